#!/usr/bin/env python3
"""One-command GPU validation of ffn_kernels: build, tests, sanitizers, sync-free and CUDA-graph
training steps, and the benchmark, on a machine with one NVIDIA GPU and PyTorch, Triton and nvcc
preinstalled. Nothing is downloaded (no pip, no network).

    python .ci/gpu_check.py --out bench/results/<gpu>    # everything, about 8 min on an H100
    python .ci/gpu_check.py --dry-run                    # print the plan (the exact commands)
    python .ci/gpu_check.py --only build,test_cuda       # a subset (steps by name)

This file is the runner: the plan, the processes, timeouts, budget and summary. What the steps
check is pytest tests marked `cuda` (they skip without a GPU): the op tests' cases, and
tests/test_gpu_runtime.py (the op sweep run under compute-sanitizer, the sync-free and the
CUDA-graph training steps), each selected by node id with `python -m pytest -m cuda`.

Steps, each in its own process with its own timeout (a failure does not stop the others):

  env              python / torch / triton / CUDA / nvcc / compute-sanitizer versions, the GPU
  build            the extension for this GPU's architecture only (FFN_KERNELS_CUDA_ARCHS from
                   torch.cuda.get_device_capability), MAX_JOBS = all cores,
                   `setup.py build_ext --inplace` (no pip: nothing is resolved or fetched)
  test_cuda        the cuda cases of the op tests (pytest -m cuda) on the GPU (a missing CUDA
                   kernel fails it)
  test_triton      the triton cases of the op tests (pytest -m triton) on the GPU
                   (TRITON_INTERPRET unset)
  memcheck         compute-sanitizer memcheck over every op's forward and backward, NCHW and
                   channels_last, fp32 and fp16, train and eval, vectorised and scalar paths,
                   through ffn_kernels.ops with the cuda backend (test_ops_under_sanitizer)
  racecheck        compute-sanitizer racecheck over the same
  sync_debug       one fused FFNResNet training step under torch.cuda.set_sync_debug_mode("error")
                   (cuda backend; sync_debug_triton: the Triton backend;
                   test_sync_free_training_step)
  cuda_graph       one training step captured in a CUDA graph (warm-up on a side stream first),
                   replayed and compared with the same step run eagerly (cuda_graph_triton: Triton;
                   test_cuda_graph_training_step)
  bench_fp32       bench/run.py --device cuda --dtype float32
  bench_bf16_cl    bench/run.py --device cuda --dtype bfloat16 --channels-last

After the build, the checks run side by side (16 cores; each test process gets a share of the
threads); the benchmarks run last, one at a time, alone on the GPU. A global budget (--budget,
default 480 s) caps the whole run: a step that would start past it is skipped, one that would run
past it is cut short. Results go to --out: summary.md / summary.json (the table printed at the
end), env.json, logs/<step>.log (full output of every step), ptxas.txt (the build's register
report), bench-fp32/ and bench-bf16-channels_last/ (bench/run.py's results.json, results.csv, results.png).
The exit status is 1 if any step failed or timed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
DEFAULT_BUDGET_S = 480
ARCH_PLACEHOLDER = "<compute capability of cuda:0, e.g. 9.0>"
SANITIZER_PLACEHOLDER = "<compute-sanitizer next to nvcc>"


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    name: str
    what: str
    cmd: list[str]
    timeout_s: float
    phase: str  # "setup" (one at a time), "checks" (side by side), "bench" (one at a time)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the environment
    unset: tuple[str, ...] = ()  # removed from the environment
    # (returncode, log text, out dir) -> (ok, note); default: ok iff returncode == 0
    judge: Optional[Callable[[int, str, Path], tuple[bool, str]]] = None

    def command_line(self) -> str:
        prefix = [f"-u {k}" for k in self.unset] + [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return ("env " + " ".join(prefix) + " " if prefix else "") + shlex.join(self.cmd)


@dataclasses.dataclass
class Context:
    python: str
    out: Path
    arch: str  # "9.0", or ARCH_PLACEHOLDER in a dry run without --arch
    jobs: int
    cuda_home: Optional[str]
    sanitizer: str  # path, or SANITIZER_PLACEHOLDER
    kernel_filter: list[str]  # compute-sanitizer flags that restrict checking to our kernels
    cpath: list[str]  # CUDA library headers shipped in pip wheels (cusparse.h, ...)
    bench_compile_model: bool = False
    dry: bool = False


# the tests with a backend parameter (tests/conftest.py: each backend's cases carry its mark)
OP_TESTS = ["tests/test_shift_alter.py", "tests/test_freq_batch_norm.py",
            "tests/test_bn_add_relu_shift_alter.py", "tests/test_temporal_conv.py",
            "tests/test_freq_layer_norm.py", "tests/test_freq_batch_norm3d.py",
            "tests/test_shared_rows.py", "tests/test_backends.py"]
# the run-time checks: tests marked cuda, each step runs one (tests/test_gpu_runtime.py)
RUNTIME_TESTS = "tests/test_gpu_runtime.py"


def pytest_judge(returncode: int, log: str, out: Path) -> tuple[bool, str]:
    """pytest passes; the note counts passed / skipped (a run that skipped its GPU tests says so)."""
    counts = re.findall(r"\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|"
                        r"warnings?)(?:, \d+ \w+)* in [\d.]+s", log)
    note = counts[-1] if counts else ""
    if returncode == 0 and re.search(r"\b0 passed|no tests ran", log):
        return False, note or "no test ran"
    return returncode == 0, note


def bench_judge(folder: str) -> Callable[[int, str, Path], tuple[bool, str]]:
    """bench/run.py wrote results.json and results.csv; a missing matplotlib (no PNG) is a note,
    not a failure, since the numbers are all there."""

    def judge(returncode: int, log: str, out: Path) -> tuple[bool, str]:
        have = all((out / folder / f).is_file() for f in ("results.json", "results.csv"))
        if returncode == 0:
            return (True, f"{folder}/") if have else (False, f"no results in {folder}/")
        if have and "No module named 'matplotlib'" in log:
            return True, f"{folder}/ (no results.png: matplotlib missing)"
        return False, ""

    return judge


def gpu_test_judge(returncode: int, log: str, out: Path) -> tuple[bool, str]:
    """pytest_judge, and the selected GPU test ran: on the GPU machine a skip is a failure (its
    reason is in the log: no CUDA device, no CUDA kernels after a failed build, ...)."""
    ok, note = pytest_judge(returncode, log, out)
    if ok and re.search(r"\b[1-9]\d* skipped", note):
        return False, f"{note} (skipped on the GPU machine: the reason is in the log)"
    return ok, note


def last_line_judge(returncode: int, log: str, out: Path) -> tuple[bool, str]:
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    return returncode == 0, (lines[-1][:120] if lines else "")


def threads_env(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def plan(ctx: Context) -> list[Step]:
    py, out = ctx.python, ctx.out
    child = [py, str(SCRIPT.relative_to(ROOT)), "--child"]
    # checks run side by side: give the CPU-heavy test processes most of the cores
    share = max(1, ctx.jobs // 4)
    build_env = {
        "FFN_KERNELS_FORCE_CUDA": "1",
        "FFN_KERNELS_CUDA_ARCHS": ctx.arch,
        "MAX_JOBS": str(ctx.jobs),
        "FFN_KERNELS_PTXAS_VERBOSE": "1",
    }
    if ctx.cuda_home:
        build_env["CUDA_HOME"] = ctx.cuda_home
    if ctx.cpath:
        build_env["CPATH"] = os.pathsep.join(ctx.cpath + [p for p in [os.environ.get("CPATH")] if p])
    sanitize_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", **threads_env(2)}
    sanitize = [ctx.sanitizer, "--error-exitcode", "1", "--print-limit", "20", *ctx.kernel_filter]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]

    def gpu_test(name: str) -> list[str]:  # one test of tests/test_gpu_runtime.py, by node id
        return pytest + ["-m", "cuda", f"{RUNTIME_TESTS}::{name}"]

    build = [py, "setup.py", "build_ext", "--inplace"]
    if ctx.arch == ARCH_PLACEHOLDER and not ctx.dry:  # the env step found no GPU
        build = [py, "-c", "raise SystemExit('no GPU architecture to build for: the env step found "
                 "no CUDA device (see logs/env.log); pass --arch to build anyway')"]
    bench = [py, "bench/run.py", "--device", "cuda"]
    if not ctx.bench_compile_model:
        bench.append("--no-compile-model")
    steps = [
        Step("env", "versions and the GPU", child + ["env"], 90, "setup", judge=last_line_judge),
        Step("build", "build the extension for this GPU's architecture only"
             + ("" if ctx.arch == ARCH_PLACEHOLDER else f" (sm_{ctx.arch.replace('.', '')})"),
             build, 360, "setup", env=build_env),
        Step("test_cuda", "the op tests' cuda cases on the GPU",
             pytest + ["-m", "cuda", *OP_TESTS],
             300, "checks", env={"FFN_KERNELS_EXPECT_CUDA": "1", **threads_env(2 * share)},
             judge=pytest_judge),
        Step("test_triton", "the op tests' triton cases on the GPU",
             pytest + ["-m", "triton", *OP_TESTS],
             300, "checks", env=threads_env(share), unset=("TRITON_INTERPRET",), judge=pytest_judge),
        *[Step(tool, f"compute-sanitizer {tool}: every op fwd+bwd, NCHW and channels_last",
               sanitize + ["--tool", tool] + gpu_test("test_ops_under_sanitizer"), 300, "checks",
               env=sanitize_env, judge=gpu_test_judge) for tool in ("memcheck", "racecheck")],
        *[Step(name + ("" if backend == "cuda" else "_triton"), f"{what}, {backend} backend",
               gpu_test(f"{test}[{backend}]"), 180, "checks", env=threads_env(2),
               unset=() if backend == "cuda" else ("TRITON_INTERPRET",), judge=gpu_test_judge)
          for name, test, what in (
              ("sync_debug", "test_sync_free_training_step",
               "FFNResNet training step under set_sync_debug_mode('error')"),
              ("cuda_graph", "test_cuda_graph_training_step",
               "training step captured in a CUDA graph vs eager"))
          for backend in ("cuda", "triton")],
        Step("bench_fp32", "bench/run.py fp32, NCHW",
             bench + ["--dtype", "float32", "--out", str(out / "bench-fp32")], 240, "bench",
             unset=("TRITON_INTERPRET",), judge=bench_judge("bench-fp32")),
        Step("bench_bf16_cl", "bench/run.py bf16, channels_last",
             bench + ["--dtype", "bfloat16", "--channels-last", "--out", str(out / "bench-bf16-channels_last")],
             240, "bench", unset=("TRITON_INTERPRET",), judge=bench_judge("bench-bf16-channels_last")),
    ]
    return steps


# ---------------------------------------------------------------------------------------------
# Finding the toolkit (without importing torch)
# ---------------------------------------------------------------------------------------------


def find_cuda_home(env: Optional[dict] = None) -> Optional[str]:
    """The toolkit nvcc really runs from: $CUDA_HOME if it has bin/nvcc, else the TOP that
    `nvcc --dryrun` reports (/usr/local/bin/nvcc may be a launcher script), else nvcc's
    parent folder, else /usr/local/cuda if it exists."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return home
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "-", "-o", os.devnull],
                                 input="", capture_output=True, text=True, timeout=30)
            m = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
            if m and os.path.isdir(m.group(1).strip()):
                return str(Path(m.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def find_sanitizer(cuda_home: Optional[str], env: Optional[dict] = None) -> Optional[str]:
    env = os.environ if env is None else env
    candidates = []
    if cuda_home:
        candidates += [os.path.join(cuda_home, "bin", "compute-sanitizer"),
                       os.path.join(cuda_home, "compute-sanitizer", "compute-sanitizer")]
    found = shutil.which("compute-sanitizer", path=env.get("PATH"))
    if found:
        candidates.append(found)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def sanitizer_kernel_filter(help_text: str) -> list[str]:
    """Flags that make compute-sanitizer check only our kernels (their mangled names contain
    `ffn_kernels`; Triton's are `_..._kernel`s of ffn_kernels/triton, not CUDA-compiled ones):
    `--kernel-name kns=ffn_kernels` in current releases, `--kernel-regex` in older ones, none if
    neither is known (then every kernel is checked, slower but still valid)."""
    if "--kernel-name" in help_text:
        return ["--kernel-name", "kns=ffn_kernels"]
    if "--kernel-regex" in help_text:
        return ["--kernel-regex", "kns=ffn_kernels"]
    return []


def wheel_cuda_includes() -> list[str]:
    """Include folders of the CUDA libraries that ship in pip wheels (nvidia/cu13/include,
    nvidia/<lib>/include): a compiler-only toolkit lacks cusparse.h and friends, which torch's
    headers include."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        for inc in sorted(Path(base).glob("*/include")):
            if inc.is_dir():
                found.append(str(inc))
    return found


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | FAIL | TIMEOUT | skipped
    seconds: float
    note: str = ""


class Runner:
    """Runs steps with per-step timeouts under a global deadline; every step's output goes to
    logs/<name>.log; a step's process group is killed when it times out."""

    def __init__(self, out: Path, deadline: float, base_env: Optional[dict] = None,
                 cwd: Path = ROOT, echo: Callable[[str], None] = print):
        self.out, self.deadline, self.cwd, self.echo = out, deadline, cwd, echo
        self.base_env = dict(os.environ if base_env is None else base_env)
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def log_path(self, step: Step) -> Path:
        return self.out / "logs" / f"{step.name}.log"

    def _start(self, step: Step):
        left = self.deadline - time.monotonic()
        if left < 5:
            return None, 0.0
        env = {k: v for k, v in self.base_env.items() if k not in step.unset}
        env.update(step.env)
        env["PYTHONPATH"] = os.pathsep.join([str(self.cwd)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path(step), "w")
        log.write(f"$ {step.command_line()}\n\n")
        log.flush()
        try:
            proc = subprocess.Popen(step.cmd, cwd=self.cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            log.close()
            return exc, 0.0
        return (proc, log, time.monotonic()), min(step.timeout_s, left)

    def _finish(self, step: Step, returncode: Optional[int], started: float) -> Result:
        seconds = time.monotonic() - started
        text = self.log_path(step).read_text(errors="replace")
        if returncode is None:
            return Result(step.name, "TIMEOUT", seconds, f"killed after {seconds:.0f} s")
        judge = step.judge or (lambda rc, log, out: (rc == 0, ""))
        try:
            ok, note = judge(returncode, text, self.out)
        except Exception as exc:  # a judge bug must not hide the step's own result
            ok, note = returncode == 0, f"(judge failed: {exc})"
        if not ok and not note:
            tail = [ln for ln in text.strip().splitlines() if ln.strip()]
            note = f"exit {returncode}: {tail[-1].strip()[:100] if tail else ''}"
        return Result(step.name, "ok" if ok else "FAIL", seconds, note)

    def run_group(self, steps: list[Step]) -> list[Result]:
        """Start every step of the group, wait for all (each under its own timeout)."""
        running, results = {}, {}
        for step in steps:
            handle, limit = self._start(step)
            if handle is None:
                results[step.name] = Result(step.name, "skipped", 0.0, "out of time budget")
            elif isinstance(handle, Exception):
                results[step.name] = Result(step.name, "FAIL", 0.0, f"could not start: {handle}")
            else:
                running[step.name] = (step, *handle, limit)
                self.echo(f"-- {step.name}: started (timeout {limit:.0f} s, log "
                          f"{self.log_path(step).relative_to(self.out)})")
        try:
            while running:
                time.sleep(0.2)
                for name, (step, proc, log, started, limit) in list(running.items()):
                    rc = proc.poll()
                    if rc is None and time.monotonic() - started < limit:
                        continue
                    if rc is None:
                        self._kill(proc)
                    log.close()
                    results[name] = r = self._finish(step, rc, started)
                    del running[name]
                    self.echo(f"-- {name}: {r.status} in {r.seconds:.1f} s {r.note}".rstrip())
        finally:  # interrupted (Ctrl-C): leave no step running
            for step, proc, log, *_ in running.values():
                self._kill(proc)
                log.close()
        return [results[s.name] for s in steps]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


def run_plan(steps: list[Step], runner: Runner, serial: bool = False,
             on_env: Optional[Callable[[Result], list[Step]]] = None) -> list[Result]:
    """Setup steps one by one (after `env`, `on_env` may rebuild the rest of the plan), then the
    checks side by side (one by one with serial=True), then the benchmarks one by one."""
    results: list[Result] = []
    i = 0
    while i < len(steps) and steps[i].phase == "setup":
        r = runner.run_group([steps[i]])[0]
        results.append(r)
        if steps[i].name == "env" and on_env is not None:
            steps = steps[: i + 1] + [s for s in on_env(r) if s.name != "env"]
        i += 1
    rest = steps[i:]
    checks = [s for s in rest if s.phase == "checks"]
    if serial:
        for s in checks:
            results += runner.run_group([s])
    elif checks:
        results += runner.run_group(checks)
    for s in rest:
        if s.phase != "checks":
            results += runner.run_group([s])
    return results


def table(results: list[Result], title: str = "") -> str:
    width = max([len(r.name) for r in results] + [4])
    lines = [title] if title else []
    lines.append(f"| {'step':<{width}} | status  | seconds | note")
    lines.append(f"|{'-' * (width + 2)}|---------|---------|-----")
    for r in results:
        lines.append(f"| {r.name:<{width}} | {r.status:<7} | {r.seconds:7.1f} | {r.note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The env probe (python .ci/gpu_check.py --child env); the checks are tests (tests/test_gpu_runtime.py)
# ---------------------------------------------------------------------------------------------


def child_env() -> int:
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "executable": sys.executable}
    ok = True
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                    cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            major, minor = torch.cuda.get_device_capability(0)
            info.update(gpu=p.name, capability=f"{major}.{minor}", sms=p.multi_processor_count,
                        memory_GiB=round(p.total_memory / 2**30, 1))
        else:
            ok = False
            info["error"] = "torch.cuda.is_available() is False"
    except Exception as exc:
        ok = False
        info["torch"] = f"import failed: {exc}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"import failed: {exc}"
    for mod in ("ninja", "matplotlib", "pytest"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception:
            info[mod] = None
    print(json.dumps(info, indent=1))
    print(f"{info.get('gpu', 'no GPU')} sm {info.get('capability', '?')}, torch {info.get('torch')}"
          f" (CUDA {info.get('torch_cuda')}), triton {info.get('triton')}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-check"),
                   help="results folder (default bench/results/gpu-check)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs nothing")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    p.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated step names to leave out")
    p.add_argument("--arch", default="", help="CUDA architecture to build for, e.g. 9.0 "
                   "(default: torch.cuda.get_device_capability())")
    p.add_argument("--jobs", type=int, default=cores(), help="build jobs (default: all cores)")
    p.add_argument("--serial", action="store_true", help="run the checks one at a time")
    p.add_argument("--bench-compile-model", action="store_true",
                   help="also time torch.compile of the model in the benchmark (slow to compile)")
    p.add_argument("--python", default=sys.executable, help="interpreter for every step")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


def select(steps: list[Step], only: str, skip: str) -> list[Step]:
    names = {s.name for s in steps}
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    unwanted = {n.strip() for n in skip.split(",") if n.strip()}
    unknown = (wanted | unwanted) - names
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; steps: {', '.join(s.name for s in steps)}")
    return [s for s in steps if (not wanted or s.name in wanted) and s.name not in unwanted]


def make_context(args, dry: bool) -> Context:
    out = Path(args.out).resolve()
    if dry:
        cuda_home = os.environ.get("CUDA_HOME") or "<CUDA_HOME: the toolkit nvcc runs from>"
        return Context(args.python, out, args.arch or ARCH_PLACEHOLDER, args.jobs, cuda_home,
                       SANITIZER_PLACEHOLDER, ["--kernel-name", "kns=ffn_kernels"], [],
                       args.bench_compile_model, dry=True)
    cuda_home = find_cuda_home()
    sanitizer = find_sanitizer(cuda_home)
    help_text = ""
    if sanitizer:
        try:
            help_text = subprocess.run([sanitizer, "--help"], capture_output=True, text=True,
                                       timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    return Context(args.python, out, args.arch or ARCH_PLACEHOLDER, args.jobs, cuda_home,
                   sanitizer or "compute-sanitizer", sanitizer_kernel_filter(help_text),
                   wheel_cuda_includes(), args.bench_compile_model)


def print_plan(steps: list[Step], ctx: Context, budget: float) -> None:
    print(f"GPU validation plan (dry run: nothing is run). Results: {ctx.out}; "
          f"budget {budget:.0f} s; checks run side by side after the build, benchmarks last.")
    for i, s in enumerate(steps, 1):
        print(f"\n[{i}] {s.name} ({s.phase}, timeout {s.timeout_s:.0f} s): {s.what}")
        print(f"    {s.command_line()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child != "env":
            raise SystemExit(f"unknown child {args.child!r}")
        return child_env()

    ctx = make_context(args, dry=args.dry_run)
    steps = select(plan(ctx), args.only, args.skip)
    if args.dry_run:
        print_plan(steps, ctx, args.budget)
        return 0

    start = time.monotonic()
    ctx.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: results in {ctx.out}, budget {args.budget:.0f} s, {ctx.jobs} cores")
    print(f"CUDA_HOME={ctx.cuda_home}  compute-sanitizer={ctx.sanitizer}  nvcc: "
          f"{tool_version([os.path.join(ctx.cuda_home or '', 'bin', 'nvcc'), '--version'])}")
    runner = Runner(ctx.out, start + args.budget)
    env_info: dict = {}

    def on_env(r: Result) -> list[Step]:
        log = runner.log_path(Step("env", "", [], 0, "setup")).read_text(errors="replace")
        m = re.search(r"^\{.*?^\}", log, re.S | re.M)
        if m:
            try:
                env_info.update(json.loads(m.group(0)))
            except ValueError:
                pass
        env_info.update(cuda_home=ctx.cuda_home, compute_sanitizer=ctx.sanitizer,
                        sanitizer_filter=" ".join(ctx.kernel_filter), cpath=ctx.cpath,
                        nvcc=tool_version([os.path.join(ctx.cuda_home or "", "bin", "nvcc"), "--version"]),
                        jobs=ctx.jobs)
        (ctx.out / "env.json").write_text(json.dumps(env_info, indent=1) + "\n")
        if not args.arch and env_info.get("capability"):
            ctx.arch = env_info["capability"]
        return select(plan(ctx), args.only, args.skip)

    if ctx.arch == ARCH_PLACEHOLDER and not any(s.name == "env" for s in steps):
        raise SystemExit("--arch is needed when the env step is skipped")
    results = run_plan(steps, runner, serial=args.serial,
                       on_env=on_env if any(s.name == "env" for s in steps) else None)
    build_log = runner.log_path(Step("build", "", [], 0, "setup"))
    if build_log.is_file():
        ptxas = [ln for ln in build_log.read_text(errors="replace").splitlines()
                 if ln.startswith("ptxas") or "bytes stack frame" in ln]
        (ctx.out / "ptxas.txt").write_text("\n".join(ptxas) + "\n")
    total = time.monotonic() - start
    arch = "?" if ctx.arch == ARCH_PLACEHOLDER else ctx.arch
    title = (f"gpu_check on {env_info.get('gpu', '?')} (sm {arch}), torch "
             f"{env_info.get('torch', '?')}, triton {env_info.get('triton', '?')}: {total:.0f} s")
    text = table(results, title)
    print("\n" + text)
    (ctx.out / "summary.md").write_text(text + "\n")
    (ctx.out / "summary.json").write_text(json.dumps(
        {"env": env_info, "seconds": total, "budget_s": args.budget,
         "steps": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    failed = [r.name for r in results if r.status in ("FAIL", "TIMEOUT")]
    skipped = [r.name for r in results if r.status == "skipped"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (logs in {ctx.out / 'logs'})")
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
