"""Ansible as a transport: run one round of host actions through ansible-runner.

This module knows nothing of rollouts. kpipe's Ansible executor
(kpipe.rollout.ansible_executor) hands it one action per host — a command
(argv, become, timeout) or a copy (local file -> remote path) — and gets back
each host's rc/stdout/stderr from the runner's events; kpipe's own
interpreters read them. The playbook is fixed (`ansible/playbooks/kpipe-step.yml`)
and every value arrives as a host variable tagged `!unsafe` (Ansible templates
variables, and a `{{` in one would be code on the controller).

Strict host key checking stays on: ANSIBLE_HOST_KEY_CHECKING=True and
`StrictHostKeyChecking=yes` with `UserKnownHostsFile` = the workspace's
known_hosts plus each host's `kpipe_known_hosts`. Connections persist across
rounds (OpenSSH ControlMaster in a private folder, closed by socket at the end).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpipe.errors import ConfigError

# The step playbook ships inside the package (an installed wheel has no source tree); the repository's
# ansible/playbooks/kpipe-step.yml is a link to it.
ANSIBLE_DIR = Path(__file__).resolve().parents[1] / "ansible_assets"
STEP_PLAYBOOK = "playbooks/kpipe-step.yml"
_TEMPLATE = re.compile(r"\{\{|\{%|\{#|\}\}|%\}|#\}")
_TIMEOUT_MSG = ("expected time frame", "timed out")


class Unsafe(str):
    """A string Ansible must never template (dumped as `!unsafe`)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Unsafe, lambda d, v: d.represent_scalar("!unsafe", str(v)))


def dump_yaml(doc: Any) -> str:
    """YAML for Ansible: `Unsafe` strings carry the `!unsafe` tag."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


@dataclass(frozen=True)
class HostAction:
    """One host's action in a round: a command (argv) or a copy (src -> dest)."""

    argv: tuple[str, ...] = ()
    become: bool = False
    timeout: int = 0  # seconds; 0 = none
    stdin: str | None = None
    src: str = ""  # copy: the local file
    dest: str = ""  # copy: the remote path
    secret: bool = False  # never log the argv

    @property
    def kind(self) -> str:
        return "copy" if self.src else "command"


@dataclass
class ActionResult:
    """What one host's action did, from the runner's events."""

    host: str
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    unreachable: str = ""  # why the host could not be reached ("" = it was)
    failed: str = ""  # the task failed without a command result (copy error, timeout, module error)
    timed_out: bool = False


def safe_value(value: Any, what: str, host: str) -> str:
    """A connection value Ansible may see: no whitespace, NUL or template markers."""
    text = str(value)
    if not text or any(c.isspace() for c in text) or _TEMPLATE.search(text) or "\x00" in text:
        raise ConfigError(f"host {host}: {what} {text!r} is empty or holds spaces or template markers",
                          hint="Ansible would template or split it; use a plain value")
    return text


def ssh_common_args(known_hosts: Sequence[str]) -> str:
    """`ansible_ssh_common_args` for strict host key checking against exactly these files."""
    files = " ".join(known_hosts)
    # Ansible splits this with shlex; paths were checked to hold no spaces.
    return (f"-o StrictHostKeyChecking=yes -o 'UserKnownHostsFile={files}' "
            "-o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no")


def connection_vars(host: Any, known_hosts: Sequence[str], python_interpreter: str = "auto_silent", *,
                    with_identity: bool = True, default_identity: str = "") -> dict[str, Any]:
    """An inventory Host's connection variables for Ansible (strict host keys; values checked)."""
    name = host.name
    files = [*known_hosts, *([host.known_hosts] if getattr(host, "known_hosts", "") else [])]
    files = [safe_value(os.path.expanduser(f), "known_hosts file", name) for f in files]
    interp = (getattr(host, "vars", None) or {}).get("ansible_python_interpreter") or python_interpreter
    v: dict[str, Any] = {
        "ansible_host": safe_value(host.address, "address", name),
        "ansible_port": int(host.port),
        "ansible_user": safe_value(host.user or "root", "user", name),
        "ansible_python_interpreter": safe_value(interp, "ansible_python_interpreter", name),
        "ansible_ssh_common_args": ssh_common_args(files),
    }
    key = getattr(host, "identity_file", "") or default_identity
    if with_identity and key:
        v["ansible_ssh_private_key_file"] = safe_value(os.path.expanduser(key), "identity file", name)
    return v


def action_vars(action: HostAction) -> dict[str, Any]:
    """The host variables the step playbook reads (every string `!unsafe`)."""
    v: dict[str, Any] = {"kpipe_action": action.kind, "kpipe_become": bool(action.become),
                         "kpipe_timeout": int(action.timeout), "kpipe_secret": bool(action.secret)}
    if action.kind == "copy":
        v["kpipe_src"] = Unsafe(action.src)
        v["kpipe_dest"] = Unsafe(action.dest)
    else:
        v["kpipe_argv"] = [Unsafe(a) for a in action.argv]
        if action.stdin is not None:
            v["kpipe_stdin"] = Unsafe(action.stdin)
    return v


