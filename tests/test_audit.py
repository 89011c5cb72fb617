"""Audit core: desired (journal + file) against observed, every status, as tables."""

from __future__ import annotations

import pytest

import kenv
from kpipe import audit as A
from kpipe.audit import AppliedRecord as R
from kpipe.audit import ObservedHost as H
from kpipe.audit import ObservedPatch as P
from kpipe.errors import ConfigError, NotFoundError
from kpipe.fleet import factstore

SHA1 = "a" * 64
SHA2 = "b" * 64
KERNEL = kenv.kernel_env(module_level=True)  # the installed headers (tests/kenv.py)
K = KERNEL.release
TAINT_OK = 45056  # O + E + K, what a real livepatch load leaves (lab.md)


def applied(host: str, patch: str = "livepatch-fix", seq: float = 1, sha: str = SHA1, kernel: str = K,
            rollout: str = "r1", replace: bool = False) -> R:
    return R(seq, rollout, host, patch, "applied", "art1", sha, kernel, replace)


def rolled_back(host: str, patch: str = "livepatch-fix", seq: float = 2, rollout: str = "r1") -> R:
    return R(seq, rollout, host, patch, "rolled_back")


def loaded(name: str = "livepatch_fix", enabled=True, transition=False, objects=None) -> dict:
    return {name: P(name, enabled, transition, objects if objects is not None else {"vmlinux": True})}


def statuses(result: A.AuditResult) -> list[tuple[str, str, str]]:
    return [(r.host, r.patch, r.status) for r in result.rows]


