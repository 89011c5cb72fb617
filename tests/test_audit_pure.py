"""The audit is pure: host output text and journal records in, verdicts out (no SSH, no store, no workspace).

Each case runs what a host printed through the same pure functions the edge uses (the facts parser, the
livepatch state parser, observed_from_facts) and evaluates it against desired state; the table says
which verdict each (host, patch) gets."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from kpipe import audit as A
from kpipe.audit import AppliedRecord as R
from kpipe.errors import ConfigError
from kpipe.findings import Finding, Severity
from kpipe.fleet.facts import parse_facts
from kpipe.fleet.livepatch import parse_host_livepatch

KPIPE = Path(__file__).resolve().parent.parent / "kpipe"
REL = "5.10.0-136.12.0.86.oe2203sp1.x86_64"
SHA = "573aff240b8b8345d088d23d2d9bef8420e1dec0aeae559ab53501c7f8f8f4ef"
OTHER = "c" * 64


def facts_text(*, patches: str = "", installed: str = "", tainted: int = 45056) -> str:
    """FACTS_SCRIPT output as a SimFleet openEuler host prints it; `patches`: lines of its livepatch part."""
    return (f"kpipe-facts 1\nrelease {REL}\nmachine x86_64\nos ID=openEuler\nos VERSION_ID=\"22.03\"\n"
            f"tainted {tainted}\nkpatch -\nselinux -\nsig_enforce N\ndf-begin /var/lib/kpatch\n"
            "Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
            "/dev/vda         264212084 24195044  82195868      23% /var/lib\ndf-end\n"
            + (f"installed {installed}  /var/lib/kpatch/{REL}/livepatch-cmdline.ko\n" if installed else "")
            + f"---livepatch---\nlivepatch_sysfs 1\ntainted {tainted}\n{patches}end\n---end-livepatch---\n"
              "kpipe-facts-end\n")


def lp_lines(enabled: int = 1, transition: int = 0, patched: int = 1, name: str = "livepatch_cmdline") -> str:
    return (f"patch {name}\nenabled {name} {enabled}\ntransition {name} {transition}\n"
            f"object {name} vmlinux {patched}\nmodule {name} 1 OEK\n")


STATE_LOADED = "livepatch_sysfs 1\ntainted 45056\nmodule livepatch_cmdline 1 OEK\n" \
               "notes livepatch_cmdline 040000001400000003000000474e5500" + "ab" * 20 + "\nend\n"
STATE_GONE = "livepatch_sysfs 1\ntainted 45056\nmodule livepatch_cmdline 0 -\nend\n"


def applied(patch: str = "livepatch-cmdline", sha: str = SHA, seq: float = 1, replace: bool = False,
            build_id: str = "") -> R:
    return R(seq, "r1", "h1", patch, "applied", "art1", sha, REL, replace, build_id)


# (case, journal records, facts text, STATE_SCRIPT text for the named modules or None) -> {patch: verdict}
TABLE = [
    ("applied_and_loaded", [applied()], facts_text(patches=lp_lines(), installed=SHA), None,
     {"livepatch_cmdline": "compliant"}),
    ("applied_not_loaded", [applied()], facts_text(tainted=0), None, {"livepatch_cmdline": "missing"}),
    ("stuck_in_transition", [applied()], facts_text(patches=lp_lines(transition=1)), None,
     {"livepatch_cmdline": "transition"}),
    ("vmlinux_not_patched", [applied()], facts_text(patches=lp_lines(patched=0)), None,
     {"livepatch_cmdline": "transition"}),
    ("other_build_installed", [applied()], facts_text(patches=lp_lines(), installed=OTHER), None,
     {"livepatch_cmdline": "wrong_hash"}),
    ("other_build_loaded", [applied(build_id="cd" * 20)], facts_text(patches=lp_lines()), STATE_LOADED,
     {"livepatch_cmdline": "wrong_hash"}),
    ("same_build_loaded", [applied(build_id="ab" * 20)], facts_text(patches=lp_lines()), STATE_LOADED,
     {"livepatch_cmdline": "compliant"}),
    ("disabled_module_still_loaded", [applied()], facts_text(), STATE_LOADED, {"livepatch_cmdline": "disabled"}),
    ("disabled_and_unloaded", [applied()], facts_text(), STATE_GONE, {"livepatch_cmdline": "missing"}),
    ("nobody_asked_for_it", [], facts_text(patches=lp_lines()), None, {"livepatch_cmdline": "unexpected"}),
    ("warned_kernel", [], facts_text(tainted=45056 | 1 << 9), None, {"": "unexpected_taint"}),
    ("quiet_host", [], facts_text(tainted=0), None, {"": "compliant"}),
    ("superseded_by_replace", [applied("livepatch-old", seq=1), applied(seq=2, replace=True)],
     facts_text(patches=lp_lines(), installed=SHA), None, {"livepatch_cmdline": "compliant"}),
]


@pytest.mark.parametrize("records,facts,state,expected", [c[1:] for c in TABLE], ids=[c[0] for c in TABLE])
def test_host_output_in_verdicts_out(records, facts, state, expected) -> None:
    desired = A.desired_from_records(records)
    assert A.modules_to_read(desired, "h1") >= {r.patch.replace("-", "_") for r in records}
    observed = A.observed_from_facts(parse_facts("h1", facts), parse_host_livepatch(state) if state else None)
    result = A.evaluate(desired, [observed], generated_at=0)
    assert {r.patch: r.status for r in result.rows} == expected
    assert result.hosts[0].status == max(expected.values(), key=A.STATUSES.index)


def test_an_error_is_an_unreachable_verdict_for_every_desired_patch() -> None:
    desired = A.desired_from_records([applied(), applied("livepatch-two", seq=2)])
    result = A.evaluate(desired, [A.unreachable("h1", "h1: connection refused\nmore text")])
    assert [(r.patch, r.status, r.detail) for r in result.rows] == [
        ("livepatch_cmdline", "unreachable", "h1: connection refused"),
        ("livepatch_two", "unreachable", "h1: connection refused")]
    assert not result.compliant and result.hosts[0].error == "h1: connection refused"


def test_verdicts_are_a_strenum_and_json_keeps_plain_strings() -> None:
    assert [str(v) for v in A.Verdict] == ["compliant", "disabled", "transition", "missing", "wrong_hash",
                                           "unexpected", "unexpected_taint", "unreachable"]
    assert tuple(A.Verdict) == A.STATUSES and A.MISSING is A.Verdict.MISSING
    result = A.evaluate(A.desired_from_records([applied()]),
                        [A.observed_from_facts(parse_facts("h1", facts_text(tainted=0)))], generated_at=0)
    text = json.dumps(result.to_dict())
    doc = json.loads(text)
    assert doc["hosts"][0]["status"] == "missing" and doc["hosts"][0]["patches"][0]["status"] == "missing"
    assert doc["summary"]["statuses"]["missing"] == 1 and "Verdict" not in text
    assert type(doc["hosts"][0]["status"]) is str


FINDINGS = [
    ("compliant", Severity.INFO), ("disabled", Severity.WARNING), ("transition", Severity.WARNING),
    ("missing", Severity.ERROR), ("wrong_hash", Severity.ERROR), ("unreachable", Severity.ERROR),
]


@pytest.mark.parametrize("status,severity", FINDINGS)
def test_a_verdict_is_a_finding_at_its_host(status: str, severity: Severity) -> None:
    row = A.PatchStatus("web1", "lp_x", A.Verdict(status), "why")
    f = row.finding()
    assert isinstance(f, Finding)
    assert (f.id, f.severity, f.message, f.location, str(f)) == (
        f"audit.{status}", severity, "lp_x: why", "web1", "web1: lp_x: why")
    assert f.to_dict() == {"id": f"audit.{status}", "severity": str(severity), "message": "lp_x: why", "hint": "",
                           "host": "web1"}


def test_desired_file_read_by_the_one_loader_names_a_duplicate_key() -> None:
    # the old SafeLoader subclass kept the last of two `require:` keys silently: one rule was lost
    text = "version: 1\nhosts:\n- match: h1\n  require: [a]\n  require: [b]\n"
    with pytest.raises(ConfigError) as e:
        A.parse_desired_text(text, "d.yml")
    assert str(e.value).startswith("d.yml:5:") and "duplicate key 'require'" in str(e.value)


def test_desired_file_rules_know_their_line() -> None:
    doc = A.parse_desired_text("version: 1\nhosts:\n- match: h1\n  require: [lp-a]\n", "d.yml")
    state = A.apply_desired_file(A.DesiredState(), doc, A.glob_matcher(["h1"]), "d.yml")
    assert state.patches["h1"]["lp_a"].source == "d.yml:3"
    assert state.unmanaged == A.Unmanaged.FLAG


PURE = ["audit.py", "desired.py", "findings.py", "yamlnodes.py"]
EDGES = ("kpipe.transport", "kpipe.store", "kpipe.workspace", "kpipe.fleet.observe", "kpipe.fleet.inventory",
         "kpipe.fleet.auditing", "kpipe.fleet.factstore", "kpipe.rollout", "kpipe.cve", "fabric", "paramiko",
         "rich", "typer", "sqlite3")


@pytest.mark.parametrize("module", PURE)
def test_the_audit_core_imports_no_edge(module: str) -> None:
    tree = ast.parse((KPIPE / module).read_text())
    imported = set()
    for node in ast.walk(tree):  # imports inside functions count too: they are the real dependency graph
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    bad = sorted(m for m in imported if any(m == e or m.startswith(e + ".") for e in EDGES))
    assert bad == [], f"kpipe/{module} imports {bad}"


def test_audit_module_stays_small() -> None:
    # ISSUE9: desired + observed -> verdicts, under 500 lines; the edges live elsewhere
    assert len((KPIPE / "audit.py").read_text().splitlines()) < 500
