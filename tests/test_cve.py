"""CVE coverage: the `fixes:` schema, the pure verdict function, the recipes edge and every report format.

The fleet end to end (real sshd hosts, the real CLI) is in test_cve_fleet.py.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kenv
from kpipe import audit as A
from kpipe import recipes
from kpipe.cve import (
    EXPOSED,
    FIXED,
    UNKNOWN,
    CveHost,
    CveRecipe,
    CveReport,
    Fix,
    cve_hosts_from_audit,
    evaluate_cves,
    load_cve_recipes,
)
from kpipe.report import render
from kpipe.report.jsonfmt import AUDIT_SCHEMA
from kpipe.workspace import load_workspace
from recipe_ws import REPO, line_of, make_workspace

UOS = "5.10.0-amd64-UOS"
ARM = "5.10.0-arm64-UOS"
DEB = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)

HIGH = Fix("CVE-2024-12345", "high", "use-after-free in memcg")
LOW = Fix("CVE-2023-0042", "low", "info leak")
CRIT = Fix("CVE-2024-12345", "critical", "same CVE, other recipe")

MEMCG = CveRecipe("memcg", ("5.10.0-*-UOS",), ("livepatch_memcg",), (HIGH,))
MEMCG_X86 = replace(MEMCG, arch="x86_64")
DEBFIX = CveRecipe("debfix", ("6.1.*-amd64",), ("livepatch_deb", "livepatch_deb_v2"), (LOW, CRIT))
NOHOST = CveRecipe("nohost", (), (), (Fix("CVE-2022-99999", "medium", "declared, no host runs it"),))


def host(name, release=UOS, arch="x86_64", verified=(), seen=None, reachable=True):
    return CveHost(name, reachable, release, arch, frozenset(verified), seen or {}, "" if reachable else "timed out")


# (recipes, hosts, expected verdicts as (host, cve, status, severity) by CVE then host, fleet exposed counts)
CASES = {
    "patched host is fixed": (
        [MEMCG], [host("a", verified=["livepatch_memcg"])],
        [("a", "CVE-2024-12345", FIXED, "high")], {"CVE-2024-12345": 0}),
    "targeted host without the patch is exposed": (
        [MEMCG], [host("a")],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "host on an untargeted kernel gets no verdict": (
        [MEMCG], [host("a", release=DEB)],
        [], {"CVE-2024-12345": 0}),
    "loaded but not verified is still exposed": (
        [MEMCG], [host("a", seen={"livepatch_memcg": "wrong_hash"})],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "another patch loaded does not fix it": (
        [MEMCG], [host("a", verified=["livepatch_other"])],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "unreachable host is unknown for every CVE": (
        [MEMCG, NOHOST], [host("a", release="", reachable=False)],
        [("a", "CVE-2022-99999", UNKNOWN, "medium"), ("a", "CVE-2024-12345", UNKNOWN, "high")],
        {"CVE-2022-99999": 0, "CVE-2024-12345": 0}),
    "arch mismatch: the catalog's kernel is not the host's": (
        [MEMCG_X86], [host("a", release=ARM, arch="aarch64"), host("b", release=UOS, arch="x86_64")],
        [("b", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "the recipe's arches: a host of another arch on the same release is not targeted": (
        [replace(MEMCG, arches=("aarch64",))], [host("a", arch="x86_64"), host("b", arch="arm64")],
        [("b", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "the recipe's arches: a host of unknown arch still matches": (
        [replace(MEMCG, arches=("aarch64",))], [host("a", arch="")],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "arch names are normalised (amd64 = x86_64)": (
        [replace(MEMCG, arch="amd64")], [host("a", arch="x86_64")],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "unknown arch on either side matches": (
        [replace(MEMCG, arch="unknown")], [host("a", arch="")],
        [("a", "CVE-2024-12345", EXPOSED, "high")], {"CVE-2024-12345": 1}),
    "one CVE from two recipes: either module fixes it, highest severity wins": (
        [MEMCG, DEBFIX],
        [host("a", verified=["livepatch_memcg"]), host("d", release=DEB, verified=["livepatch_deb_v2"]),
         host("e", release=DEB)],
        [("d", "CVE-2023-0042", FIXED, "low"), ("e", "CVE-2023-0042", EXPOSED, "low"),
         ("a", "CVE-2024-12345", FIXED, "critical"), ("d", "CVE-2024-12345", FIXED, "critical"),
         ("e", "CVE-2024-12345", EXPOSED, "critical")],
        {"CVE-2023-0042": 1, "CVE-2024-12345": 1}),
    "a CVE no audited host is targeted by is listed with nobody exposed": (
        [NOHOST], [host("a")], [], {"CVE-2022-99999": 0}),
    "no recipe declares fixes": ([], [host("a")], [], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_cves(case):
    recipes_, hosts, verdicts, exposed = CASES[case]
    report = evaluate_cves(recipes_, hosts)
    assert [(v.host, v.cve, v.status, v.severity) for v in report.verdicts] == verdicts
    assert {s.cve: len(s.exposed_hosts) for s in report.cves} == exposed
    for s in report.cves:
        assert list(s.exposed_hosts) == [v.host for v in report.for_cve(s.cve) if v.status == EXPOSED]
        assert list(s.fixed_hosts) == [v.host for v in report.for_cve(s.cve) if v.status == FIXED]


def test_verdict_details_name_the_reason():
    report = evaluate_cves([MEMCG], [host("a", seen={"livepatch_memcg": "disabled"}), host("b"),
                                     host("c", verified=["livepatch_memcg"])])
    d = {v.host: v.detail for v in report.verdicts}
    assert "livepatch_memcg is disabled (not verified)" in d["a"] and "memcg" in d["a"]
    assert "livepatch_memcg not loaded" in d["b"] and UOS in d["b"]
    assert d["c"] == "livepatch_memcg loaded and verified"
    assert report.cves[0].summary == HIGH.summary


def _audit(rows_by_host, kernels=None, unreachable=()):
    hosts = []
    for name, rows in rows_by_host.items():
        hosts.append(A.HostAudit(name, name not in unreachable, (kernels or {}).get(name, UOS), 0, "",
                                 tuple(A.PatchStatus(name, p, st, "", None, en) for p, st, en in rows)))
    return A.AuditResult(0.0, tuple(hosts))


def test_hosts_from_audit_only_count_compliant_enabled_patches():
    result = _audit({
        "ok": [("livepatch_memcg", "compliant", True)],
        # klp replace leaves the superseded module loaded but inactive: compliant, enabled unknown
        "superseded": [("livepatch_memcg", "compliant", None)],
        "unexpected": [("livepatch_memcg", "unexpected", True)],
        "forbid-row": [("livepatch_memcg", "compliant", None)],
    })
    got = {h.host: (sorted(h.verified), dict(h.seen)) for h in cve_hosts_from_audit(result, {"ok": "x86_64"})}
    assert got == {"ok": (["livepatch_memcg"], {}), "superseded": ([], {}),
                   "unexpected": ([], {"livepatch_memcg": "unexpected"}), "forbid-row": ([], {})}
    assert {h.host: h.arch for h in cve_hosts_from_audit(result, {"ok": "x86_64"})}["ok"] == "x86_64"


# --- the recipe schema -------------------------------------------------------------------------------

KPATCH = """\
builder: kpatch-build
kernels: [5.10.0-*-UOS]
patches: [fix.patch]
kpatch: {module_name: livepatch-memcg}
"""


def lint_errors(tmp_path, fixes_yaml):
    ws = load_workspace(make_workspace(tmp_path, {"r": KPATCH + fixes_yaml}))
    return [p for p in recipes.lint(ws) if p.severity == "error"]


@pytest.mark.parametrize("fixes_yaml, needle, words", [
    ("fixes:\n  - cve: CVE-24-1\n    severity: high\n    summary: x\n", "cve: CVE-24-1", "is not a CVE id"),
    ("fixes:\n  - cve: CVE-2024-123\n    severity: high\n    summary: x\n", "cve: CVE-2024-123", "is not a CVE id"),
    ("fixes:\n  - cve: GHSA-2024-1234\n    severity: high\n    summary: x\n", "GHSA", "is not a CVE id"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severity: hihg\n    summary: x\n", "severity: hihg", "did you mean 'high'"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severity: severe\n    summary: x\n", "severity: severe",
     "none, low, medium, high, critical"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severity: high\n", "- cve: CVE-2024-1234", "summary is required"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severity: high\n    summary: '  '\n", "summary:", "must not be empty"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severity: high\n    summary: x\n    score: 9\n", "score:",
     "unknown key 'score'"),
    ("fixes:\n  - cve: CVE-2024-1234\n    severty: high\n    summary: x\n", "severty:", "did you mean 'severity'"),
    ("fixes: CVE-2024-1234\n", "fixes:", "must be a list"),
    ("fixes:\n  - CVE-2024-1234\n", "- CVE-2024-1234", "must be a mapping"),
    ("fixes:\n  - {cve: CVE-2024-1234, severity: low, summary: a}\n"
     "  - {cve: cve-2024-1234, severity: low, summary: b}\n",
     "cve-2024-1234", "listed twice"),
    ("fixes:\n  - cve: \"{{ options.id }}\"\n    severity: high\n    summary: x\noptions: {id: CVE-1}\n",
     "cve:", "is not a CVE id"),
])
def test_malformed_fixes_are_file_line_errors(tmp_path, fixes_yaml, needle, words):
    errs = lint_errors(tmp_path, fixes_yaml)
    assert errs, "lint accepted a malformed fixes entry"
    first = errs[0]
    assert (first.file, first.line) == ("recipes/r.yaml", line_of(tmp_path, "r", needle)), errs
    assert words in first.message + " " + first.hint, errs
    assert first.hint


def test_good_fixes_lint_clean_and_normalise(tmp_path):
    assert lint_errors(tmp_path, "fixes:\n  - {cve: cve-2024-1234, severity: HIGH, summary: ' leak '}\n") == []
    ws = load_workspace(tmp_path)
    (rec,), errors = load_cve_recipes(ws, [UOS])
    assert errors == [] and rec.fixes == (Fix("CVE-2024-1234", "high", "leak"),)
    assert rec.modules == ("livepatch_memcg",) and rec.targets(UOS, "x86_64")


def test_shipped_examples_declare_fixes():
    ws = load_workspace(REPO)
    assert [p for p in recipes.lint(ws) if p.severity == "error"] == []
    got, errors = load_cve_recipes(ws, [DEB, UOS])
    assert errors == []
    by_name = {r.recipe: r for r in got}
    assert by_name["cmdline-demo"].fixes[0].severity == "low" and by_name["cmdline-demo"].fixes[0].summary == "demo"
    assert by_name["cmdline-demo"].modules == ("livepatch_cmdline_demo",)
    assert by_name["memcg-oom-fix"].modules == ("livepatch_memcg_oom_fix",)
    assert by_name["memcg-oom-fix"].arch == "x86_64"  # from the catalog entry of kpipe.toml


def test_templated_summary_renders_per_kernel_in_the_sandbox(tmp_path):
    fixes = ("fixes:\n  - cve: CVE-2024-1234\n    severity: \"{{ 'high' if kernel.arch == 'x86_64' else 'low' }}\"\n"
             "    summary: \"leak on {{ kernel.release }}\"\n")
    make_workspace(tmp_path, {"r": KPATCH + fixes})
    got, errors = load_cve_recipes(load_workspace(tmp_path), [UOS, ARM])
    assert errors == []
    assert sorted((r.kernels, r.fixes[0].severity, r.fixes[0].summary) for r in got) == [
        ((UOS,), "high", f"leak on {UOS}"), ((ARM,), "low", f"leak on {ARM}")]


def test_recipe_arches_reach_the_verdicts(tmp_path):
    """A recipe limited to aarch64 by `arches:` leaves an x86_64 host of the same release out of its CVE."""
    make_workspace(tmp_path, {"r": KPATCH + "arches: [arm64]\n"
                              + "fixes: [{cve: CVE-2024-1234, severity: high, summary: leak}]\n"})
    release = "5.10.0-74-UOS"  # names no arch: the hosts' arches decide
    (rec,), errors = load_cve_recipes(load_workspace(tmp_path), [release])
    assert errors == [] and rec.arches == ("aarch64",)
    report = evaluate_cves([rec], [host("x", release, arch="x86_64"), host("a", release, arch="aarch64")])
    assert [(v.host, v.status) for v in report.verdicts] == [("a", EXPOSED)]


def test_sandbox_escape_in_fixes_is_a_recipe_error_not_a_crash(tmp_path):
    fixes = ("fixes:\n  - cve: CVE-2024-1234\n    severity: high\n"
             "    summary: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n")
    make_workspace(tmp_path, {"r": KPATCH + fixes, "ok": KPATCH.replace("memcg", "ok")
                              + "fixes: [{cve: CVE-2023-7777, severity: low, summary: fine}]\n"})
    got, errors = load_cve_recipes(load_workspace(tmp_path), [UOS])
    assert [r.recipe for r in got] == ["ok"]  # the broken recipe does not hide the others
    assert len(errors) == 1 and errors[0].startswith(f"recipes/r.yaml:{line_of(tmp_path, 'r', 'summary')}:")
    assert "sandbox" in errors[0]


def test_artifact_module_names_count_too(tmp_path):
    from kpipe.artifacts import add_artifact

    make_workspace(tmp_path, {"r": KPATCH + "fixes: [{cve: CVE-2024-1234, severity: high, summary: x}]\n"})
    ws = load_workspace(tmp_path)
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"module")
    add_artifact(ws.store, ko, kernel=UOS, module_name="livepatch-memcg-renamed", recipe="r", status="valid")
    (rec,), _ = load_cve_recipes(ws, [UOS])
    assert rec.modules == ("livepatch_memcg", "livepatch_memcg_renamed")


# --- the report formats ------------------------------------------------------------------------------


@pytest.fixture
def result():
    """Four hosts: fixed, exposed, exposed with a hostile name, unreachable; two CVEs."""
    audit = _audit({
        "fixed-1": [("livepatch_memcg", "compliant", True)],
        "exposed-1": [("", "compliant", None)],
        'bad"host\\\n': [("livepatch_memcg", "missing", None)],
        "gone": [("", "unreachable", None)],
    }, unreachable=("gone",))
    report = evaluate_cves([MEMCG, NOHOST], cve_hosts_from_audit(audit))
    return replace(audit, cves=report)


def test_json_carries_the_cve_view_and_validates(result):
    doc = json.loads(render(result, "json"))
    jsonschema.validate(doc, AUDIT_SCHEMA)
    summary = {s["cve"]: s for s in doc["cves"]["summary"]}
    assert summary["CVE-2024-12345"]["exposed_hosts"] == sorted(["exposed-1", 'bad"host\\\n'])
    assert summary["CVE-2024-12345"]["fixed_hosts"] == ["fixed-1"] and summary["CVE-2024-12345"]["hosts_unknown"] == 1
    assert summary["CVE-2022-99999"]["hosts_targeted"] == 0
    statuses = {(v["host"], v["cve"]): v["status"] for v in doc["cves"]["hosts"]}
    assert statuses[("gone", "CVE-2024-12345")] == "unknown" and statuses[("fixed-1", "CVE-2024-12345")] == "fixed"
    # The schema really checks the CVE part.
    broken = json.loads(render(result, "json"))
    broken["cves"]["hosts"][0]["status"] = "patched"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, AUDIT_SCHEMA)
    # An audit without a CVE view (verify of old trails) still validates.
    jsonschema.validate(json.loads(render(replace(result, cves=None), "json")), AUDIT_SCHEMA)


def test_prometheus_cve_families_parse_with_prometheus_client(result):
    fams = {f.name: f for f in text_string_to_metric_families(render(result, "prometheus"))}
    exposed = {(s.labels["host"], s.labels["cve"], s.labels["severity"]): s.value
               for s in fams["kpipe_cve_exposed"].samples}
    assert exposed == {("fixed-1", "CVE-2024-12345", "high"): 0.0, ("exposed-1", "CVE-2024-12345", "high"): 1.0,
                       ('bad"host\\\n', "CVE-2024-12345", "high"): 1.0}
    fleet = {(s.labels["cve"], s.labels["severity"]): s.value for s in fams["kpipe_cve_exposed_hosts"].samples}
    assert fleet == {("CVE-2024-12345", "high"): 2.0, ("CVE-2022-99999", "medium"): 0.0}
    assert {s.labels["cve"]: s.value for s in fams["kpipe_cve_unknown_hosts"].samples}["CVE-2024-12345"] == 1.0
    assert fams["kpipe_cve_exposed"].type == "gauge" and fams["kpipe_host_reachable"].samples
    assert "kpipe_cve_exposed" not in render(replace(result, cves=None), "prometheus")


def test_junit_has_a_testcase_per_host_and_cve(result):
    root = ET.fromstring(render(result, "junit"))
    suite = root.find("testsuite[@name='kpipe-cve']")
    cases = {(c.get("classname"), c.get("name")): c for c in suite.findall("testcase")}
    assert len(cases) == len(result.cves.verdicts) == int(suite.get("tests"))
    assert cases[("kpipe.cve.exposed-1", "CVE-2024-12345")].find("failure") is not None
    assert cases[("kpipe.cve.fixed-1", "CVE-2024-12345")].find("failure") is None
    assert cases[("kpipe.cve.gone", "CVE-2024-12345")].find("error") is not None
    assert (suite.get("failures"), suite.get("errors")) == ("2", "2")
    audit_suite = root.find("testsuite[@name='kpipe-audit']")
    assert int(root.get("tests")) == int(audit_suite.get("tests")) + int(suite.get("tests"))


def test_html_has_a_cve_section_escaped(result):
    page = render(result, "html")
    section = page[page.index('<h2 id="cves">'):]
    assert "CVE-2024-12345" in section and "use-after-free in memcg" in section and "exposed-1" in section
    assert "bad&#34;host" in section and 'bad"host' not in section
    assert "fixed-1</td>" not in section.split("Hosts still exposed")[1]
    assert '<h2 id="cves">' not in render(replace(result, cves=None), "html")


def test_table_text_lists_cves(result):
    text = render(result, "table")
    assert "CVE-2024-12345  high" in text and "exposed-1" in text.split("CVE ")[-1]


def test_report_narrowing():
    report = evaluate_cves([MEMCG, NOHOST], [host("a")])
    only = report.only(["CVE-2022-99999"])
    assert [s.cve for s in only.cves] == ["CVE-2022-99999"] and only.verdicts == ()
    assert CveReport().to_dict() == {"summary": [], "hosts": [], "errors": []}


def test_templated_module_name_is_rendered_for_the_hosts_kernel(tmp_path):
    recipe = KPATCH.replace("module_name: livepatch-memcg", "module_name: \"livepatch-memcg-{{ kernel.abi or 'x' }}\"")
    make_workspace(tmp_path, {"r": recipe + "fixes: [{cve: CVE-2024-1234, severity: high, summary: x}]\n"})
    (rec,), errors = load_cve_recipes(load_workspace(tmp_path), [UOS])
    assert errors == [] and rec.modules == ("livepatch_memcg_x",)
