"""Start-up cost of kpipe commands next to a bare interpreter, and the build rows of issue 13, in one run.

    nice python bench/startup.py [--runs N] [--no-build]

Prints one line per row of issue 13's table that concerns a kpipe command's own cost, each beside its
baseline from the same run and its target:

  kpipe --version                            CPU  <= 2x   `python3 -c pass`
  kpipe kernels parse R (table, --json)      CPU  <= 2.5x `python3 -c pass`
  kpipe artifacts list (table, --json)       CPU  <= 2.5x `python3 -c pass`
  kpipe rollout status last (table, --json)  CPU  <= 2.5x `python3 -c pass`
  cache-hit `kpipe build`                    wall <= 3x   `python3 -c pass`
  `kpipe build` over the same make over SSH  wall overhead < 15 % (bench/build_overhead.py's case)

Every kpipe run alternates with its baseline so that machine load hits both alike; medians are printed
(CPU = user + system of the child, the steadier figure on a shared machine). The commands run piped, as
scripts run them, in a scratch workspace holding one artifact and one finished rollout of two hosts (so
the tables have rows); the build rows use a loopback sshd build host and the kernel headers installed
here (bench/build_overhead.py; --no-build leaves them out). kpipe runs with compiled bytecode, as an
installed kpipe does. The fleet rows of the table (`kpipe fleet facts` against ansible and OpenSSH) are
bench/fleet.py's.

`kernels parse`, `artifacts list` and `rollout status` are parsed without Typer when their argv is plain
(kpipe.cli.fast; anything else goes to Typer), and kpipe.toml's settings classes generate no code at
import (kpipe.settings._Frozen). Last run: see docs/scale.md, "Start-up and `kpipe build`".
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from build_overhead import (  # noqa: E402  (beside this file)
    RECIPE,
    alternate,
    bench_env,
    build_in_process,
    cache_hit_paths,
    cli_path,
    direct_path,
    make_workspace,
)

RELEASE = "5.10.0-amd64-UOS"  # parser test data

# (label, argv after `kpipe`, target ratio of CPU to `python3 -c pass`)
COMMANDS: list[tuple[str, list[str], float]] = [
    ("kpipe --version", ["--version"], 2.0),
    (f"kpipe kernels parse {RELEASE}", ["kernels", "parse", RELEASE], 2.5),
    (f"kpipe kernels parse {RELEASE} --json", ["kernels", "parse", RELEASE, "--json"], 2.5),
    ("kpipe artifacts list", ["artifacts", "list"], 2.5),
    ("kpipe artifacts list --json", ["artifacts", "list", "--json"], 2.5),
    ("kpipe rollout status last", ["rollout", "status", "last"], 2.5),
    ("kpipe rollout status last --json", ["rollout", "status", "last", "--json"], 2.5),
]

SEED = f"""\
from pathlib import Path
from kpipe.artifacts import add_artifact
from kpipe.store import open_store
from kpipe.rollout.journal import Journal
store = open_store('.kpipe')
Path('demo.ko').write_bytes(b'\\x7fELF demo')
add_artifact(store, Path('demo.ko'), kernel='{RELEASE}', module_name='livepatch-demo', recipe='demo')
j = Journal(store)
plan = {{'target': 'all', 'target_kind': 'artifact', 'waves': [['web1']], 'assignments': {{}},
        'excluded': [{{'host': 'db1', 'reason': 'kernel not in the catalog', 'code': 'no-artifact'}}], 'options': {{}}}}
