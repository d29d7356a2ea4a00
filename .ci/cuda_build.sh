#!/usr/bin/env bash
# CI proof of the CUDA build (no GPU needed): in a venv with the CUDA build of torch, compile the
# extension with the CUDA kernels from a copy of the repository (the CPU build in the work tree is
# left alone), keep ptxas's register/spill report, import the extension and run the cuda cases of
# the op tests (pytest -m cuda: the registration test must pass; the GPU tests skip without a
# device).
#
# Knobs: FFN_CUDA_VENV (default /tmp/ffn-cuda-venv, reused when it already has torch 2.14.1),
# FFN_CUDA_LOG_DIR (default /tmp/ffn-cuda-build: build.log, ptxas.log, ptxas-summary.txt),
# FFN_KERNELS_CUDA_ARCHS (default "8.0;9.0"), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${FFN_CUDA_VENV:-/tmp/ffn-cuda-venv}
LOGS=${FFN_CUDA_LOG_DIR:-/tmp/ffn-cuda-build}
TORCH_VERSION=2.14.1
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# 1. venv with the CUDA 13 build of torch (on this machine's disk) and the build tools.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  step "creating $VENV with torch==$TORCH_VERSION (CUDA build)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" ninja numpy setuptools wheel pytest
else
  step "reusing $VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q ninja numpy setuptools wheel pytest  # no-ops when present

