#!/usr/bin/env python3
"""bench/fleet: `kpipe fleet facts` over N loopback hosts vs parallel OpenSSH and `ansible -m raw`.

    python bench/fleet.py [--hosts 200] [--forks 50] [--kex curve25519] [--skip-ansible] [--json FILE]

One run, same hosts (tests/simfleet.py: real sshd processes, simulated kernels), same
parallelism, same remote command (kpipe's facts script), same key exchange for every
client (ssh-performance.md: compare like with like; pinning curve25519 is a benchmark
choice, not a kpipe default). Measured:

1. fresh connections: `kpipe fleet facts --json --forks F` (the CLI, process start and
   inventory load included) vs `xargs -P F ssh ...` vs `ansible -m raw -f F`;
2. a second command on the same hosts: kpipe's pool reusing its open connections
   (in one process: the first gather opens them, the second is timed) vs OpenSSH with
   a warm ControlMaster per host.

Targets (issue 5): kpipe >= 1.0x parallel OpenSSH throughput, >= 3x ansible -m raw, and the
second command within 1.5x of the ControlMaster run. Prints hosts/s, client CPU and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

KEX = {"curve25519": ("curve25519-sha256@libssh.org", "curve25519-sha256")}  # (paramiko name, OpenSSH name)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
          check_output: bool = False) -> tuple[float, float, int, str]:
    """Run argv; (wall s, client CPU s of the whole process tree, exit status, stdout)."""
    cpu0, t0 = children_cpu(), time.monotonic()
    r = subprocess.run(argv, env=env, input=stdin, text=True, capture_output=True, timeout=1800)
    return time.monotonic() - t0, children_cpu() - cpu0, r.returncode, r.stdout if check_output else r.stderr[-500:]


def ssh_opts(fleet, kex: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    opts = ["-q", "-i", str(fleet.client_key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30"]
    if kex:
        opts += ["-o", f"KexAlgorithms={kex}"]
    return opts + list(extra)


def xargs_ssh(fleet, forks: int, remote: str, kex: str | None, extra: tuple[str, ...] = ()) -> tuple:
    """`xargs -P forks` running one ssh per host: `port address` lines on stdin."""
    lines = "".join(f"{h.port} {h.address}\n" for h in fleet.hosts)
    inner = "exec ssh " + " ".join(shlex.quote(o) for o in ssh_opts(fleet, kex, extra)) + \
        ' -p "$0" root@"$1" "$KPIPE_BENCH_CMD" >/dev/null'
    env = dict(os.environ, KPIPE_BENCH_CMD=remote)
    return timed(["xargs", "-P", str(forks), "-L", "1", "sh", "-c", inner], env=env, stdin=lines)


INNER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from kpipe.workspace import load_workspace
from kpipe.fleet.inventory import load_inventory
from kpipe.fleet.facts import HostFacts
from kpipe.fleet.observe import gather_facts, pool_for
from pathlib import Path
ws = load_workspace(Path(sys.argv[2]))
hosts = load_inventory(ws).select(None)
forks = int(sys.argv[3])
out = {}
with pool_for(ws, forks) as pool:
    for label in ("first", "second"):
        t, c = time.monotonic(), time.process_time()
        r = gather_facts(ws, hosts, forks, pool=pool)
        out[label] = {"wall": time.monotonic() - t, "cpu": time.process_time() - c,
                      "ok": sum(isinstance(v, HostFacts) for v in r.values())}
print(json.dumps(out))
"""


