"""Problems found in recipes (kpipe.findings.Finding at file:line) and the collector the checks write to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from kpipe.errors import ConfigError
from kpipe.findings import Finding, Severity
from kpipe.yamlnodes import field_name

# A recipe problem is a Finding located at file:line (Finding.at(file, line, message, hint, severity)).
Problem = Finding


class _Problems:
    """Collects problems for one file; `line(path)` finds the nearest known line of a value."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int] | None = None,
                 key_lines: dict[tuple[Any, ...], int] | None = None, context: str = ""):
        self.file = file
        self.lines = lines or {}
        self.key_lines = key_lines or {}
        self.context = context  # e.g. "kernel 5.10.0-amd64-UOS"
        self.items: list[Problem] = []
        self.data: Any = None  # the parsed YAML, when it parsed

    def line(self, path: tuple[Any, ...], key: bool = False) -> int:
        if key and path in self.key_lines:
            return self.key_lines[path]
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def error(self, path: tuple[Any, ...], message: str, hint: str = "", *, key: bool = False, file: str | None = None,
              line: int | None = None) -> None:
        self._add("error", path, message, hint, key, file, line)

    def warning(self, path: tuple[Any, ...], message: str, hint: str = "", *, key: bool = False) -> None:
        self._add("warning", path, message, hint, key, None, None)

    def _add(self, severity: Severity | str, path: tuple[Any, ...], message: str, hint: str, key: bool,
             file: str | None, line: int | None) -> None:
        if self.context:
            message = f"{message} ({self.context})"
        hint = hint or "run `kpipe recipe lint` for every problem; README.md documents the recipe format"
        self.items.append(Finding.at(file or self.file, line if line is not None else self.line(path, key),
                                     message, hint, Severity(severity)))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity == Severity.ERROR]


def _raise_first(problems: list[Problem], what: str) -> None:
    errors = [p for p in problems if p.severity == Severity.ERROR]
    if not errors:
        return
    first = errors[0]
    more = f" (+{len(errors) - 1} more problem(s): run `kpipe recipe lint`)" if len(errors) > 1 else ""
    raise ConfigError(f"{first}{more}", hint=first.hint or f"fix {what}")


def _field(path: tuple[Any, ...]) -> str:
    return field_name(path, "recipe")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""