def _close_masters(cp_dir: str) -> None:
    """Stop the OpenSSH ControlMaster processes this session started (by socket, not by name)."""
    for sock in Path(cp_dir).glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "kpipe-control-master"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)
    shutil.rmtree(cp_dir, ignore_errors=True)


def base_envvars(cp_dir: str, local_tmp: str) -> dict[str, str]:
    """Ansible's settings for kpipe's runs: strict host keys, pipelining, persistent connections."""
    return {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": cp_dir,
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=120s",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        # One SSH exchange per module instead of put + chmod + exec (no requiretty assumed).
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": local_tmp,
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_INVENTORY_ENABLED": "yaml",
        "ANSIBLE_TIMEOUT": "20",
    }


class _Signals:
    """While a play runs: SIGINT/SIGTERM cancel it (ansible-runner polls `cancel`), then, with the
    previous handlers back, the signal is raised again (Ctrl-C: KeyboardInterrupt, as anywhere in kpipe)."""

    def __init__(self) -> None:
        self.got: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        # only the main thread may set handlers; elsewhere ansible-runner leaves them alone too
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._saved[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.got = self.got or signum

    def cancel(self) -> bool:
        """ansible-runner's cancel_callback."""
        return self.got is not None

    def __exit__(self, *exc: object) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if self.got is not None:
            signal.raise_signal(self.got)


class _Collector:
    """An ansible-runner event_handler: the step task's result per host."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None):
        self.results: dict[str, ActionResult] = {}
        self._lock = threading.Lock()
        self._on_event = on_event

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = str(event.get("event", ""))
        data = event.get("event_data") or {}
        host = str(data.get("host") or "")
        res = data.get("res") or {}
        if host and kind in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable"):
            with self._lock:
                r = self.results.setdefault(host, ActionResult(host))
                msg = str(res.get("msg") or "").strip()
                if kind == "runner_on_unreachable":
                    r.unreachable = msg or "unreachable"
                elif kind == "runner_on_ok" and ("rc" in res or res.get("dest") or res.get("checksum")):
                    r.rc = int(res.get("rc", 0) if res.get("rc") is not None else 0)
                    r.stdout, r.stderr = str(res.get("stdout") or ""), str(res.get("stderr") or "")
                elif kind == "runner_on_failed":
                    r.failed = msg or str(res.get("stderr") or "failed").strip()
                    r.timed_out = any(t in r.failed for t in _TIMEOUT_MSG)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001, S110 - a progress printer must not break the run
                pass
        return True


@dataclass
class AnsibleSession:
    """Rounds of host actions over one set of hosts' connection variables (one ansible-runner run each)."""

    hostvars: Mapping[str, Mapping[str, Any]]  # host -> connection variables (connection_vars)
    private_root: Path
    forks: int = 50
    on_event: Callable[[dict[str, Any]], None] | None = None
    rounds: int = 0
    _cp_dir: str = field(default="", repr=False)

    def run_round(self, actions: Mapping[str, HostAction]) -> dict[str, ActionResult]:
        """Run each host's action at once (one play over these hosts); a result per host, never an exception
        for one host's failure."""
        import ansible_runner

        if not actions:
            return {}
        if not self._cp_dir:
            # OpenSSH control sockets live here; a unix socket path must stay under ~108 bytes.
            self._cp_dir = tempfile.mkdtemp(prefix="kpipe-cp-", dir="/tmp")
        self.rounds += 1
        pdir = self.private_root / f"round-{self.rounds:04d}"
        (pdir / "inventory").mkdir(parents=True, exist_ok=True)
        hosts = {h: {**self.hostvars[h], **action_vars(a)} for h, a in actions.items()}
        inv = pdir / "inventory" / "hosts.yml"
        inv.write_text(dump_yaml({"all": {"children": {"kpipe_step": {"hosts": hosts}}}}))
        collector = _Collector(self.on_event)
        envvars = base_envvars(self._cp_dir, str(self.private_root / "tmp"))
        try:
            # Without a cancel_callback of our own, ansible-runner (in the main thread) replaces the
            # process's SIGINT/SIGTERM handlers for good: Ctrl-C would only end the current play and
            # kpipe would go on. _Signals cancels the play (ansible-runner kills its process group,
            # which a terminal's Ctrl-C does not reach: it runs on its own pty) and re-raises the signal.
            with _Signals() as sig:
                r = ansible_runner.run(private_data_dir=str(pdir), project_dir=str(ANSIBLE_DIR),
                                       playbook=STEP_PLAYBOOK, inventory=str(inv), envvars=envvars,
                                       forks=max(1, int(self.forks)), event_handler=collector, quiet=True,
                                       json_mode=False, cancel_callback=sig.cancel)
        finally:
            if any(a.secret for a in actions.values()):
                inv.unlink(missing_ok=True)  # the argv was a secret: keep it off the disk
        out = {}
        for h in actions:
            got = collector.results.get(h)
            if got is None or (got.rc is None and not got.unreachable and not got.failed):
                got = ActionResult(h, failed=f"ansible-runner gave no result for this host (status {r.status}, "
                                             f"rc {r.rc}; see {pdir})")
            out[h] = got
        return out

    def close(self) -> None:
        """Close the persistent SSH connections of every round."""
        if self._cp_dir:
            _close_masters(self._cp_dir)
            self._cp_dir = ""
