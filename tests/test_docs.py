"""The docs work as a reader uses them: every Python block of the README and docs/*.md runs on its
own, in a fresh process outside the source tree, and the README's `ffn` commands run in order in
one folder, each using what the commands before it created (shortened by overrides, see TINY).

`.ci/wheel_smoke.sh` runs this module again from `/` in a venv holding only the built wheel, so
what these examples import is the installed package, not the checkout."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(doc: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced ```python block of ``doc``."""
    text = doc.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)]


BLOCKS = [(doc, line, code) for doc in DOCS for line, code in python_blocks(doc)]


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.parametrize("doc,line,code", BLOCKS, ids=[f"{d.name}:{n}" for d, n, _ in BLOCKS])
def test_python_block_runs_alone(doc, line, code, tmp_path):
    run([sys.executable, "-c", code], tmp_path, timeout=600)


# The README's runs, made seconds long: few tiny videos, one short epoch (appended, so they win)
TINY = ["train.epochs=1", "train.max_steps=2", "data.workers=0", "data.batch_size=2",
        "data.synthetic.train_videos=8", "data.synthetic.val_videos=6"]


def readme_commands() -> list[list[str]]:
    """The README's shell lines that start with ``ffn`` (4-space indented code), in order."""
    lines = re.findall(r"^    (ffn \S.*)$", (ROOT / "README.md").read_text(), flags=re.M)
    return [shlex.split(line.split("  #")[0]) for line in lines]


def test_readme_commands_run_in_order(tmp_path):
    commands = readme_commands()
    assert [c[1] for c in commands].count("train") >= 2 and "eval" in [c[1] for c in commands]
    for command in commands:
        args = [sys.executable, "-m", "ffn", *command[1:]]
        if command[1] in ("train", "demo"):
            args += TINY
        run(args, tmp_path, timeout=900)
    assert (tmp_path / "runs/eval/accuracy.png").is_file()
