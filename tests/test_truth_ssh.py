"""Failing hosts are one line each: paramiko's tracebacks never reach stderr (issue 8, item 17).

Real `kpipe fleet facts` runs against a real sshd (tests/sshd.py) and hosts that lie: a loopback
TCP listener that sends garbage, one that closes at once, one that never speaks, one that sends an
SSH banner and then hangs up, and a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sshd import free_port

REPO = Path(__file__).resolve().parent.parent


class LyingHost:
    """A TCP listener on 127.0.0.1 that answers every connection in one bad way; stopped by close()."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                if self.mode == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nServer: not-ssh\r\n\r\n" * 4)
                    conn.close()
                elif self.mode == "close":
                    conn.close()
                elif self.mode == "silent":
                    self._held.append(conn)  # never answers; the client's banner timeout ends it
                elif self.mode == "banner-then-close":
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                    time.sleep(0.1)
                    conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._held:
            c.close()
        self.sock.close()


@pytest.fixture
def liars():
    hosts = {m: LyingHost(m) for m in ("garbage", "close", "silent", "banner-then-close")}
    yield hosts
    for h in hosts.values():
        h.close()


def _workspace(folder: Path, hosts: dict[str, tuple[int, str]], *, key: Path, known_hosts: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kpipe.toml").write_text(
        f'[ssh]\nknown_hosts = "{known_hosts}"\nidentity_file = "{key}"\nssh_config = "/nonexistent"\n'
        "connect_timeout = 3\n")
    lines = ["hosts:"]
    for name, (port, user) in hosts.items():
        lines.append(f"  {name}: {{address: 127.0.0.1, port: {port}, user: {user}}}")
    (folder / "fleet.yml").write_text("\n".join(lines) + "\n")
    return folder


def _kpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["kpipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _bad_hosts(liars: dict[str, LyingHost]) -> dict[str, tuple[int, str]]:
    hosts = {f"liar-{m}": (h.port, "root") for m, h in liars.items()}
    hosts["nothing-listens"] = (free_port(), "root")
    return hosts


def test_every_host_failing_is_one_line_each_and_exit_6(tmp_path, liars, client_key):
    hosts = _bad_hosts(liars)
    ws = _workspace(tmp_path / "ws", hosts, key=client_key, known_hosts=tmp_path / "known_hosts")
    r = _kpipe(ws, "fleet", "facts")
    # no paramiko traceback or log record: only kpipe's own error line and its hint
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr and "Exception" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) <= 2, r.stderr
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert r.stderr.startswith("kpipe: error: none of the 5 hosts reported facts")
    # each failing host's reason: exactly one line naming it
    reasons = [ln for ln in r.stdout.splitlines() if ln.startswith("liar-") or ln.startswith("nothing-listens")]
    assert sorted(ln.split()[0] for ln in reasons) == sorted(hosts), r.stdout
    assert any("refused" in ln for ln in reasons if ln.startswith("nothing-listens"))


def test_json_all_failing_exits_6_with_each_host(tmp_path, liars, client_key):
    hosts = _bad_hosts(liars)
    ws = _workspace(tmp_path / "ws", hosts, key=client_key, known_hosts=tmp_path / "known_hosts")
    r = _kpipe(ws, "fleet", "facts", "--json")
    assert r.returncode == 6 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["hosts"]) == set(hosts) and doc["summary"]["failed"] == 5
    assert all(not h["ok"] and "\n" not in h["error"] for h in doc["hosts"].values())


