"""Fan-out over worker processes: every core opens SSH connections, the parent keeps the logic.

A Python process does its SSH crypto and packet work (paramiko) on one core at a time (the GIL),
so a fan-out of hundreds of hosts is CPU-bound on one core. `ProcessPool` starts N worker
processes (`python -m kpipe.transport.workers`), each holding its own SshPool for its own share
of the hosts (a host stays with one worker: its connection is reused). The parent runs the caller's
per-host function in its own threads, as the in-process pool does, over a proxy transport whose
run/put/get are forwarded to the host's worker and answered with the CommandResult.

So everything that decides or records stays in the parent: plans, step interpreters (pure parsers,
never pickled), the rollout journal and its write-ahead order. A worker only acts on a request,
and the parent sends a request only when run_steps reaches the action, i.e. after the step's
`intended` record is committed. A SIGKILL of anything therefore never leaves an un-journaled
write on a host: a dead worker's pending and later requests fail as that host's TransportError
(partial failure is data, nothing waits for it), and a dead parent closes the workers' stdin,
which ends them (a request in flight was journaled before it was sent).

Workers inherit only what the pool needs: the [ssh] settings (paths, not key material; each
worker loads the identity file itself), the known_hosts paths and a minimal environment.
Host key checking is the SshPool's, unchanged.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from kpipe.commands import Command, CommandResult
from kpipe.errors import CommandTimeout, KpipeError, TransportError
from kpipe.host import Host
from kpipe.workspace import SshSettings

T = TypeVar("T")

# Hosts per worker below which a fan-out stays in-process. A worker costs ~0.4 s of CPU to start
# (the interpreter plus paramiko, Fabric and cryptography) and a pickled request and answer per
# command; measured on 2 cores at 200 hosts (bench/fleet.py --sizes 200) in-process took 8.7 s and
# 12.6 ms CPU/host, 2 workers 13.8 s and 20.9 ms/host. So workers start only where that fixed cost
# is small per host (< 2 ms at 250 hosts per worker) and one core's ~80-100 hosts/s is the limit.
MIN_HOSTS_PER_WORKER = 250

# What a worker's environment keeps: enough to find Python and kpipe, the agent socket (when no
# identity file is configured, the agent is how the pool authenticates) and the debug switch.
_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "PYTHONPATH", "SSH_AUTH_SOCK", "KPIPE_DEBUG",
             "TMPDIR")

_LEN = struct.Struct("!I")


def default_workers() -> int:
    """The default number of worker processes: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers_for(workers: int, hosts: int) -> int:
    """How many worker processes a fan-out of `hosts` uses: 1 (in-process) below the threshold."""
    return max(1, min(workers, hosts // MIN_HOSTS_PER_WORKER))


def _send(stream: BinaryIO, obj: Any, lock: threading.Lock) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        stream.write(_LEN.pack(len(data)) + data)
        stream.flush()


def _recv(stream: BinaryIO) -> Any:
    """The next message, or None at end of stream (the other side is gone)."""
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


@dataclass(frozen=True)
class _Failure:
    """An exception as it crosses the pipe: rebuilt in the parent as the same transport error."""

    type: str
    message: str
    host: str
    kind: str
    hint: str | None

    @classmethod
    def of(cls, e: BaseException, host: str) -> _Failure:
        if isinstance(e, KpipeError):
            return cls(type(e).__name__, e.message, getattr(e, "host", host) or host, getattr(e, "kind", "error"),
                       e.hint)
        return cls(type(e).__name__, f"{host}: {type(e).__name__}: {e}", host, "error", None)

    def exception(self) -> KpipeError:
        """The error as the in-process pool would have raised it (a timeout stays a CommandTimeout)."""
        if self.type == "CommandTimeout":
            return CommandTimeout(self.message, host=self.host, hint=self.hint)
        # TransportError and its kinds; a ConfigError (a bad identity file) and the like are still
        # that host's failure, said as they were
        return TransportError(self.message, host=self.host, kind=self.kind, hint=self.hint)


class _Worker:
    """One worker process as the parent sees it: a request pipe, a reader thread, pending futures."""

    def __init__(self, index: int, config: dict[str, Any]):
        self.index = index
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        root = str(Path(__file__).resolve().parents[2])  # the kpipe being run, also from a source tree
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        debug = os.environ.get("KPIPE_DEBUG", "") not in ("", "0")
        self.proc = subprocess.Popen([sys.executable, "-m", "kpipe.transport.workers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None if debug else subprocess.DEVNULL,
                                     env=env, close_fds=True)
        self.pid = self.proc.pid
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, tuple[Future[Any], str]] = {}
        self._next = 0
        self.dead = ""  # why the worker is gone ("" while it runs)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: BinaryIO = self.proc.stdin  # type: ignore[assignment]
        self._out: BinaryIO = self.proc.stdout  # type: ignore[assignment]
        _send(self._in, config, self._wlock)
        self._reader = threading.Thread(target=self._read, name=f"kpipe-worker-{index}", daemon=True)
        self._reader.start()

    def call(self, op: str, host: Host, *args: Any) -> Any:
        """Ask the worker to do `op` for `host` and wait for the answer (a dead worker: TransportError)."""
        fut: Future[Any] = Future()
        with self._plock:
            if self.dead:
                raise TransportError(f"{host.name}: {self.dead}", host=host.name, kind="error")
            self._next += 1
            rid = self._next
            self._pending[rid] = (fut, host.name)
        try:
            _send(self._in, (rid, op, host, args), self._wlock)
        except (OSError, ValueError):
            self._gone(f"worker process {self.pid} is gone")
        value = fut.result()
        if isinstance(value, _Failure):
            raise value.exception()
        return value

    def _read(self) -> None:
        why = ""
        try:
            while True:
                msg = _recv(self._out)
                if msg is None:
                    break
                rid, value = msg
                with self._plock:
                    entry = self._pending.pop(rid, None)
                if entry is not None:
                    entry[0].set_result(value)
        except Exception as e:  # a torn message is a dead worker, as EOF is  # noqa: BLE001
            why = f": unreadable answer ({type(e).__name__}: {e})"
            self.proc.kill()  # by its pid: it cannot be talked to any more
        status = self.proc.poll()
        self._gone(f"worker process {self.pid} ended" + ("" if status is None else f" (status {status})")
                   + f" before this host's answer{why}")

    def _gone(self, why: str) -> None:
        with self._plock:
            if not self.dead:
                self.dead = why
            pending, self._pending = self._pending, {}
        for fut, host in pending.values():
            if not fut.done():
                fut.set_result(_Failure("TransportError", f"{host}: {why}", host, "error",
                                        "a kpipe worker process died; the host's state is unknown until read again"))

    def close(self, timeout: float = 10.0) -> None:
        """End the worker: close its stdin (it closes its connections and exits); kill it by pid if it lingers."""
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        try:
            self._out.close()
        except OSError:
            pass


class WorkerTransport:
    """A host's transport whose connection lives in a worker process (the Transport protocol)."""

    def __init__(self, target: Host, worker: _Worker):
        self.name = target.name
        self.target = target
        self.worker = worker

    def run(self, cmd: Command) -> CommandResult:
        """Run one command on the host's connection in its worker."""
        result: CommandResult = self.worker.call("run", self.target, cmd)
        return result

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to the host (the worker reads it: same machine, same path)."""
        self.worker.call("put", self.target, Path(local), remote)

    def get(self, remote: str, local: Path) -> None:
        """Copy a remote file to a local path (written by the worker)."""
        self.worker.call("get", self.target, remote, Path(local))

    def close(self) -> None:
        """Close the host's connection in its worker (idempotent)."""
        if not self.worker.dead:
            try:
                self.worker.call("close", self.target)
            except TransportError:
                pass


class ProcessPool:
    """N worker processes, each an SshPool for its share of the hosts; the kpipe.transport.base.Pool protocol."""

    def __init__(self, settings: SshSettings, known_hosts: Iterable[Path], *, workers: int, forks: int,
                 accept_new: bool | None = None):
        self.settings = settings
        self.forks = forks
        self.workers = max(1, workers)
        self._config = {"settings": settings, "known_hosts": [str(p) for p in known_hosts], "accept_new": accept_new,
                        "threads": max(1, -(-forks // self.workers))}
        self._procs: list[_Worker] = []
        self._assigned: dict[str, int] = {}
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if not self._procs:
                self._procs = [_Worker(i, self._config) for i in range(self.workers)]

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids (empty before the first fan-out)."""
        return [w.pid for w in self._procs]

    def transport(self, target: Host) -> WorkerTransport:
        """The host's proxy transport; a host stays with one worker (round-robin on first sight)."""
        self._start()
        with self._lock:
            i = self._assigned.setdefault(target.name, len(self._assigned) % len(self._procs))
        return WorkerTransport(target, self._procs[i])

    def run_many(self, targets: Iterable[Host], fn: Callable[[WorkerTransport], T],
                 forks: int | None = None) -> dict[str, T | BaseException]:
        """fn(transport) for every target with at most `forks` in flight; each result or exception, by name."""
        transports = [self.transport(t) for t in targets]

        def one(t: WorkerTransport) -> tuple[str, T | BaseException]:
            try:
                return t.name, fn(t)
            except Exception as e:  # collected, not raised: partial failure is data
                return t.name, e

        results: dict[str, T | BaseException] = {}
        n = max(1, min(forks or self.forks, len(transports) or 1))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="kpipe-fan") as ex:
            for name, value in ex.map(one, transports):
                results[name] = value
        return results

    def close(self) -> None:
        """End every worker (each closes its connections)."""
        with self._lock:
            procs, self._procs = self._procs, []
            self._assigned.clear()
        for w in procs:
            w.close()


# -- the worker process ------------------------------------------------------------------------------------------------

def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer requests until stdin closes: each runs in a thread of a pool of `threads`."""
    from kpipe.transport.ssh import SshPool

    config = _recv(inp)
    if config is None:
        return
    pool = SshPool(config["settings"], known_hosts=[Path(p) for p in config["known_hosts"]],
                   accept_new=config["accept_new"])
    wlock = threading.Lock()

    def handle(rid: int, op: str, host: Host, args: tuple[Any, ...]) -> None:
        try:
            t = pool.transport(host)
            value: Any = None
            if op == "run":
                value = t.run(args[0])
            elif op == "put":
                t.put(args[0], args[1])
            elif op == "get":
                t.get(args[0], args[1])
            elif op == "close":
                t.close()
            else:
                raise ValueError(f"unknown request {op!r}")
        except BaseException as e:  # every failure is the host's answer, never the worker's end
            value = _Failure.of(e, host.name)
        try:
            _send(out, (rid, value), wlock)
        except (OSError, ValueError):
            os._exit(0)  # the parent is gone

    ex = ThreadPoolExecutor(max_workers=config["threads"], thread_name_prefix="kpipe-w")
    while True:
        msg = _recv(inp)
        if msg is None:
            break
        ex.submit(handle, *msg)
    # The parent closed our stdin: it is done with us, or it died. Requests still queued are dropped
    # (each was journaled before it was sent, so resume re-reads that host either way).
    ex.shutdown(wait=True, cancel_futures=True)
    pool.close()


def main() -> None:
    """Entry point of a worker process (`python -m kpipe.transport.workers`)."""
    # The answers go to a private copy of stdout; fd 1 becomes stderr, so that nothing a library
    # prints can tear a message.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    # run the imported module's main: what crosses the pipe (_Failure) must pickle as
    # kpipe.transport.workers._Failure, not __main__._Failure
    from kpipe.transport.workers import main as _main

    _main()