# (case id, journal records, observed hosts, expected (host, patch, status) rows)
CASES = [
    ("compliant", [applied("h1")],
     [H("h1", kernel=K, tainted=TAINT_OK, patches=loaded(), installed={"livepatch-fix.ko": SHA1})],
     [("h1", "livepatch_fix", "compliant")]),
    ("compliant_hash_unchecked_without_file", [applied("h1")],
     [H("h1", kernel=K, patches=loaded())],
     [("h1", "livepatch_fix", "compliant")]),
    ("missing", [applied("h1")],
     [H("h1", kernel=K, tainted=TAINT_OK)],
     [("h1", "livepatch_fix", "missing")]),
    ("missing_after_reboot_into_other_kernel", [applied("h1")],
     [H("h1", kernel=KERNEL.other_release(+1))],
     [("h1", "livepatch_fix", "missing")]),
    ("unexpected_unmanaged", [],
     [H("h1", kernel=K, patches=loaded("vendor_patch"))],
     [("h1", "vendor_patch", "unexpected")]),
    ("unexpected_after_rollback", [applied("h1"), rolled_back("h1")],
     [H("h1", kernel=K, patches=loaded())],
     [("h1", "livepatch_fix", "unexpected")]),
    ("rolled_back_and_gone_is_compliant", [applied("h1"), rolled_back("h1")],
     [H("h1", kernel=K, tainted=TAINT_OK)],
     [("h1", "", "compliant")]),
    ("reapplied_after_rollback", [applied("h1"), rolled_back("h1"), applied("h1", seq=3, rollout="r2")],
     [H("h1", kernel=K, patches=loaded())],
     [("h1", "livepatch_fix", "compliant")]),
    ("disabled", [applied("h1")],
     [H("h1", kernel=K, patches=loaded(enabled=False))],
     [("h1", "livepatch_fix", "disabled")]),
    ("disabled_undesired", [],
     [H("h1", kernel=K, patches=loaded(enabled=False))],
     [("h1", "livepatch_fix", "disabled")]),
    ("stuck_patching", [applied("h1")],
     [H("h1", kernel=K, patches=loaded(transition=True))],
     [("h1", "livepatch_fix", "transition")]),
    ("stuck_unpatching_after_rollback", [applied("h1"), rolled_back("h1")],
     [H("h1", kernel=K, patches=loaded(enabled=False, transition=True))],
     [("h1", "livepatch_fix", "transition")]),
    ("vmlinux_not_patched", [applied("h1")],
     [H("h1", kernel=K, patches=loaded(objects={"vmlinux": False}))],
     [("h1", "livepatch_fix", "transition")]),
    ("module_object_not_loaded_is_fine", [applied("h1")],
     [H("h1", kernel=K, patches=loaded(objects={"vmlinux": True, "ext4": False}))],
     [("h1", "livepatch_fix", "compliant")]),
    ("wrong_hash", [applied("h1")],
     [H("h1", kernel=K, patches=loaded(), installed={"livepatch_fix": SHA2})],
     [("h1", "livepatch_fix", "wrong_hash")]),
    ("hash_case_insensitive", [applied("h1", sha=SHA1.upper())],
     [H("h1", kernel=K, patches=loaded(), installed={"livepatch_fix": SHA1})],
     [("h1", "livepatch_fix", "compliant")]),
    ("later_rollout_new_hash", [applied("h1"), applied("h1", seq=2, sha=SHA2, rollout="r2")],
     [H("h1", kernel=K, patches=loaded(), installed={"livepatch_fix": SHA1})],
     [("h1", "livepatch_fix", "wrong_hash")]),
    ("unexpected_taint", [applied("h1")],
     [H("h1", kernel=K, tainted=TAINT_OK | 1 << 7 | 1, patches=loaded())],
     [("h1", "", "unexpected_taint"), ("h1", "livepatch_fix", "compliant")]),
    ("taint_unknown_is_not_a_finding", [applied("h1")],
     [H("h1", kernel=K, tainted=None, patches=loaded())],
     [("h1", "livepatch_fix", "compliant")]),
    ("unreachable_with_desired", [applied("h1"), applied("h1", "livepatch-two", seq=2)],
     [H("h1", reachable=False, error="connection refused")],
     [("h1", "livepatch_fix", "unreachable"), ("h1", "livepatch_two", "unreachable")]),
    ("unreachable_nothing_desired", [],
     [H("h1", reachable=False, error="timeout")],
     [("h1", "", "unreachable")]),
    ("nothing_desired_nothing_loaded", [],
     [H("h1", kernel=K, tainted=0)],
     [("h1", "", "compliant")]),
    ("journal_of_other_host_ignored", [applied("h2")],
     [H("h1", kernel=K)],
     [("h1", "", "compliant")]),
    ("replace_supersedes_older", [applied("h1", "livepatch-a"), applied("h1", "livepatch-b", seq=2, replace=True)],
     [H("h1", kernel=K, patches=loaded("livepatch_b"))],
     [("h1", "livepatch_b", "compliant")]),
    ("superseded_still_loaded_is_unexpected",
     [applied("h1", "livepatch-a"), applied("h1", "livepatch-b", seq=2, replace=True)],
     [H("h1", kernel=K, patches={**loaded("livepatch_a"), **loaded("livepatch_b")})],
     [("h1", "livepatch_a", "unexpected"), ("h1", "livepatch_b", "compliant")]),
    ("superseded_module_still_loaded_is_fine",
     [applied("h1", "livepatch-a"), applied("h1", "livepatch-b", seq=2, replace=True)],
     [H("h1", kernel=K, patches=loaded("livepatch_b"), modules={"livepatch_a": True, "livepatch_b": True})],
     [("h1", "livepatch_a", "compliant"), ("h1", "livepatch_b", "compliant")]),
    ("rolled_back_module_still_loaded_is_disabled", [applied("h1"), rolled_back("h1")],
     [H("h1", kernel=K, modules={"livepatch_fix": True})],
     [("h1", "livepatch_fix", "disabled")]),
    ("non_replace_keeps_both",
     [applied("h1", "livepatch-a"), applied("h1", "livepatch-b", seq=2)],
     [H("h1", kernel=K, patches=loaded("livepatch_b"))],
     [("h1", "livepatch_a", "missing"), ("h1", "livepatch_b", "compliant")]),
    ("records_out_of_order_are_sorted", [rolled_back("h1", seq=5), applied("h1", seq=1)],
     [H("h1", kernel=K)],
     [("h1", "", "compliant")]),
    ("many_hosts_mixed",
     [applied("h1"), applied("h2"), applied("h3"), applied("h4")],
     [H("h4", reachable=False, error="refused"),
      H("h1", kernel=K, patches=loaded()),
      H("h2", kernel=K),
      H("h3", kernel=K, patches=loaded(transition=True))],
     [("h1", "livepatch_fix", "compliant"), ("h2", "livepatch_fix", "missing"),
      ("h3", "livepatch_fix", "transition"), ("h4", "livepatch_fix", "unreachable")]),
]


