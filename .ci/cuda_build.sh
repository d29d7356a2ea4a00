#!/usr/bin/env bash
# CI proof of the CUDA build (no GPU needed): in a venv with the CUDA build of torch, compile the
# extension with the CUDA kernels from a copy of the repository (the CPU build in the work tree is
# left alone), keep ptxas's register/spill report, import the extension and run tests/test_cuda.py
# (the registration test must pass; the GPU tests skip without a device).
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
# One line per kernel and architecture: registers, spills, stack; demangled.
"$PY" - "$LOGS/ptxas.log" > "$LOGS/ptxas-summary.txt" <<'EOF'
import re, subprocess, sys
lines = open(sys.argv[1]).read().splitlines()
rows, name, arch = [], None, None
for line in lines:
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        name, arch = m.groups()
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        rows.append([name, arch, None, *m.groups()])
    m = re.search(r"Used (\d+) registers", line)
    if m and rows and rows[-1][0] == name and rows[-1][2] is None:
        rows[-1][2] = m.group(1)
names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                       text=True).stdout.splitlines() if rows else []
spills = 0
for r, demangled in zip(rows, names):
    short = re.sub(r"ffn_kernels::cuda::|\(anonymous namespace\)::|c10::", "", demangled)
    spills += int(r[4]) + int(r[5])
    print(f"{r[1]} regs={r[2]:>3} stack={r[3]:>3}B spill_st={r[4]}B spill_ld={r[5]}B  {short[:200]}")
print(f"# {len(rows)} kernels, total spill bytes {spills}")
EOF
step "built in ${build_s}s; ptxas: $(tail -1 "$LOGS/ptxas-summary.txt") (report: $LOGS/ptxas-summary.txt)"
cat "$LOGS/ptxas-summary.txt"

# 5. Import the extension and run the CUDA tests (a missing CUDA kernel fails them).
cd "$SRC"
export FFN_KERNELS_EXPECT_CUDA=1
"$PY" -W ignore -m ffn_kernels.info
"$PY" -c "import ffn_kernels.backend as b, sys; sys.exit(0 if b.extension_has_cuda() else 'extension has no CUDA kernels')"
step "running tests/test_cuda.py"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
step "CUDA build check done in $(( $(date +%s) - start ))s (build ${build_s}s)"
