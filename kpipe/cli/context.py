"""What every command shares: the workspace, the console, JSON output."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class AppState:
    workspace_arg: str | None = None
    debug: bool = False
    _workspace: Any = None
    _console: Any = None

    @property
    def workspace(self):
        """The loaded Workspace (kpipe.workspace.Workspace), found on first use."""
        if self._workspace is None:
            from kpipe.workspace import open_workspace

            self._workspace = open_workspace(self.workspace_arg)
        return self._workspace

    @property
    def console(self):
        """A rich Console on stdout."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
        return self._console

    @property
    def err_console(self):
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def _width(stream: Any) -> int | None:
    # Rich assumes 80 columns off a terminal; tables of ids and releases then get
    # truncated in logs and pipes. Let $COLUMNS or a terminal decide, else be wide.
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return 200


STATE = AppState()


def state() -> AppState:
    return STATE


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
