"""The Ansible executor: the same rollout plan, each host step run as an Ansible task.

kpipe's Engine (kpipe.rollout.engine) owns the plan: waves, the per-host steps
(each a Command or an Upload with its pure interpreter), the write-ahead
journal, the gate and soak between waves, halt and rollback, resume. The
Fabric executor hands each host's steps an SSH transport; this one hands them
a transport whose actions are batched into Ansible plays: every host of the
wave that is still in its pipeline submits its next action, and one play
(`ansible/playbooks/kpipe-step.yml`, one ansible-runner run) runs all of them —
`ansible.builtin.command` with the step's argv (become when the Command wants
sudo on a non-root login) or `ansible.builtin.copy` for an Upload. Each host's
rc/stdout/stderr comes back from the runner's events and kpipe's own
interpreter of the step reads it, so a host whose step failed drops out of
the next play by itself. Journal entries, gate decisions and host states are
the Fabric executor's, step for step: `rollout status`, `resume` and
`rollback` work after either engine.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kpipe.commands import Command, CommandResult
from kpipe.errors import CommandTimeout, KpipeError, TransportError
from kpipe.rollout.journal import Journal
from kpipe.transport.ansible import (
    ActionResult,
    AnsibleSession,
    HostAction,
    connection_vars,
)

T = TypeVar("T")
ENGINES = ("fabric", "ansible")


@dataclass
class _Request:
    action: HostAction
    result: ActionResult | BaseException | None = None


class _Rounds:
    """The barrier: a round starts when every live host has submitted its next action (or finished)."""

    def __init__(self, hosts: list[str]):
        self.cond = threading.Condition()
        self.live = set(hosts)
        self.pending: dict[str, _Request] = {}

    def submit(self, host: str, req: _Request) -> ActionResult:
        with self.cond:
            self.pending[host] = req
            self.cond.notify_all()
            while req.result is None:
                self.cond.wait()
        if isinstance(req.result, BaseException):
            raise req.result
        return req.result

    def finish(self, host: str) -> None:
        with self.cond:
            self.live.discard(host)
            self.cond.notify_all()

    def next_round(self) -> dict[str, _Request] | None:
        """The next round's requests, or None when every host is done."""
        with self.cond:
            while self.live and len(self.pending) < len(self.live):
                self.cond.wait()
            if not self.live:
                return None
            batch, self.pending = self.pending, {}
            return batch

    def deliver(self, batch: Mapping[str, _Request], results: Mapping[str, ActionResult | BaseException]) -> None:
        with self.cond:
            for h, req in batch.items():
                req.result = results[h]
            self.cond.notify_all()


def unreachable_kind(message: str) -> str:
    """The TransportError kind of an Ansible `unreachable` message (the SSH transport's kinds)."""
    low = message.lower()
    if "host key" in low:
        return "hostkey"
    if "connection refused" in low:
        return "refused"
    if "permission denied" in low:
        return "auth"
    if "timed out" in low:
        return "timeout"
    return "disconnected"


