"""The audit as one JSON document (schema `kpipe.audit/v1`, see AuditResult.to_dict)."""

from __future__ import annotations

import json
from typing import Any

from kpipe.audit import STATUSES, AuditResult
from kpipe.cve import CVE_STATUSES
from kpipe.recipes.schema import SEVERITIES

_NULLABLE_BOOL = {"type": ["boolean", "null"]}

# JSON Schema (draft 2020-12) of the document render_json writes; consumers
# can validate against it, the tests do.
AUDIT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "kpipe.audit/v1",
    "type": "object",
    "required": ["schema", "generated_at", "generated_at_epoch", "sources", "compliant", "summary", "hosts"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": "kpipe.audit/v1"},
        "generated_at": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z$"},
        "generated_at_epoch": {"type": "number"},
        "sources": {"type": "array", "items": {"type": "string"}},
        "compliant": {"type": "boolean"},
        "summary": {
            "type": "object",
            "required": ["hosts", "compliant_hosts", "statuses"],
            "properties": {
                "hosts": {"type": "integer", "minimum": 0},
                "compliant_hosts": {"type": "integer", "minimum": 0},
                "statuses": {
                    "type": "object",
                    "required": list(STATUSES),
                    "additionalProperties": False,
                    "properties": {s: {"type": "integer", "minimum": 0} for s in STATUSES},
                },
            },
        },
        "hosts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["host", "reachable", "kernel", "tainted", "taint_flags", "error", "status", "compliant",
                             "patches"],
                "additionalProperties": False,
                "properties": {
                    "host": {"type": "string"},
                    "reachable": {"type": "boolean"},
                    "kernel": {"type": "string"},
                    "tainted": {"type": ["integer", "null"]},
                    "taint_flags": {"type": ["string", "null"]},
                    "error": {"type": "string"},
                    "status": {"enum": list(STATUSES)},
                    "compliant": {"type": "boolean"},
                    "persisted": {"type": "array", "items": {"type": "string"}},
                    "patches": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["host", "patch", "status", "ok", "detail", "desired", "observed"],
                            "additionalProperties": False,
                            "properties": {
                                "host": {"type": "string"},
                                "patch": {"type": "string"},
                                "status": {"enum": list(STATUSES)},
                                "ok": {"type": "boolean"},
                                "detail": {"type": "string"},
                                "desired": {
                                    "type": ["object", "null"],
                                    "required": ["patch", "artifact_id", "sha256", "kernel", "source"],
                                },
                                "observed": {
                                    "type": "object",
                                    "required": ["enabled", "transition", "sha256"],
                                    "properties": {
                                        "enabled": _NULLABLE_BOOL,
                                        "transition": _NULLABLE_BOOL,
                                        "sha256": {"type": ["string", "null"]},
                                        "persisted": {"type": "boolean"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


_STRINGS = {"type": "array", "items": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}

# The CVE view (kpipe.cve.CveReport.to_dict): a fleet summary per CVE and one
# verdict per host and CVE. Present whenever `kpipe audit` computed it.
CVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["summary", "hosts", "errors"],
    "additionalProperties": False,
    "properties": {
        "summary": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["cve", "severity", "summary", "recipes", "hosts_targeted", "hosts_fixed", "hosts_exposed",
                             "hosts_unknown", "fixed_hosts", "exposed_hosts", "unknown_hosts"],
                "additionalProperties": False,
                "properties": {
                    "cve": {"type": "string", "pattern": "^CVE-[0-9]{4}-[0-9]{4,}$"},
                    "severity": {"enum": list(SEVERITIES)},
                    "summary": {"type": "string"},
                    "recipes": _STRINGS,
                    "hosts_targeted": _COUNT,
                    "hosts_fixed": _COUNT,
                    "hosts_exposed": _COUNT,
                    "hosts_unknown": _COUNT,
                    "fixed_hosts": _STRINGS,
                    "exposed_hosts": _STRINGS,
                    "unknown_hosts": _STRINGS,
                },
            },
        },
        "hosts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["host", "cve", "severity", "status", "recipes", "modules", "kernel", "detail"],
                "additionalProperties": False,
                "properties": {
                    "host": {"type": "string"},
                    "cve": {"type": "string", "pattern": "^CVE-[0-9]{4}-[0-9]{4,}$"},
                    "severity": {"enum": list(SEVERITIES)},
                    "status": {"enum": list(CVE_STATUSES)},
                    "recipes": _STRINGS,
                    "modules": _STRINGS,
                    "kernel": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        },
        "errors": _STRINGS,
    },
}
AUDIT_SCHEMA["properties"]["cves"] = CVE_SCHEMA


def render_json(result: AuditResult) -> str:
    """The audit as indented JSON text, newline-terminated."""
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
