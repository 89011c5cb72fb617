"""The one finding type: what a check found, how bad it is, where, and what to do about it.

Module checks (kpipe.checks: an id such as `sig.present`), recipe lint (kpipe.recipes: a
file and line) and the audit (kpipe.audit: a host) all report `Finding`s. The JSON shape
(`to_dict`) keeps the keys each of them has always printed: a finding located in a file
prints file, line, message, hint, severity; one with an id prints id, severity, message,
hint; a host is added when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    """How bad a finding is; `skipped`: the check lacked its reference data."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Finding:
    """One result: a stable id (may be ""), severity, a message naming the values, a hint, and where."""

    id: str
    severity: Severity
    message: str
    hint: str = ""
    file: str = ""  # where, in a file: file and 1-based line
    line: int = 0
    host: str = ""  # where, on the fleet

    def __post_init__(self) -> None:
        # a plain string from a caller ("error") becomes the enum; an unknown one is a ValueError
        object.__setattr__(self, "severity", Severity(self.severity))

    @classmethod
    def at(cls, file: str, line: int, message: str, hint: str = "",
           severity: Severity | str = Severity.ERROR, *, id: str = "") -> Finding:
        """A finding at file:line (recipe lint and the files kpipe reads)."""
        return cls(id, Severity(severity), message, hint, file=file, line=line)

    @property
    def location(self) -> str:
        """`file:line`, the host, or "" when the finding is about the thing checked as a whole."""
        if self.file:
            return f"{self.file}:{self.line}"
        return self.host

    @property
    def is_error(self) -> bool:
        return self.severity == Severity.ERROR

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json, in the shape each producer has always printed."""
        if self.file:
            out: dict[str, Any] = {"file": self.file, "line": self.line, "message": self.message,
                                   "hint": self.hint, "severity": str(self.severity)}
            if self.id:
                out["id"] = self.id
        else:
            out = {"id": self.id, "severity": str(self.severity), "message": self.message, "hint": self.hint}
        if self.host:
            out["host"] = self.host
        return out