class AnsibleStepTransport:
    """What a host's steps see: run/put, executed as that host's task in the next Ansible play."""

    def __init__(self, name: str, rounds: _Rounds, *, become: bool, default_timeout: float):
        self.name = name
        self._rounds = rounds
        self._become = become
        self._default_timeout = default_timeout

    def run(self, cmd: Command) -> CommandResult:
        """Run one Command as `ansible.builtin.command` with its argv; rc/stdout/stderr as SSH would give them."""
        argv = (*(("env", *(f"{k}={v}" for k, v in cmd.env)) if cmd.env else ()), *cmd.argv)
        timeout = cmd.timeout if cmd.timeout is not None else self._default_timeout
        action = HostAction(argv=tuple(argv), become=cmd.sudo and self._become, timeout=int(timeout + 0.999),
                            stdin=cmd.stdin.decode("utf-8", "replace") if cmd.stdin else None, secret=cmd.secret)
        start = time.monotonic()
        r = self._rounds.submit(self.name, _Request(action))
        what = cmd.label or cmd.argv[0]
        if r.unreachable:
            raise TransportError(f"{self.name}: unreachable during {what}: {r.unreachable}", host=self.name,
                                 kind=unreachable_kind(r.unreachable))
        if r.timed_out:
            raise CommandTimeout(f"{self.name}: {what} timed out after {timeout:g} s", host=self.name)
        if r.rc is None:
            raise TransportError(f"{self.name}: {what} failed in Ansible: {r.failed}", host=self.name, kind="error")
        return CommandResult(self.name, cmd, r.rc, r.stdout, r.stderr, time.monotonic() - start,
                             {"engine": "ansible"})

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to the host with `ansible.builtin.copy`."""
        action = HostAction(src=str(Path(local).resolve()), dest=remote, become=self._become,
                            timeout=int(self._default_timeout + 0.999))
        r = self._rounds.submit(self.name, _Request(action))
        if r.unreachable:
            raise TransportError(f"{self.name}: unreachable while copying {local} to {remote}: {r.unreachable}",
                                 host=self.name, kind=unreachable_kind(r.unreachable))
        if r.rc is None or r.rc != 0:
            raise TransportError(f"{self.name}: copying {local} to {remote} failed: {r.failed or r.stderr}",
                                 host=self.name, kind="error")

    def close(self) -> None:
        pass


class AnsibleRunner:
    """The Engine's Runner over Ansible: fn(transport) per host, their actions batched into plays."""

    def __init__(self, session: AnsibleSession, hosts: Mapping[str, Any], *, default_timeout: float = 600.0,
                 forks: int | None = None):
        self.session = session
        self.hosts = dict(hosts)  # name -> inventory Host
        self.default_timeout = default_timeout or 600.0
        self.forks = forks  # the operator's --forks wins over the plan's

    def _become(self, name: str) -> bool:
        h = self.hosts[name]
        # the SSH transport's rule: sudo-flagged commands go through sudo when asked to or not root
        return bool(h.become) or (h.user or "root") != "root"

    def run_many(self, hosts: list[str], fn: Callable[[Any], T], forks: int) -> dict[str, T | BaseException]:
        """fn(transport) for every host; a result or the exception per host (partial failure is data)."""
        out: dict[str, T | BaseException] = {
            h: TransportError(f"{h}: not in the inventory any more", host=h, kind="error")
            for h in hosts if h not in self.hosts}
        present = [h for h in hosts if h in self.hosts]
        if not present:
            return out
        rounds = _Rounds(present)
        self.session.forks = self.forks or forks or self.session.forks

        def one(h: str) -> None:
            try:
                out[h] = fn(AnsibleStepTransport(h, rounds, become=self._become(h),
                                                 default_timeout=self.default_timeout))
            except BaseException as e:  # noqa: BLE001 - every host's outcome is data for the caller
                out[h] = e
            finally:
                rounds.finish(h)

        threads = [threading.Thread(target=one, args=(h,), name=f"kpipe-ansible-{h}", daemon=True) for h in present]
        for t in threads:
            t.start()
        while True:
            batch = rounds.next_round()
            if batch is None:
                break
            try:
                got: Mapping[str, ActionResult | BaseException] = self.session.run_round(
                    {h: r.action for h, r in batch.items()})
            except Exception as e:  # ansible-runner itself failed: every host of the round learns it
                err = e if isinstance(e, KpipeError) else KpipeError(f"ansible-runner failed: {e}")
                rounds.deliver(batch, {h: err for h in batch})
                continue
            except BaseException:
                # Ctrl-C (or SIGTERM) stopped the play: the hosts' steps end as interrupted, not as failed
                # outcomes (the engine journals no outcome for a KeyboardInterrupt), then kpipe stops
                rounds.deliver(batch, {h: KeyboardInterrupt() for h in batch})
                for t in threads:
                    t.join(timeout=30)
                raise
            rounds.deliver(batch, got)
        for t in threads:
            t.join()
        return out

    def close(self) -> None:
        self.session.close()


def known_hosts_files(workspace: Any) -> list[str]:
    """The workspace's known_hosts file (strict checking: hosts must be in it or in their own)."""
    ssh = workspace.ssh
    path = Path(os.path.expanduser(ssh.known_hosts)) if ssh is not None and ssh.known_hosts else None
    return [str(path)] if path is not None and path.exists() else []


def ansible_engine_for(workspace: Any, journal: Journal, rollout_id: str, *, forks: int | None = None,
                       on_event: Callable[..., None] | None = None, check_blobs: bool = False,
                       hosts: list[Any] | None = None) -> tuple[Any, AnsibleRunner]:
    """An Engine whose host steps run through ansible-runner (the rollout's hosts from the inventory)."""
    from kpipe.rollout.engine import Engine
    from kpipe.rollout.world import local_path_fn, plan_and_targets

    plan, found = plan_and_targets(workspace, journal, rollout_id, hosts=hosts, check_blobs=check_blobs)
    known = known_hosts_files(workspace)
    interp = workspace.settings.ansible.python_interpreter or "auto_silent"
    key = getattr(workspace.ssh, "identity_file", "") or ""
    hostvars = {n: connection_vars(h, known, interp, default_identity=key) for n, h in found.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()
    private = Path(workspace.store.root) / "ansible" / f"{rollout_id}-{stamp}"
    session = AnsibleSession(hostvars, private, forks=forks or plan.options.forks)
    runner = AnsibleRunner(session, found, default_timeout=float(workspace.ssh.command_timeout or 0), forks=forks)
    engine = Engine(journal, runner, local_path_fn(workspace.store), on_event=on_event)
    # where ansible-runner keeps this run's inventories and events (for an operator who digs in)
    journal.update_detail(rollout_id, ansible_dir=str(private))
    return engine, runner
