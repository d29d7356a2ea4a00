"""``ffn demo``: the paper's comparison at small scale, on the synthetic data.

Four models are trained with the same data, schedule and seed: a TSM at 16 frames (TSM-16, which
is also Separated Training's 16-frame model), ST-4 and ST-8 (TSMs trained alone at 4 and at 8
frames), and the FFN on 4/8/16 frames. All are evaluated at 2..20 frames: the FFN on its nearest
branch, Separated Training as its nearest model (the fair any-frame baseline: three models, each
used at the counts nearest its own). ``--seeds K`` repeats the whole comparison over seeds
``0..K-1`` and reports the mean and the min..max of every cell. A model is evaluated at its best
checkpoint (the highest validation top-1, averaged over its branches), as the official TSM and FFN
training scripts report it, rather than at its last epoch (docs/design.md §7).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import config_path, load_config
from .data import num_classes
from .engine.evaluate import accuracy_by_frames
from .engine.factory import load_trained
from .engine.rundir import write_atomic, writing
from .engine.trainer import fit
from .models import nearest_branch
from .report import Results, markdown_table, write_results

FFN_FRAMES = (4, 8, 16)
EVAL_FRAMES = list(range(2, 21))
COST_FRAMES = FFN_FRAMES


@dataclass(frozen=True)
class Model:
    name: str  # its run folder, out/seed<S>/<name>
    label: str
    overrides: tuple[str, ...]


# The settings are the shipped config `demo` (ffn/configs/demo.toml): small enough for a 2-core CPU,
# big enough to show the effect. The class is the speed of three bouncing shapes (ffn.data.synthetic),
# so a model that learnt per-frame displacements at 16 frames misreads the larger ones it sees at 4.
TSM16_FRAMES = FFN_FRAMES[-1]
TSM16 = Model("tsm16", "TSM-16", (f"model.frames=[{TSM16_FRAMES}]", "model.weight_alteration=false"))
ST = tuple(Model(f"st{t}", f"ST-{t}", (f"model.frames=[{t}]", "model.weight_alteration=false"))
           for t in FFN_FRAMES[:-1]) + (TSM16,)  # Separated Training: one TSM per FFN branch count
FFN = Model("ffn", "FFN 4/8/16", (f"model.frames=[{','.join(map(str, FFN_FRAMES))}]",))
MODELS = (TSM16, *ST[:-1], FFN)
# the rows of the comparison
TSM_ROW, ST_ROW, FFN_ROW = "TSM, trained at 16", "ST, nearest of 4/8/16", "FFN, trained at 4/8/16"
RUN_FILE = "demo.json"  # a model's finished part of the demo: what --resume reuses


def run_demo(out: Path, overrides: list[str] = (), seeds: int = 1, resume: bool = False) -> dict:
    """Train and evaluate every model of :data:`MODELS` for seeds ``0..seeds-1`` into
    ``out/seed<S>/<name>`` and write ``report.md``, ``results.*`` (the comparison; mean and min..max
    over seeds), ``seeds.json`` (every model, every seed) and the plot into ``out``. With ``resume``,
    a model whose run finished with the same settings is not trained again."""
    start = time.perf_counter()
    runs = {m.name: [] for m in MODELS}  # name -> one record per seed
    for seed in range(seeds):
        for m in MODELS:
            runs[m.name].append(train_and_evaluate(m, seed, out, overrides, resume))
    cfg = load_config(config_path("demo"), list(overrides))
    per_seed = [comparison({m.name: runs[m.name][s]["results"] for m in MODELS}) for s in range(seeds)]
    summary = summarise(per_seed)
    paths = write_results(summary, out, "Synthetic motion speed: top-1 vs inference frames",
                          chance=100 / num_classes(cfg.data))
    with writing(out / "seeds.json"):
        write_atomic(out / "seeds.json", json.dumps(runs, indent=1).encode())
    costs = cost_table(out, runs, cfg.data.size)
    minutes = (time.perf_counter() - start) / 60
    body = f"{markdown_table(summary)}\n\n{verdicts(per_seed)}\n\n{costs}"
    (out / "report.md").write_text(
        f"# ffn demo\n\nTop-1 accuracy (%) on {cfg.data.synthetic.val_videos} synthetic validation videos, "
        f"{seed_words(seeds)}, each model at its best checkpoint. {machine()}; {minutes:.1f} minutes in all "
        f"(with --resume, only what ran now).\n\n{body}\n\nPlot: {paths['png']}\n")
    print(body)
    print(f"{minutes:.1f} min; wrote {out / 'report.md'} and {paths['png']}")
    return summary


def train_and_evaluate(m: Model, seed: int, out: Path, overrides: list[str], resume: bool) -> dict:
    """``{"results", "train_minutes", "parameters", "settings"}`` of model ``m`` at ``seed``, also
    written to its run folder's :data:`RUN_FILE`; reused from there with ``resume`` when its settings
    are the same."""
    folder = out / f"seed{seed}" / m.name
    settings = [*m.overrides, f"train.seed={seed}", *overrides]
    record_path = folder / RUN_FILE
    if resume and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            print(f"{m.label}, seed {seed}: finished before, reused ({record_path})", flush=True)
            record["results"] = {int(n): v for n, v in record["results"].items()}
            return record
    cfg = load_config(config_path("demo"), [*settings, f"train.out={folder}"])
    began = time.perf_counter()
    fit(cfg, overwrite=True)  # a model not reused starts over
    train_minutes = (time.perf_counter() - began) / 60
    model, cfg = load_trained(folder / "best.pt")
    with torch.no_grad():
        results = accuracy_by_frames(model, cfg.data, EVAL_FRAMES, torch.device("cpu"))
    record = {"settings": settings, "train_minutes": train_minutes,
              "parameters": sum(p.numel() for p in model.parameters()), "results": results}
    with writing(record_path):
        write_atomic(record_path, json.dumps(record, indent=1).encode())
    return record


def comparison(results: dict[str, dict[int, dict]]) -> Results:
    """One seed's rows: TSM-16, Separated Training (at each count, the ST model nearest to it) and
    the FFN, from every model's accuracy by frame count."""
    nearest = {n: ST[nearest_branch(FFN_FRAMES, n)].name for n in EVAL_FRAMES}
    return {TSM_ROW: results[TSM16.name],
            ST_ROW: {n: results[nearest[n]][n] for n in EVAL_FRAMES},
            FFN_ROW: results[FFN.name]}


