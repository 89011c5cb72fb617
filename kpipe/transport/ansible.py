"""The Ansible engine: hand a kpipe rollout plan to ansible-runner.

Past a few hundred hosts kpipe hands the same plan to Ansible (design.md,
"Scale"): `ansible/playbooks/livepatch-rollout.yml` with the role
`kpipe_livepatch`. kpipe keeps the plan, the journal and the audit; Ansible
does the per-host work. This module:

- writes a private data folder for ansible-runner: an inventory whose group
  `kpipe_rollout` lists the plan's hosts in wave order (so Ansible's `serial`
  batches are exactly kpipe's waves), their connection settings and their
  assignment (module, release, file, sha256, local artifact path);
- translates the failure budget: kpipe's budget counts failures over every
  host attempted so far, which the playbook's gate task checks after each
  wave (`meta: end_play`), and Ansible's per-batch `max_fail_percentage`
  is set so that it never halts earlier than kpipe's budget would
  (a percentage budget p -> p; a count N -> 100*N/smallest wave). A host
  whose apply failed and was rolled back stays in the play (a fact says it
  failed) so that only kpipe's gate weighs it; Ansible's own brake sees hard
  failures (unreachable, a rollback that failed);
- keeps strict host key checking: ANSIBLE_HOST_KEY_CHECKING=True and
  `StrictHostKeyChecking=yes` with `UserKnownHostsFile` = the workspace's
  known_hosts plus each host's `kpipe_known_hosts`;
- collects a result per host from the runner's events (partial failure is
  data) in the engine's shape, kpipe.rollout.engine.HostResult;
- after a halt, rolls back per the plan's policy in a second run (hosts left
  mid-step by Ansible's brake are always rolled back: their state is unknown).

Values that reach the playbook are validated here (module names, releases,
file names, sha256, paths) and must not contain template markers: Ansible
templates variables, and a `{{` in a host variable is code on the controller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError, KpipeError, NotFoundError

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
PLAYBOOK = "playbooks/livepatch-rollout.yml"

_MODULE = re.compile(r"^[A-Za-z0-9_-]{1,55}$")
_COMPONENT = re.compile(r"^[A-Za-z0-9._+~-]{1,200}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_TEMPLATE = re.compile(r"\{\{|\{%|\{#|\}\}|%\}|#\}")


@dataclass
class HostProgress:
    """What the runner events said about one host so far."""

    host: str
    started: bool = False
    last_step: str = ""
    result: str = ""  # applied | rolled_back (from the role's result facts)
    failed_step: str = ""
    failure: str = ""
    unreachable: str = ""
    final_failed: bool = False  # the role's rescue ran: the apply failed
    rescued_failures: list[str] = field(default_factory=list)


@dataclass
class AnsibleRun:
    """One ansible-runner run: its status, return code and per-host progress."""

    status: str
    rc: int
    hosts: dict[str, HostProgress]
    gate_halted: bool
    gate: dict[str, Any]
    artifact_dir: str


def _step_of(task_name: str) -> str:
    # Role tasks may arrive as "role : name"; kpipe's task names are "<step> | <what>".
    name = task_name.rsplit(" : ", 1)[-1]
    return name.split(" | ", 1)[0].strip() if " | " in name else name.strip()


class EventCollector:
    """An ansible-runner event_handler that folds events into HostProgress per host."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None):
        self.hosts: dict[str, HostProgress] = {}
        self.gate: dict[str, Any] = {}
        self.gate_halted = False
        self._lock = threading.Lock()
        self._on_event = on_event

    def _host(self, name: str) -> HostProgress:
        if name not in self.hosts:
            self.hosts[name] = HostProgress(name)
        return self.hosts[name]

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host") or ""
        task = data.get("task") or ""
        res = data.get("res") or {}
        with self._lock:
            if host and kind.startswith("runner_on_"):
                p = self._host(host)
                p.started = True
                step = _step_of(task)
                full = task.rsplit(" : ", 1)[-1]
                if kind == "runner_on_ok":
                    p.last_step = step or p.last_step
                    facts = res.get("ansible_facts") or {}
                    if facts.get("kpipe_result"):
                        p.result = str(facts["kpipe_result"])
                    if facts.get("kpipe_apply_failed"):
                        # the role's rescue: the apply failed, the host was rolled back
                        p.final_failed = True
                        p.failure = str(facts.get("kpipe_apply_error") or p.failure or "failed")
                        head = p.failure.split(":", 1)[0]
                        p.failed_step = _step_of(head) if " | " in head else p.failed_step
                    if full.startswith("gate | weigh"):
                        self.gate = {k: facts.get(k) for k in
                                     ("kpipe_gate_failed", "kpipe_gate_allowed", "kpipe_gate_attempted")}
                        try:
                            self.gate_halted = int(facts.get("kpipe_gate_failed", 0)) > int(
                                facts.get("kpipe_gate_allowed", 0))
                        except (TypeError, ValueError):
                            pass
                elif kind == "runner_on_failed":
                    msg = str(res.get("msg") or res.get("stderr") or "failed").strip()
                    if full.startswith("result | stop here"):
                        p.final_failed = True
                        p.failure = msg
                    elif data.get("ignore_errors"):
                        pass
                    else:
                        p.rescued_failures.append(f"{full}: {msg}")
                        p.failed_step = step
                        p.failure = p.failure or f"{full}: {msg}"
                elif kind == "runner_on_unreachable":
                    p.unreachable = str(res.get("msg") or "unreachable").strip()
                    p.failed_step = step
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a progress printer must not break the run
                pass
        return True  # keep the event in the artifact folder (ansible-runner's replay)


