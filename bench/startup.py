"""Start-up cost of kpipe commands next to a bare interpreter, in one run.

    python bench/startup.py [--runs N]

For each command, N runs alternating with `python3 -c pass` so that machine
load hits both alike; prints the median CPU time (user + system of the child,
the steadier figure on a shared machine) and wall time of each, and the CPU
ratio to `python3 -c pass` beside its target (issue 13):

  kpipe --version                         CPU <= 2x   python3 -c pass
  kpipe kernels parse R                   CPU <= 2.5x python3 -c pass
  kpipe artifacts list / rollout status   CPU <= 2.5x python3 -c pass

The commands run in a scratch workspace holding one finished rollout (so
`rollout status last` renders a real one), so what is measured is start-up,
imports and the store opening, not the user's data. The --json forms are
listed too: they must not load Rich's tables (tests/test_startup_budget.py).
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
RELEASE = "5.10.0-amd64-UOS"

COMMANDS: list[tuple[str, list[str], float]] = [
    ("kpipe --version", ["--version"], 2.0),
    (f"kpipe kernels parse {RELEASE}", ["kernels", "parse", RELEASE], 2.5),
    (f"kpipe kernels parse {RELEASE} --json", ["kernels", "parse", RELEASE, "--json"], 2.5),
    ("kpipe artifacts list", ["artifacts", "list"], 2.5),
    ("kpipe artifacts list --json", ["artifacts", "list", "--json"], 2.5),
    ("kpipe rollout status last", ["rollout", "status", "last"], 2.5),
    ("kpipe rollout status last --json", ["rollout", "status", "last", "--json"], 2.5),
]

SEED = """\
from kpipe.store import open_store
from kpipe.rollout.journal import Journal
j = Journal(open_store('.kpipe'))
plan = {'target': 'all', 'target_kind': 'artifact', 'waves': [], 'assignments': {}, 'excluded': [], 'options': {}}
j.set_state(j.create(plan, {}, target='all'), 'completed')
"""


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(CPU seconds of the child, wall seconds, exit code) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        check=False).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in [k for k in env if k.startswith(("KPIPE_", "_KPIPE_"))]:
        env.pop(k)
    with tempfile.TemporaryDirectory(prefix="kpipe-startup-") as tmp:
        ws = Path(tmp)
        (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
        subprocess.run([sys.executable, "-c", SEED], cwd=ws, env=env, check=True)  # store made, one rollout
        kpipe = [sys.executable, "-m", "kpipe"]
        print(f"{'command':46} {'CPU ms':>7} {'wall ms':>8} | {'pass CPU':>8} {'pass wall':>9} | "
              f"{'CPU ratio':>9} {'wall ratio':>10} {'target':>7}")
        for label, argv, target in COMMANDS:
            cpu, wall, base_cpu, base_wall = [], [], [], []
            for _ in range(args.runs):
                c, w, _rc = _run([sys.executable, "-c", "pass"], ws, env)
                base_cpu.append(c)
                base_wall.append(w)
                c, w, rc = _run([*kpipe, *argv], ws, env)
                if rc != 0:
                    print(f"{label}: exit {rc}", file=sys.stderr)
                    return 1
                cpu.append(c)
                wall.append(w)
            m_cpu, m_wall = statistics.median(cpu), statistics.median(wall)
            b_cpu, b_wall = statistics.median(base_cpu), statistics.median(base_wall)
            ratio = m_cpu / b_cpu
            verdict = "met" if ratio <= target else "MISSED"
            print(f"{label:46} {m_cpu * 1000:7.0f} {m_wall * 1000:8.0f} | {b_cpu * 1000:8.0f} {b_wall * 1000:9.0f} | "
                  f"{ratio:8.2f}x {m_wall / b_wall:9.2f}x {'<=' + str(target) + 'x':>7} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
