"""Real OpenSSH servers on loopback for tests: generated keys, strict known_hosts.

`SshdServer.start(folder)` runs `/usr/sbin/sshd -D` on a free 127.0.0.1 port
with its own host key and an authorized client key; `known_hosts` holds exactly
that host key, so clients keep strict host key checking. Servers are stopped by
PID (never by name).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _quiet_rc_wrapper(folder: Path) -> list[str]:
    """Run sshd in a private mount namespace where ~/.bashrc is empty.

    bash sources ~/.bashrc for every command sshd runs; on the project's
    machines root's runs `pyenv init`, 0.2-0.5 s per command, which made
    parallel tests time out. The namespace keeps the host's file untouched.
    """
    rc = Path(os.path.expanduser("~/.bashrc"))
    if os.geteuid() != 0 or not rc.is_file():
        return []
    empty = folder / "empty-bashrc"
    empty.write_text("")
    script = 'mount --bind "$1" "$2" || exit 111; shift 2; exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(empty), str(rc)]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """Generate an unencrypted key pair at path (path.pub beside it)."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "kpipe-test", "-f", str(path)], check=True)
    return path


SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile {folder}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 500:30:1000
MaxSessions 200
ClientAliveInterval 0
{extra}
"""


@dataclass
class SshdServer:
    folder: Path
    address: str
    port: int
    host_key: Path
    client_key: Path
    known_hosts: Path
    proc: subprocess.Popen | None = None
    user: str = "root"
    extra_config: str = ""
    log: Path = field(default=Path("/dev/null"))

    @classmethod
    def start(cls, folder: Path, *, client_key: Path | None = None, address: str = "127.0.0.1",
              extra_config: str = "", wrapper: list[str] | None = None) -> SshdServer:
        """Start sshd in folder; wrapper (e.g. an unshare argv prefix) runs it inside something."""
        folder.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
        host_key = keygen(folder / "host_ed25519")
        client_key = client_key or keygen(folder / "client_ed25519")
        authorized = folder / "authorized_keys"
        authorized.write_text(Path(str(client_key) + ".pub").read_text())
        port = free_port(address)
        server = cls(folder, address, port, host_key, client_key, folder / "known_hosts",
                     extra_config=extra_config, log=folder / "sshd.log")
        pub = Path(str(host_key) + ".pub").read_text().split()
        server.known_hosts.write_text(f"[{address}]:{port} {pub[0]} {pub[1]}\n")
        server._launch(wrapper)
        return server

    def _launch(self, wrapper: list[str] | None = None) -> None:
        cfg = self.folder / "sshd_config"
        cfg.write_text(SSHD_CONFIG.format(port=self.port, address=self.address, host_key=self.host_key,
                                          authorized_keys=self.folder / "authorized_keys", folder=self.folder,
                                          extra=self.extra_config))
        argv = [*(wrapper or _quiet_rc_wrapper(self.folder)), SSHD, "-D", "-e", "-f", str(cfg)]
        with open(self.log, "ab") as log:  # sshd keeps its own descriptor; ours is closed
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.address}:{self.port} did not answer within {timeout} s")

    def target(self, name: str = "", **kw):
        """A kpipe Host record for this server (what kpipe.transport.ssh takes)."""
        from kpipe.host import Host

        return Host(name=name or f"{self.address}:{self.port}", address=self.address, port=self.port,
                         user=self.user, identity_file=str(self.client_key), known_hosts=str(self.known_hosts), **kw)

    def ssh_argv(self, *command: str) -> list[str]:
        """An OpenSSH client argv reaching this server with strict host keys."""
        return ["ssh", "-q", "-p", str(self.port), "-i", str(self.client_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "IdentitiesOnly=yes", f"{self.user}@{self.address}", "--", *command]

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd children (the listener's children)."""
        if self.proc is None:
            return []
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        return [int(p) for p in children]

    def _session_sshds(self) -> list[int]:
        """Every sshd process of the open connections: each connection's monitor (session_pids) and the sshd
        processes under it, among them the post-auth one that holds the socket.

        Killing the monitor alone does not drop a connection: its post-auth child keeps serving the channels
        it has and notices the dead monitor only when it next asks it something, which an exec session may
        never do. What the sessions run (shells, and what they started) is not sshd and is left alone."""
        out: list[int] = []
        todo = list(self.session_pids())
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            for child in children:
                try:
                    if Path(f"/proc/{child}/comm").read_text().startswith("sshd"):  # sshd-session (>= 9.8) too
                        todo.append(child)
                except (FileNotFoundError, ProcessLookupError):
                    continue
        return out

    def kill_sessions(self) -> None:
        """Drop every open SSH connection (kills the per-connection sshd processes) but keep listening."""
        for pid in self._session_sshds():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop the listener and its sessions, by PID."""
        if self.proc is None:
            return
        # Freeze the listener before dropping its sessions: a client whose connection is killed may connect
        # again at once, and the listener would fork that connection after kill_sessions() looked. sshd's
        # per-connection child calls setsid(), so the killpg below would not reach it either, and the
        # "stopped" server would go on serving it. Stopped, the listener forks nothing more.
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        self.kill_sessions()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self._launch()
