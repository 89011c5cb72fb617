"""The transport interface every edge implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from kpipe.commands import Command, CommandResult


@runtime_checkable
class Transport(Protocol):
    """Runs Commands on one host and moves files to and from it.

    A non-zero exit status is a result, not an exception; TransportError (and
    CommandTimeout) mean the host could not be reached or did not answer.
    """

    name: str

    def run(self, cmd: Command) -> CommandResult:
        """Run one command; return its exit status and output."""
        ...

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to a remote path."""
        ...

    def get(self, remote: str, local: Path) -> None:
        """Copy a remote file to a local path."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent)."""
        ...