def one_round(record, fleet, ws: Path, env: dict, remote: str, openssh_kex: str | None, masters_dir: Path,
              tmp: Path, args: argparse.Namespace) -> None:
    """One measurement of every client, in a fixed order."""
    # 1. fresh connections
    wall, cpu, rc, out = timed(["kpipe", "fleet", "facts", "--json", "--forks", str(args.forks)], env=env,
                               check_output=True)
    ok = json.loads(out)["summary"]["ok"] if rc == 0 else 0
    record("kpipe fleet facts (CLI, fresh)", wall, cpu, rc if ok == args.hosts else 1, f"{ok} ok")
    wall, cpu, rc, err = xargs_ssh(fleet, args.forks, remote, openssh_kex)
    record(f"xargs -P{args.forks} ssh (fresh)", wall, cpu, rc, err)
    if not args.skip_ansible:
        inv = fleet.write_inventory(tmp / "ansible-inventory.yml")
        ssh_args = "-C -o ControlMaster=auto -o ControlPersist=60s"  # ansible's defaults
        if openssh_kex:
            ssh_args += f" -o KexAlgorithms={openssh_kex}"
        aenv = dict(os.environ, ANSIBLE_SSH_ARGS=ssh_args, ANSIBLE_HOST_KEY_CHECKING="True",
                    ANSIBLE_SSH_EXTRA_ARGS=f"-o UserKnownHostsFile={fleet.known_hosts} -o IdentitiesOnly=yes",
                    ANSIBLE_SSH_CONTROL_PATH_DIR=str(masters_dir / "ansible"), ANSIBLE_NOCOLOR="1")
        wall, cpu, rc, err = timed(["ansible", "all", "-i", str(inv), "-f", str(args.forks), "-m", "raw",
                                    "-a", remote], env=aenv)
        record(f"ansible -m raw -f {args.forks} (fresh)", wall, cpu, rc, err)

    # 2. a second command on the same hosts
    wall_cpu = subprocess.run([sys.executable, "-c", INNER, str(ROOT), str(ws), str(args.forks)],
                              capture_output=True, text=True, timeout=1800)
    if wall_cpu.returncode == 0:
        inner = json.loads(wall_cpu.stdout)
        record("kpipe pool: first gather (in-process)", inner["first"]["wall"], inner["first"]["cpu"],
               0 if inner["first"]["ok"] == args.hosts else 1, f"{inner['first']['ok']} ok")
        record("kpipe pool: second command (reused)", inner["second"]["wall"], inner["second"]["cpu"],
               0 if inner["second"]["ok"] == args.hosts else 1, f"{inner['second']['ok']} ok")
    else:
        print(wall_cpu.stderr[-2000:])
    cm = ("-o", "ControlMaster=auto", "-o", f"ControlPath={masters_dir}/%C", "-o", "ControlPersist=300")
    wall, cpu, rc, err = xargs_ssh(fleet, args.forks, remote, openssh_kex, cm)
    record("OpenSSH ControlMaster: first (opens masters)", wall, cpu, rc, err)
    wall, cpu, rc, err = xargs_ssh(fleet, args.forks, remote, openssh_kex, cm)
    record("OpenSSH ControlMaster: second (warm)", wall, cpu, rc, err)
    # the next round's ControlMaster and ansible runs start cold again
    for sock in list(masters_dir.glob("*")) + list((masters_dir / "ansible").glob("*")):
        if sock.is_socket():
            subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "bench"], capture_output=True, timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--forks", type=int, default=50)
    ap.add_argument("--kex", choices=["curve25519", "default"], default="curve25519",
                    help="key exchange for every client (default: curve25519, as ssh-performance.md compares)")
    ap.add_argument("--skip-ansible", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds; each client's best round counts (this machine's load varies)")
    args = ap.parse_args()

    from kpipe.fleet.facts import facts_command
    from simfleet import SimFleet

    paramiko_kex, openssh_kex = KEX.get(args.kex, (None, None))
    remote = facts_command().shell_line()
    tmp = Path(tempfile.mkdtemp(prefix="kpipe-bench-fleet-"))
    print(f"bench/fleet: {args.hosts} hosts, forks {args.forks}, kex {args.kex}; starting SimFleet in {tmp}",
          flush=True)
    t0 = time.monotonic()
    fleet = SimFleet(args.hosts, tmp / "fleet", prefix="b").start()
    print(f"  {args.hosts} sshd hosts up and verified in {time.monotonic() - t0:.1f} s", flush=True)
    rows: dict[str, dict[str, float]] = {}
    masters_dir = Path(tempfile.mkdtemp(prefix="kpipe-cm-", dir="/tmp"))  # short: ControlPath has a length limit
    try:
        ws = fleet.write_workspace(tmp / "ws", forks=args.forks)
        if paramiko_kex:
            text = (ws / "kpipe.toml").read_text().replace("[fleet]", f'kex = ["{paramiko_kex}"]\n\n[fleet]')
            (ws / "kpipe.toml").write_text(text)
        env = dict(os.environ, KPIPE_WORKSPACE=str(ws))

        def record(name: str, wall: float, cpu: float, rc: int, note: str = "") -> None:
            print(f"  {name:<44} {wall:7.2f} s  {args.hosts / wall:7.1f} hosts/s  cpu {cpu:6.2f} s"
                  f"{'' if rc == 0 else f'  (exit {rc}: {note.strip()[-200:]})'}", flush=True)
            if name in rows and rows[name]["rc"] == 0 and (rc != 0 or rows[name]["wall"] <= wall):
                return  # keep the best successful round
            rows[name] = {"wall": wall, "cpu": cpu, "hosts_per_s": args.hosts / wall if wall else 0.0, "rc": rc}

        for round_ in range(1, args.repeat + 1):
            print(f"round {round_}/{args.repeat}", flush=True)
            one_round(record, fleet, ws, env, remote, openssh_kex, masters_dir, tmp, args)

    finally:
        # ControlPersist masters are background ssh processes: ask each to exit through its socket.
        for sock in list(masters_dir.glob("*")) + list((masters_dir / "ansible").glob("*")):
            if sock.is_socket():
                subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "bench"], capture_output=True,
                               timeout=30)
        fleet.close()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(masters_dir, ignore_errors=True)

    def ratio(a: str, b: str) -> float | None:
        if a in rows and b in rows and rows[a]["wall"] > 0:
            return rows[b]["wall"] / rows[a]["wall"]
        return None

    kp, xs, an = "kpipe fleet facts (CLI, fresh)", f"xargs -P{args.forks} ssh (fresh)", \
        f"ansible -m raw -f {args.forks} (fresh)"
    second, cmw = "kpipe pool: second command (reused)", "OpenSSH ControlMaster: second (warm)"
    first_inproc = "kpipe pool: first gather (in-process)"
    checks = [
        ("kpipe CLI vs parallel OpenSSH (throughput)", ratio(kp, xs), 1.0, ">="),
        ("kpipe in-process first gather vs parallel OpenSSH", ratio(first_inproc, xs), 1.0, ">="),
        ("kpipe CLI vs ansible -m raw (throughput)", ratio(kp, an), 3.0, ">="),
        ("kpipe in-process first gather vs ansible -m raw", ratio(first_inproc, an), 3.0, ">="),
        ("kpipe CLI vs ansible -m raw (client CPU)", None if kp not in rows or an not in rows
         else rows[an]["cpu"] / rows[kp]["cpu"], 3.0, ">="),
        ("kpipe second command vs ControlMaster (time)", None if second not in rows or cmw not in rows
         else rows[second]["wall"] / rows[cmw]["wall"], 1.5, "<="),
    ]
    print("\nratios (throughput ratio = their wall time / kpipe's wall time):")
    failed = False
    summary = []
    for name, value, target, op in checks:
        if value is None:
            print(f"  {name:<52} n/a")
            continue
        ok = value >= target if op == ">=" else value <= target
        failed |= not ok
        summary.append({"check": name, "value": value, "target": f"{op} {target}", "ok": ok})
        print(f"  {name:<52} {value:5.2f}x  (target {op} {target}x)  {'PASS' if ok else 'MISS'}")
    if any(r["rc"] != 0 for r in rows.values()):
        print("  note: a client reported failures (see exit statuses above)")
    if args.json:
        args.json.write_text(json.dumps({"hosts": args.hosts, "forks": args.forks, "kex": args.kex,
                                         "rows": rows, "checks": summary}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