# ---------------------------------------------------------------------------
# Plan -> inventory and extra vars (pure)
# ---------------------------------------------------------------------------


def _check(value: Any, pattern: re.Pattern[str], what: str, host: str) -> str:
    text = str(value)
    if not pattern.match(text) or text in (".", ".."):
        raise ConfigError(f"plan: host {host}: invalid {what} {text!r}",
                          hint="the plan must come from `kpipe rollout plan`")
    return text


def _safe_path(value: Any, what: str, host: str) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text) or _TEMPLATE.search(text) or "\x00" in text:
        raise ConfigError(f"host {host}: {what} {text!r} is empty or holds spaces or template markers",
                          hint="Ansible would template or split it; use a plain path")
    return text


def budget_settings(max_failures: str, waves: list[list[str]]) -> dict[str, Any]:
    """Extra vars for the budget: cumulative attempted/allowed per wave and max_fail_percentage."""
    from kpipe.rollout.planner import FailureBudget

    budget = FailureBudget.parse(max_failures if max_failures not in (None, "") else "0")
    sizes = [len(w) for w in waves if w]
    attempted, total = [], 0
    for s in sizes:
        total += s
        attempted.append(total)
    allowed = [budget.allowed(n) for n in attempted]
    if budget.percent is not None:
        pct = float(budget.percent)
    else:
        smallest = min(sizes) if sizes else 1
        pct = min(100.0, 100.0 * (budget.count or 0) / smallest)
    return {
        "kpipe_serial": sizes,
        "kpipe_attempted": attempted,
        "kpipe_allowed_failures": allowed,
        # Ansible halts a batch when failed/batch_size > this (strictly greater).
        "kpipe_max_fail_percentage": int(pct) if float(pct).is_integer() else pct,
    }


def _ssh_args(known_hosts: list[str]) -> str:
    files = " ".join(known_hosts)
    # Ansible splits this with shlex; paths were checked to hold no spaces.
    return (f"-o StrictHostKeyChecking=yes -o 'UserKnownHostsFile={files}' "
            "-o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no")