# 2. A copy of the repository's files (tracked, plus untracked ones git does not ignore).
SRC=$(mktemp -d /tmp/ffn-cuda-src.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
  | tar --null -T - -cf - | tar -xf - -C "$SRC"
step "copied the repository to $SRC"

# 3. The CUDA toolkit: the folder nvcc really runs from (/usr/local/bin/nvcc may be a launcher
#    script), and the CUDA library headers that ship in torch's nvidia-* wheels (cusparse.h,
#    cublas_v2.h, ... are not in a compiler-only toolkit).
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC=$(command -v nvcc || true)
  [ -n "$NVCC" ] || { echo "nvcc not found on PATH" >&2; exit 1; }
  TOP=$(echo | "$NVCC" --dryrun -x cu -c - -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  CUDA_HOME=$(cd "${TOP:-$(dirname "$(readlink -f "$NVCC")")/..}" && pwd -P)
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
NV_INC=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
if [ -n "$NV_INC" ] && [ -d "$NV_INC" ]; then
  export CPATH="$NV_INC${CPATH:+:$CPATH}"
fi
step "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1)); CPATH=${CPATH:-}"

# 4. Build with the CUDA kernels (forced: there is no GPU here), ptxas report kept.
mkdir -p "$LOGS"
step "building (FFN_KERNELS_CUDA_ARCHS=${FFN_KERNELS_CUDA_ARCHS:-8.0;9.0}, MAX_JOBS=${MAX_JOBS:-2})"
build_start=$(date +%s)
(cd "$SRC" && FFN_KERNELS_FORCE_CUDA=1 FFN_KERNELS_CUDA_ARCHS="${FFN_KERNELS_CUDA_ARCHS:-8.0;9.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" FFN_KERNELS_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace) \
  > "$LOGS/build.log" 2>&1 || { tail -n 80 "$LOGS/build.log"; echo "CUDA build failed (log: $LOGS/build.log)" >&2; exit 1; }
build_s=$(( $(date +%s) - build_start ))
grep -E "^ptxas|bytes stack frame" "$LOGS/build.log" > "$LOGS/ptxas.log" || true
# One line per kernel and architecture (registers, spills, stack; demangled), then the gate: no
# kernel may use more than 128 registers, and none may spill, except fp64 kernels (`double` in
# the demangled name), which may: double division and sqrt call ptxas's slow-path subroutines,
# whose calling convention saves registers to the stack, and fp64 is the correctness path, not
# a performance one. Stack without spills (local arrays) is reported, not gated.
gate_rc=0
"$PY" - "$LOGS/ptxas.log" > "$LOGS/ptxas-summary.txt" <<'PTXAS_GATE' || gate_rc=$?
import re, subprocess, sys
MAX_REGS = 128
lines = open(sys.argv[1]).read().splitlines()
rows = {}  # (function, arch) -> [registers, stack, spill stores, spill loads]
entry, arch, props = None, None, None
for line in lines:
    m = re.search(r"Compiling entry function '(\S+?)' for '(sm_\w+?)'", line)
    if m:
        entry, arch = m.groups()
        rows.setdefault((entry, arch), [None, 0, 0, 0])
        continue
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        props = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and props and arch:
        row = rows.setdefault((props, arch), [None, 0, 0, 0])  # non-inlined device functions too
        row[1:] = [int(v) for v in m.groups()]
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and entry and rows.get((entry, arch), [0])[0] is None:
        rows[(entry, arch)][0] = int(m.group(1))
keys = list(rows)
names = subprocess.run(["c++filt"], input="\n".join(k[0] for k in keys), capture_output=True,
                       text=True).stdout.splitlines() if keys else []
if len(names) != len(keys):
    names = [k[0] for k in keys]
spills, fp64_spilling, failures = 0, 0, []
for (name, arch), demangled in zip(keys, names):
    regs, stack, st, ld = rows[(name, arch)]
    short = re.sub(r"ffn_kernels::cuda::|\(anonymous namespace\)::|c10::", "", demangled)
    spills += st + ld
    verdict = ""
    if regs is not None and regs > MAX_REGS:
        failures.append(f"{arch} {short[:200]}: {regs} registers > {MAX_REGS}")
        verdict += "  FAIL: registers"
    if st + ld:
        if re.search(r"\bdouble\b", demangled):
            fp64_spilling += 1
            verdict += "  (fp64: spill allowed)"
        else:
            failures.append(f"{arch} {short[:200]}: spills ({st} B stores, {ld} B loads)")
            verdict += "  FAIL: spill"
    regs_s = "  ?" if regs is None else f"{regs:>3}"
    print(f"{arch} regs={regs_s} stack={stack:>3}B spill_st={st}B spill_ld={ld}B  {short[:200]}{verdict}")
if not rows:
    failures.append("no ptxas report in the build log (was -Xptxas=-v passed?)")
max_regs = max((r[0] for r in rows.values() if r[0] is not None), default=0)
print(f"# {len(rows)} kernels, max {max_regs} registers, total spill bytes {spills} "
      f"({fp64_spilling} fp64 kernels spill: allowed); gate (<= {MAX_REGS} registers, no spill "
      f"outside fp64): {'FAIL' if failures else 'pass'}")
for f in failures:
    print(f"ptxas gate: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
PTXAS_GATE
step "built in ${build_s}s; ptxas: $(tail -1 "$LOGS/ptxas-summary.txt") (report: $LOGS/ptxas-summary.txt)"
cat "$LOGS/ptxas-summary.txt"
if [ "$gate_rc" -ne 0 ]; then
  echo "ptxas gate FAILED: the kernels marked FAIL above (report: $LOGS/ptxas-summary.txt)" >&2
  exit 1
fi

# 5. Import the extension and run the CUDA tests (a missing CUDA kernel fails them).
cd "$SRC"
export FFN_KERNELS_EXPECT_CUDA=1
"$PY" -W ignore -m ffn_kernels.info
"$PY" -c "import ffn_kernels.backend as b, sys; sys.exit(0 if b.extension_has_cuda() else 'extension has no CUDA kernels')"
step "running the op tests' cuda cases (pytest -m cuda)"
"$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_shift_alter.py \
  tests/test_freq_batch_norm.py tests/test_bn_add_relu_shift_alter.py tests/test_temporal_conv.py \
  tests/test_freq_layer_norm.py tests/test_freq_batch_norm3d.py tests/test_shared_rows.py \
  tests/test_backends.py
step "CUDA build check done in $(( $(date +%s) - start ))s (build ${build_s}s)"
