"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

import pytest

DOCS = [Path(__file__).resolve().parent.parent / "README.md",
        *sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc):
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{doc.name} example", "exec"), namespace)
