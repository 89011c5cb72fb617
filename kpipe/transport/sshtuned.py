"""paramiko and Fabric as kpipe runs them: three changes, each measured in a 200-host fan-out.

bench/fleet.py profiles a fan-out; docs/scale.md gives the figures. Each change keeps what the
library does and only spends less of the control machine's CPU doing it:

- `AeadFirstTransport` offers AES-GCM first: paramiko computes the HMAC of AES-CTR + HMAC-SHA2 in
  Python, GCM authenticates inside the cipher (cryptography's C code). A server without GCM gets
  paramiko's usual list, in its usual order.
- `PrefetchPacketizer` takes every byte that has arrived in one read(2): paramiko reads each packet
  with two socket reads of exactly its header and its body, each after a poll(2), and each system
  call releases and retakes the GIL, which with hundreds of transport threads is a futex wake and
  a context switch.
- `quick_connection_class()` is Fabric's Connection whose attribute sets skip invoke's `dir()`
  scan: ~0.4 ms of CPU for each Connection built, one per host.
"""

from __future__ import annotations

import functools
import os
import select
import socket
from typing import Any

from kpipe.transport.sshlibs import import_ssh_libraries

import_ssh_libraries()  # before paramiko: its import of invoke then loads no unittest.mock nor asyncio

import paramiko  # noqa: E402  (after import_ssh_libraries, which says why)
from paramiko.packet import Packetizer  # noqa: E402

# Enough for every packet of a handshake and a facts report in one read; the prefetched bytes stay
# in the packetizer until paramiko asks for them, as the bytes it reads past the banner line do.
PREFETCH_BYTES = 65536
# where paramiko's Packetizer keeps the bytes it read past the banner line (a private, name-mangled
# attribute: PrefetchPacketizer checks it exists, and reads nothing ahead when it does not)
_KEPT = "_Packetizer__remainder"


def aead_first(ciphers: tuple[str, ...]) -> tuple[str, ...]:
    """The same ciphers with the AES-GCM ones first (those paramiko has)."""
    gcm = tuple(c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in ciphers)
    return gcm + tuple(c for c in ciphers if c not in gcm)


class PrefetchPacketizer(Packetizer):
    """paramiko's Packetizer, taking every byte that already arrived (or the first ones to arrive)
    in one read(2) when the bytes it holds do not make the packet it asks for.

    paramiko reads a packet as its header, then its body, each with a socket read of exactly that
    size, and Python's socket waits in poll(2) before each: four system calls a packet, each of
    which hands the GIL over. Here one poll(2) waits (as long as the socket's timeout, as paramiko's
    own read would) and one os.read() takes what is there: the socket is non-blocking underneath
    (Python waits in poll(2) itself), so the read never waits. Timeouts, EOF, errors and what they
    mean (rekeying, keepalives, a closed transport) stay paramiko's: its read_all() runs after,
    and finds the bytes where it keeps those it read past the banner line. A paramiko that no
    longer keeps them there gets no prefetch (the attribute is private; checked once per
    connection)."""

    def __init__(self, sock: Any):
        super().__init__(sock)
        self._kpipe_sock: socket.socket | None = None
        if isinstance(sock, socket.socket) and hasattr(self, _KEPT):
            self._kpipe_sock = sock
            self._kpipe_poll = select.poll()
            self._kpipe_poll.register(sock.fileno(), select.POLLIN)

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        sock = self._kpipe_sock
        if sock is not None:
            kept: bytes = getattr(self, _KEPT)
            timeout = sock.gettimeout()
            if len(kept) < n and timeout is not None:
                more = self._arrived(sock, timeout)
                if more:
                    setattr(self, _KEPT, kept + more)
        data: bytes = super().read_all(n, check_rekey)
        return data

    def _arrived(self, sock: socket.socket, timeout: float) -> bytes:
        """What the socket holds, waiting up to `timeout` for the first byte; b"" for none, an error or EOF
        (paramiko's own read then meets and reports them)."""
        try:
            if not self._kpipe_poll.poll(timeout * 1000):
                return b""
            # fileno() now, not at __init__: a closed socket answers -1 (EBADF), never a reused number
            return os.read(sock.fileno(), PREFETCH_BYTES)
        except OSError:
            return b""


class AeadFirstTransport(paramiko.Transport):
    """paramiko's Transport preferring AES-GCM over its default AES-CTR + HMAC-SHA2, reading packets
    through a PrefetchPacketizer when it runs over a socket of its own.

    GCM authenticates each packet inside the cipher (C code, in cryptography); with CTR, paramiko
    computes every packet's HMAC and compares it byte by byte in Python, ~10 % of a fan-out's
    client CPU (bench/fleet.py). Both are strong; OpenSSH has offered GCM since 6.2 (2013), and a
    server without it gets paramiko's usual list, in its usual order, after it."""

    _preferred_ciphers = aead_first(tuple(getattr(paramiko.Transport, "_preferred_ciphers")))  # noqa: B009

    def __init__(self, sock: Any, *args: Any, **kwargs: Any):
        # over a jump host's channel or a ProxyCommand, PrefetchPacketizer reads as paramiko's own does
        kwargs.setdefault("packetizer_class", PrefetchPacketizer)
        super().__init__(sock, *args, **kwargs)


@functools.cache
def quick_connection_class() -> Any:  # a fabric.Connection subclass (Fabric ships no type hints)
    """Fabric's Connection, built with ~0.2 ms of CPU instead of ~0.6 ms.

    invoke's DataProxy.__setattr__ tells a real attribute from a config key with `key in dir(self)`,
    a sorted list of ~200 names built again for each of the ~13 attributes Connection.__init__
    sets; the instance's dict and its class answer the same question. `inline_ssh_env` becomes a
    class attribute (None) so that setting it is a plain attribute too: Fabric otherwise writes it
    into the Connection's Config as a user modification (invoke's slowest path), and reads it back
    from the attribute either way."""
    from fabric import Connection

    class QuickConnection(Connection):  # type: ignore[misc]
        inline_ssh_env = None

        def __setattr__(self, key: str, value: Any) -> None:
            if key in self.__dict__ or hasattr(type(self), key):
                object.__setattr__(self, key, value)
            else:
                super().__setattr__(key, value)

    return QuickConnection
