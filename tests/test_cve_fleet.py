"""`kpipe audit --cve` end to end: real sshd hosts (SimFleet, simulated livepatch sysfs), the real
rollout journal, real recipes with `fixes:`, the real CLI in a subprocess.

Four hosts run a kernel the demo recipe targets: one has its patch loaded and verified (fixed),
one has nothing loaded (exposed, although the compliance audit has nothing to say about it), one
has another build of the module loaded (wrong hash: not verified, still exposed), one is down
(unknown). Then the patch goes onto the exposed host and the answer changes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kenv
from kpipe.report.jsonfmt import AUDIT_SCHEMA
from simfleet import simfleet_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RELEASE = kenv.kernel_env(module_level=True).release  # the simulated hosts run the installed headers' release
NAME = "livepatch_demo"
CVE = "CVE-2024-11111"
OTHER = "CVE-2023-22222"

DEMO_RECIPE = f"""\
name: demo-fix
builder: kpatch-build
kernels: ["6.1.0-*-amd64"]
patches: [fix.patch]
kpatch:
  module_name: livepatch-demo
fixes:
  - cve: {CVE}
    severity: high
    summary: "demo: use-after-free on {{{{ kernel.release }}}}"
"""
UOS_RECIPE = f"""\
name: uos-fix
builder: kpatch-build
kernels: ["5.10.0-*-UOS"]
patches: [fix.patch]
fixes:
  - {{cve: {OTHER}, severity: medium, summary: "no audited host runs this kernel"}}
