""".ci/gpu_check.py without a GPU: the dry run prints every step's exact command and needs
nothing (not even torch), the runner keeps going past failures and timeouts and respects the time
budget, the judges and tool lookups behave, and the env probe runs (the checks it runs are tests:
tests/test_gpu_runtime.py). Also the ptxas gate of .ci/cuda_build.sh on synthetic ptxas reports."""

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu_check.py"

gc = load_script(".ci/gpu_check.py")


def dry_run(tmp_path, *extra):
    """The dry run in a fresh interpreter where importing torch or triton fails."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['triton'] = None; "
            f"sys.argv = {[str(SCRIPT), '--dry-run', '--out', str(tmp_path / 'res'), *extra]!r}; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = "/usr/bin:/bin"  # no nvcc, no compute-sanitizer
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_dry_run_prints_every_step_without_torch_or_a_gpu(tmp_path):
    r = dry_run(tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    steps = re.findall(r"^\[\d+\] (\w+) ", out, re.M)
    assert steps == ["env", "build", "test_cuda", "test_triton", "memcheck", "racecheck",
                     "sync_debug", "sync_debug_triton", "cuda_graph", "cuda_graph_triton",
                     "bench_fp32", "bench_bf16_cl"]
    cmds = dict(zip(steps, re.findall(r"^    (.+)$", out, re.M)))
    # the build: present architecture only, all cores, in place, no pip
    assert "setup.py build_ext --inplace" in cmds["build"] and "pip" not in cmds["build"]
    assert "FFN_KERNELS_CUDA_ARCHS='<compute capability" in cmds["build"]
    assert f"MAX_JOBS={gc.cores()}" in cmds["build"]
    assert "FFN_KERNELS_FORCE_CUDA=1" in cmds["build"]
    # the op tests' cuda and triton cases on the GPU: a missing CUDA kernel fails, Triton not
    # interpreted
    op_tests = " ".join(f"tests/test_{name}.py" for name in (
        "shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter", "temporal_conv",
        "freq_layer_norm", "freq_batch_norm3d", "shared_rows", "backends"))
    assert "pytest" in cmds["test_cuda"] and cmds["test_cuda"].endswith(f"-m cuda {op_tests}")
    assert "FFN_KERNELS_EXPECT_CUDA=1" in cmds["test_cuda"]
    assert cmds["test_triton"].endswith(f"-m triton {op_tests}")
    assert "-u TRITON_INTERPRET" in cmds["test_triton"]
    # the run-time checks are pytest tests marked cuda, one per step, selected by node id
    def runtime(test):
        return "-m pytest -q -p no:cacheprovider -rs -m cuda " + shlex.quote(
            f"tests/test_gpu_runtime.py::{test}")

    # sanitizers over the op sweep, only our kernels checked
    for tool in ("memcheck", "racecheck"):
        assert f"--tool {tool}" in cmds[tool]
        assert cmds[tool].endswith(runtime("test_ops_under_sanitizer"))
        assert "--error-exitcode 1" in cmds[tool] and "kns=ffn_kernels" in cmds[tool]
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in cmds[tool]
    assert cmds["sync_debug"].endswith(runtime("test_sync_free_training_step[cuda]"))
    assert cmds["sync_debug_triton"].endswith(runtime("test_sync_free_training_step[triton]"))
    assert cmds["cuda_graph"].endswith(runtime("test_cuda_graph_training_step[cuda]"))
    assert cmds["cuda_graph_triton"].endswith(runtime("test_cuda_graph_training_step[triton]"))
    assert cmds["env"].endswith(".ci/gpu_check.py --child env")
    # the benchmark: fp32, and bf16 channels_last, into the given folder
    res = tmp_path / "res"
    assert "bench/run.py --device cuda" in cmds["bench_fp32"]
    assert cmds["bench_fp32"].endswith(f"--dtype float32 --out {res / 'bench-fp32'}")
    assert cmds["bench_bf16_cl"].endswith(
        f"--dtype bfloat16 --channels-last --out {res / 'bench-bf16-channels_last'}")
    assert "budget 480 s" in out
    assert not res.exists(), "a dry run writes nothing"


def test_dry_run_selection_and_arch(tmp_path):
    r = dry_run(tmp_path, "--only", "build,memcheck", "--arch", "9.0", "--jobs", "16")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^\[\d+\] (\w+) ", r.stdout, re.M) == ["build", "memcheck"]
    assert "FFN_KERNELS_CUDA_ARCHS=9.0 MAX_JOBS=16" in r.stdout and "(sm_90)" in r.stdout
    r = dry_run(tmp_path, "--only", "nonsense")
    assert r.returncode != 0 and "unknown steps" in r.stderr


def py_step(name, code, timeout=60, phase="checks", **kw):
    return gc.Step(name, name, [sys.executable, "-c", code], timeout, phase, **kw)


def test_runner_keeps_going_past_failures_and_timeouts(tmp_path):
    steps = [
        py_step("first", "print('setup done')", phase="setup"),
        py_step("good", "import os; print('value', os.environ['GC_TEST'])", env={"GC_TEST": "7"}),
        py_step("bad", "import sys; print('broken'); sys.exit(3)"),
        py_step("slow", "import time; time.sleep(60)", timeout=1),
        py_step("unset", "import os, sys; sys.exit('GC_DROP' in os.environ)", unset=("GC_DROP",)),
        py_step("after", "print('bench ran')", phase="bench"),
    ]
    lines = []
    runner = gc.Runner(tmp_path, time.monotonic() + 120, base_env={**os.environ, "GC_DROP": "1"},
                       echo=lines.append)
    t0 = time.monotonic()
    results = gc.run_plan(steps, runner)
    assert time.monotonic() - t0 < 30, "the timed-out step was not killed"
    status = {r.name: r.status for r in results}
    assert status == {"first": "ok", "good": "ok", "bad": "FAIL", "slow": "TIMEOUT", "unset": "ok",
                      "after": "ok"}
    assert [r.name for r in results] == [s.name for s in steps]
    assert "value 7" in (tmp_path / "logs" / "good.log").read_text()
    note = {r.name: r.note for r in results}
    assert "exit 3" in note["bad"] and "broken" in note["bad"]
    assert (tmp_path / "logs" / "bad.log").read_text().startswith("$ ")  # the command heads the log
    text = gc.table(results, "title")
    assert text.splitlines()[0] == "title" and "| slow " in text and "TIMEOUT" in text
    # serial mode gives the same results
    results = gc.run_plan(steps, gc.Runner(tmp_path, time.monotonic() + 120, echo=lines.append,
                                           base_env={**os.environ, "GC_DROP": "1"}), serial=True)
    assert {r.name: r.status for r in results} == status


def test_runner_budget_and_env_hook(tmp_path):
    steps = [py_step("env", "print('{}')", phase="setup"), py_step("x", "pass")]
    seen = []

    def on_env(result):
        seen.append(result.status)
        return [steps[0], py_step("replaced", "pass")]

    results = gc.run_plan(steps, gc.Runner(tmp_path, time.monotonic() + 60, echo=lambda s: None),
                          on_env=on_env)
    assert seen == ["ok"] and [r.name for r in results] == ["env", "replaced"]
    results = gc.run_plan(steps, gc.Runner(tmp_path, time.monotonic() + 1, echo=lambda s: None))
    assert {r.status for r in results} == {"skipped"}
    results = gc.Runner(tmp_path, time.monotonic() + 60, echo=lambda s: None).run_group(
        [gc.Step("missing", "", [str(tmp_path / "no-such-binary")], 10, "checks")])
    assert results[0].status == "FAIL" and "could not start" in results[0].note


def test_judges(tmp_path):
    assert gc.pytest_judge(0, "... 12 passed, 3 skipped in 4.0s\n", tmp_path) == (
        True, "12 passed, 3 skipped in 4.0s")
    assert gc.pytest_judge(1, "1 failed, 2 passed in 1s", tmp_path)[0] is False
    assert gc.pytest_judge(0, "no tests ran in 0.1s", tmp_path)[0] is False
    # a GPU check that skips on the GPU machine fails its step
    assert gc.gpu_test_judge(0, "1 passed in 3.0s", tmp_path) == (True, "1 passed in 3.0s")
    ok, note = gc.gpu_test_judge(0, "SKIPPED [1] needs a CUDA device\n1 skipped in 0.5s", tmp_path)
    assert not ok and "skipped" in note
    judge = gc.bench_judge("bench-fp32")
    assert judge(1, "ModuleNotFoundError: No module named 'matplotlib'", tmp_path) == (False, "")
    (tmp_path / "bench-fp32").mkdir()
    for f in ("results.json", "results.csv"):
        (tmp_path / "bench-fp32" / f).write_text("{}")
    ok, note = judge(1, "ModuleNotFoundError: No module named 'matplotlib'", tmp_path)
    assert ok and "matplotlib missing" in note
    assert judge(0, "", tmp_path)[0] and not judge(1, "RuntimeError: boom", tmp_path)[0]


def test_toolkit_lookup(tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "compute-sanitizer").mkdir()
    for exe in (home / "bin" / "nvcc", home / "compute-sanitizer" / "compute-sanitizer"):
        exe.write_text("#!/bin/sh\necho '#$ TOP=" + str(home) + "'\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    assert gc.find_cuda_home({"CUDA_HOME": str(home), "PATH": "/usr/bin"}) == str(home)
    # a launcher nvcc elsewhere on PATH: the toolkit is the TOP that --dryrun reports
    launcher = tmp_path / "launch"
    launcher.mkdir()
    (launcher / "nvcc").write_text(f"#!/bin/sh\necho '#$ TOP={home}' >&2\n")
    (launcher / "nvcc").chmod(0o755)
    assert gc.find_cuda_home({"PATH": str(launcher)}) == str(home.resolve())
    assert gc.find_sanitizer(str(home), {"PATH": "/usr/bin"}) == str(
        home / "compute-sanitizer" / "compute-sanitizer")
    assert gc.find_sanitizer(str(tmp_path / "none"), {"PATH": str(tmp_path)}) is None
    assert gc.sanitizer_kernel_filter("  --kernel-name <filter>") == ["--kernel-name", "kns=ffn_kernels"]
    assert gc.sanitizer_kernel_filter("  --kernel-regex <filter>") == ["--kernel-regex", "kns=ffn_kernels"]
    assert gc.sanitizer_kernel_filter("") == []


def test_env_probe_runs(capsys):
    """The env step's probe (the checks' code runs on CPU in tests/test_gpu_runtime.py)."""
    assert gc.child_env() in (0, 1)
    assert '"torch"' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The ptxas gate of .ci/cuda_build.sh
# ---------------------------------------------------------------------------------------------

# frame_map_kernel<1, BnBwdOp<T, false>>(BnBwdOp<T, false>, FrameLayout, Geom), T = float / double
ENTRY = ("_ZN11ffn_kernels4cuda16frame_map_kernelILi1ENS0_7BnBwdOpI{}Lb0EEEEEvT0_"
         "NS0_11FrameLayoutENS0_4GeomE")


def ptxas_log(kernels):
    """A ptxas -v report: (mangled name, arch, registers, spill store bytes) per kernel."""
    lines = []
    for name, arch, regs, spill in kernels:
        lines += [f"ptxas info    : Compiling entry function '{name}' for '{arch}'",
                  f"ptxas info    : Function properties for {name}",
                  f"    0 bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads",
                  f"ptxas info    : Used {regs} registers, used 0 barriers, 400 bytes cmem[0]"]
    return "\n".join(lines) + "\n"


def run_gate(tmp_path, kernels):
    script = (ROOT / ".ci" / "cuda_build.sh").read_text()
    gate = re.search(r"<<'PTXAS_GATE'.*?\n(.*?)\nPTXAS_GATE\n", script, re.S).group(1)
    (tmp_path / "gate.py").write_text(gate)
    (tmp_path / "ptxas.log").write_text(ptxas_log(kernels))
    return subprocess.run([sys.executable, str(tmp_path / "gate.py"), str(tmp_path / "ptxas.log")],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt (binutils)")
def test_ptxas_gate(tmp_path):
    f, d = ENTRY.format("f"), ENTRY.format("d")  # float and double kernels
    r = run_gate(tmp_path, [(f, "sm_90", 64, 0), (d, "sm_90", 128, 8)])
    assert r.returncode == 0, r.stderr
    assert "2 kernels, max 128 registers" in r.stdout and ": pass" in r.stdout
    assert "fp64: spill allowed" in r.stdout
    r = run_gate(tmp_path, [(f, "sm_80", 40, 4)])
    assert r.returncode == 1 and "spills" in r.stderr and "BnBwdOp<float, false>" in r.stderr
    r = run_gate(tmp_path, [(d, "sm_90", 129, 0)])
    assert r.returncode == 1 and "129 registers > 128" in r.stderr
    r = run_gate(tmp_path, [])
    assert r.returncode == 1 and "no ptxas report" in r.stderr
