#!/usr/bin/env bash
# The package as a user installs it, not as the editable checkout the test suite runs on:
#   1. an isolated `pip install .` stops within seconds saying to use --no-build-isolation (it must
#      never fetch another torch to build against);
#   2. sdist -> wheel, built against the installed torch; the sdist holds every source the build
#      needs, and the wheel requires exactly that torch release;
#   3. the wheel (+ its train and onnx extras, pytest) in a fresh venv, then from `/`: `ffn --help`,
#      the fused ops from the installed extension, and tests/test_docs.py (every README/docs Python
#      block alone, the README's `ffn train/eval/demo/diagnose` commands in order).
# Run by .ci/run after the README's test command, in the venv that command installed into.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_RELEASE="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"

echo "== 1. isolated build: refused at once"
python -m venv "$WORK/iso"
start=$SECONDS
if out="$(timeout 300 "$WORK/iso/bin/python" -m pip install "$ROOT" 2>&1)"; then
    echo "FAIL: an isolated pip install . succeeded"; exit 1
fi
grep -q "pip install --no-build-isolation" <<<"$out" || { echo "$out" | tail -20; echo "FAIL: no hint"; exit 1; }
echo "refused after $((SECONDS - start)) s with: $(grep -m1 'ffn-kernels: no torch' <<<"$out" | sed 's/^ *//')"

echo "== 2. sdist -> wheel"
python -m build --sdist --no-isolation -o "$WORK/dist" "$ROOT" >/dev/null
python -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$WORK"/dist/*.tar.gz
WHEEL="$(ls "$WORK"/dist/*.whl)"
python - "$WHEEL" "$TORCH_RELEASE" <<'EOF'
import re, sys, zipfile
wheel, release = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
requires = [l for l in meta.splitlines() if re.match(r"Requires-Dist: torch($|[ =<>!~;])", l)]
assert requires == [f"Requires-Dist: torch=={release}"], requires
for need in ("ffn/engine/__init__.py", "ffn/configs/demo.toml", "ffn_kernels/triton/kernels.py"):
    assert need in names, f"{need} missing from the wheel"
assert any(n.startswith("ffn_kernels/_C") and n.endswith(".so") for n in names), "no extension"
print(f"{wheel.rsplit('/', 1)[-1]}: {len(names)} files, {requires[0]}")
EOF

echo "== 3. the wheel in a fresh venv, used from /"
python -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL[train,onnx]" pytest
cd /
PATH="$WORK/venv/bin:$PATH"
ffn --help >/dev/null
python - "$ROOT" <<'EOF'
import sys
import torch
import ffn, ffn_kernels
from ffn_kernels import FrameLayout, backend_name, ops
root = sys.argv[1]
for module in (ffn, ffn_kernels):
    assert not module.__file__.startswith(root), f"{module.__name__} imported from the checkout"
assert backend_name("cpu") == "cpu", backend_name("cpu")  # the compiled kernels, not a fallback
layout = FrameLayout(clips=1, frames=(2, 4), rows=(0, 1))
x = torch.randn(layout.total_frames, 8, 3, 3)
y = ops.shift_alter(x, layout, torch.zeros(2, 8))
print(f"ffn_kernels.ops from {ffn_kernels.__file__}: shift_alter -> {tuple(y.shape)}")
EOF
python -m pytest -q -p no:cacheprovider "$ROOT/tests/test_docs.py"
