"""Reading kpipe's Prometheus output in tests with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def parse_exposition(text: str) -> dict[str, Any]:
    """The metric families in `text` by name, read by prometheus_client (ValueError on malformed text).

    Also checks what node_exporter's textfile collector needs beyond the parser: a final line feed, no
    timestamps, no duplicate series, HELP and TYPE for every family, each family's samples together.
    """
    assert text == "" or text.endswith("\n"), "the last line must end with a line feed"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for fam in families.values():
        assert fam.documentation and fam.type != "unknown", f"{fam.name}: no HELP or TYPE"
        for s in fam.samples:
            assert s.timestamp is None, f"{s.name}: the textfile collector refuses timestamps"
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in series, f"duplicate series {key}"
            series.add(key)
    names = [line.split("{")[0].split(" ")[0] for line in text.split("\n") if line and not line.startswith("#")]
    blocks = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert len(blocks) == len(set(blocks)), "a family's samples are not contiguous"
    return families
