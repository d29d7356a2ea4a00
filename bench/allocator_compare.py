"""The model section's training step under glibc's allocator, for comparison with the run's own
(mimalloc by default, see ``ffn.allocator``): a child process with ``FFN_ALLOCATOR=system`` times
the same steps, so both allocators' numbers come from this one benchmark run."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ffn import allocator


def system_allocator_rows(args, task: str, key: dict) -> list[dict]:
    if allocator.active() == "system":
        return []  # this run already is the system-allocator run
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).with_name("run.py")), "--model", "--train-only",
               "--out", out, "--device", args.device, "--dtype", args.dtype,
               "--depth", str(args.depth), "--arch", args.arch, "--width", str(args.width), "--size", str(args.size), "--clips", str(args.clips),
               "--classes", str(args.classes), "--repeats", str(args.repeats)]
        if args.quick:
            cmd.append("--quick")
        print(f"\n(training step under the system allocator, in a child process: {' '.join(cmd)})",
              flush=True)
        subprocess.run(cmd, check=True, env=allocator.system_env(), stdout=subprocess.DEVNULL)
        rows = json.loads((Path(out) / "results.json").read_text())["model"]
    return [{**key, **r, "task": f"{task}, system allocator"} for r in rows if r["task"] == task]
