"""SSH through Fabric, tuned as docs/scale.md measures (kpipe.transport.sshtuned: the changes made
inside paramiko and Fabric).

- Strict host key checking: every known_hosts file is parsed once per pool
  (paramiko's HostKeys.load is quadratic) and shared by all connections
  through a MissingHostKeyPolicy of our own; unknown keys are refused unless
  the user asked to accept new ones (then they are appended, once).
- The private key is loaded once and passed as `pkey`; agent and key probing
  are off when a key is configured.
- ssh_config is read once per pool; each Connection is built by its first use, in the
  thread that opens it, over a Config of its own (a shared Config races).
- The socket is ours, connected with TCP_NODELAY (paramiko never sets it, and
  every command on an open connection then stalls ~40 ms).
- One connection per host, reused for every later step; `in_stream=False`.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from kpipe.commands import Command, CommandResult
from kpipe.errors import CommandTimeout, ConfigError, TransportError
from kpipe.host import Host
from kpipe.transport.sshlibs import import_ssh_libraries
from kpipe.transport.sshtuned import AeadFirstTransport, quick_connection_class
from kpipe.workspace import SshSettings

import_ssh_libraries()  # before paramiko: its import of invoke then loads no unittest.mock nor asyncio

import paramiko  # noqa: E402  (after import_ssh_libraries, which says why)
from paramiko.hostkeys import HostKeyEntry, HostKeys  # noqa: E402

T = TypeVar("T")

# paramiko's transport thread reads its socket with a 0.1 s timeout, to notice a close; an open
# connection that waits for its next command so wakes 10 times a second, and a fan-out or rollout
# that keeps 1,000 connections open spends a core's share on those wake-ups (measured: 4.2 ms of
# CPU per command at 60 idle connections, 1.9 ms without). Once open, the socket waits this long
# instead; close() shuts the socket down first, which ends the thread's wait at once.
IDLE_RECV_TIMEOUT = 30.0


def quiet_paramiko_logging() -> None:
    """Keep paramiko's own log records (a traceback per failed handshake) off stderr.

    paramiko's transport thread logs every failed handshake as an ERROR with a traceback; with no
    handler configured, logging's last-resort handler prints them (~20 lines per host). kpipe
    reports each host's failure once itself. KPIPE_DEBUG=1 leaves paramiko's records alone.
    """
    if os.environ.get("KPIPE_DEBUG", "") not in ("", "0"):
        return
    log = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    log.propagate = False


def _handshake_reason(e: BaseException) -> str:
    """A one-line reason for a failed SSH handshake (paramiko glues the cause onto the banner text)."""
    text = re.sub(r"\[Errno \d+\] ", "", str(e)) or type(e).__name__
    if text.startswith("Error reading SSH protocol banner"):
        cause = text[len("Error reading SSH protocol banner"):].strip()
        return ("no SSH protocol banner (not an SSH server, or it closed or stalled the connection)"
                + (f": {cause}" if cause else ""))
    return " ".join(text.split())


class KnownHosts:
    """Host keys from known_hosts files, parsed once, shared by every connection."""

    def __init__(self, files: Iterable[Path], *, accept_new: bool = False, write_to: Path | None = None):
        self._plain: dict[str, dict[str, paramiko.PKey]] = {}
        self._hashed: list[tuple[str, str, paramiko.PKey]] = []  # (hashed entry, keytype, key)
        self._loaded: set[Path] = set()
        self._lock = threading.Lock()
        self.accept_new = accept_new
        self.write_to = write_to
        for f in files:
            self.load(f)

    def load(self, path: Path) -> None:
        """Parse one known_hosts file (linear time; missing files are empty)."""
        path = Path(os.path.expanduser(str(path)))
        with self._lock:
            if path in self._loaded:
                return
            self._loaded.add(path)
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                return
            except OSError as e:
                raise ConfigError(f"cannot read known_hosts file {path}: {e.strerror}") from None
            for lineno, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#") or line.startswith("@"):
                    continue  # @cert-authority / @revoked markers are not supported here
                try:
                    entry = HostKeyEntry.from_line(line, lineno)
                except Exception:  # a broken line must not hide the others (OpenSSH skips it too)
                    entry = None
                if entry is None or entry.key is None:
                    continue
                ktype = entry.key.get_name()
                for name in entry.hostnames:
                    if name.startswith("|1|"):
                        self._hashed.append((name, ktype, entry.key))
                    else:
                        self._plain.setdefault(name, {})[ktype] = entry.key

    def lookup(self, hostname: str) -> dict[str, paramiko.PKey]:
        """Known keys for a host name as ssh writes it ("host" or "[host]:port")."""
        found = dict(self._plain.get(hostname, {}))
        for entry, ktype, key in self._hashed:
            salt = entry.split("|")[2]
            if HostKeys.hash_host(hostname, salt) == entry:
                found.setdefault(ktype, key)
        return found

    def add(self, hostname: str, key: paramiko.PKey) -> None:
        with self._lock:
            self._plain.setdefault(hostname, {})[key.get_name()] = key
            if self.write_to is not None:
                self.write_to.parent.mkdir(parents=True, exist_ok=True)
                with open(self.write_to, "a", encoding="utf-8") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class _StrictPolicy(paramiko.MissingHostKeyPolicy):
    """Accept a server key only if known_hosts has exactly it (or new keys are allowed)."""

    def __init__(self, known: KnownHosts, target: Host):
        self.known = known
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        keys = self.known.lookup(hostname)
        ktype = key.get_name()
        if ktype in keys:
            if keys[ktype] == key:
                return
            raise TransportError(
                f"{self.target.name}: HOST KEY MISMATCH for {hostname} ({ktype}): the server's key is not the one "
                "in known_hosts", host=self.target.name, kind="hostkey",
                hint="someone may be intercepting the connection, or the host was reinstalled; fix known_hosts",
            )
        if keys:
            raise TransportError(
                f"{self.target.name}: {hostname} offered a {ktype} key but known_hosts has only "
                f"{', '.join(sorted(keys))}", host=self.target.name, kind="hostkey",
                hint="add the host's key to known_hosts (ssh-keyscan, then check its fingerprint)")
        if self.known.accept_new:
            self.known.add(hostname, key)
            return
        raise TransportError(
            f"{self.target.name}: {hostname} is not in known_hosts (strict host key checking)",
            host=self.target.name, kind="hostkey",
            hint="add its key to known_hosts, or set [ssh] accept_new_host_keys = true to trust on first use",
        )


def _host_key_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


class SshTransport:
    """One host over one reused Fabric connection."""

    def __init__(self, target: Host, pool: SshPool):
        self.name = target.name
        self.target = target
        self.pool = pool
        kwargs: dict[str, Any] = {"look_for_keys": True, "allow_agent": True}
        pkey = pool.private_key(target.identity_file or pool.settings.identity_file)
        if pkey is not None:
            kwargs = {"pkey": pkey, "look_for_keys": False, "allow_agent": False}
        if pool.disabled_algorithms:
            kwargs["disabled_algorithms"] = pool.disabled_algorithms
        kwargs["banner_timeout"] = kwargs["auth_timeout"] = self._connect_timeout()
        kwargs["transport_factory"] = AeadFirstTransport
        self._connect_kwargs = kwargs
        self._conn: Any = None  # the Fabric Connection, built on first use (see `conn`)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # the open connection's socket (ours: see _open)

    @property
    def conn(self) -> Any:  # a fabric.Connection (Fabric ships no type hints)
        """The Fabric Connection, built on first use, in the thread that opens it.

        ~0.5-1 ms of CPU each (a Config, an ssh_config lookup, invoke's attribute proxies): built
        here rather than in the pool, a fan-out's first hosts connect while the last ones' are
        still unbuilt, instead of after all of them. Each has a Config of its own (Fabric reads
        and lazily fills a Connection's Config while it opens, so a shared one races)."""
        if self._conn is None:
            connection = quick_connection_class()
            conn = connection(host=self.target.address, port=self.target.port, user=self.target.user or None,
                              config=self.pool.fabric_config(), connect_kwargs=self._connect_kwargs,
                              connect_timeout=None)
            conn.client.set_missing_host_key_policy(_StrictPolicy(self.pool.known_hosts_for(self.target),
                                                                  self.target))
            self._conn = conn
        return self._conn

    @conn.setter
    def conn(self, value: Any) -> None:
        self._conn = value

    def _connect_timeout(self) -> float:
        return self.target.connect_timeout or self.pool.settings.connect_timeout

    def _open(self) -> None:
        if self.conn.is_connected:
            return
        address, port = self.conn.host, self.conn.port
        timeout = self._connect_timeout()
        try:
            # an ASCII name or address as bytes: a str makes getaddrinfo load the idna codec (unicodedata,
            # stringprep: ~10 ms of a CLI's start) even for "10.0.0.5"
            host = cast(str, address.encode("ascii")) if address.isascii() else address  # typeshed: str only
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise TransportError(f"{self.name}: connection to {address}:{port} timed out after {timeout:g} s",
                                 host=self.name, kind="timeout") from None
        except ConnectionRefusedError:
            raise TransportError(f"{self.name}: connection to {address}:{port} refused", host=self.name,
                                 kind="refused", hint="is sshd running on that port?") from None
        except OSError as e:
            raise TransportError(f"{self.name}: cannot connect to {address}:{port}: {e.strerror or e}",
                                 host=self.name, kind="error") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.connect_kwargs["sock"] = sock
        self._sock = sock
        try:
            self.conn.open()
            sock.settimeout(IDLE_RECV_TIMEOUT)  # after the handshake, which polls its own deadline
        except TransportError:
            self._drop()
            sock.close()
            raise
        except paramiko.AuthenticationException as e:
            self._drop()
            sock.close()
            raise TransportError(f"{self.name}: authentication failed for {self.conn.user}@{address}:{port}: {e}",
                                 host=self.name, kind="auth", hint="check the user and identity_file") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            # Stop paramiko's transport thread before closing its socket under it (else it logs
            # "Socket exception: Bad file descriptor" from the thread).
            self._drop()
            sock.close()
            raise TransportError(f"{self.name}: SSH handshake with {address}:{port} failed: {_handshake_reason(e)}",
                                 host=self.name, kind="error") from None
        finally:
            self.conn.connect_kwargs.pop("sock", None)

    def connect(self) -> SshTransport:
        """Open the connection now (otherwise the first command opens it)."""
        with self._lock:
            self._open()
        return self

    def _use_sudo(self, cmd: Command) -> bool:
        return cmd.sudo and (self.target.become or (self.conn.user or "root") != "root")

    def run(self, cmd: Command) -> CommandResult:
        """Run one command on a new channel of the reused connection (opened on first use)."""
        with self._lock:
            self._open()
            line = cmd.shell_line(use_sudo=self._use_sudo(cmd))
            timeout = cmd.timeout if cmd.timeout is not None else self.pool.settings.command_timeout
            start = time.monotonic()
            try:
                exit_status, out, err = self._exec(line, cmd.stdin, timeout or None)
            except CommandTimeout:
                self._drop()
                raise CommandTimeout(f"{self.name}: {cmd.label or cmd.display()} timed out after {timeout:g} s",
                                     host=self.name) from None
            except (paramiko.SSHException, EOFError, OSError) as e:
                self._drop()
                raise TransportError(f"{self.name}: connection lost during {cmd.label or cmd.argv[0]}: "
                                     f"{e or type(e).__name__}", host=self.name, kind="disconnected") from None
            if exit_status is None:
                # the channel closed without an exit status: the session died under us
                self._drop()
                raise TransportError(f"{self.name}: connection lost during {cmd.label or cmd.argv[0]}",
                                     host=self.name, kind="disconnected")
            return CommandResult(self.name, cmd, exit_status, out.decode("utf-8", "replace"),
                                 err.decode("utf-8", "replace"), time.monotonic() - start)

    def _exec(self, line: str, stdin: bytes | None, timeout: float | None) -> tuple[int | None, bytes, bytes]:
        """Run one shell line on a new channel of the open connection.

        The channel is read directly in 64 KiB blocks: Fabric's (invoke's)
        runner reads 1000-byte chunks through watcher threads, which cost
        ~0.6 s per command and 2 s per MB of output on a loaded 2-CPU machine.
        Fabric still owns the connection, its configuration and SFTP.
        """
        transport = self.conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise paramiko.SSHException("connection is not active")
        deadline = None if timeout is None else time.monotonic() + timeout
        chan = transport.open_session(timeout=self._connect_timeout())
        try:
            chan.exec_command(line)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            # poll, not select: a fan-out holds far more than FD_SETSIZE (1024) descriptors
            poller = select.poll()
            poller.register(chan.fileno(), select.POLLIN)
            while True:
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                poller.poll(wait * 1000)
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break  # EOF: no more output will come
                if chan.closed or not transport.is_active():
                    # Output, EOF, exit-status and close can all arrive between the reads above and
                    # this check: what came with the close is still buffered, and a session that sent
                    # its exit status answered (reporting it unreachable would be a lie).
                    while chan.recv_ready():
                        out += chan.recv(65536)
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    if chan.exit_status_ready():
                        status = chan.recv_exit_status()
                        return (None if status == -1 else status), bytes(out), bytes(err)
                    return None, bytes(out), bytes(err)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CommandTimeout("timeout", host=self.name)
            # exit-status may arrive just after EOF; a session that closes without one died
            grace = 10.0 if deadline is None else max(0.5, min(10.0, deadline - time.monotonic()))
            if not chan.status_event.wait(grace) or not chan.exit_status_ready():
                if deadline is not None and time.monotonic() >= deadline:
                    raise CommandTimeout("timeout", host=self.name)
                return None, bytes(out), bytes(err)
            status = chan.recv_exit_status()
            return (None if status == -1 else status), bytes(out), bytes(err)
        finally:
            chan.close()

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to the host over SFTP."""
        with self._lock:
            self._open()
            try:
                self.conn.put(str(local), remote=remote)
            except (OSError, paramiko.SSHException, EOFError) as e:
                if not self._alive():
                    self._drop()
                raise TransportError(f"{self.name}: copying {local} to {remote} failed: {e}", host=self.name,
                                     kind="error") from None

    def get(self, remote: str, local: Path) -> None:
        """Copy a file of the host to `local` over SFTP; TransportError when it does not exist."""
        with self._lock:
            self._open()
            Path(local).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.conn.get(remote, local=str(local))
            except FileNotFoundError:
                raise TransportError(f"{self.name}: {remote} does not exist", host=self.name) from None
            except (OSError, paramiko.SSHException, EOFError) as e:
                if not self._alive():
                    self._drop()
                raise TransportError(f"{self.name}: fetching {remote} failed: {e}", host=self.name,
                                     kind="error") from None

    def _alive(self) -> bool:
        transport = self.conn.client.get_transport()
        return transport is not None and transport.is_active()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                # wakes paramiko's transport thread out of its socket read (IDLE_RECV_TIMEOUT) with EOF
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more
        if self._conn is None:
            return  # never used: nothing was built or opened
        try:
            self._conn.close()
        except Exception:  # closing a dead connection may raise anything; it is gone either way
            pass

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SshPool:
    """Shared SSH state for a fan-out: parsed known_hosts, keys, ssh_config, open connections."""

    def __init__(self, settings: SshSettings | None = None, *, known_hosts: Iterable[Path] | None = None,
                 forks: int | None = None, accept_new: bool | None = None, workers: int = 1):
        quiet_paramiko_logging()
        self.settings = settings or SshSettings()
        files = list(known_hosts) if known_hosts is not None else [Path(os.path.expanduser(self.settings.known_hosts))]
        accept = self.settings.accept_new_host_keys if accept_new is None else accept_new
        self._default_known = KnownHosts(files, accept_new=accept, write_to=files[0] if files else None)
        self._known_files = files
        self._accept_new = accept_new
        self.workers = max(1, workers)  # >1: large fan-outs run in worker processes (kpipe.transport.workers)
        self._procs: Any = None  # the ProcessPool, started by the first fan-out large enough
        self._per_file: dict[str, KnownHosts] = {}
        self.forks = forks or self.settings.forks
        self._keys: dict[str, paramiko.PKey] = {}
        self._transports: dict[str, SshTransport] = {}
        self._lock = threading.RLock()  # transport() builds an SshTransport, which loads its key, under it
        self.disabled_algorithms: dict[str, list[str]] = {}
        if self.settings.kex:
            supported: list[str] = list(paramiko.Transport._preferred_kex)  # type: ignore[attr-defined]
            unknown = [k for k in self.settings.kex if k not in supported]
            if unknown:
                raise ConfigError(f"[ssh] kex names algorithms paramiko does not know: {unknown}",
                                  hint=f"known: {supported}")
            self.disabled_algorithms = {"kex": [k for k in supported if k not in self.settings.kex]}
        self._ssh_config = self._read_ssh_config()

    def _read_ssh_config(self) -> paramiko.SSHConfig:
        path = Path(os.path.expanduser(self.settings.ssh_config))
        ssh_config = paramiko.SSHConfig()
        if path.is_file():
            try:
                ssh_config = paramiko.SSHConfig.from_path(str(path))
            except Exception as e:  # paramiko raises several types for a malformed file
                raise ConfigError(f"{path}: cannot parse ssh_config: {e}") from None
        return ssh_config

    def fabric_config(self) -> Any:  # a fabric.Config (Fabric ships no type hints)
        """A new Fabric Config for one connection, over the ssh_config parsed once for the pool.

        Built fresh rather than cloned from one pool-wide Config: Config.clone() deep-copies the parsed
        ssh_config, merges every config level and tries Fabric's and invoke's config files, ~1-2 ms per host
        of a fan-out's client CPU, to produce what a new lazy Config is anyway (the lazily created original
        had loaded no files, and a clone copies its levels over the files it loaded). The parsed
        ssh_config is shared: a Connection only looks its host up in it (SSHConfig.lookup builds a new
        dict and changes nothing), once, while it is constructed, before any fan-out starts."""
        from fabric import Config

        return Config(ssh_config=self._ssh_config, lazy=True)

    def known_hosts_for(self, target: Host) -> KnownHosts:
        """The known host keys for a target: its own file when it names one (like OpenSSH's
        UserKnownHostsFile, it replaces the pool's files), else the pool's."""
        if not target.known_hosts:
            return self._default_known
        with self._lock:
            kh = self._per_file.get(target.known_hosts)
            if kh is None:
                extra = Path(os.path.expanduser(target.known_hosts))
                kh = KnownHosts([extra], accept_new=self._default_known.accept_new,
                                write_to=extra)
                self._per_file[target.known_hosts] = kh
            return kh

    def private_key(self, path: str) -> paramiko.PKey | None:
        """The private key at path, loaded once (None when no key is configured)."""
        if not path:
            return None
        with self._lock:
            key = self._keys.get(path)
            if key is None:
                full = os.path.expanduser(path)
                try:
                    key = paramiko.PKey.from_path(full)
                except FileNotFoundError:
                    raise ConfigError(f"SSH identity file {full} does not exist") from None
                except (paramiko.SSHException, ValueError, OSError) as e:
                    raise ConfigError(f"cannot load SSH identity file {full}: {e}",
                                      hint="kpipe needs an unencrypted key or an ssh-agent") from None
                self._keys[path] = key
            return key

    def transport(self, target: Host) -> SshTransport:
        """The (reused) transport for a target; the connection opens on first use.

        Looked up and built under one lock, so two threads asking for the same host share one
        transport (and one connection). Building one is cheap: its Fabric Connection and the
        connection itself wait for its first use."""
        with self._lock:
            t = self._transports.get(target.name)
            if t is None or t.target != target:
                t = self._transports[target.name] = SshTransport(target, self)
            return t

    def run_many(self, targets: Iterable[Host], fn: Callable[[SshTransport], T],
                 forks: int | None = None) -> dict[str, T | BaseException]:
        """fn(transport) for every target with at most `forks` in flight; each result or exception, by name.

        One host's exception never stops the others (partial failure is data). With `workers` > 1 and
        enough targets (kpipe.transport.workers.workers_for), the connections live in worker processes.
        """
        targets = list(targets)
        procs = self._process_pool(len(targets))
        if procs is not None:
            return procs.run_many(targets, fn, forks)  # type: ignore[no-any-return]
        # Built here, before the fan-out (cheap: each Fabric Connection is built by its first use,
        # in its own thread, over a Config of its own; a shared Config raced, seen as "No attribute
        # or config key found for 'authentication'" on half of 200 hosts).
        transports = [self.transport(t) for t in targets]
        results: dict[str, T | BaseException] = {}

        def one(t: SshTransport) -> tuple[str, T | BaseException]:
            try:
                return t.name, fn(t)
            except Exception as e:  # collected, not raised: the caller's gate decides what it means
                return t.name, e

        workers = max(1, min(forks or self.forks, len(transports) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kpipe-ssh") as ex:
            for name, value in ex.map(one, transports):
                results[name] = value
        return results

    def _process_pool(self, hosts: int) -> Any:
        """The worker processes for a fan-out of `hosts` (started on first need), or None: in-process."""
        if self.workers <= 1:
            return None
        from kpipe.transport.workers import ProcessPool, workers_for

        if self._procs is None:
            n = workers_for(self.workers, hosts)
            if n <= 1:
                return None
            self._procs = ProcessPool(self.settings, self._known_files, workers=n, forks=self.forks,
                                      accept_new=self._accept_new)
        return self._procs

    def close(self) -> None:
        """Close every connection the pool opened, and end its worker processes."""
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
            procs, self._procs = self._procs, None
        for t in transports:
            t.close()
        if procs is not None:
            procs.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
