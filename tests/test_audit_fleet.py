"""verify / audit end to end: real SSH to SimFleet hosts (simulated kernels in private
mount namespaces), the real rollout journal, the real CLI. The observed state comes
from what the hosts report; the test arranges each host's kernel state with kpipe's
own host operations over SSH, then checks each verdict."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kenv
from exposition import parse_exposition
from kpipe.fleet import auditing
from simfleet import simfleet_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RELEASE = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
NAME = "livepatch_demo"


def kpipe(ws: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def scene(simfleet_factory, tmp_path_factory):  # noqa: F811
    """8 hosts, each in one audit state; the journal says r1 applied the demo patch everywhere."""
    from kpipe.fleet import livepatch as lp
    from kpipe.rollout.journal import Journal
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import open_workspace

    fleet = simfleet_factory(8)
    tmp = tmp_path_factory.mktemp("auditfleet")
    ws_dir = fleet.write_workspace(tmp / "ws")
    # This machine is shared with VM tests: give loaded sshds time to answer.
    toml = ws_dir / "kpipe.toml"
    toml.write_text(toml.read_text().replace("connect_timeout = 10", "connect_timeout = 60"))
    ws = open_workspace(str(ws_dir))
    good = tmp / "livepatch-demo.ko"
    good.write_bytes(b"the good module\n")
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    bad = tmp / "other" / "livepatch-demo.ko"
    bad.parent.mkdir()
    bad.write_bytes(b"some other build\n")
    bad_sha = hashlib.sha256(bad.read_bytes()).hexdigest()

    h = [x.name for x in fleet.hosts]
    roles = {h[0]: "compliant", h[1]: "missing", h[2]: "wrong_hash", h[3]: "unexpected", h[4]: "transition",
             h[5]: "unreachable", h[6]: "disabled", h[7]: "unexpected_taint"}
    fleet.host(h[4]).inject("stuck_transition", stall_after=0.5)
    pool = SshPool(ws.ssh, known_hosts=[fleet.known_hosts])
    try:
        def apply(t, local, digest):
            path = lp.stage(t, local, RELEASE, digest, "livepatch-demo.ko")
            lp.load(t, path, NAME)

        for host, role in roles.items():
            if role in ("missing", "unreachable"):
                continue
            t = pool.transport(fleet.host(host).target())
            if role == "wrong_hash":
                apply(t, bad, bad_sha)
            else:
                apply(t, good, sha)
            if role != "transition":
                lp.wait_transition(t, NAME, timeout=30)
            if role == "disabled":
                lp.disable(t, NAME, timeout=30)  # sysfs folder gone, module still loaded
    finally:
        pool.close()
    fleet.host(h[7])._set_taint(1 << 9, "kernel")  # the kernel WARNed: W is not a livepatch taint
    fleet.host(h[5]).stop()

    journal = Journal(ws.store)
    rid = journal.create({}, {}, target="demo", rollout_id="r1")
    for host in h:
        journal.record(rid, host, 1, "outcome", "done", {"state": "applied", "module": NAME, "artifact": "art1",
                                                         "sha256": sha, "kernel": RELEASE, "replace": True})
    rb = journal.create({}, {}, target="demo", rollout_id="r2")
    journal.record(rb, h[3], 1, "outcome", "done", {"state": "rolled_back", "module": NAME, "artifact": "art1",
                                                    "sha256": sha, "kernel": RELEASE, "action": "rollback"})
    journal.set_state(rid, "completed")
    yield fleet, ws_dir, roles, sha
    fleet.host(h[5]).start()


def by_host(doc: dict) -> dict[str, str]:
    return {x["host"]: x["status"] for x in doc["hosts"]}


def test_run_audit_matches_what_hosts_show(scene):
    from kpipe.workspace import open_workspace

    fleet, ws_dir, roles, sha = scene
    result = auditing.run_audit(open_workspace(str(ws_dir)), settle=0.5)
    got = {h.host: h.status for h in result.hosts}
    assert got == roles, [(h.host, h.error, [(r.patch, r.status, r.detail) for r in h.rows]) for h in result.hosts]
    rows = {(r.host, r.patch): r for r in result.rows}
    h = sorted(roles)
    assert rows[(h[0], NAME)].observed_sha256 == sha
    assert "rolled back by rollout r2" in rows[(h[3], NAME)].detail
    assert "not allowed: W" in rows[(h[7], "")].detail
    # Observed state is what the simulated kernels hold, not what the journal claims.
    for host in fleet.hosts:
        loaded = NAME in host.patches()
        status = result.hosts[[x.host for x in result.hosts].index(host.name)].status
        if status in ("compliant", "wrong_hash", "unexpected", "transition"):
            assert loaded, host.name
        if status in ("missing", "disabled"):
            assert not loaded, host.name


def test_an_audit_with_warm_caches_reads_no_inventory(scene, tmp_path, monkeypatch):
    """The limit and the desired file's patterns come from the selection cache: the second audit
    does not parse the inventory with ansible-core (~0.3 s of a 200-host audit), and says the same."""
    from kpipe.fleet import inventory
    from kpipe.workspace import open_workspace

    fleet, ws_dir, roles, _ = scene
    h = sorted(roles)
    desired = tmp_path / "desired.yml"
    desired.write_text(f"version: 1\nhosts:\n- match: '{h[0]}:{h[1]}'\n  require: [livepatch-extra]\n")
    parses: list[str] = []
    real = inventory.load_inventory
    monkeypatch.setattr(inventory, "load_inventory", lambda *a, **kw: parses.append("parse") or real(*a, **kw))

    def rows() -> set[tuple[str, str, str]]:
        result = auditing.run_audit(open_workspace(str(ws_dir)), f"{h[0]}:{h[1]}:{h[2]}", desired_file=desired)
        return {(r.host, r.patch, r.status) for r in result.rows}

    first = rows()
    assert len(parses) == 1  # the limit and the pattern are new: the inventory is read once for both
    assert rows() == first and len(parses) == 1
    assert {(x, "livepatch_extra") for x in h[:2]} <= {(x, p) for x, p, _ in first}
    assert (h[2], "livepatch_extra") not in {(x, p) for x, p, _ in first}


def test_verify_cli_exit_codes_and_json(scene):
    fleet, ws_dir, roles, _ = scene
    h = sorted(roles)
    r = kpipe(ws_dir, "verify", "--json", "--settle", "0.5")
    assert r.returncode == 1, r.stderr
    assert by_host(json.loads(r.stdout)) == roles
    ok = kpipe(ws_dir, "verify", "--limit", h[0])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "compliant" in ok.stdout and "Traceback" not in ok.stderr
    bad = kpipe(ws_dir, "verify", "--limit", "nosuchhost*")
    assert bad.returncode == 5 and "kpipe: error:" in bad.stderr


def test_audit_cli_every_format(scene, tmp_path):
    fleet, ws_dir, roles, _ = scene
    prom = tmp_path / "kpipe.prom"
    r = kpipe(ws_dir, "audit", "--format", "prometheus", "--output", str(prom), "--settle", "0.5")
    assert r.returncode == 0, r.stderr
    fams = parse_exposition(prom.read_text())
    reach = {s[1]["host"]: s[2] for s in fams["kpipe_host_reachable"].samples}
    assert reach == {h: (0.0 if s == "unreachable" else 1.0) for h, s in roles.items()}
    states = {s[1]["host"]: s[1]["status"] for s in fams["kpipe_livepatch_state"].samples if s[1]["patch"] == NAME}
    assert {h: s for h, s in states.items() if s != "compliant"} == {
        h: s for h, s in roles.items() if s not in ("compliant", "unexpected_taint")}
    assert sorted(os.listdir(tmp_path)) == ["kpipe.prom"]

    junit = kpipe(ws_dir, "audit", "-F", "junit", "--settle", "0.5")
    root = ET.fromstring(junit.stdout)
    suite = root.find("testsuite")
    assert int(suite.get("tests")) >= len(roles) and int(suite.get("errors")) == 1

    html = tmp_path / "audit.html"
    assert kpipe(ws_dir, "audit", "-F", "html", "-o", str(html), "--settle", "0.5").returncode == 0
    page = html.read_text()
    assert all(f"st-{s}" in page for s in set(roles.values()))

    table = kpipe(ws_dir, "audit", "--settle", "0", "--strict")
    assert table.returncode == 1 and "wrong_hash" in table.stdout

    unknown = kpipe(ws_dir, "audit", "-F", "yaml")
    assert unknown.returncode == 2 and "kpipe: error:" in unknown.stderr


def test_desired_file_through_the_cli(scene, tmp_path):
    fleet, ws_dir, roles, sha = scene
    h = sorted(roles)
    desired = tmp_path / "desired.yml"
    desired.write_text(f"version: 1\nhosts:\n- match: '{h[0]}'\n  forbid: [livepatch-demo]\n"
                       f"- match: '{h[1]}'\n  require: [livepatch-extra]\n")
    r = kpipe(ws_dir, "verify", "--json", "--limit", f"{h[0]}:{h[1]}", "--desired", str(desired), "--settle", "0")
    doc = json.loads(r.stdout)
    rows = {(p["host"], p["patch"]): p["status"] for x in doc["hosts"] for p in x["patches"]}
    assert rows[(h[0], NAME)] == "unexpected"
    assert rows[(h[1], "livepatch_extra")] == "missing"
    desired.write_text("version: 1\nhosts:\n- match: x\n  require: [{name: y, sha256: nothex}]\n")
    bad = kpipe(ws_dir, "verify", "--desired", str(desired))
    assert bad.returncode == 4 and f"{desired}:4" in bad.stderr