def build_inventory(
    plan: Mapping[str, Any],
    hosts: Mapping[str, Any],
    artifact_paths: Mapping[str, str],
    known_hosts: list[str],
    *,
    rollout_hosts: list[str],
    rollback_hosts: list[str],
    python_interpreter: str = "auto_silent",
) -> dict[str, Any]:
    """The YAML inventory document: kpipe_rollout (wave order) and kpipe_rollback groups."""
    assignments = plan.get("assignments") or {}

    def entry(name: str) -> dict[str, Any]:
        a = assignments[name]
        art = a.get("artifact") or {}
        h = hosts[name]
        module = _check(art.get("module_name", ""), _MODULE, "module name", name).replace("-", "_")
        files = [*known_hosts, *([h.known_hosts] if getattr(h, "known_hosts", "") else [])]
        files = [_safe_path(os.path.expanduser(f), "known_hosts file", name) for f in files]
        v: dict[str, Any] = {
            "ansible_host": _safe_path(h.address, "address", name),
            "ansible_port": int(h.port),
            "ansible_user": _safe_path(h.user or "root", "user", name),
            "ansible_become": bool(h.become),
            "ansible_python_interpreter": _safe_path(
                (getattr(h, "vars", None) or {}).get("ansible_python_interpreter") or python_interpreter,
                "ansible_python_interpreter", name),
            "ansible_ssh_common_args": _ssh_args(files),
            "kpipe_wave": int(a.get("wave", 1)),
            "kpipe_module": module,
            "kpipe_release": _check(a.get("release", ""), _COMPONENT, "kernel release", name),
            "kpipe_filename": _check(art.get("filename", ""), _COMPONENT, "module file name", name),
            "kpipe_sha256": _check(str(art.get("sha256", "")).lower(), _SHA, "sha256", name),
            "kpipe_artifact_id": _check(art.get("id", "") or "-", _COMPONENT, "artifact id", name),
            "kpipe_artifact_path": _safe_path(artifact_paths[art.get("id", "")], "artifact path", name),
        }
        if h.identity_file:
            v["ansible_ssh_private_key_file"] = _safe_path(os.path.expanduser(h.identity_file), "identity file", name)
        return v

    return {
        "all": {
            "children": {
                "kpipe_rollout": {"hosts": {n: entry(n) for n in rollout_hosts}},
                "kpipe_rollback": {"hosts": {n: entry(n) for n in rollback_hosts}},
            }
        }
    }


# ---------------------------------------------------------------------------
# The edge: ansible-runner
# ---------------------------------------------------------------------------


def _short_tmp() -> str:
    # OpenSSH control sockets live here; a unix socket path must stay under ~108 bytes.
    return tempfile.mkdtemp(prefix="kpipe-cp-", dir="/tmp")


def _close_masters(cp_dir: str) -> None:
    """Stop the OpenSSH ControlMaster processes this run started (by socket, not by name)."""
    for sock in Path(cp_dir).glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "kpipe-control-master"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)
    shutil.rmtree(cp_dir, ignore_errors=True)


