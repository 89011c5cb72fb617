"""Audit report renderers: pure functions from an AuditResult to text.

Formats: `table_rows` (the CLI draws them with Rich), JSON, JUnit XML,
Prometheus text exposition (node_exporter textfile collector) and a static
HTML page. `render(result, fmt)` picks one; `write_atomic` puts the text in
place with a temporary file and a rename, so a reader (the textfile
collector, a web server) never sees half a report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kpipe.audit import AuditResult

FORMATS: tuple[str, ...] = ("table", "json", "junit", "prometheus", "html")


def render(result: AuditResult, fmt: str, *, limit: str | None = None) -> str:
    """The report in one of FORMATS (except "table", which the CLI draws); ValueError otherwise.
    `limit` is the audit's host pattern (the HTML page states its scope)."""
    if fmt == "json":
        from kpipe.report.jsonfmt import render_json

        return render_json(result)
    if fmt == "junit":
        from kpipe.report.junit import render_junit

        return render_junit(result)
    if fmt == "prometheus":
        from kpipe.report.prometheus import render_prometheus

        return render_prometheus(result)
    if fmt == "html":
        from kpipe.report.htmlreport import render_html

        return render_html(result, limit=limit)
    if fmt == "table":
        from kpipe.report.table import render_text

        return render_text(result)
    raise ValueError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write text to path through a temporary file in the same folder and os.replace.

    The temporary name starts with '.' and does not end in '.prom', so the
    node_exporter textfile collector never reads a partial file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
