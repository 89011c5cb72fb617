"""What a reboot does to each loaded patch (persisted / live-only) in every report format, not only the table."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import kenv
from exposition import parse_exposition
from kpipe import audit as A
from kpipe.audit import AppliedRecord as R
from kpipe.audit import ObservedHost as H
from kpipe.audit import ObservedPatch as P
from kpipe.report import render
from kpipe.report.table import table_rows

SHA = "c" * 64
K = kenv.kernel_env(module_level=True).release


def result() -> A.AuditResult:
    hosts = ("h-kept", "h-live", "h-miss")
    desired = A.desired_from_records([R(i, "r1", h, "livepatch-fix", "applied", "art", SHA, K)
                                      for i, h in enumerate(hosts)])
    patch = {"livepatch_fix": P("livepatch_fix", True, False, {"vmlinux": True})}
    observed = [H("h-kept", kernel=K, patches=patch, persisted=frozenset({"livepatch_fix"})),
                H("h-live", kernel=K, patches=patch),
                H("h-miss", kernel=K)]
    return A.evaluate(desired, observed, generated_at=1795900000.0)


WANT = {"h-kept": "persisted", "h-live": "live-only", "h-miss": "-"}


def test_the_table_says_what_a_reboot_keeps():
    assert {row[0]: row[3] for row in table_rows(result())} == WANT


def test_prometheus_has_a_persisted_gauge_for_loaded_patches_only():
    fams = parse_exposition(render(result(), "prometheus"))
    got = {s[1]["host"]: s[2] for s in fams["kpipe_livepatch_persisted"].samples}
    assert got == {"h-kept": 1.0, "h-live": 0.0}  # a missing patch has no boot behaviour to report


def test_junit_testcases_say_the_boot_behaviour():
    import re

    root = ET.fromstring(render(result(), "junit"))
    boots = {}
    for case in root.iter("testcase"):
        host = case.get("classname", "").rsplit(".", 1)[-1]
        text = "\n".join(el.text or "" for el in case if el.tag in ("system-out", "failure", "error"))
        m = re.search(r"^boot=(\S+)$", text, re.M)
        boots[host] = m.group(1) if m else "-"
    assert boots == WANT


def test_html_marks_each_loaded_patch():
    html = render(result(), "html")
    assert html.count('class="boot boot-persisted"') == 1
    assert html.count('class="boot boot-live-only"') == 1
