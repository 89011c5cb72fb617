"""Start-up cost of kpipe commands next to a bare interpreter, in one run.

    python bench/startup.py [--runs N]

For each command, N runs alternating with `python3 -c pass` so that machine
load hits both alike; prints the median CPU time (user + system of the child,
the steadier figure on a shared machine) and wall time, and the ratio to
`python3 -c pass` beside its target:

  kpipe --version                         CPU <= 2x   python3 -c pass
  kpipe kernels parse R                   CPU <= 2.5x python3 -c pass
  kpipe artifacts list / rollout status   CPU <= 2.5x python3 -c pass

The commands run in a scratch workspace (an empty store), so what is measured
is start-up, imports and the store opening, not the user's data.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS: list[tuple[str, list[str], float]] = [
    ("kpipe --version", ["--version"], 2.0),
    ("kpipe kernels parse 5.10.0-amd64-UOS", ["kernels", "parse", "5.10.0-amd64-UOS"], 2.5),
    ("kpipe artifacts list", ["artifacts", "list"], 2.5),
    ("kpipe rollout status last", ["rollout", "status", "last"], 2.5),
]


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds of the child, wall seconds) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KPIPE_WORKSPACE", None)
    with tempfile.TemporaryDirectory(prefix="kpipe-startup-") as tmp:
        ws = Path(tmp)
        (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
        kpipe = [sys.executable, "-m", "kpipe"]
        subprocess.run([*kpipe, "artifacts", "list"], cwd=ws, env=env, capture_output=True, check=False)  # store made
        print(f"{'command':40} {'CPU ms':>8} {'wall ms':>8} {'baseline CPU ms':>16} {'ratio':>6} {'target':>7}")
        for label, argv, target in COMMANDS:
            cpu, wall, base_cpu = [], [], []
            for _ in range(args.runs):
                c, w = _run([sys.executable, "-c", "pass"], ws, env)
                base_cpu.append(c)
                c, w = _run([*kpipe, *argv], ws, env)
                cpu.append(c)
                wall.append(w)
            ratio = statistics.median(cpu) / statistics.median(base_cpu)
            verdict = "met" if ratio <= target else "MISSED"
            print(f"{label:40} {statistics.median(cpu) * 1000:8.0f} {statistics.median(wall) * 1000:8.0f} "
                  f"{statistics.median(base_cpu) * 1000:16.0f} {ratio:5.2f}x {'<=' + str(target) + 'x':>7} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