def summarise(per_seed: list[Results]) -> Results:
    """Mean of every cell over seeds, with ``top1_min``/``top1_max`` where there are several."""
    summary: Results = {}
    for row in per_seed[0]:
        summary[row] = {}
        for n in per_seed[0][row]:
            cells = [r[row][n] for r in per_seed]
            top1 = [c["top1"] for c in cells]
            entry = {"top1": statistics.fmean(top1), "top5": statistics.fmean(c["top5"] for c in cells),
                     "videos": cells[0]["videos"], "skipped": max(c["skipped"] for c in cells)}
            if len(cells) > 1:
                entry.update(top1_min=min(top1), top1_max=max(top1))
            summary[row][n] = entry
    return summary


def verdicts(per_seed: list[Results]) -> str:
    """FFN against ST at each branch count (at 16, ST's model is the TSM-16), claimed only where the
    seeds' ranges do not overlap."""
    lines = ["FFN against the baselines at the FFN's branch counts (top-1 %, "
             f"{seed_words(len(per_seed))}):", ""]
    for n in FFN_FRAMES:
        ffn = [r[FFN_ROW][n]["top1"] for r in per_seed]
        base = [r[ST_ROW][n]["top1"] for r in per_seed]
        name = f"ST-{n}" + (" (the TSM-16)" if n == TSM16_FRAMES else "")
        gap = statistics.fmean(ffn) - statistics.fmean(base)
        if len(per_seed) == 1:
            word = "one seed: no claim"
        elif min(ffn) > max(base):
            word = "FFN above in every seed's range"
        elif max(ffn) < min(base):
            word = "FFN below in every seed's range"
        else:
            word = "the ranges overlap: no claim"
        lines.append(f"- {n} frames, FFN vs {name}: {statistics.fmean(ffn):.1f} vs {statistics.fmean(base):.1f} "
                     f"({gap:+.1f}; {spread(ffn)} vs {spread(base)}): {word}")
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    return f"{values[0]:.1f}" if len(values) == 1 else f"{min(values):.1f}..{max(values):.1f}"


def seed_words(seeds: int) -> str:
    return "one seed (0)" if seeds == 1 else f"mean (min..max) over seeds 0..{seeds - 1}"


def machine() -> str:
    from ffn_kernels.info import cpu_model

    return (f"CPU {cpu_model()}, ISA {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


def cost_table(out: Path, runs: dict[str, list[dict]], size: int) -> str:
    """Parameters stored, training minutes and inference cost per clip (GFLOPs, ms on this CPU) of
    the FFN against Separated Training's three models, from seed 0's checkpoints."""
    ffn, _ = load_trained(out / "seed0" / FFN.name / "best.pt")
    st = {m.name: load_trained(out / "seed0" / m.name / "best.pt")[0] for m in ST}
    st_params = sum(runs[m.name][0]["parameters"] for m in ST)
    ffn_params = runs[FFN.name][0]["parameters"]

    def minutes(name):
        return statistics.fmean(r["train_minutes"] for r in runs[name])

    lines = [
        "| | FFN | Separated Training (ST-4 + ST-8 + ST-16) |", "|---|---:|---:|",
        f"| parameters stored | {ffn_params / 1e6:.3f} M | {st_params / 1e6:.3f} M "
        f"({st_params / ffn_params:.2f}x) |",
        f"| training minutes (mean per seed) | {minutes(FFN.name):.1f} | "
        f"{sum(minutes(m.name) for m in ST):.1f} ({' + '.join(f'{minutes(m.name):.1f}' for m in ST)}) |",
        "", f"Inference per clip ({size}x{size} frames, batch 1, median of 20 on this CPU): the FFN's "
        "adjustable compute.", "",
        "| frames | GFLOPs | FFN ms | ST model ms |", "|---:|---:|---:|---:|"]
    for n in COST_FRAMES:
        clip = torch.randn(1, n, 3, size, size)
        st_model = st[ST[nearest_branch(FFN_FRAMES, n)].name]
        lines.append(f"| {n} | {gflops(ffn, clip):.3f} | {milliseconds(ffn, clip):.1f} | "
                     f"{milliseconds(st_model, clip):.1f} |")
    return "\n".join(lines)


def gflops(model: torch.nn.Module, clip: torch.Tensor) -> float:
    """Convolution and matmul GFLOPs of one forward (multiply and add counted apart; the elementwise
    work of BN, shift and WA is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(clip)
    return counter.get_total_flops() / 1e9


def milliseconds(model: torch.nn.Module, clip: torch.Tensor, repeats: int = 20) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(clip)  # warm-up
        for _ in range(repeats):
            began = time.perf_counter()
            model(clip)
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)