def test_some_hosts_failing_stays_exit_0_and_quiet(tmp_path, liars, sshd, client_key):
    hosts = _bad_hosts(liars)
    hosts["good"] = (sshd.port, sshd.user)
    ws = _workspace(tmp_path / "ws", hosts, key=client_key, known_hosts=sshd.known_hosts)
    r = _kpipe(ws, "fleet", "facts", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # partial failure is data: nothing on stderr at all
    doc = json.loads(r.stdout)
    assert doc["hosts"]["good"]["ok"] is True
    assert doc["summary"] == {**doc["summary"], "hosts": 6, "ok": 1, "failed": 5}
    # --strict turns any failure into exit 6, still without a traceback
    r = _kpipe(ws, "fleet", "facts", "--strict")
    assert r.returncode == 6 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr
    for name in hosts:
        if name != "good":
            assert sum(ln.startswith(f"{name} ") for ln in r.stdout.splitlines()) == 1, (name, r.stdout)


def test_banner_failure_reason_is_one_readable_line(liars):
    from kpipe.errors import TransportError
    from kpipe.host import Host
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import SshSettings

    with SshPool(SshSettings(connect_timeout=3, ssh_config="/nonexistent"), known_hosts=[]) as pool:
        for mode in ("garbage", "close", "silent"):
            t = pool.transport(Host(name=mode, address="127.0.0.1", port=liars[mode].port, user="root"))
            with pytest.raises(TransportError) as e:
                t.connect()
            assert e.value.message.startswith(f"{mode}: SSH handshake with 127.0.0.1:") and "\n" not in e.value.message
            if mode != "close":  # a closed socket may fail the client's own banner write first
                assert "no SSH protocol banner" in e.value.message


def test_verify_and_audit_over_lying_hosts_are_quiet(tmp_path, liars, client_key):
    hosts = _bad_hosts(liars)
    ws = _workspace(tmp_path / "ws", hosts, key=client_key, known_hosts=tmp_path / "known_hosts")
    r = _kpipe(ws, "verify")
    assert r.returncode == 1, (r.returncode, r.stderr)  # README: verify exits 1 for non-compliant hosts
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr
    r = _kpipe(ws, "audit", "--format", "json")
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr
    assert "[Errno" not in r.stdout


class _RacingChannel:
    """A paramiko channel at the instant the race happens: the last output, EOF, the exit status and the
    close all arrived after kpipe's read and before its EOF check (seen under load in the 200-host test)."""

    def __init__(self, status: int | None):
        self.out = [b"late output\n"]
        self.eof_received = True
        self.closed = True
        self.status = status

    def exec_command(self, line: str) -> None: ...
    def sendall(self, data: bytes) -> None: ...
    def shutdown_write(self) -> None: ...
    def fileno(self) -> int:
        self.fd = os.open(os.devnull, os.O_RDONLY)
        return self.fd
    def recv_ready(self) -> bool:
        # the first look (in the read loop) misses the data, the drain finds it
        self._looks = getattr(self, "_looks", 0) + 1
        return self._looks > 1 and bool(self.out)
    def recv(self, n: int) -> bytes:
        return self.out.pop(0)
    def recv_stderr_ready(self) -> bool:
        return False
    def exit_status_ready(self) -> bool:
        return self.status is not None
    def recv_exit_status(self) -> int:
        assert self.status is not None
        return self.status
    def close(self) -> None:
        os.close(self.fd)


def _racing_transport(chan: _RacingChannel) -> Any:
    from types import SimpleNamespace

    from kpipe.transport.ssh import SshTransport

    t = object.__new__(SshTransport)
    session = SimpleNamespace(is_active=lambda: True, open_session=lambda timeout=None: chan)
    t.name = "racer"
    t.conn = SimpleNamespace(client=SimpleNamespace(get_transport=lambda: session))
    t.target = SimpleNamespace(connect_timeout=5.0)
    return t


@pytest.mark.parametrize("status", [0, 1])
def test_a_session_that_closed_with_its_exit_status_answered(status: int) -> None:
    """Not 'connection lost': the host answered; its output and exit status are what it said."""
    got = _racing_transport(_RacingChannel(status))._exec("true", None, 10.0)
    assert got == (status, b"late output\n", b"")


def test_a_session_that_closed_without_an_exit_status_died() -> None:
    got = _racing_transport(_RacingChannel(None))._exec("true", None, 10.0)
    assert got[0] is None and got[1] == b"late output\n"
