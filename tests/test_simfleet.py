"""SimFleet follows its contract: real sshd hosts, a simulated kernel as kernel-facts.md describes, faults, safety."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

import kenv
from kpipe.commands import Command
from kpipe.errors import CommandTimeout, TransportError
from kpipe.fleet import livepatch as lp
from kpipe.transport.ssh import SshPool
from kpipe.workspace import SshSettings
from simfleet import SimFleet, simfleet_factory  # noqa: F401  (the fixture)

RELEASE = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
MODULE = "livepatch-sim"
NAME = "livepatch_sim"


@pytest.fixture(scope="module")
def fleet(simfleet_factory) -> SimFleet:  # noqa: F811
    return simfleet_factory(14, prefix="t")


@pytest.fixture(scope="module")
def pool(fleet: SimFleet):
    settings = SshSettings(known_hosts=str(fleet.known_hosts), identity_file=str(fleet.client_key),
                           ssh_config="/nonexistent", connect_timeout=10, command_timeout=30)
    with SshPool(settings, known_hosts=[fleet.known_hosts]) as p:
        yield p


@pytest.fixture(scope="module")
def module_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("mod") / f"{MODULE}.ko"
    path.write_bytes(b"\x7fELF simulated\x00name=livepatch_sim\x00livepatch=Y\x00")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def transport(pool: SshPool, fleet: SimFleet, i: int):
    return pool.transport(fleet.hosts[i].target())


def staged_load(t, module_file) -> tuple[str, lp.OpResult]:
    path, sha = module_file
    remote = lp.stage(t, path, RELEASE, sha, path.name)
    return remote, lp.load(t, remote, MODULE, timeout=20)


def test_hosts_are_isolated_and_this_machine_is_untouched(fleet: SimFleet) -> None:
    own_ns = os.readlink("/proc/self/ns/mnt")
    assert all(h.mntns and h.mntns != own_ns for h in fleet.hosts)
    assert len({h.mntns for h in fleet.hosts}) == len(fleet.hosts)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(fleet.root) not in mountinfo  # no bind mount leaked into this namespace
    assert Path("/proc/sys/kernel/tainted").read_text().strip() != "" and not Path("/sys/kernel/livepatch/"
                                                                                    + NAME).exists()
    assert os.path.realpath("/sbin/insmod") == "/usr/bin/kmod" and b"KPIPE_SIMFLEET" not in Path(
        "/usr/bin/kmod").read_bytes()[:4096]


def test_safety_check_refuses_a_host_that_is_not_simulated(fleet: SimFleet) -> None:
    h = fleet.hosts[13]
    token = h.token
    h.token = "not-the-token"  # what a host whose bind mounts are missing would answer
    try:
        with pytest.raises(RuntimeError, match="safety check failed"):
            fleet.verify([h])
    finally:
        h.token = token
    fleet.verify([h])


def test_uname_os_release_and_no_kpatch(fleet: SimFleet) -> None:
    h = fleet.hosts[0]
    r = subprocess.run(h.ssh_argv("uname -r; uname -m; . /etc/os-release; echo $ID $VERSION_ID; "
                                  "command -v kpatch || echo no-kpatch; cat /proc/sys/kernel/tainted"),
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[:5] == [RELEASE, "x86_64", "debian 12", "no-kpatch", "0"]


def test_load_verify_disable_unload_as_the_kernel_does(fleet: SimFleet, pool: SshPool, module_file) -> None:
    t = transport(pool, fleet, 1)
    h = fleet.hosts[1]
    remote, res = staged_load(t, module_file)
    assert res.ok, res
    assert remote == f"/var/lib/kpatch/{RELEASE}/{MODULE}.ko" and remote in h.staged()
    assert lp.wait_transition(t, MODULE, 10).ok
    v = lp.verify_loaded(t, MODULE, res.marker)
    assert v.ok, v.problems
    assert h.patches()[NAME] == {"enabled": "1", "transition": "0", "objects": {"vmlinux": "1"}}
    assert h.tainted == 45056 and NAME in h.modules()  # O + E + K, as lab.md saw on a real 6.1
    log = h.log()
    i = log.index(res.marker)
    assert log[i + 1:] == [
        f"{NAME}: loading out-of-tree module taints kernel.",
        f"{NAME}: module verification failed: signature and/or required key missing - tainting kernel",
        f"{NAME}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{NAME}'",
        f"livepatch: '{NAME}': starting patching transition",
        f"livepatch: '{NAME}': patching complete",
    ]
    # rmmod while enabled fails, like the real kernel
    r = t.run(Command.of(lp.RMMOD, NAME))
    assert r.exit_status == 1 and "is in use" in r.stderr
    d = lp.disable(t, MODULE, 10)
    assert d.ok, d
    assert NAME not in h.patches() and NAME in h.modules()
    assert lp.unload(t, MODULE).ok
    v = lp.verify_removed(t, MODULE)
    assert v.ok, v.problems
    assert h.log()[-2:] == [f"livepatch: '{NAME}': starting unpatching transition",
                            f"livepatch: '{NAME}': unpatching complete"]
    assert h.tainted == 45056  # taint stays after unload
    # a second load prints no taint messages (only the first time a taint is set)
    _, res2 = staged_load(t, module_file)
    assert res2.ok and not any("taint" in ln for ln in h.log()[h.log().index(res2.marker):])


def test_replace_mode_supersedes_the_older_patch(fleet: SimFleet, pool: SshPool, tmp_path: Path) -> None:
    t = transport(pool, fleet, 2)
    h = fleet.hosts[2]
    for n in ("livepatch-one", "livepatch-two"):
        f = tmp_path / f"{n}.ko"
        f.write_bytes(n.encode())
        remote = lp.stage(t, f, RELEASE, hashlib.sha256(f.read_bytes()).hexdigest(), f.name)
        assert lp.load(t, remote, n, timeout=20).ok
        assert lp.wait_transition(t, n, 10).ok
    assert list(h.patches()) == ["livepatch_two"]
    assert h.modules() >= {"livepatch_one", "livepatch_two"}


def test_refused(fleet: SimFleet, pool: SshPool) -> None:
    h = fleet.hosts[3]
    h.inject("refused")
    try:
        with pytest.raises(TransportError) as e:
            pool.transport(h.target()).run(Command.of("true"))
        assert e.value.kind == "refused"
    finally:
        h.clear("refused")
    assert pool.transport(h.target()).run(Command.of("true")).ok


def test_host_dies_during_insmod(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[4]
    t = transport(pool, fleet, 4)
    path, sha = module_file
    remote = lp.stage(t, path, RELEASE, sha, path.name)
    h.inject("die_during", op="insmod")
    with pytest.raises(TransportError) as e:
        t.run(Command.of(lp.INSMOD, remote, timeout=20))
    assert e.value.kind in ("disconnected", "error", "refused")
    assert NAME in h.modules()  # the kernel took the module before the host went away
    with pytest.raises(TransportError):
        t.run(Command.of("true"))
    h.clear("die_during")
    h.start()
    st = lp.read_state(t, MODULE)
    assert st.patches[NAME].enabled == 1  # state survives an sshd restart (not a reboot)
    h.reboot()
    assert lp.read_state(t, MODULE).patches == {} and h.tainted == 0


def test_hang_past_the_timeout(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[5]
    t = transport(pool, fleet, 5)
    path, sha = module_file
    remote = lp.stage(t, path, RELEASE, sha, path.name)
    h.inject("hang", op="insmod", seconds=600)
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        t.run(Command.of(lp.INSMOD, remote, timeout=2))
    assert time.monotonic() - start < 15
    assert NAME not in h.modules()
    h.clear("hang")
    assert any("sleep" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
               for p in h.pids() if Path(f"/proc/{p}").exists())  # still hanging; close() must reap it


def test_stuck_transition(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[6]
    h.inject("stuck_transition", stall_after=0.2)
    t = transport(pool, fleet, 6)
    _, res = staged_load(t, module_file)
    assert res.ok  # insmod itself succeeds: only sysfs tells
    w = lp.wait_transition(t, MODULE, 2)
    assert not w.ok and "transition" in w.message
    assert h.patches()[NAME]["transition"] == "1"
    assert "livepatch: signaling remaining tasks" in h.log()
    v = lp.verify_loaded(t, MODULE, res.marker)
    assert not v.ok and any("transition" in p for p in v.problems)


def test_ebusy_on_enable(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[7]
    h.inject("ebusy_enable")
    _, res = staged_load(transport(pool, fleet, 7), module_file)
    assert not res.ok and "Device or resource busy" in res.message
    assert NAME not in h.modules() and h.patches() == {}


def test_ebusy_on_disable(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[8]
    t = transport(pool, fleet, 8)
    _, res = staged_load(t, module_file)
    assert res.ok and lp.wait_transition(t, MODULE, 10).ok
    h.inject("ebusy_disable")
    d = lp.disable(t, MODULE, 3)
    assert not d.ok
    assert h.patches()[NAME]["enabled"] == "1"  # the write failed; the patch stays
    h.clear("ebusy_disable")
    assert lp.disable(t, MODULE, 10).ok and NAME not in h.patches()


def test_full_disk(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[9]
    h.inject("full_disk")
    path, sha = module_file
    with pytest.raises(Exception) as e:
        lp.stage(pool.transport(h.target()), path, RELEASE, sha, path.name)
    assert "space" in str(e.value).lower() or "failed" in str(e.value).lower()
    assert not h.staged()
    h.clear("full_disk")  # restarts the host's sshd: the pooled connection is gone
    pool.transport(h.target()).close()
    assert lp.stage(pool.transport(h.target()), path, RELEASE, sha, path.name)


def test_sig_enforce_refuses_unsigned(fleet: SimFleet, pool: SshPool, module_file) -> None:
    h = fleet.hosts[10]
    h.inject("sig_enforce")
    _, res = staged_load(transport(pool, fleet, 10), module_file)
    assert not res.ok and "Key was rejected by service" in res.message
    assert "Loading of unsigned module is rejected" in h.log()


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_simulator_cpu_counts_the_simulator_thread_only(fleet: SimFleet) -> None:
    """bench/rollout.py subtracts simulator_cpu() from its own process's CPU: it must be that thread's."""
    before = fleet.simulator_cpu()
    _spin(0.4)  # this thread's CPU: not the simulator's
    mid = fleet.simulator_cpu()
    assert 0 <= before <= mid < before + 0.2 <= time.process_time()
    done: list[bool] = []

    def busy_on_the_simulator_thread() -> None:
        _spin(0.4)
        done.append(True)

    fleet.after(0, busy_on_the_simulator_thread)
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done, "the simulator did not run the callback"
    assert fleet.simulator_cpu() >= mid + 0.3


def test_close_stops_every_process_by_pid(tmp_path: Path) -> None:
    fleet = SimFleet(2, tmp_path / "f", prefix="c").start()
    h = fleet.hosts[0]
    h.inject("hang", op="insmod", seconds=600)
    p = subprocess.Popen(h.ssh_argv("/sbin/insmod /nonexistent-but-hang-first"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
            b"sleep" in Path(f"/proc/{q}/cmdline").read_bytes() for q in h.pids() if Path(f"/proc/{q}").exists()):
        time.sleep(0.1)
    pids = [q for h2 in fleet.hosts for q in h2.pids()]
    namespaces = {h2.mntns for h2 in fleet.hosts}
    assert len(pids) >= 3
    fleet.close()
    p.wait(20)
    time.sleep(0.2)
    alive = {ns: pl for ns, pl in SimFleet.pids_by_namespace().items() if ns in namespaces}
    assert alive == {}
