"""bench/rollout: a three-VM real-kernel rollout by kpipe vs a hand-written scp + insmod + poll loop.

    python bench/rollout.py [--rounds N] [--keep-lab WORKSPACE]
    python bench/rollout.py --simulated 1000 [--workers N] [--configs normal:batch,full:batch,normal:each]

`--simulated N` (issue 13 §3) runs no VM: a SimFleet of N real sshd hosts with simulated kernels,
a rollout with waves `1,10%,50%,100%` and no soak, driven in this process by the engine over the
SSH pool (worker processes as configured). Per wave: hosts/s; per run: journal records and
transactions per host and the share of the wall time spent inside journal transactions, for
each CONFIG: the store's synchronous pragma (normal: WAL + synchronous=NORMAL, kpipe's setting,
no fsync per commit; full: fsync of the WAL at every commit) and the journal's batching (batch:
done/failed records ride with the next intended record; each: one transaction per record).
Client CPU is the engine's process (the parent) and its worker processes; the SimFleet simulator
thread, which plays the hosts' kernels in the same process, is measured apart and not counted.
Between runs the patch is rolled back (not timed).

Boots three lab VMs (`kpipe lab up --vms 3`), builds the cmdline demo livepatch
module against the local headers, then alternates, N rounds each:

- kpipe: `kpipe rollout start ARTIFACT --waves 100% --yes` (facts, plan, preflight
  checks, stage with checksum + atomic rename, marker, insmod, transition wait,
  verification through sysfs, taint and the kernel log, probe; every step journaled),
- by hand: three parallel shells doing `scp` then `ssh insmod` then polling
  /sys/kernel/livepatch/<m>/transition until 0, then `cat /proc/cmdline`,

and, untimed between rounds, removes the patch again. Prints both medians and the
ratio (target: kpipe < 1.5x the hand loop). The VMs are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "tests" / "data" / "livepatch_demo"
TEXT = "kpipe live patch active"
MODULE = "livepatch_demo"

HAND_SCRIPT = r"""
set -e
vm_port=$1; key=$2; kh=$3; ko=$4; m=$5
SSH="ssh -i $key -p $vm_port -o StrictHostKeyChecking=yes -o UserKnownHostsFile=$kh"
SSH="$SSH -o IdentitiesOnly=yes -o LogLevel=ERROR"
scp -q -i "$key" -P "$vm_port" -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$kh" -o IdentitiesOnly=yes \
    -o LogLevel=ERROR "$ko" root@127.0.0.1:/tmp/$m.ko
