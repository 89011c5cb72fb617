"""The typed seams: one host record, one transport protocol, states as StrEnums, settings read once.

- the inventory's Host is the record the SSH pool connects with (no second record, no conversion);
- every transport satisfies kpipe.transport.base.Transport, and SshPool satisfies Pool, both at run
  time (runtime_checkable) and statically (mypy on a small typed snippet);
- the enums' string values are what the journal, the store and --json hold: they never change;
- every kpipe.toml section reports a bad value at file:line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kpipe.commands import Command
from kpipe.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


# -- one host record ----------------------------------------------------------------------------------


def _fleet_file(tmp_path: Path, sshd) -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(
        "hosts:\n"
        f"  web1: {{address: {sshd.address}, port: {sshd.port}, user: {sshd.user},"
        f" identity_file: {sshd.client_key}, known_hosts: {sshd.known_hosts}}}\n"
        "    \n"
        "groups:\n"
        "  canary: {hosts: [web1], vars: {tier: front}}\n"
    )
    return path


def test_the_inventory_host_is_what_the_ssh_pool_connects_with(sshd, tmp_path):
    from kpipe.fleet.inventory import load_inventory
    from kpipe.host import Host
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import SshSettings

    [host] = load_inventory(None, [_fleet_file(tmp_path, sshd)]).select("canary")
    assert type(host) is Host
    assert (host.address, host.port, host.user) == (sshd.address, sshd.port, sshd.user)
    assert host.known_hosts == str(sshd.known_hosts) and host.groups == ("canary",)
    assert host.vars["tier"] == "front"
    # the record round-trips through the inventory selection cache's plain data
    assert Host.from_dict(host.to_dict()) == host and Host.from_dict(host.to_dict()).vars == host.vars

    settings = SshSettings(known_hosts="/nonexistent", ssh_config="/nonexistent")
    with SshPool(settings, known_hosts=[]) as pool:
        t = pool.transport(host)
        assert t.target is host  # taken as it is: no conversion into another record
        assert t.run(Command.of("echo", "hello")).stdout == "hello\n"
        results = pool.run_many([host], lambda tr: tr.run(Command.of("true")).exit_status)
    assert results == {"web1": 0}


def test_the_pool_reuses_a_connection_for_the_same_connection_settings():
    from kpipe.host import Host
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import SshSettings

    settings = SshSettings(known_hosts="/nonexistent", ssh_config="/nonexistent")
    with SshPool(settings, known_hosts=[]) as pool:
        first = pool.transport(Host("h", "127.0.0.1", 2200, "root", groups=("web",), vars={"rack": 7}))
        # the inventory's groups and variables are not connection settings
        assert pool.transport(Host("h", "127.0.0.1", 2200, "root")) is first
        assert pool.transport(Host("h", "127.0.0.1", 2201, "root")) is not first


def test_there_is_one_host_record():
    from kpipe.fleet import inventory
    from kpipe.host import Host
    from kpipe.rollout import world
    from kpipe.transport import ssh

    assert inventory.Host is Host
    assert not hasattr(ssh, "SshTarget")  # the second record of the same host is gone
    assert not hasattr(world, "host_target")  # and with it the conversion that caught TypeError
    assert not hasattr(Host, "target")


def test_a_lab_vm_is_a_host_with_the_labs_own_known_hosts(tmp_path):
    from kpipe.host import Host
    from kpipe.lab.lab import Lab, LabState
    from kpipe.lab.vm import VmProcess

    lab = Lab(tmp_path / ".lab")
    vm = VmProcess(name="lab1", pid=1, start_time=0, ssh_port=2222, folder=str(tmp_path))
    st = LabState(folder=tmp_path, kernel={"release": "6.1.0-test"}, vms=[vm], identity_file="/k/id",
                  known_hosts="/k/kh", inventory="")
    [h] = lab.targets(st)
    assert h == Host("lab1", "127.0.0.1", 2222, "root", "/k/id", known_hosts="/k/kh", connect_timeout=10.0)


# -- one transport protocol ---------------------------------------------------------------------------


def test_every_transport_satisfies_the_protocol_at_run_time(tmp_path):
    from kpipe.host import Host
    from kpipe.transport.base import Pool, Transport
    from kpipe.transport.local import LocalTransport
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import SshSettings

    assert isinstance(LocalTransport(), Transport)
    settings = SshSettings(known_hosts="/nonexistent", ssh_config="/nonexistent")
    with SshPool(settings, known_hosts=[]) as pool:
        assert isinstance(pool, Pool)
        assert isinstance(pool.transport(Host("h", "127.0.0.1", 22)), Transport)  # built, not connected

    class NoGet:
        name = "x"

        def run(self, cmd: Command) -> None: ...

        def put(self, local: Path, remote: str) -> None: ...

        def close(self) -> None: ...

    assert not isinstance(NoGet(), Transport)


_SNIPPET = '''
from pathlib import Path

from kpipe.commands import Command, CommandResult
from kpipe.transport.base import Pool, Transport
from kpipe.transport.local import LocalTransport
from kpipe.transport.ssh import SshPool, SshTransport


def name_of(t: Transport) -> str:
    return t.name


def width(p: Pool) -> int:
    return p.forks


def check(s: SshTransport, loc: LocalTransport, p: SshPool) -> None:
    name_of(s)
    name_of(loc)
    width(p)
    name_of(p.transport(s.target))
'''

_BROKEN = '''
from pathlib import Path

from kpipe.commands import Command, CommandResult
from kpipe.transport.base import Transport


class NoGet:
    name = "x"

    def run(self, cmd: Command) -> CommandResult:
        raise NotImplementedError

    def put(self, local: Path, remote: str) -> None: ...

    def close(self) -> None: ...


def name_of(t: Transport) -> str:
    return t.name


name_of(NoGet())
'''


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source)
    env = {**os.environ, "MYPYPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--config-file", os.devnull,
         "--cache-dir", str(tmp_path / "mypy-cache"), str(snippet)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )


def test_every_transport_satisfies_the_protocol_statically(tmp_path):
    from kenv import require_or_skip

    try:
        import mypy  # noqa: F401
    except ImportError:
        require_or_skip("mypy is not installed (pip install mypy)")
    ok = _mypy(tmp_path, _SNIPPET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = _mypy(tmp_path, _BROKEN)  # the check can fail: a transport without get() is refused
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert 'missing following "Transport" protocol member' in broken.stdout and "    get" in broken.stdout


# -- states are StrEnums with stable values -----------------------------------------------------------


def _values(enum_type: type) -> list[str]:
    return [m.value for m in enum_type]


def test_state_values_never_change():
    from kpipe.artifacts import ArtifactStatus, PreflightOutcome
    from kpipe.builder.states import (
        BuildEventKind,
        BuildRecordStatus,
        BuildStatus,
        LaunchState,
    )
    from kpipe.lab.vm import VmState
    from kpipe.rollout.states import HostState, Phase, RolloutState

    # stored in the state store, the journal and --json: renaming a value breaks every store and script
    assert _values(RolloutState) == ["planned", "running", "interrupted", "halted", "completed", "aborted",
                                     "rolled_back", "failed"]
    assert _values(Phase) == ["intended", "done", "failed"]
    assert _values(HostState) == ["applied", "rolled_back", "failed", "excluded", "unreachable", "pending",
                                  "skipped", "interrupted", "rolling_back"]
    assert _values(ArtifactStatus) == ["built", "valid", "rejected"]
    assert _values(PreflightOutcome) == ["passed", "failed"]
    assert _values(BuildStatus) == ["built", "cached", "failed", "rejected", "error"]
    assert _values(BuildRecordStatus) == ["running", "succeeded", "failed"]
    assert _values(LaunchState) == ["started", "running", "done"]
    assert _values(BuildEventKind) == ["cached", "host", "started", "reattached", "restarted", "milestone", "line",
                                       "built", "failed", "validated", "signed", "error"]
    assert _values(VmState) == ["running", "stopped"]
    # a member is its string: code and stores holding plain strings keep working
    assert RolloutState.RUNNING == "running" and f"{HostState.APPLIED}" == "applied"
    assert {"applied": 1}[HostState.APPLIED] == 1


def test_the_journal_stores_plain_strings_and_reads_enums(tmp_path):
    from kpipe.rollout.journal import Journal, host_state
    from kpipe.rollout.states import HostState, Phase, RolloutState
    from kpipe.store import open_store

    store = open_store(tmp_path / ".kpipe")
    j = Journal(store)
    rid = j.create({"hosts": []}, {})
    j.set_state(rid, RolloutState.RUNNING)
    j.record(rid, "web1", 1, "load", Phase.INTENDED, {"marker": "m1"})
    j.record(rid, "web1", 1, "load", "done")
    j.record(rid, "web1", 1, "outcome", Phase.DONE, {"state": HostState.APPLIED})
    raw = store.query_one("SELECT state FROM rollouts WHERE id = ?", (rid,))
    assert type(raw["state"]) is str and raw["state"] == "running"
    assert [type(r["phase"]) for r in store.query("SELECT phase FROM journal")] == [str, str, str]
    rec = j.get(rid)
    assert rec.state is RolloutState.RUNNING
    entries = j.entries(rid)
    assert [e.phase for e in entries] == [Phase.INTENDED, Phase.DONE, Phase.DONE]
    st = host_state("web1", entries)
    assert st.outcome is HostState.APPLIED and st.marker == "m1" and st.unfinished == ()
    with pytest.raises(ValueError):
        j.set_state(rid, "exploded")
    with pytest.raises(ValueError):
        j.record(rid, "web1", 1, "load", "maybe")


def test_artifact_status_is_an_enum_and_stored_as_text(tmp_path):
    from kpipe.artifacts import (
        ArtifactStatus,
        add_artifact,
        get_artifact,
        update_artifact,
    )
    from kpipe.store import open_store

    store = open_store(tmp_path / ".kpipe")
    ko = tmp_path / "livepatch-x.ko"
    ko.write_bytes(b"\x7fELF not really")
    art = add_artifact(store, ko, kernel="6.1.0-test")
    assert get_artifact(store, art.id).status is ArtifactStatus.BUILT
    update_artifact(store, art.id, status="valid")
    assert get_artifact(store, art.id).status is ArtifactStatus.VALID
    assert store.query_one("SELECT status FROM artifacts WHERE id = ?", (art.id,))["status"] == "valid"
    with pytest.raises(ValueError):
        update_artifact(store, art.id, status="shiny")


# -- kpipe.toml: every section's bad value at file:line ------------------------------------------------

_HEAD = "# kpipe.toml\n\n"  # two lines before the table, so that line numbers are not trivially 1

SETTINGS_CASES = [
    ("workspace", "[workspace]\nrecipes = \"r\"\nstore = 5\n", 5, "workspace.store"),
    ("build_hosts", "[[build_hosts]]\nname = \"b1\"\nport = 70000\n", 5, "build_hosts[0].port"),
    ("kernels", "[[kernels]]\nrelease = \"6.1.0-9-amd64\"\nsig_hash = \"md5\"\n", 5, "kernels[0].sig_hash"),
    ("ssh", "[ssh]\nforks = 0\n", 4, "ssh.forks"),
    ("signing", "[signing.signers.k]\nkey = \"k.pem\"\ntype = \"magic\"\n", 5, "signing.signers.k.type"),
    ("fleet", "[fleet]\ninventory_timeout = \"ten\"\n", 4, "fleet.inventory_timeout"),
    ("lab", "[lab]\nvms = 2\nmemory = 10\n", 5, "lab.memory"),
    ("audit", "[audit]\nallowed_taint = \"OQ\"\n", 4, "audit.allowed_taint"),
    ("validation", "[validation]\nstrict = \"yes\"\n", 4, "validation.strict"),
    ("ansible", "[ansible]\npython_interpreter = \"\"\n", 4, "ansible.python_interpreter"),
    ("rollout", "[rollout.prometheus]\nquery = \"up\"\nurl = \"ftp://x\"\n", 5, "rollout.prometheus.url"),
]


def test_every_section_has_a_bad_value_case():
    from kpipe.settings import SECTIONS

    assert sorted(c[0] for c in SETTINGS_CASES) == sorted(SECTIONS)


@pytest.mark.parametrize("section,text,line,field", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_a_bad_value_in_each_section_names_file_and_line(section, text, line, field, tmp_path):
    from kpipe.settings import parse_settings

    file = tmp_path / "kpipe.toml"
    with pytest.raises(ConfigError) as e:
        parse_settings(file, (_HEAD + text).encode())
    message = e.value.message
    assert message.startswith(f"{file}:{line}: "), message
    assert field in message or field.rsplit(".", 1)[-1] in message, message
    assert "\n" not in message and e.value.hint


def test_the_workspace_carries_the_parsed_settings(tmp_path):
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text("[lab]\nmemory = 512\n[validation]\nstrict = true\n"
                                         "[ansible]\npython_interpreter = \"/usr/bin/python3\"\n")
    ws = load_workspace(tmp_path)
    assert ws.settings.lab.memory == 512 and ws.settings.validation.strict
    assert ws.settings.ansible.python_interpreter == "/usr/bin/python3"
    assert ws.settings.file == tmp_path / "kpipe.toml"


def test_no_module_but_settings_reads_toml():
    # kpipe.toml is parsed once, in kpipe/settings.py; a second reader would skip its file:line checks
    readers = sorted(str(p.relative_to(REPO)) for p in (REPO / "kpipe").rglob("*.py")
                     if "tomllib" in p.read_text() or "import toml" in p.read_text())
    assert readers == ["kpipe/settings.py"]
