"""The audit in the Prometheus text exposition format (version 0.0.4).

Meant for node_exporter's textfile collector: write it with `--output
/var/lib/node_exporter/textfile/kpipe.prom` (kpipe writes a temporary file and
renames it into place). No sample carries a timestamp, because the textfile
collector rejects them; the audit's own time is the gauge
`kpipe_audit_timestamp_seconds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from kpipe.audit import HOST_ROW, STATUSES, AuditResult
from kpipe.report.table import boot_of

_METRICS: tuple[tuple[str, str], ...] = (
    ("kpipe_audit_timestamp_seconds", "Unix time the audit observed the hosts."),
    ("kpipe_audit_hosts", "Hosts audited, by overall status (the worst of their verdicts)."),
    ("kpipe_host_reachable", "1 if kpipe could read the host's live-patch state, else 0."),
    ("kpipe_host_compliant", "1 if every verdict for the host is compliant, else 0."),
    ("kpipe_host_tainted", "The host's /proc/sys/kernel/tainted bit mask."),
    ("kpipe_livepatch_state", "1 for the audit verdict of a host and live patch (label status)."),
    ("kpipe_livepatch_enabled", "The live patch's sysfs enabled flag (1 or 0) where it is loaded."),
    ("kpipe_livepatch_transition", "The live patch's sysfs transition flag (1 or 0) where it is loaded."),
    ("kpipe_livepatch_persisted", "1 if the loaded live patch is loaded again at boot, 0 if a reboot drops it."),
)


def escape_label_value(value: str) -> str:
    """Escape a label value as the format requires: backslash, double quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape HELP text: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_prometheus(result: AuditResult) -> str:
    """Every metric family with HELP and TYPE lines, its samples grouped under it."""
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}

    def add(metric: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        samples[metric].append(f"{metric}{_labels(labels)} {_num(value)}")

    add("kpipe_audit_timestamp_seconds", (), round(result.generated_at, 3))
    by_status = {s: 0 for s in STATUSES}
    for h in result.hosts:
        by_status[h.status] += 1
    for status, n in by_status.items():
        add("kpipe_audit_hosts", (("status", status),), n)
    for h in result.hosts:
        host = (("host", h.host),)
        add("kpipe_host_reachable", host, h.reachable)
        add("kpipe_host_compliant", host, h.compliant)
        if h.tainted is not None:
            add("kpipe_host_tainted", host, h.tainted)
        for r in h.rows:
            patch = r.patch if r.patch != HOST_ROW else ""
            base = (("host", h.host), ("patch", patch), ("kernel", h.kernel))
            add("kpipe_livepatch_state", (*base, ("status", r.status)), 1)
            if r.enabled is not None:
                add("kpipe_livepatch_enabled", base, r.enabled)
            if r.transition is not None:
                add("kpipe_livepatch_transition", base, r.transition)
            boot = boot_of(h, r)
            if boot != "-":
                add("kpipe_livepatch_persisted", base, boot == "persisted")
    lines: list[str] = []
    for name, help_text in _METRICS:
        lines.append(f"# HELP {name} {escape_help(help_text)}")
        lines.append(f"# TYPE {name} gauge")
        # Two verdicts can share host+patch+kernel+status only for distinct
        # forbid globs; the format forbids duplicate series, so keep the first.
        seen: set[str] = set()
        for s in samples[name]:
            key = s.rsplit(" ", 1)[0]
            if key not in seen:
                seen.add(key)
                lines.append(s)
    lines.extend(cve_metric_lines(result))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The CVE view (kpipe.cve): exposure per host and per CVE
# ---------------------------------------------------------------------------

_CVE_METRICS: tuple[tuple[str, str], ...] = (
    ("kpipe_cve_exposed", "1 if the host runs a kernel a recipe fixing the CVE targets without its patch loaded "
                          "and verified, 0 if the patch is; no sample when the host could not be read."),
    ("kpipe_cve_exposed_hosts", "Hosts exposed to the CVE (a recipe targets their kernel, its patch is not loaded "
                                "and verified)."),
    ("kpipe_cve_fixed_hosts", "Hosts where a loaded and verified patch fixes the CVE."),
    ("kpipe_cve_unknown_hosts", "Hosts that could not be read, so their exposure to the CVE is unknown."),
)


def cve_metric_lines(result: AuditResult) -> list[str]:
    """HELP, TYPE and samples of the CVE families; none when the audit has no CVE view."""
    report = getattr(result, "cves", None)
    if report is None:
        return []
    from kpipe.cve import EXPOSED, FIXED

    samples: dict[str, list[str]] = {name: [] for name, _ in _CVE_METRICS}
    for v in report.verdicts:
        if v.status in (EXPOSED, FIXED):
            labels = (("host", v.host), ("cve", v.cve), ("severity", v.severity))
            samples["kpipe_cve_exposed"].append(f"kpipe_cve_exposed{_labels(labels)} {_num(v.exposed)}")
    for s in report.cves:
        cve_labels = _labels((("cve", s.cve), ("severity", s.severity)))
        samples["kpipe_cve_exposed_hosts"].append(f"kpipe_cve_exposed_hosts{cve_labels} {len(s.exposed_hosts)}")
        samples["kpipe_cve_fixed_hosts"].append(f"kpipe_cve_fixed_hosts{cve_labels} {len(s.fixed_hosts)}")
        samples["kpipe_cve_unknown_hosts"].append(f"kpipe_cve_unknown_hosts{cve_labels} {len(s.unknown_hosts)}")
    lines: list[str] = []
    for name, help_text in _CVE_METRICS:
        lines.append(f"# HELP {name} {escape_help(help_text)}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(samples[name])
    return lines
