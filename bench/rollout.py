"""bench/rollout: a three-VM real-kernel rollout by kpipe vs a hand-written scp + insmod + poll loop.

    python bench/rollout.py [--rounds N] [--keep-lab WORKSPACE]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
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
