"""The optional Prometheus gate: one instant PromQL query per gate tick (HTTP API /api/v1/query).

Each returned sample is matched to a host by `host_label` (default "instance"): its value, with a
trailing ":port" removed, must be the inventory host name. A host whose value breaks the threshold
fails; so does a host the query returns no sample for (the gate cannot judge it). A Prometheus that
cannot be reached, or that answers with an error, is a PrometheusError: the gate halts, never passes.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kpipe.errors import KpipeError

FAIL_WHEN = ("above", "below")


class PrometheusError(KpipeError):
    """Prometheus could not be asked or its answer could not be read: a gate error (the rollout halts)."""


@dataclass(frozen=True)
class PromCheck:
    """[rollout.prometheus]: the server, the query, the threshold and which label names the host."""

    url: str
    query: str
    threshold: float
    host_label: str = "instance"
    fail_when: str = "above"  # above: value > threshold fails; below: value < threshold fails
    timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "query": self.query, "threshold": self.threshold, "host_label": self.host_label,
                "fail_when": self.fail_when, "timeout": self.timeout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromCheck:
        return cls(str(d["url"]), str(d["query"]), float(d["threshold"]), str(d.get("host_label", "instance")),
                   str(d.get("fail_when", "above")), float(d.get("timeout", 10.0)))


def parse_vector(body: bytes | str, host_label: str) -> dict[str, float]:
    """An /api/v1/query answer (pure) -> host label value (":port" removed) -> value.

    PrometheusError for an error status or a result that is not an instant vector."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise PrometheusError(f"Prometheus answered something that is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PrometheusError("Prometheus answered JSON that is not an object")
    if doc.get("status") != "success":
        raise PrometheusError(f"Prometheus query failed: {doc.get('errorType', '?')}: {doc.get('error', '?')}",
                              hint="check [rollout.prometheus] query with the Prometheus web UI")
    data = doc.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusError(f"the query returned a {data.get('resultType')!r}, not an instant vector",
                              hint="write a query whose result is one sample per host, e.g. max by (instance) (...)")
    out: dict[str, float] = {}
    for sample in data.get("result") or []:
        labels = sample.get("metric") or {}
        host = labels.get(host_label)
        if not isinstance(host, str) or not host:
            continue
        try:
            value = float(sample["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise PrometheusError(f"a sample for {host!r} has no readable value") from None
        host = _strip_port(host)
        # several samples per host: the worst one decides
        out[host] = max(out.get(host, value), value)
    return out


def _strip_port(value: str) -> str:
    head, sep, tail = value.rpartition(":")
    if sep and tail.isdigit():
        return head.removeprefix("[").removesuffix("]")  # "[::1]:9100" -> "::1"
    return value


def query(check: PromCheck) -> dict[str, float]:
    """Run the instant query now; host -> value. PrometheusError when it cannot be asked or read."""
    url = check.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": check.query})
    try:
        with urllib.request.urlopen(url, timeout=check.timeout) as resp:  # noqa: S310 (the operator's URL)
            body = resp.read()
    except urllib.error.HTTPError as e:
        # Prometheus answers 400/422 with a JSON error body: its message is the useful part
        try:
            body = e.read()
        except OSError:
            body = b""
        if body:
            parse_vector(body, check.host_label)
        raise PrometheusError(f"Prometheus at {check.url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise PrometheusError(f"Prometheus at {check.url} cannot be reached: {reason}",
                              hint="the gate halts when it cannot ask Prometheus; check [rollout.prometheus] url") \
            from None
    return parse_vector(body, check.host_label)


def judge(check: PromCheck, values: Mapping[str, float], hosts: Iterable[str]) -> dict[str, str]:
    """host -> problem for every host whose value breaks the threshold or that has no sample (pure)."""
    out = {}
    for h in hosts:
        v = values.get(h)
        if v is None:
            out[h] = f"prometheus: no sample with {check.host_label}={h!r} for {check.query!r}"
        elif math.isnan(v) or (v > check.threshold if check.fail_when == "above" else v < check.threshold):
            rel = ">" if check.fail_when == "above" else "<"
            out[h] = f"prometheus: {check.query!r} is {v:g} for {h} ({rel} threshold {check.threshold:g})"
    return out