j.set_state(j.create(plan, {{}}, target='all'), 'completed')
"""

PASS = [sys.executable, "-c", "pass"]


def run_once(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(CPU seconds of the child, wall seconds, stdout) of one run; exits when the command fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr[-1500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, r.stdout


class Row:
    """One measured row: the command's and the baseline's median CPU and wall, and its target."""

    def __init__(self, label: str, target: float, on: str = "cpu", what: str = "x python3 -c pass") -> None:
        self.label, self.target, self.on, self.what = label, target, on, what
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.base_cpu: list[float] = []
        self.base_wall: list[float] = []

    def measure(self, argv: list[str], env: dict[str, str], runs: int, cwd: Path | None = None,
                check: Callable[[str], bool] | None = None) -> Row:
        """N runs of argv, each after one run of `python3 -c pass`."""
        for _ in range(runs):
            c, w, _ = run_once(PASS, env, cwd)
            self.base_cpu.append(c)
            self.base_wall.append(w)
            c, w, out = run_once(argv, env, cwd)
            if check is not None and not check(out):
                sys.exit(f"{self.label}: unexpected output:\n{out[-1500:]}")
            self.cpu.append(c)
            self.wall.append(w)
        return self

    def line(self) -> str:
        cpu, wall = statistics.median(self.cpu), statistics.median(self.wall)
        bcpu, bwall = statistics.median(self.base_cpu), statistics.median(self.base_wall)
        ratio = cpu / bcpu if self.on == "cpu" else wall / bwall
        verdict = "met" if ratio <= self.target else "MISSED"
        return (f"{self.label:46} {cpu * 1000:7.0f} {wall * 1000:8.0f} | {bcpu * 1000:8.0f} {bwall * 1000:9.0f} | "
                f"{ratio:6.2f}x {self.on:4} {'<= ' + format(self.target, 'g') + 'x':>7} {verdict}")


HEADER = (f"{'measure':46} {'CPU ms':>7} {'wall ms':>8} | {'pass CPU':>8} {'pass wall':>9} | "
          f"{'ratio':>7} {'of':4} {'target':>7}")


def build_rows(env: dict[str, str], runs: int) -> list[str]:
    """The cache-hit `kpipe build` row and the overhead of `kpipe build` over the same make over SSH, timed by
    bench/build_overhead.py's one alternating loop and its paths."""
    import kenv
    from kpipe import recipes
    from kpipe.workspace import load_workspace
    from sshd import SshdServer, keygen

    found = kenv.discover()
    tmp = Path(tempfile.mkdtemp(prefix="kpipe-startup-build-"))
    server = SshdServer.start(tmp / "sshd", client_key=keygen(tmp / "id_ed25519"))
    try:
        ws_root = make_workspace(tmp, server, found.release, str(found.headers))
        ws = load_workspace(ws_root)
        spec = recipes.render(ws, RECIPE, found.release)
        build_in_process(ws, spec)  # the artifact the cache hits answer with; warms the page cache
        benv = {**env, "KPIPE_WORKSPACE": str(ws_root)}
        paths = cache_hit_paths(benv, found.release)
        paths["cache-hit kpipe build"]()  # the first hit renders and remembers its inputs (kpipe.builder.memo)
        times = alternate(runs, paths, quiet=True)
        hit = Row("cache-hit kpipe build", 3.0, on="wall")
        hit.base_wall, hit.base_cpu = ([t[i] for t in times["python3 -c pass"]] for i in (0, 1))
        hit.wall, hit.cpu = ([t[i] for t in times["cache-hit kpipe build"]] for i in (0, 1))
        # overhead: the same make over one OpenSSH connection (the floor) vs `kpipe build --force` as a process
        times = alternate(max(1, min(runs, 3)), {"direct": direct_path(tmp, server, ws, spec),
                                                 "kpipe": cli_path(benv, found.release)}, quiet=True)
        d, k = min(w for w, _ in times["direct"]), min(w for w, _ in times["kpipe"])
        over = k / d - 1
        overhead = (f"{'kpipe build vs make over SSH (min wall)':46} {'':>7} {k * 1000:8.0f} | {'make:':>8} "
                    f"{d * 1000:9.0f} | {100 * over:+6.1f} % wall {'< 15 %':>7} {'met' if over < 0.15 else 'MISSED'}")
        return [hit.line(), overhead]
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-build", action="store_true", help="leave out the build rows (sshd, kernel headers)")
    args = ap.parse_args()
    env = bench_env()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kpipe-startup-") as tmp:
        ws = Path(tmp)
        (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
        run_once([sys.executable, "-c", SEED], env, ws)  # the store, one artifact, one rollout
        kpipe = [sys.executable, "-m", "kpipe"]
        for argv in (c[1] for c in COMMANDS):  # compile and cache the bytecode of every command's modules
            run_once([*kpipe, *argv], env, ws)
        for label, argv, target in COMMANDS:
            lines.append(Row(label, target).measure([*kpipe, *argv], env, args.runs, ws).line())
            print(lines[-1], file=sys.stderr, flush=True)  # progress; the table follows on stdout
    if not args.no_build:
        lines += build_rows(env, max(3, args.runs // 3))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; medians of {args.runs} runs "
          "(build rows: fewer); the fleet rows are bench/fleet.py's")
    print(HEADER)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
