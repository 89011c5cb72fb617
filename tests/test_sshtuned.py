"""kpipe.transport.sshtuned: paramiko and Fabric as kpipe runs them, against real sockets and a real sshd."""

from __future__ import annotations

import hashlib
import socket

import pytest

from kpipe.commands import Command
from kpipe.host import Host
from kpipe.transport.ssh import SshPool
from kpipe.transport.sshtuned import PrefetchPacketizer, quick_connection_class


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)  # as paramiko's transport thread reads: a socket with a timeout
    yield a, b
    a.close()
    b.close()


def test_one_read_takes_every_byte_that_arrived(pair):
    a, b = pair
    p = PrefetchPacketizer(a)
    b.sendall(b"H" * 16 + b"B" * 100 + b"N" * 16)  # a header, a body, the next packet's header
    assert p.read_all(16) == b"H" * 16
    a.setblocking(False)
    with pytest.raises(BlockingIOError):  # the body and the next header came with the same read
        a.recv(1)
    a.settimeout(5)
    b.close()
    assert p.read_all(100) == b"B" * 100
    assert p.read_all(16) == b"N" * 16
    with pytest.raises(EOFError):  # and then paramiko's own read meets the end of the stream
        p.read_all(1)


def test_a_packet_split_across_arrivals_waits_for_the_rest(pair):
    import threading

    a, b = pair
    p = PrefetchPacketizer(a)
    b.sendall(b"x" * 10)
    later = threading.Timer(0.2, lambda: b.sendall(b"y" * 30))
    later.start()
    try:
        assert p.read_all(40) == b"x" * 10 + b"y" * 30
    finally:
        later.join()


def test_a_blocking_socket_is_never_read_ahead(pair):
    a, b = pair
    a.settimeout(None)  # os.read on it would block: the prefetch must stay out of the way
    p = PrefetchPacketizer(a)
    b.sendall(b"abcdef")
    assert p.read_all(2) == b"ab"
    assert a.recv(16) == b"cdef"  # still in the socket: nothing was taken ahead


def test_a_socket_like_object_gets_paramikos_own_reads():
    class Pipe:  # what a jump host's channel or a ProxyCommand looks like to paramiko
        def __init__(self) -> None:
            self.data = b"0123456789"

        def recv(self, n: int) -> bytes:
            out, self.data = self.data[:n], self.data[n:]
            return out

        def settimeout(self, t: float) -> None:
            pass

    p = PrefetchPacketizer(Pipe())
    assert p.read_all(4) == b"0123" and p.read_all(6) == b"456789"


def test_connections_read_through_the_prefetch_and_lose_nothing(sshd):
    """A real sshd, megabytes of output in packets of every size: every byte arrives, in order."""
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(Host("h", sshd.address, sshd.port, "root", str(sshd.client_key)))
        r = t.run(Command.script('i=0; while [ $i -lt 3000 ]; do printf "%s %0${i}d\\n" $i 0; i=$((i+1)); done'))
        assert isinstance(t.conn.client.get_transport().packetizer, PrefetchPacketizer)
    expected = "".join(f"{i} {0:0{i}d}\n" if i else "0 0\n" for i in range(3000))
    assert r.ok and len(r.stdout) == len(expected)
    assert hashlib.sha256(r.stdout.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()


def test_a_quick_connection_is_the_connection_fabric_builds():
    from fabric import Config, Connection

    def build(cls):
        return cls(host="127.0.0.1", port=2222, user="root", config=Config(lazy=True),
                   connect_kwargs={"look_for_keys": False}, connect_timeout=None)

    quick, plain = build(quick_connection_class()), build(Connection)
    assert isinstance(quick, Connection)
    for name in ("host", "port", "user", "connect_kwargs", "inline_ssh_env", "forward_agent", "gateway",
                 "connect_timeout", "original_host"):
        assert getattr(quick, name) == getattr(plain, name), name
    quick.some_config_key = 1  # not an attribute: invoke's proxy still writes it into the config
    assert quick.config.some_config_key == 1 and "some_config_key" not in vars(quick)