"""


def kpipe(ws: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                          timeout=timeout)


def _apply(ws, fleet, host: str, local: Path, sha: str) -> None:
    from kpipe.fleet import livepatch as lp
    from kpipe.transport.ssh import SshPool

    pool = SshPool(ws.ssh, known_hosts=[fleet.known_hosts])
    try:
        t = pool.transport(fleet.host(host).target())
        path = lp.stage(t, local, RELEASE, sha, "livepatch-demo.ko")
        lp.load(t, path, NAME)
        lp.wait_transition(t, NAME, timeout=30)
    finally:
        pool.close()


def _journal_applied(ws, rollout_id: str, hosts: list[str], sha: str) -> None:
    from kpipe.rollout.journal import Journal

    journal = Journal(ws.store)
    rid = journal.create({}, {}, target="demo-fix", rollout_id=rollout_id)
    for h in hosts:
        journal.record(rid, h, 1, "outcome", "done", {"state": "applied", "module": NAME, "artifact": "art1",
                                                      "sha256": sha, "kernel": RELEASE})
    journal.set_state(rid, "completed")


@pytest.fixture(scope="module")
def scene(simfleet_factory, tmp_path_factory):  # noqa: F811
    from kpipe.workspace import open_workspace

    fleet = simfleet_factory(4)
    tmp = tmp_path_factory.mktemp("cvefleet")
    ws_dir = fleet.write_workspace(tmp / "ws")
    toml = ws_dir / "kpipe.toml"
    toml.write_text(toml.read_text().replace("connect_timeout = 10", "connect_timeout = 60"))
    (ws_dir / "recipes").mkdir()
    (ws_dir / "patches").mkdir()
    (ws_dir / "patches" / "fix.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    (ws_dir / "recipes" / "demo-fix.yaml").write_text(DEMO_RECIPE)
    (ws_dir / "recipes" / "uos-fix.yaml").write_text(UOS_RECIPE)
    ws = open_workspace(str(ws_dir))

    good = tmp / "livepatch-demo.ko"
    good.write_bytes(b"the good module\n")
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    other = tmp / "other" / "livepatch-demo.ko"
    other.parent.mkdir()
    other.write_bytes(b"some other build\n")

    h = sorted(x.name for x in fleet.hosts)
    roles = {h[0]: "fixed", h[1]: "exposed", h[2]: "wrong_hash", h[3]: "unknown"}
    _apply(ws, fleet, h[0], good, sha)
    _apply(ws, fleet, h[2], other, hashlib.sha256(other.read_bytes()).hexdigest())
    _journal_applied(ws, "r1", [h[0], h[2]], sha)
    fleet.host(h[3]).stop()
    yield fleet, ws_dir, ws, roles, good, sha
    fleet.host(h[3]).start()


def test_cve_shows_who_is_still_exposed(scene):
    fleet, ws_dir, ws, roles, good, sha = scene
    h = sorted(roles)
    r = kpipe(ws_dir, "audit", "--cve", CVE.lower(), "--settle", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "kpipe: error: 3 hosts exposed to CVE-2024-11111" in r.stderr
    assert f"{CVE} (high): 2 exposed, 1 fixed, 1 unknown" in r.stdout
    listed = r.stdout.split("exposed hosts", 1)[1]
    for name in (h[1], h[2], h[3]):
        assert name in listed
    assert h[0] not in listed  # the patched host is not in the table
    assert "wrong_hash" in listed  # why h[2] counts: its module is another build

    ok = kpipe(ws_dir, "audit", "--cve", CVE, "--limit", h[0], "--settle", "0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no selected host is exposed" in ok.stdout

    nobody = kpipe(ws_dir, "audit", "--cve", OTHER, "--limit", f"{h[0]}:{h[1]}", "--settle", "0")
    assert nobody.returncode == 0 and f"{OTHER} (medium): 0 exposed, 0 fixed" in nobody.stdout

    undeclared = kpipe(ws_dir, "audit", "--cve", "CVE-2024-11112", "--settle", "0")
    assert undeclared.returncode == 5 and "no recipe declares a fix for CVE-2024-11112" in undeclared.stderr
    assert "did you mean 'CVE-2024-11111'" in undeclared.stderr
    bad = kpipe(ws_dir, "audit", "--cve", "CVE-24-1")
    assert bad.returncode == 4 and "is not a CVE id" in bad.stderr and "Traceback" not in bad.stderr


def test_every_format_carries_the_cve_view(scene, tmp_path):
    fleet, ws_dir, ws, roles, good, sha = scene
    h = sorted(roles)
    r = kpipe(ws_dir, "audit", "-F", "json", "--settle", "0")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, AUDIT_SCHEMA)
    verdicts = {v["host"]: v["status"] for v in doc["cves"]["hosts"] if v["cve"] == CVE}
    assert verdicts == {h[0]: "fixed", h[1]: "exposed", h[2]: "exposed", h[3]: "unknown"}
    summary = {s["cve"]: s for s in doc["cves"]["summary"]}
    assert summary[CVE]["summary"] == f"demo: use-after-free on {RELEASE}"  # rendered per kernel
    assert summary[OTHER]["hosts_targeted"] == 0 and doc["cves"]["errors"] == []
    # The compliance view alone would call the unpatched host compliant: nothing asked for the patch there.
    assert {x["host"]: x["status"] for x in doc["hosts"]}[h[1]] == "compliant"

    prom = tmp_path / "kpipe.prom"
    assert kpipe(ws_dir, "audit", "-F", "prometheus", "-o", str(prom), "--settle", "0").returncode == 0
    fams = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    per_host = {s.labels["host"]: s.value for s in fams["kpipe_cve_exposed"].samples if s.labels["cve"] == CVE}
    assert per_host == {h[0]: 0.0, h[1]: 1.0, h[2]: 1.0}  # no sample for the host that was not read
    fleet_gauge = {(s.labels["cve"], s.labels["severity"]): s.value for s in fams["kpipe_cve_exposed_hosts"].samples}
    assert fleet_gauge == {(CVE, "high"): 2.0, (OTHER, "medium"): 0.0}

    junit = kpipe(ws_dir, "audit", "-F", "junit", "--settle", "0")
    suite = ET.fromstring(junit.stdout).find("testsuite[@name='kpipe-cve']")
    failed = {c.get("classname").removeprefix("kpipe.cve.") for c in suite.findall("testcase")
              if c.find("failure") is not None and c.get("name") == CVE}
    assert failed == {h[1], h[2]}

    html = tmp_path / "audit.html"
    assert kpipe(ws_dir, "audit", "-F", "html", "-o", str(html), "--settle", "0").returncode == 0
    section = html.read_text().split('<h2 id="cves">', 1)[1]
    assert CVE in section and h[1] in section and OTHER in section

    table = kpipe(ws_dir, "audit", "--settle", "0")
    assert table.returncode == 0 and "CVEs the recipes fix" in table.stdout and CVE in table.stdout


def test_rolling_out_the_patch_clears_the_exposure(scene):
    fleet, ws_dir, ws, roles, good, sha = scene
    h = sorted(roles)
    before = kpipe(ws_dir, "audit", "--cve", CVE, "--limit", h[1], "--settle", "0")
    assert before.returncode == 1 and h[1] in before.stdout
    _apply(ws, fleet, h[1], good, sha)
    _journal_applied(ws, "r2", [h[1]], sha)
    after = kpipe(ws_dir, "audit", "--cve", CVE, "--limit", h[1], "--settle", "0")
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"{CVE} (high): 0 exposed, 1 fixed" in after.stdout


def test_a_broken_recipe_makes_the_cve_answer_fail_not_lie(scene):
    fleet, ws_dir, ws, roles, good, sha = scene
    broken = ws_dir / "recipes" / "broken.yaml"
    broken.write_text(textwrap.dedent(f"""\
        builder: kpatch-build
        kernels: ["6.1.0-*-amd64"]
        patches: [fix.patch]
        fixes:
          - {{cve: {CVE}, severity: hihg, summary: x}}
        """))
    try:
        r = kpipe(ws_dir, "audit", "--cve", CVE, "--settle", "0")
        assert r.returncode == 4, r.stdout + r.stderr
        assert "recipes/broken.yaml:5:" in r.stderr and "did you mean 'high'" in r.stderr
        assert "Traceback" not in r.stderr
        # Without --cve the audit still reports (compliance does not depend on recipes) and warns.
        plain = kpipe(ws_dir, "audit", "-F", "json", "--settle", "0")
        assert plain.returncode == 0 and "warning: CVE view incomplete: recipes/broken.yaml:5:" in plain.stderr
        assert json.loads(plain.stdout)["cves"]["errors"][0].startswith("recipes/broken.yaml:5:")
    finally:
        broken.unlink()