@pytest.mark.parametrize("records,observed,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_journal_against_observed(records, observed, expected):
    result = A.evaluate(A.desired_from_records(records), observed, generated_at=0)
    assert statuses(result) == expected
    assert result.compliant == all(s == "compliant" for _, _, s in expected)
    for r in result.rows:
        assert r.detail, r  # every verdict says why


def test_every_status_is_exercised_by_the_table():
    seen = set()
    for _, records, observed, _ in CASES:
        seen |= {r.status for r in A.evaluate(A.desired_from_records(records), observed).rows}
    assert seen == set(A.STATUSES)


def test_detail_names_the_rollout_that_rolled_back():
    res = A.evaluate(A.desired_from_records([applied("h1"), rolled_back("h1", rollout="r9")]),
                     [H("h1", patches=loaded())])
    assert "rolled back by rollout r9" in res.rows[0].detail


def test_detail_of_unexpected_taint_names_letters():
    res = A.evaluate(A.DesiredState(), [H("h1", tainted=TAINT_OK | (1 << 7) | (1 << 9))])
    assert res.rows[0].status == "unexpected_taint"
    assert "not allowed: DW" in res.rows[0].detail


def test_wrong_hash_detail_shows_both_prefixes():
    res = A.evaluate(A.desired_from_records([applied("h1")]),
                     [H("h1", patches=loaded(), installed={"livepatch_fix": SHA2})])
    assert "bbbbbbbbbbbb" in res.rows[0].detail and "aaaaaaaaaaaa" in res.rows[0].detail


def test_host_status_is_worst_row_and_counts_cover_all_statuses():
    res = A.evaluate(A.desired_from_records([applied("h1"), applied("h1", "livepatch-two")]),
                     [H("h1", patches=loaded())])
    assert res.hosts[0].status == "missing"
    c = res.counts()
    assert set(c) == set(A.STATUSES) and c["compliant"] == 1 and c["missing"] == 1


def test_unknown_journal_action_is_rejected():
    with pytest.raises(ValueError):
        A.desired_from_records([R(1, "r", "h", "p", "installed")])


# ---- the desired-state file -------------------------------------------------------

HOSTS = ["web1", "web2", "db1"]
MATCH = A.glob_matcher(HOSTS)


def from_file(text: str, records=(), tmp_path=None) -> A.DesiredState:
    return A.apply_desired_file(A.desired_from_records(records), A.parse_desired_text(text, "d.yml"), MATCH, "d.yml")


FILE_CASES = [
    ("require_bare_name", "version: 1\nhosts:\n- match: web*\n  require: [livepatch-cve]\n", [],
     {"web1": {}, "db1": {}},
     [("db1", "", "compliant"), ("web1", "livepatch_cve", "missing")]),
    ("require_with_sha_ok",
     f"version: 1\nhosts:\n- match: web1\n  require:\n  - name: livepatch_cve\n    sha256: {SHA1}\n", [],
     {"web1": {"p": loaded("livepatch_cve"), "i": {"livepatch_cve": SHA1}}},
     [("web1", "livepatch_cve", "compliant")]),
    ("require_with_sha_wrong",
     f"version: 1\nhosts:\n- match: web1\n  require:\n  - name: livepatch_cve\n    sha256: {SHA1}\n", [],
     {"web1": {"p": loaded("livepatch_cve"), "i": {"livepatch_cve.ko": SHA2}}},
     [("web1", "livepatch_cve", "wrong_hash")]),
    ("file_overrides_journal_hash",
     f"version: 1\nhosts:\n- match: web1\n  require:\n  - name: livepatch-fix\n    sha256: {SHA2}\n",
     [applied("web1")],
     {"web1": {"p": loaded(), "i": {"livepatch_fix": SHA2}}},
     [("web1", "livepatch_fix", "compliant")]),
    ("kernel_scoped_rule_skips_other_kernels",
     f"version: 1\nhosts:\n- match: '*'\n  require:\n  - {{name: lp_x, kernel: '{KERNEL.abi_glob()}'}}\n", [],
     {"web1": {"k": K}, "db1": {"k": "5.10.0-136.oe2203.x86_64"}},
     [("db1", "", "compliant"), ("web1", "lp_x", "missing")]),
    ("forbid_loaded_is_unexpected", "version: 1\nhosts:\n- match: db1\n  forbid: ['kpatch_old_*']\n", [],
     {"db1": {"p": loaded("kpatch_old_1")}},
     [("db1", "kpatch_old_1", "unexpected")]),
    ("forbid_absent_is_a_passing_check", "version: 1\nhosts:\n- match: db1\n  forbid: [kpatch-old]\n", [],
     {"db1": {}},
     [("db1", "kpatch_old", "compliant")]),
    ("forbid_wins_over_journal", "version: 1\nhosts:\n- match: web1\n  forbid: [livepatch-fix]\n",
     [applied("web1")],
     {"web1": {"p": loaded()}},
     [("web1", "livepatch_fix", "unexpected")]),
    ("unmanaged_ignore", "version: 1\nunmanaged: ignore\n", [],
     {"web1": {"p": loaded("vendor")}},
     [("web1", "vendor", "compliant")]),
    ("allowed_taint_stricter", "version: 1\nallowed_taint: [K]\n", [],
     {"web1": {"t": TAINT_OK}},
     [("web1", "", "unexpected_taint")]),
    ("allowed_taint_string", "version: 1\nallowed_taint: KOED\n", [],
     {"web1": {"t": TAINT_OK | 1 << 7}},
     [("web1", "", "compliant")]),
    ("group_union_pattern", "version: 1\nhosts:\n- match: 'web1:db1'\n  require: [p]\n", [],
     {"web1": {}, "web2": {}, "db1": {}},
     [("db1", "p", "missing"), ("web1", "p", "missing"), ("web2", "", "compliant")]),
    ("empty_file_means_journal_only", "", [applied("web1")],
     {"web1": {}},
     None),  # version missing -> error, checked below
]


@pytest.mark.parametrize("text,records,hosts,expected", [c[1:] for c in FILE_CASES if c[4] is not None],
                         ids=[c[0] for c in FILE_CASES if c[4] is not None])
def test_desired_file_against_observed(text, records, hosts, expected):
    desired = from_file(text, records)
    observed = [H(h, kernel=v.get("k", K), tainted=v.get("t"), patches=v.get("p", {}), installed=v.get("i", {}))
                for h, v in hosts.items()]
    assert statuses(A.evaluate(desired, observed)) == expected


BAD_FILES = [
    ("", "version"),
    ("version: 2\n", "version"),
    ("- a\n", "document"),
    ("version: 1\nextra: 1\n", "extra"),
    ("version: 1\nhosts: {}\n", "hosts"),
    ("version: 1\nhosts:\n- require: [x]\n", "hosts[0].match"),
    ("version: 1\nhosts:\n- match: a\n  bogus: 1\n", "hosts[0].bogus"),
    ("version: 1\nhosts:\n- match: a\n  require: [{sha256: abc}]\n", "hosts[0].require[0].name"),
    ("version: 1\nhosts:\n- match: a\n  require: [{name: x, sha256: abc}]\n", "hosts[0].require[0].sha256"),
    ("version: 1\nhosts:\n- match: a\n  require: [3]\n", "hosts[0].require[0]"),
    ("version: 1\nhosts:\n- match: a\n  forbid: x\n", "hosts[0].forbid"),
    ("version: 1\nallowed_taint: [Q]\n", "allowed_taint"),
    ("version: 1\nunmanaged: maybe\n", "unmanaged"),
]


@pytest.mark.parametrize("text,field", BAD_FILES)
def test_bad_desired_file_names_the_field(text, field):
    with pytest.raises(ConfigError) as e:
        from_file(text)
    assert field in str(e.value) and str(e.value).startswith("d.yml")


def test_bad_desired_file_names_the_line(tmp_path):
    p = tmp_path / "desired.yml"
    p.write_text("version: 1\nhosts:\n- match: a\n  require: [x]\n- match: b\n  require:\n  - {name: x, sha256: zz}\n")
    with pytest.raises(ConfigError) as e:
        A.apply_desired_file(A.DesiredState(), A.load_desired_file(p), MATCH, str(p))
    assert f"{p}:7:" in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "desired.yml"
    p.write_text("version: 1\nhosts: [\n  {match: a\n")
    with pytest.raises(ConfigError) as e:
        A.load_desired_file(p)
    assert str(e.value).startswith(f"{p}:")


def test_missing_desired_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        A.load_desired_file(tmp_path / "nope.yml")


@pytest.mark.parametrize("name,expected", [
    ("livepatch-fix", "livepatch_fix"), ("livepatch-fix.ko", "livepatch_fix"),
    ("/var/lib/kpatch/6.1/kpatch-a-b.ko", "kpatch_a_b"), ("plain", "plain")])
def test_module_name(name, expected):
    assert A.module_name(name) == expected


@pytest.mark.parametrize("mask,letters",
                         [(0, ""), (45056, "OEK"), (1, "P"), (1 << 7 | 1 << 9, "DW"), (1 << 20, "bit20")])
def test_taint_letters(mask, letters):
    assert A.taint_letters(mask) == letters


def test_taint_mask_roundtrip():
    assert A.taint_mask("OEK") == 45056 == A.DEFAULT_ALLOWED_TAINT
    with pytest.raises(ValueError):
        A.taint_mask(["Z"])


def test_require_must_be_a_list():
    with pytest.raises(ConfigError, match=r"hosts\[0\].require"):
        from_file("version: 1\nhosts:\n- match: a\n  require: {x: 1}\n")


# ---- real captured state (lab VM output, parsed by kpipe.fleet.livepatch) -------------

DATA = __import__("pathlib").Path(__file__).parent / "data" / "livepatch"
DEMO = [applied("vm1", "livepatch-demo")]


@pytest.mark.parametrize("capture,records,expected", [
    ("state_loaded.txt", DEMO, "compliant"),
    ("state_disabled_module_loaded.txt", DEMO, "disabled"),
    ("state_removed.txt", DEMO, "missing"),
    ("state_none.txt", DEMO, "missing"),
    ("state_loaded.txt", [], "unexpected"),
    ("state_loaded.txt", DEMO + [rolled_back("vm1", "livepatch-demo")], "unexpected"),
    ("state_disabled_module_loaded.txt", DEMO + [rolled_back("vm1", "livepatch-demo")], "disabled"),
])
def test_real_captured_state(capture, records, expected):
    from kpipe.fleet import livepatch as lp

    state = lp.parse_host_livepatch((DATA / capture).read_text())
    obs = A.observed_from_livepatch("vm1", state, kernel=K)
    res = A.evaluate(A.desired_from_records(records), [obs])
    assert [(r.patch, r.status) for r in res.rows] == [("livepatch_demo", expected)]


def test_int_flags_from_the_parser_are_understood():
    from kpipe.fleet import livepatch as lp

    for enabled, transition, status in [(1, 0, "compliant"), (0, 0, "disabled"), (1, 1, "transition"),
                                        (0, 1, "transition"), (None, 0, "disabled"), (1, None, "compliant")]:
        st = lp.LivepatchState("livepatch_fix", enabled, transition, {"vmlinux": 1})
        res = A.evaluate(A.desired_from_records([applied("h1")]), [H("h1", patches={"livepatch_fix": st})])
        assert res.rows[0].status == status, (enabled, transition)
    st = lp.LivepatchState("livepatch_fix", 1, 0, {"vmlinux": 0})
    res = A.evaluate(A.desired_from_records([applied("h1")]), [H("h1", patches={"livepatch_fix": st})])
    assert res.rows[0].status == "transition"


def test_audit_trail_in_the_store(tmp_path):
    from kpipe.store import Store

    store = Store(tmp_path / "store")
    res = A.evaluate(A.desired_from_records([applied("h1")]), [H("h1")], generated_at=100)
    ok = A.evaluate(A.DesiredState(), [H("h1")], generated_at=200)
    first = factstore.record_audit(store, res, command="verify", limit="h*")
    second = factstore.record_audit(store, ok)
    assert second > first
    hist = factstore.audit_history(store)
    assert [(h["id"], h["command"], h["host_pattern"], h["compliant"]) for h in hist] == [
        (second, "audit", "", 1), (first, "verify", "h*", 0)]
    import json

    doc = json.loads(store.query_one("SELECT result_json FROM audits WHERE id = ?", (first,))["result_json"])
    assert doc["hosts"][0]["patches"][0]["status"] == "missing"