def run_playbook(
    private_dir: Path,
    inventory_doc: dict[str, Any],
    extravars: dict[str, Any],
    *,
    forks: int,
    timeout: float | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> AnsibleRun:
    """Run the kpipe playbook once through ansible-runner; return the per-host progress."""
    import ansible_runner
    import yaml

    private_dir.mkdir(parents=True, exist_ok=True)
    inv_dir = private_dir / "inventory"
    inv_dir.mkdir(exist_ok=True)
    inv_path = inv_dir / "hosts.yml"
    inv_path.write_text(yaml.safe_dump(inventory_doc, sort_keys=False))
    cp_dir = _short_tmp()
    envvars = {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": cp_dir,
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=120s",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        # One SSH exchange per module instead of put + chmod + exec (no requiretty assumed).
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(private_dir / "tmp"),
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_INVENTORY_ENABLED": "yaml",
        "ANSIBLE_TIMEOUT": "20",
    }
    collector = EventCollector(on_event)
    try:
        r = ansible_runner.run(
            private_data_dir=str(private_dir),
            project_dir=str(ANSIBLE_DIR),
            playbook=PLAYBOOK,
            inventory=str(inv_path),
            extravars=extravars,
            envvars=envvars,
            forks=max(1, int(forks)),
            event_handler=collector,
            quiet=True,
            timeout=int(timeout) if timeout else None,
            json_mode=False,
        )
    finally:
        _close_masters(cp_dir)
    return AnsibleRun(
        status=str(r.status),
        rc=int(r.rc if r.rc is not None else -1),
        hosts=collector.hosts,
        gate_halted=collector.gate_halted,
        gate=collector.gate,
        artifact_dir=str(getattr(r.config, "artifact_dir", "")),
    )


def _result_of(p: HostProgress | None, host: str, wave: int) -> Any:
    from kpipe.rollout.engine import HostResult

    if p is None or not p.started:
        return HostResult(host, "skipped", "not attempted: the rollout halted before this host's wave", "",
                          {"wave": wave, "engine": "ansible"})
    detail = {"wave": wave, "engine": "ansible"}
    if p.rescued_failures:
        detail["failures"] = p.rescued_failures[-5:]
    if p.unreachable:
        return HostResult(host, "unreachable", f"unreachable during {p.failed_step or p.last_step}: {p.unreachable}",
                          p.failed_step or p.last_step, detail)
    if p.final_failed:
        if p.result == "rolled_back":
            detail["apply_failed"] = True
            return HostResult(host, "rolled_back", p.failure, p.failed_step or "rollback", detail)
        return HostResult(host, "failed", p.failure, p.failed_step, detail)
    if p.failure and p.result != "applied":
        return HostResult(host, "failed", p.failure, p.failed_step, detail)
    if p.result == "applied":
        return HostResult(host, "applied", "", "verify", detail)
    if p.result == "rolled_back":
        return HostResult(host, "rolled_back", "", "rollback", detail)
    detail["interrupted"] = True
    return HostResult(host, "failed", f"interrupted after step {p.last_step or '?'} (Ansible halted the batch)",
                      p.last_step, detail)


def run_plan_with_ansible(
    workspace: Any,
    plan_dict: Mapping[str, Any],
    inventory_path: str | os.PathLike | None,
    *,
    forks: int | None = None,
    timeout: float | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    run_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run a kpipe rollout plan (RolloutPlan.to_dict()) through ansible-runner.

    Returns host -> kpipe.rollout.engine.HostResult (state applied | failed |
    unreachable | skipped | rolled_back; `detail["apply_failed"]` marks a host
    rolled back because its own apply failed). `plan_dict["artifact_paths"]`
    may map artifact id -> local module path; otherwise the store's blob is used.
    """
    from kpipe.fleet.inventory import load_inventory
    from kpipe.store import sha256_file

    waves = [list(w) for w in plan_dict.get("waves") or []]
    assignments = plan_dict.get("assignments") or {}
    order = [h for w in waves for h in w]
    if not order:
        raise ConfigError("plan: no hosts to run", hint="every host was excluded; see `kpipe rollout plan`")
    missing = [h for h in order if h not in assignments]
    if missing:
        raise ConfigError(f"plan: hosts without an assignment: {', '.join(missing[:5])}")
    options = plan_dict.get("options") or {}

    # None: the workspace's own inventory sources (kpipe.toml [fleet], fleet.yml, the lab's).
    inventory = load_inventory(workspace, sources=[str(inventory_path)] if inventory_path else None)
    hosts: dict[str, Any] = {}
    for name in order:
        try:
            hosts[name] = inventory.get(name)
        except NotFoundError:
            raise NotFoundError(f"plan host {name!r} is not in {inventory_path or 'the inventory'}",
                                hint="plan and run with the same inventory") from None

    # The local module file for each artifact, verified against the plan's sha256.
    explicit = dict(plan_dict.get("artifact_paths") or {})
    artifact_paths: dict[str, str] = {}
    for name in order:
        art = assignments[name].get("artifact") or {}
        aid, sha = art.get("id", ""), str(art.get("sha256", "")).lower()
        if aid in artifact_paths:
            continue
        path = Path(explicit[aid]) if aid in explicit else Path(workspace.store.blob_path(sha))
        if not path.is_file():
            raise NotFoundError(f"artifact {aid}: module file {path} not found", hint="see `kpipe artifacts list`")
        got = sha256_file(path)
        if got != sha:
            raise KpipeError(f"artifact {aid}: {path} has sha256 {got[:12]}, the plan says {sha[:12]}",
                             hint="the store or the file changed after planning; plan again")
        artifact_paths[aid] = str(path.resolve())

    ssh = getattr(workspace, "ssh", None)
    known_hosts = [str(Path(os.path.expanduser(ssh.known_hosts)))] if ssh is not None and ssh.known_hosts else []
    known_hosts = [k for k in known_hosts if Path(k).exists()]
    forks = forks or int(options.get("forks") or getattr(ssh, "forks", 50) or 50)
    extravars = {
        **budget_settings(str(options.get("max_failures", "0")), waves),
        "kpipe_transition_timeout": int(float(options.get("step_timeout_s", 120))),
        "kpipe_rollback_on_failure": True,
    }

    stamp = time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()
    base = Path(run_dir) if run_dir else Path(workspace.store.root) / "ansible" / stamp
    wave_of = {h: i + 1 for i, w in enumerate(waves) for h in w}
    # [ansible] python_interpreter in kpipe.toml, else the host's own variable, else discovery.
    interp = workspace.settings.ansible.python_interpreter
    inv = build_inventory(plan_dict, hosts, artifact_paths, known_hosts, rollout_hosts=order, rollback_hosts=[],
                          python_interpreter=interp)
    run = run_playbook(Path(base) / "apply", inv, extravars, forks=forks, timeout=timeout, on_event=on_event)
    results = {h: _result_of(run.hosts.get(h), h, wave_of[h]) for h in order}

    # A halt: Ansible's brake or kpipe's gate stopped the play before every wave ran.
    halted = run.gate_halted or any(r.state == "skipped" for r in results.values())
    policy = str(options.get("rollback_policy", "failed"))
    to_roll = [h for h, r in results.items() if r.detail.get("interrupted")]
    if halted:
        failed_waves = {wave_of[h] for h, r in results.items() if r.state in ("failed", "unreachable", "rolled_back")}
        last_wave = max(failed_waves) if failed_waves else 0
        for h, r in results.items():
            if r.state != "applied":
                continue
            if policy == "all" or (policy == "wave" and wave_of[h] == last_wave):
                to_roll.append(h)
    if to_roll:
        to_roll = [h for h in order if h in set(to_roll)]
        inv = build_inventory(plan_dict, hosts, artifact_paths, known_hosts, rollout_hosts=[], rollback_hosts=to_roll,
                              python_interpreter=interp)
        rb = run_playbook(Path(base) / "rollback", inv, extravars, forks=forks, timeout=timeout, on_event=on_event)
        from kpipe.rollout.engine import HostResult

        for h in to_roll:
            p = rb.hosts.get(h)
            before = results[h]
            detail = {**before.detail, "rollback": True, "state_before_rollback": before.state}
            if p is not None and p.result == "rolled_back" and not p.failure and not p.unreachable:
                results[h] = HostResult(h, "rolled_back", before.reason or f"rolled back ({policy} policy)",
                                        "rollback", detail)
            else:
                why = (p.unreachable or p.failure) if p else "rollback run did not reach the host"
                results[h] = HostResult(h, "failed", f"rollback failed: {why}", "rollback", detail)
    for r in results.values():
        r.detail["halted"] = halted
        r.detail["ansible_status"] = run.status
    return results


def results_to_dict(results: Mapping[str, Any]) -> dict[str, Any]:
    """Plain data (for --json and the journal) from run_plan_with_ansible's results."""
    return {h: {"state": r.state, "reason": r.reason, "step": r.step, "detail": json.loads(json.dumps(r.detail,
                                                                                                        default=str))}
            for h, r in results.items()}


def record_outcomes(journal: Any, rollout_id: str, plan_dict: Mapping[str, Any], results: Mapping[str, Any]) -> None:
    """Journal each host's result the way kpipe's own engine does (step `outcome`), so that
    `kpipe rollout status` and the audit see an Ansible-run rollout like any other.

    A host rolled back after its own failure gets a `failed` then a `rolled_back`
    outcome; a host rolled back by policy an `applied` then a `rolled_back` one;
    hosts never attempted (`skipped`) get none.
    """
    assignments = plan_dict.get("assignments") or {}

    def outcome(host: str, state: str, reason: str, step: str, action: str) -> None:
        a = assignments[host]
        art = a.get("artifact") or {}
        journal.record(rollout_id, host, int(a.get("wave", 1)), "outcome",
                       "done" if state in ("applied", "rolled_back") else "failed",
                       {"state": state, "reason": reason, "step": step, "action": action, "engine": "ansible",
                        "artifact": art.get("id", ""), "sha256": art.get("sha256", ""),
                        "module": str(art.get("module_name", "")).replace("-", "_"),
                        "kernel": a.get("release", ""), "replace": bool(art.get("replace", False))})

    for host, r in results.items():
        if host not in assignments or r.state == "skipped":
            continue
        if r.state == "rolled_back":
            before = "failed" if r.detail.get("apply_failed") or r.detail.get("state_before_rollback") != "applied" \
                else "applied"
            outcome(host, before, r.reason, r.detail.get("failed_step", r.step), "apply")
            outcome(host, "rolled_back", r.reason, "rollback", "rollback")
        else:
            outcome(host, r.state, r.reason, r.step, "apply")
