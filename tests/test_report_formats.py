"""Report renderers: JSON schema, JUnit XML, Prometheus exposition, HTML escaping, atomic writes."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

import kenv
from exposition import parse_exposition
from kpipe import audit as A
from kpipe.audit import AppliedRecord as R
from kpipe.audit import ObservedHost as H
from kpipe.audit import ObservedPatch as P
from kpipe.report import FORMATS, render, write_atomic
from kpipe.report.jsonfmt import AUDIT_SCHEMA
from kpipe.report.prometheus import escape_label_value
from kpipe.report.table import table_rows

SHA = "c" * 64
K = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
_BASE, _FLAVOUR = K.rsplit("-", 1)
HOSTILE_K = f'{_BASE}-"{_FLAVOUR}"\n'  # a kernel string with a quote and a newline
HOSTILE = [
    'quote"host',
    "new\nline",
    "back\\slash",
    'all\\"\n\\n"',
    "<script>alert(1)</script>",
    "ctl\x01\x1b[31mred",
    "ünïcödé-主机",
    "amp&lt;",
]


def lp(name, enabled=True, transition=False):
    return {name: P(name, enabled, transition, {"vmlinux": True})}


def sample_result(hosts=None) -> A.AuditResult:
    """Every status at least once, hostile names mixed in."""
    hosts = hosts or ["h-ok", "h-miss"]
    records = [R(i, "r1", h, "livepatch-fix", "applied", "art", SHA, K) for i, h in enumerate(hosts)]
    records += [R(1, "r1", h, "livepatch-fix", "applied", "art", SHA, K)
                for h in ("h-dis", "h-tr", "h-hash", "h-down")]
    desired = A.desired_from_records(records)
    observed = [H(h, kernel=HOSTILE_K, tainted=45056, patches=lp("livepatch_fix")) for h in hosts[:1]]
    observed += [H(h, kernel=K) for h in hosts[1:]]
    observed += [
        H("h-dis", kernel="k", patches=lp("livepatch_fix", enabled=False)),
        H("h-tr", kernel="k", patches=lp("livepatch_fix", transition=True)),
        H("h-hash", kernel="k", patches=lp("livepatch_fix"), installed={"livepatch_fix": "d" * 64}),
        H("h-down", reachable=False, error='refused "quoted"\nsecond line'),
        H("h-extra", kernel="k", tainted=45056 | 1 << 7, patches=lp('vendor"<b>\\x')),
    ]
    return A.evaluate(desired, observed, generated_at=1795900000.25)


def every_result():
    return [sample_result(), sample_result(HOSTILE), A.evaluate(A.DesiredState(), [], generated_at=0)]


def test_sample_covers_every_status():
    assert {r.status for r in sample_result().rows} == set(A.STATUSES)


# ---- JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("result", every_result(), ids=["sample", "hostile", "empty"])
def test_json_matches_schema_and_round_trips(result):
    jsonschema = kenv.require_module("jsonschema")
    doc = json.loads(render(result, "json"))
    jsonschema.validate(doc, AUDIT_SCHEMA)
    assert [h["host"] for h in doc["hosts"]] == [h.host for h in result.hosts]
    assert sum(doc["summary"]["statuses"].values()) == len(result.rows)
    assert doc["compliant"] is result.compliant


def test_json_schema_rejects_a_wrong_document():
    jsonschema = kenv.require_module("jsonschema")
    doc = json.loads(render(sample_result(), "json"))
    doc["hosts"][0]["patches"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, AUDIT_SCHEMA)


# ---- JUnit ---------------------------------------------------------------------------

# The shape of the JUnit XSD that Jenkins and most CI reporters accept (junit-10.xsd):
# allowed attributes and children per element, and the required attributes.
JUNIT_SHAPE = {
    "testsuites": ({"name", "time", "tests", "failures", "errors", "disabled", "skipped"}, set(), {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "skipped", "disabled", "time", "timestamp", "hostname",
                   "id", "package", "file"}, {"name", "tests"}, {"properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, {"name", "value"}, set()),
    "testcase": ({"name", "classname", "time", "assertions", "status", "file", "line"}, {"name"},
                 {"skipped", "error", "failure", "system-out", "system-err"}),
    "failure": ({"message", "type"}, set(), set()),
    "error": ({"message", "type"}, set(), set()),
    "skipped": ({"message"}, set(), set()),
    "system-out": (set(), set(), set()),
    "system-err": (set(), set(), set()),
}


def check_junit_shape(el: ET.Element) -> None:
    allowed, required, children = JUNIT_SHAPE[el.tag]
    assert set(el.attrib) <= allowed, (el.tag, el.attrib)
    assert required <= set(el.attrib), (el.tag, el.attrib)
    for key in ("tests", "failures", "errors", "skipped"):
        if key in el.attrib:
            assert el.attrib[key].isdigit()
    if "time" in el.attrib:
        float(el.attrib["time"])
    for child in el:
        assert child.tag in children, (el.tag, child.tag)
        check_junit_shape(child)


@pytest.mark.parametrize("result", every_result(), ids=["sample", "hostile", "empty"])
def test_junit_is_valid_xml_of_the_junit_shape(result):
    text = render(result, "junit")
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == "testsuites"
    check_junit_shape(root)
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(result.rows) == int(suite.get("tests"))
    fails = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    assert int(suite.get("failures")) == len(fails)
    assert int(suite.get("errors")) == len(errors)
    for case, row in zip(cases, result.rows, strict=True):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        assert (bad is None) == row.ok
        if bad is not None:
            assert bad.get("type") == row.status and bad.get("message", "").startswith(row.status)


def test_junit_keeps_hostile_host_names_readable():
    root = ET.fromstring(render(sample_result(HOSTILE), "junit"))
    classnames = {c.get("classname") for c in root.iter("testcase")}
    assert "kpipe.audit.<script>alert(1)</script>" in classnames
    assert 'kpipe.audit.all\\"\n\\n"' in classnames
    # XML 1.0 cannot carry \x01 or ESC at all: shown as visible escapes instead
    assert "kpipe.audit.ctl\\x01\\x1b[31mred" in classnames


# ---- Prometheus -------------------------------------------------------------------------

@pytest.mark.parametrize("result", every_result(), ids=["sample", "hostile", "empty"])
def test_prometheus_parses_to_the_spec(result):
    text = render(result, "prometheus")
    fams = parse_exposition(text)
    for name, fam in fams.items():
        assert fam.type == "gauge" and fam.documentation, name
    assert fams["kpipe_audit_timestamp_seconds"].samples[0][2] == pytest.approx(result.generated_at, abs=1e-3)
    states = fams["kpipe_livepatch_state"].samples
    assert len(states) == len(result.rows)
    got = sorted((s[1]["host"], s[1]["patch"], s[1]["status"]) for s in states)
    assert got == sorted((r.host, r.patch, r.status) for r in result.rows)
    reach = {s[1]["host"]: s[2] for s in fams["kpipe_host_reachable"].samples}
    assert reach == {h.host: float(h.reachable) for h in result.hosts}


def test_prometheus_hostile_label_values_round_trip():
    result = sample_result(HOSTILE)
    fams = parse_exposition(render(result, "prometheus"))
    hosts = {s[1]["host"] for s in fams["kpipe_host_reachable"].samples}
    assert set(HOSTILE) <= hosts
    kernels = {s[1]["kernel"] for s in fams["kpipe_livepatch_state"].samples}
    assert HOSTILE_K in kernels
    patches = {s[1]["patch"] for s in fams["kpipe_livepatch_state"].samples}
    assert 'vendor"<b>\\x' in patches


def test_prometheus_enabled_and_transition_gauges():
    fams = parse_exposition(render(sample_result(), "prometheus"))
    enabled = {s[1]["host"]: s[2] for s in fams["kpipe_livepatch_enabled"].samples}
    assert enabled["h-ok"] == 1 and enabled["h-dis"] == 0 and "h-miss" not in enabled
    trans = {s[1]["host"]: s[2] for s in fams["kpipe_livepatch_transition"].samples}
    assert trans["h-tr"] == 1 and trans["h-ok"] == 0


@pytest.mark.parametrize("value,escaped", [
    ('a"b', 'a\\"b'), ("a\nb", "a\\nb"), ("a\\b", "a\\\\b"), ("\\n", "\\\\n"), ("plain", "plain")])
def test_escape_label_value(value, escaped):
    assert escape_label_value(value) == escaped


# ---- HTML -----------------------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_hostile_names_and_has_no_external_assets():
    result = sample_result(HOSTILE)
    page = render(result, "html")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page  # the hostile patch name 'vendor"<b>\x'
    p = _Tags()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    for name, value in p.attrs:
        assert not name.startswith("on"), name  # no event handlers smuggled in
        assert name not in ("src", "href"), (name, value)
    text = "".join(p.text)
    assert "<script>alert(1)</script>" in text  # shown, as text
    assert "amp&lt;" in text


def test_html_has_grid_summary_time_and_colours():
    result = sample_result()
    page = render(result, "html")
    assert "2026-11-28 21:06:40 UTC" in page
    for status in A.STATUSES:
        assert f"st-{status}" in page
    p = _Tags()
    p.feed(page)
    # one grid row per host (plus the header) and one summary row per status (plus header)
    assert p.tags.count("tr") == (len(result.hosts) + 1) + (len(A.STATUSES) + 1)
    import markupsafe

    for patch in result.patches:
        assert f"<th>{markupsafe.escape(patch)}</th>" in page


def test_html_uses_autoescape():
    from kpipe.report.htmlreport import _environment

    assert _environment().autoescape is True


# ---- table rows and dispatch ------------------------------------------------------------

def test_table_rows_one_per_verdict():
    result = sample_result()
    rows = table_rows(result)
    assert len(rows) == len(result.rows)
    assert ("h-down", "livepatch_fix", "unreachable", "-", "-", 'refused "quoted"\nsecond line') in rows


def test_text_table_neutralises_control_characters():
    text = render(sample_result(HOSTILE), "table")
    assert "\x1b" not in text and "\x01" not in text


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError):
        render(sample_result(), "yaml")
    assert set(FORMATS) == {"table", "json", "junit", "prometheus", "html"}


# ---- atomic writes ------------------------------------------------------------------------

def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    out = tmp_path / "kpipe.prom"
    out.write_text("old\n")
    write_atomic(out, render(sample_result(), "prometheus"))
    parse_exposition(out.read_text())
    assert os.listdir(tmp_path) == ["kpipe.prom"]
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_write_atomic_failure_keeps_old_file(tmp_path):
    out = tmp_path / "kpipe.prom"
    out.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(out, "bad \udc80 surrogate")
    assert out.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["kpipe.prom"]


def test_write_atomic_temp_name_is_ignored_by_textfile_collector(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomic(tmp_path / "kpipe.prom", "x 1\n")
    assert seen and seen[0].startswith(".") and not seen[0].endswith(".prom")


# ---- properties over arbitrary text ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(host=_TEXT, patch=_TEXT, kernel=_TEXT, error=_TEXT)
def test_any_text_survives_every_format(host, patch, kernel, error):
    desired = A.desired_from_records([R(1, "r", host, patch, "applied", "a", SHA, kernel)])
    result = A.evaluate(desired, [H(host, kernel=kernel, patches=lp(A.module_name(patch))),
                                  H(host + "-down", reachable=False, error=error)], generated_at=1)
    fams = parse_exposition(render(result, "prometheus"))
    assert {s[1]["host"] for s in fams["kpipe_host_reachable"].samples} == {host, host + "-down"}
    assert {s[1]["kernel"] for s in fams["kpipe_livepatch_state"].samples if s[1]["host"] == host} == {kernel}
    root = ET.fromstring(render(result, "junit").encode("utf-8"))
    assert len(root.findall("./testsuite/testcase")) == len(result.rows)
    assert json.loads(render(result, "json"))["hosts"][0]["host"] in (host, host + "-down")
    page = render(result, "html")
    p = _Tags()
    p.feed(page)
    assert set(p.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "table", "tr",
                           "th", "td", "span", "p", "details", "summary"}
