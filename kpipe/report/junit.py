"""The audit as JUnit XML: one testsuite, one testcase per host and patch.

CI systems (Jenkins, GitLab, GitHub test reporters) show a non-compliant
verdict as a failed test; an unreachable host is an <error> (the check could
not run), every other non-compliant status a <failure>.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

from kpipe.audit import COMPLIANT, HOST_ROW, UNREACHABLE, AuditResult
from kpipe.report.table import boot_of

# XML 1.0 forbids most C0 controls, surrogates and U+FFFE/U+FFFF even as
# character references; a hostile host name must not make the report unreadable.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """Text with XML-invalid characters replaced by a visible \\xNN / \\uNNNN escape."""
    def escape(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}"

    return _XML_INVALID.sub(escape, text)


def render_junit(result: AuditResult, suite_name: str = "kpipe-audit") -> str:
    """A <testsuites> document with one <testsuite> and a <testcase> per verdict."""
    rows = result.rows
    failures = sum(1 for r in rows if r.status not in (COMPLIANT, UNREACHABLE))
    errors = sum(1 for r in rows if r.status == UNREACHABLE)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.generated_at))
    counts = {"tests": str(len(rows)), "failures": str(failures), "errors": str(errors), "skipped": "0", "time": "0"}
    root = ET.Element("testsuites", {"name": suite_name, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **counts, "timestamp": stamp, "hostname": "kpipe"})
    props = ET.SubElement(suite, "properties")
    for source in result.sources:
        ET.SubElement(props, "property", {"name": "desired_source", "value": xml_safe(source)})
    for h in result.hosts:
        for r in h.rows:
            name = r.patch if r.patch != HOST_ROW else "host"
            case = ET.SubElement(
                suite, "testcase", {"classname": xml_safe(f"kpipe.audit.{h.host}"), "name": xml_safe(name), "time": "0"}
            )
            boot = boot_of(h, r)
            if r.status == COMPLIANT:
                # system-out, not testcase properties: the JUnit schema CI readers validate has none there;
                # a reader sees which compliant patches a reboot would drop
                out = [f"boot={boot}"] if boot != "-" else []
                if r.detail:
                    out.append(r.detail)
                if out:
                    ET.SubElement(case, "system-out").text = xml_safe("\n".join(out))
                continue
            tag = "error" if r.status == UNREACHABLE else "failure"
            message = f"{r.status}: {r.detail}" if r.detail else r.status
            el = ET.SubElement(case, tag, {"message": xml_safe(message), "type": r.status})
            el.text = xml_safe(
                f"host={h.host}\npatch={name}\nstatus={r.status}\nboot={boot}\nkernel={h.kernel}\ndetail={r.detail}\n"
            )
    add_cve_suite(root, result, stamp)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def add_cve_suite(root: ET.Element, result: AuditResult, stamp: str, suite_name: str = "kpipe-cve") -> None:
    """A second <testsuite>: a testcase per host and CVE (exposed: failure; host not read: error)."""
    from kpipe.cve import EXPOSED, UNKNOWN

    report = getattr(result, "cves", None)
    if report is None:
        return
    verdicts = report.verdicts
    failures = sum(1 for v in verdicts if v.status == EXPOSED)
    errors = sum(1 for v in verdicts if v.status == UNKNOWN)
    counts = {"tests": str(len(verdicts)), "failures": str(failures), "errors": str(errors), "skipped": "0",
              "time": "0"}
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **counts, "timestamp": stamp, "hostname": "kpipe"})
    props = ET.SubElement(suite, "properties")
    for s in report.cves:
        ET.SubElement(props, "property", {"name": xml_safe(s.cve), "value": xml_safe(f"{s.severity}: {s.summary}")})
    for problem in report.errors:
        ET.SubElement(props, "property", {"name": "recipe_error", "value": xml_safe(problem)})
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", {"classname": xml_safe(f"kpipe.cve.{v.host}"), "name": xml_safe(v.cve),
                                                 "time": "0"})
        if v.status not in (EXPOSED, UNKNOWN):
            ET.SubElement(case, "system-out").text = xml_safe(v.detail)
            continue
        tag = "failure" if v.status == EXPOSED else "error"
        el = ET.SubElement(case, tag, {"message": xml_safe(f"{v.status} ({v.severity}): {v.detail}"), "type": v.status})
        el.text = xml_safe(f"host={v.host}\ncve={v.cve}\nseverity={v.severity}\nstatus={v.status}\n"
                           f"kernel={v.kernel}\nrecipes={','.join(v.recipes)}\nmodules={','.join(v.modules)}\n"
                           f"detail={v.detail}\n")
    for key in ("tests", "failures", "errors"):
        root.set(key, str(int(root.get(key, "0")) + int(counts[key])))
