"""The transport interface every edge implements, and the pool that fans commands out over many hosts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from kpipe.host import Host
from kpipe.plan import FanOut, StepTransport

T = TypeVar("T")


@runtime_checkable
class Transport(StepTransport, Protocol):
    """Runs Commands on one host and moves files to and from it: the core's StepTransport
    (kpipe/plan.py: name, run, put) plus what only the edges use (get, close).

    A non-zero exit status is a result, not an exception; TransportError (and
    CommandTimeout) mean the host could not be reached or did not answer.
    """

    def get(self, remote: str, local: Path) -> None:
        """Copy a remote file to a local path."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent)."""
        ...


@runtime_checkable
class Pool(FanOut, Protocol):
    """Transports to many hosts, reused per host, and a bounded fan-out over them (kpipe's SshPool):
    kpipe.plan.FanOut plus transport() and close().

    `run_many` returns a result or the exception per host name: one host's failure never stops
    the others (partial failure is data).
    """

    forks: int

    def transport(self, target: Host) -> Transport:
        """The (reused) transport for a host; the connection opens on first use."""
        ...

    def run_many(self, targets: Iterable[Host], fn: Callable[[Transport], T],
                 forks: int | None = None) -> dict[str, T | BaseException]:
        """fn(transport) for every host with at most `forks` in flight; each result or exception, by name."""
        ...

    def close(self) -> None:
        """Close every transport the pool opened."""
        ...
