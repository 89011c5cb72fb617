"""Run the kpipe CLI and SIGKILL it at a chosen point: a test-only stand-in for a crash.

    python tests/crashpoint.py SPEC_JSON [kpipe arguments...]

SPEC_JSON picks the point (the production code has no hook for this: the wrappers below are
installed in this process only):

    {"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 2, "when": "after"}
    {"event": "run",    "match": {"label": "stage"}, "nth": 1, "when": "before"}
    {"event": "put",    "nth": 1, "when": "partial"}     # half the file reaches the host, then death
    {"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 2, "hold": true}

`record` is a journal write (kpipe.rollout.journal.Journal.record), `run` a host command
(kpipe.transport.ssh.SshTransport.run; match on its label), `put` a file upload. "before" dies
before the real call, "after" right after it returned. With "hold", every matching thread stops
(sleeps) after its event until the nth one arrives, then the process dies: as if kpipe were
paused at that step on several hosts at once (each held thread writes "crashpoint: holding at
record <host> <step> <phase>" to stderr). `match` may also name a `host`. `nth` counts
matching events across all threads. Just before dying one line goes to stderr:
"crashpoint: killed at <event> <n>".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_count = 0


def _die(what: str) -> None:
    sys.stderr.write(f"crashpoint: killed at {what} {_count}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL is not deliverable late


def _hit(spec: dict[str, Any], fields: dict[str, Any]) -> bool:
    """Count a matching event; True when it is the chosen one."""
    global _count
    for k, v in (spec.get("match") or {}).items():
        if str(fields.get(k, "")) != str(v):
            return False
    with _lock:
        _count += 1
        return _count == int(spec.get("nth", 1))


def install(spec: dict[str, Any]) -> None:
    """Wrap the journal and the SSH transport of this process according to `spec`."""
    from kpipe.rollout.journal import Journal
    from kpipe.transport.ssh import SshTransport

    event, when, hold = spec["event"], spec.get("when", "after"), bool(spec.get("hold"))

    if event == "record":
        real_record = Journal.record

        def record(self: Any, rollout_id: str, host: str, wave: int, step: str, phase: str,
                   detail: dict[str, Any] | None = None) -> int:
            fields = {"host": host, "step": step, "phase": phase, "action": (detail or {}).get("action", "")}
            if when == "before" and _hit(spec, fields):
                _die(f"record {host} {step} {phase} (before)")
            seq = real_record(self, rollout_id, host, wave, step, phase, detail)
            if when == "after":
                chosen = _hit(spec, fields)
                if chosen:
                    _die(f"record {host} {step} {phase}")
                if hold and all(str(fields.get(k, "")) == str(v) for k, v in (spec.get("match") or {}).items()):
                    sys.stderr.write(f"crashpoint: holding at record {host} {step} {phase}\n")
                    sys.stderr.flush()
                    time.sleep(3600)  # paused here until the chosen event kills the process
            return seq

        Journal.record = record  # type: ignore[method-assign]
    elif event == "run":
        real_run = SshTransport.run

        def run(self: Any, cmd: Any) -> Any:
            fields = {"host": self.name, "label": cmd.label}
            if when == "before" and _hit(spec, fields):
                _die(f"run {self.name} {cmd.label} (before)")
            r = real_run(self, cmd)
            if when == "after" and _hit(spec, fields):
                _die(f"run {self.name} {cmd.label}")
            return r

        SshTransport.run = run  # type: ignore[method-assign]
    elif event == "put":
        real_put = SshTransport.put

        def put(self: Any, local: Path, remote: str) -> None:
            fields = {"host": self.name}
            if when == "partial" and _hit(spec, fields):
                data = Path(local).read_bytes()
                with tempfile.NamedTemporaryFile(delete=False) as f:
                    f.write(data[: max(1, len(data) // 2)])
                real_put(self, Path(f.name), remote)
                os.unlink(f.name)
                _die(f"put {self.name} {remote} (partial)")
            if when == "before" and _hit(spec, fields):
                _die(f"put {self.name} (before)")
            real_put(self, local, remote)
            if when == "after" and _hit(spec, fields):
                _die(f"put {self.name}")

        SshTransport.put = put  # type: ignore[method-assign]
    else:
        raise SystemExit(f"crashpoint: unknown event {event!r}")


def main() -> None:
    # the kpipe next to these tests, whatever the working directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    spec = json.loads(sys.argv[1])
    install(spec)
    sys.argv = ["kpipe", *sys.argv[2:]]
    from kpipe.cli.app import main as kpipe_main

    kpipe_main()


if __name__ == "__main__":
    main()
