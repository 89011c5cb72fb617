"""Facts over 200 real sshd hosts (SimFleet): refused, hanging and frozen hosts are per-host data."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kpipe.errors import ExitCode, TransportError
from kpipe.fleet.facts import HostFacts
from kpipe.fleet.inventory import load_inventory
from kpipe.fleet.observe import gather_facts
from kpipe.workspace import load_workspace
from simfleet import SimFleet, simfleet_factory  # noqa: F401  (the fixture)

N = int(os.environ.get("KPIPE_FANOUT_HOSTS", "200"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(simfleet_factory) -> SimFleet:  # noqa: F811
    f = simfleet_factory(N, prefix="f")
    f.hosts[3].inject("refused")
    f.hosts[N // 2].inject("hang", op="uname", seconds=600)
    f.hosts[N - 2].inject("frozen")
    return f


@pytest.fixture(scope="module")
def workspace(fleet: SimFleet, tmp_path_factory: pytest.TempPathFactory):
    folder = fleet.write_workspace(tmp_path_factory.mktemp("ws"), forks=50)
    text = (folder / "kpipe.toml").read_text().replace("connect_timeout = 10", "connect_timeout = 4")
    (folder / "kpipe.toml").write_text(text)
    return load_workspace(folder)


def test_facts_from_every_host_partial_failure_is_data(fleet: SimFleet, workspace) -> None:
    hosts = load_inventory(workspace).select("simfleet")
    assert len(hosts) == N
    results = gather_facts(workspace, hosts, forks=50, timeout=5)
    assert list(results) == [h.name for h in hosts]  # every host, in inventory order
    failed = {n: r for n, r in results.items() if not isinstance(r, HostFacts)}
    assert set(failed) == {fleet.hosts[3].name, fleet.hosts[N // 2].name, fleet.hosts[N - 2].name}
    assert all(isinstance(r, TransportError) for r in failed.values())
    assert failed[fleet.hosts[3].name].kind == "refused"
    assert failed[fleet.hosts[N // 2].name].kind == "timeout"
    assert failed[fleet.hosts[N - 2].name].kind in ("timeout", "error")
    for r in results.values():
        if isinstance(r, HostFacts):
            assert (r.release, r.arch, r.livepatch_sysfs, r.kpatch_cli) == (fleet.release, "x86_64", True, "")


def test_facts_see_each_hosts_own_kernel_state(fleet: SimFleet, workspace) -> None:
    h = fleet.hosts[7]
    r = subprocess.run(h.ssh_argv("printf 'x' > /var/lib/kpatch/livepatch-f.ko && /sbin/insmod "
                                  "/var/lib/kpatch/livepatch-f.ko"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    hosts = load_inventory(workspace).select(f"{h.name}:{fleet.hosts[8].name}")
    results = gather_facts(workspace, hosts, forks=2)
    f7, f8 = results[h.name], results[fleet.hosts[8].name]
    assert isinstance(f7, HostFacts) and isinstance(f8, HostFacts)
    assert f7.patches["livepatch_f"].enabled == 1 and f7.taint_flags == "OEK"
    assert f8.patches == {} and f8.tainted == 0


def test_cli_facts_json_exit_0_and_strict_exit_6(fleet: SimFleet, workspace) -> None:
    env = dict(os.environ, KPIPE_WORKSPACE=str(workspace.root))
    pattern = ":".join(h.name for h in fleet.hosts[:6])  # includes the refused host 3
    r = subprocess.run(["kpipe", "fleet", "facts", "--limit", pattern, "--json", "--forks", "4"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"] == {**doc["summary"], "hosts": 6, "ok": 5, "failed": 1}
    assert doc["hosts"][fleet.hosts[3].name] == {**doc["hosts"][fleet.hosts[3].name], "ok": False, "kind": "refused"}
    r = subprocess.run(["kpipe", "fleet", "facts", "--limit", pattern, "--strict"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == ExitCode.UNREACHABLE
    assert fleet.hosts[3].name in r.stdout and "refused" in r.stdout  # the table names the host and why
    assert "Traceback" not in r.stderr
    # facts are kept in the store for the audit
    rows = workspace.store.query("SELECT host, ok FROM fleet_facts")
    assert {row["host"]: row["ok"] for row in rows}[fleet.hosts[3].name] == 0


def test_cli_facts_runs_without_typer_and_answers_as_the_typer_command(fleet: SimFleet, workspace) -> None:
    """A plain `kpipe fleet facts` argv runs through kpipe.cli.fast: no Typer, click, Rich (JSON output)
    or PyYAML (a warm selection cache) is imported, and the hosts' answers are the Typer command's."""
    import sys

    env = dict(os.environ, KPIPE_WORKSPACE=str(workspace.root))
    env.pop("KPIPE_DEBUG", None)
    pattern = ":".join(h.name for h in fleet.hosts[:6])  # includes the refused host 3
    argv = ["fleet", "facts", "--limit", pattern, "--json", "--forks", "4", "--timeout", "30", "--workers", "1"]
    subprocess.run([sys.executable, "-m", "kpipe", *argv], capture_output=True, env=env, timeout=300)  # warm cache
    fast = subprocess.run([sys.executable, "-X", "importtime", "-m", "kpipe", *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    assert fast.returncode == 0, fast.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip() for line in fast.stderr.splitlines() if line.startswith("import time:")}
    assert "kpipe.cli.fleetfacts" in names and "paramiko" in names  # importtime listed the run
    assert not {m for m in names if m.split(".")[0] in ("typer", "click", "rich", "yaml", "ansible")}
    code = ("import sys; import kpipe.cli.fast as f; f.parse = lambda args: None; sys.argv[0] = 'kpipe'; "
            "from kpipe.cli.app import main; main()")
    slow = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert slow.returncode == 0, slow.stderr[-2000:]

    def answers(out: str) -> tuple[dict, dict]:
        doc = json.loads(out)
        facts = {n: {k: v for k, v in h.items() if k != "facts"} | {"release": h.get("facts", {}).get("release")}
                 for n, h in doc["hosts"].items()}
        return facts, {k: v for k, v in doc["summary"].items() if k != "seconds"}

    assert answers(fast.stdout) == answers(slow.stdout)
    assert answers(fast.stdout)[1] == {"hosts": 6, "ok": 5, "failed": 1}


def test_forks_bound_the_parallelism(fleet: SimFleet, workspace) -> None:
    """--forks is the number of hosts worked on at once: counted while real SSH commands run, not timed."""
    import threading

    from kpipe.commands import Command
    from kpipe.fleet.observe import pool_for

    faulty = {3, N // 2, N - 2}
    healthy = [h.name for i, h in enumerate(fleet.hosts) if i not in faulty][8:24]
    hosts = load_inventory(workspace).select(":".join(healthy))
    lock = threading.Lock()
    now, peak = 0, 0

    def one(t):  # a real command on the host, with the count of hosts in flight around it
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        try:
            return t.run(Command.of("sleep", "0.2", timeout=30)).exit_status
        finally:
            with lock:
                now -= 1

    for forks, at_most in ((1, 1), (4, 4), (20, len(hosts))):
        now, peak = 0, 0
        with pool_for(workspace, forks=forks, workers=1) as pool:
            results = pool.run_many(hosts, one, forks=forks)
        assert all(r == 0 for r in results.values()), results
        assert peak <= at_most, (forks, peak)
        if forks > 1:
            assert peak > 1, f"--forks {forks} ran the hosts one at a time"


def test_known_hosts_mismatch_is_refused_per_host(fleet: SimFleet, workspace, tmp_path: Path) -> None:
    """Strict host keys: a host whose key is not in known_hosts fails alone, with kind hostkey."""
    bad = tmp_path / "known_hosts"
    lines = fleet.known_hosts.read_text().splitlines(keepends=True)
    victim = fleet.hosts[11]
    bad.write_text("".join(ln for ln in lines if not ln.startswith(f"[{victim.address}]:")))
    from kpipe.fleet.observe import pool_for

    hosts = [h for h in load_inventory(workspace).select(f"{victim.name}:{fleet.hosts[12].name}")]
    hosts = [type(h)(**{**h.__dict__, "known_hosts": str(bad)}) for h in hosts]
    with pool_for(workspace) as pool:
        results = gather_facts(workspace, hosts, pool=pool)
    assert isinstance(results[fleet.hosts[12].name], HostFacts)
    err = results[victim.name]
    assert isinstance(err, TransportError) and err.kind == "hostkey"
