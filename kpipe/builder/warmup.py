"""A build host connected (and probed) in the background while `kpipe build` renders its recipe.

A build's first contact with its host is mostly waiting: TCP, the SSH key exchange and authentication, then
the toolchain probe's round trip. The CLI knows the host before it renders (the kernel's catalog entry picks
it), so BuildRunner.prepare() imports the SSH transport (CPU, like the rendering: it gains nothing in a
thread) and starts a HostWarmup: a thread that opens the connection and, once told which builder the recipe
uses, probes the host. The build then finds the connection open and the probe done. A warm-up never
decides anything: the error it met while connecting is raised by the build that waits for it (the same
TransportError, so the same message and exit code), a failed probe is simply done again by the build, and
a build of another host or builder ignores it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kpipe.settings import BuildHost
    from kpipe.transport.base import Transport


class HostWarmup:
    """Connects to `host` now (thread), then probes it for the builder named later; see the module doc."""

    def __init__(self, host: BuildHost, connect: Callable[[], Transport],
                 probe: Callable[[Transport, str], object]) -> None:
        self.host = host
        self._connect = connect
        self._probe = probe
        self._builder: str | None = None
        self._named = threading.Event()  # the builder is known (or the warm-up was abandoned)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._error: Exception | None = None  # what connecting raised, for the build to raise
        self._on_end: Callable[[], None] | None = None  # set by abandon(): run when the thread ends
        threading.Thread(target=self._run, name="kpipe-warm-up", daemon=True).start()

    def _run(self) -> None:
        try:
            try:
                transport = self._connect()
            except Exception as e:  # noqa: BLE001 -- kept for the build, which raises it where it is reported
                self._error = e
                return
            self._named.wait()
            if self._builder:
                try:
                    self._probe(transport, self._builder)
                except Exception:  # noqa: BLE001, S110 -- the build probes again and reports it
                    pass
        finally:
            with self._lock:
                self._done.set()
                on_end = self._on_end
            if on_end is not None:
                on_end()

    def name_builder(self, builder: str | None) -> None:
        """The builder to probe for (None: none); only the first naming counts."""
        with self._lock:
            if not self._named.is_set():
                self._builder = builder
                self._named.set()

    def wait(self, builder: str) -> None:
        """Wait for the warm-up (naming `builder` if nobody did); raise the error connecting met, once."""
        self.name_builder(builder)
        self._done.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def abandon(self, close: Callable[[], None]) -> bool:
        """No build will use it: True when the thread has ended (the caller closes the connections now);
        else the thread calls `close` when its connection attempt ends (a Ctrl-C does not wait for it)."""
        self.name_builder(None)
        with self._lock:
            if self._done.is_set():
                return True
            self._on_end = close
            return False