$SSH root@127.0.0.1 "/sbin/insmod /tmp/$m.ko"
while [ "$($SSH root@127.0.0.1 cat /sys/kernel/livepatch/$m/transition)" != 0 ]; do sleep 0.1; done
$SSH root@127.0.0.1 cat /proc/cmdline | grep -q "kpipe live patch active"
"""

CLEAN_SCRIPT = r"""
m=$1
d=/sys/kernel/livepatch/$m
[ -d $d ] && echo 0 > $d/enabled
while [ -d $d ]; do sleep 0.1; done
/sbin/rmmod $m 2>/dev/null
rm -f /tmp/$m.ko /var/lib/kpatch/*/$m.ko
true
"""


def kp(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"kpipe {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def release() -> str:
    """The installed headers' release, discovered as the tests do (tests/kenv.py)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import kenv

    try:
        return kenv.discover().release
    except kenv.KernelEnvMissing as e:
        sys.exit(str(e))


def build(out: Path, rel: str) -> Path:
    src = out / "src"
    shutil.copytree(DEMO, src)
    c = src / "livepatch_demo.c"
    c.write_text(f'#define KPIPE_TEXT "{TEXT}"\n' + c.read_text())
    subprocess.run(["make", "-C", f"/usr/src/linux-headers-{rel}", f"M={src}", "modules"], check=True,
                   capture_output=True)
    return src / "livepatch_demo.ko"


def _load() -> str:
    """The 1-minute load average (the bench machine is shared)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def simulated(n: int, configs: list[str], workers: int, forks: int) -> None:
    """A simulated N-host rollout per config: hosts/s per wave, journal writes per host and their time share."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import resource

    import kpipe.store
    from kpipe.artifacts import add_artifact
    from kpipe.fleet.observe import pool_for
    from kpipe.rollout.journal import Journal
    from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
    from kpipe.rollout.world import engine_for
    from kpipe.transport.workers import default_workers
    from kpipe.workspace import open_workspace
    from simfleet import SimFleet, fake_module

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # this process only: a descriptor or three per host
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workers = workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="kpipe-bench-simrollout-"))
    t0 = time.monotonic()
    fleet = SimFleet(n, tmp / "fleet", prefix="r").start()
    print(f"bench/rollout --simulated: {n} sshd hosts up in {time.monotonic() - t0:.1f} s; waves 1,10%,50%,100%, "
          f"no soak, forks {forks}, workers {workers}, cores {os.cpu_count()}, load average {_load()}", flush=True)
    print("  fsync policy per config: normal = SQLite WAL + synchronous=NORMAL (kpipe's: a commit is not fsynced, "
          "the WAL is at checkpoints); full = synchronous=FULL (fsync at every commit); batch = read steps' "
          "done/failed ride with the next durable record (kpipe's); each = one transaction per record", flush=True)
    def client_cpu() -> float:
        """This process's CPU without the SimFleet simulator thread's (it runs here too, but is the hosts')."""
        return time.process_time() - fleet.simulator_cpu()

    results = []
    try:
        for i, config in enumerate(configs):
            sync, _, batching = config.partition(":")
            kpipe.store.SYNCHRONOUS = sync.upper()  # read by every new store connection
            ws = open_workspace(fleet.write_workspace(tmp / f"ws{i}", forks=forks))
            ko = tmp / f"livepatch-demo-{i}.ko"
            ko.write_bytes(fake_module(MODULE, build_id=os.urandom(20)))
            art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                               module_name="livepatch-demo", preflight={"status": "passed"})
            options = RolloutOptions(waves="1,10%,50%,100%", forks=forks, step_timeout_s=120.0, soak_s=0.0)
            views = [HostView(h.name, release=fleet.release, arch="x86_64") for h in fleet.hosts]
            plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
            journal = Journal(ws.store, batch=batching != "each")
            rid = journal.create(plan.to_dict(), options.to_dict(), target=art.id)
            marks: list[tuple[str, int, float, int, float, int, float]] = []

            def on_event(e: object, journal: Journal = journal,
                         marks: list[tuple[str, int, float, int, float, int, float]] = marks) -> None:
                kind = getattr(e, "kind", "")
                if kind in ("wave-start", "gate"):
                    st = journal.stats
                    marks.append((kind, getattr(e, "wave", 0), time.monotonic(), st.records, st.seconds,
                                  st.transactions, client_cpu()))

            engine, runner = engine_for(ws, journal, rid, on_event=on_event, pool=pool_for(ws, forks, workers))
            start, cpu0, kids0, sim0 = time.monotonic(), client_cpu(), _children_cpu(), fleet.simulator_cpu()
            try:
                s = engine.start(rid)
                wall = time.monotonic() - start
            finally:
                runner.close()  # the worker processes end here: their CPU is counted once they are reaped
            cpu = client_cpu() - cpu0
            sim = fleet.simulator_cpu() - sim0
            kids = _children_cpu() - kids0
            bad = {h: st for h, st in s.hosts.items() if st != "applied"}
            st = journal.stats
            print(f"\n{config}: {s.state} in {wall:.1f} s ({n / wall:.1f} hosts/s overall)"
                  + (f"; NOT applied: {len(bad)} ({sorted(set(bad.values()))})" if bad else ""), flush=True)
            starts = {w: m for m in marks if m[0] == "wave-start" for w in [m[1]]}
            for m in marks:
                if m[0] != "gate" or m[1] not in starts:
                    continue
                w0 = starts[m[1]]
                hosts = len(plan.waves[m[1] - 1])
                took = m[2] - w0[2]
                print(f"  wave {m[1]}: {hosts:5d} hosts in {took:7.2f} s = {hosts / took:7.1f} hosts/s; journal "
                      f"{(m[3] - w0[3]) / hosts:5.1f} records/host in {(m[5] - w0[5]) / hosts:5.1f} transactions/host,"
                      f" {1000 * (m[4] - w0[4]) / hosts:6.2f} ms/host = {100 * (m[4] - w0[4]) / took:4.1f} % of the "
                      f"wave's wall time; parent CPU {1000 * (m[6] - w0[6]) / hosts:6.1f} ms/host", flush=True)
            print(f"  whole run: {st.records / n:.1f} journal records/host, {st.transactions / n:.1f} "
                  f"transactions/host, {st.seconds:.2f} s in journal transactions = {100 * st.seconds / wall:.1f} %"
                  " of the wall time", flush=True)
            print(f"  client CPU: parent {1000 * cpu / n:.1f} ms/host, worker processes {1000 * kids / n:.1f} ms/host"
                  f" (the simulated kernels' thread, not counted: {1000 * sim / n:.1f} ms/host);"
                  f" load average {_load()}", flush=True)
            results.append({"config": config, "wall": wall, "records": st.records, "transactions": st.transactions,
                            "journal_s": st.seconds, "cpu_parent_s": cpu, "cpu_workers_s": kids,
                            "cpu_simulator_s": sim, "load": _load()})
            t1 = time.monotonic()
            engine, runner = engine_for(ws, journal, rid, pool=pool_for(ws, forks, workers))
            try:
                engine.rollback(rid)
            finally:
                runner.close()
            print(f"  (rolled back in {time.monotonic() - t1:.1f} s, not timed)", flush=True)
    finally:
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary: config, wall s, hosts/s, journal records/host, transactions/host, journal share of wall")
    for r in results:
        print(f"  {r['config']:<14} {r['wall']:7.1f} {n / r['wall']:7.1f} {r['records'] / n:6.1f} "
              f"{r['transactions'] / n:6.1f} {100 * r['journal_s'] / r['wall']:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--simulated", type=int, metavar="N", help="a simulated N-host rollout instead (no VM)")
    ap.add_argument("--configs", default="normal:batch,full:batch,normal:each",
                    help="with --simulated: SYNC:JOURNAL runs (sync normal|full, journal batch|each)")
    ap.add_argument("--workers", type=int, default=0, help="with --simulated: worker processes (default: cores)")
    ap.add_argument("--forks", type=int, default=50, help="with --simulated: hosts in flight")
    args = ap.parse_args()
    if args.simulated:
        simulated(args.simulated, args.configs.split(","), args.workers, args.forks)
        return
    rel = release()
    ws = Path(tempfile.mkdtemp(prefix="kpipe-bench-rollout-"))
    (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    shutil.copytree(REPO / "recipes", ws / "recipes")
    ko = build(ws, rel)
    from kpipe.artifacts import add_artifact
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    art = add_artifact(store, ko, kernel=rel, status="valid", recipe="cmdline-demo", arch="x86_64",
                       module_name=MODULE)
    store.close()
    print(f"workspace {ws}; booting 3 VMs of {rel}...", flush=True)
    t0 = time.monotonic()
    kp(ws, "lab", "up", "--kernel", rel, "--vms", "3")
    print(f"lab ready in {time.monotonic() - t0:.1f} s", flush=True)
    try:
        lab = json.loads(kp(ws, "lab", "status", "--json").stdout)
        vms = lab["vms"]

        def clean() -> None:
            procs = [subprocess.Popen(["ssh", "-i", lab["identity_file"], "-p", str(v["port"]),
                                       "-o", "StrictHostKeyChecking=yes",
                                       "-o", f"UserKnownHostsFile={lab['known_hosts']}",
                                       "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1",
                                       f"sh -c '{CLEAN_SCRIPT}' clean {MODULE}"]) for v in vms]
            for p in procs:
                p.wait()

        def hand() -> float:
            start = time.monotonic()
            procs = [subprocess.Popen(["sh", "-c", HAND_SCRIPT, "hand", str(v["port"]), lab["identity_file"],
                                       lab["known_hosts"], str(ko), MODULE]) for v in vms]
            codes = [p.wait() for p in procs]
            took = time.monotonic() - start
            if any(codes):
                sys.exit(f"the hand loop failed: {codes}")
            return took

        def kpipe_run() -> float:
            start = time.monotonic()
            r = kp(ws, "rollout", "start", art.id, "--limit", "lab", "--waves", "100%", "--soak", "0",
                   "--skip-preflight", "--yes", "--json")
            took = time.monotonic() - start
            out = json.loads(r.stdout)
            if set(out["hosts"].values()) != {"applied"}:
                sys.exit(f"kpipe rollout did not apply everywhere: {out}")
            return took

        times: dict[str, list[float]] = {"kpipe": [], "hand": []}
        for i in range(args.rounds):
            clean()
            times["kpipe"].append(kpipe_run())
            kp(ws, "rollout", "rollback", "last")
            clean()
            times["hand"].append(hand())
            print(f"round {i + 1}: kpipe {times['kpipe'][-1]:.2f} s, hand loop {times['hand'][-1]:.2f} s", flush=True)
        clean()
        k, h = statistics.median(times["kpipe"]), statistics.median(times["hand"])
        print(f"\nthree-VM rollout (median of {args.rounds}):")
        print(f"  kpipe rollout start (facts, plan, stage, verify, journal): {k:.2f} s")
        print(f"  scp + insmod + poll loop (3 parallel shells):              {h:.2f} s")
        print(f"  ratio kpipe / hand: {k / h:.2f}x (target < 1.5x)")
    finally:
        kp(ws, "lab", "down", check=False)
        if os.environ.get("KPIPE_BENCH_KEEP") != "1":
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
