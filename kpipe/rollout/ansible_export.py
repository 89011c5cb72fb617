"""`kpipe rollout export ID --ansible DIR`: a rollout plan as a self-contained Ansible project.

For operators who run the rollout with plain `ansible-playbook` or hand it to
AWX / Ansible Automation Platform. The project holds the same per-host steps
the executors run — built by kpipe.rollout.engine.apply_plan / rollback_plan
for a host that has nothing of the patch yet — as data (vars/plan.yml: each
step's exact argv, become, timeout), one generic step task file, the plays
(`serial` = kpipe's waves, `max_fail_percentage` = the failure budget), an
inventory with each host's connection settings and strict host key checking
against the copied known_hosts lines, and the module file(s) from the store.
No private key is copied: pass one with `--private-key`, an ssh-agent, or an
AWX machine credential.

Without kpipe, a step's result is checked in Ansible: a non-zero exit fails the
host, and the few reads whose meaning matters (the preflight's release and
livepatch support, the transition, the verification) carry regexes their
output must (or must not) match. Idempotency where the host scripts alone
would not give it: the load runs only if `/sys/kernel/livepatch/<name>` does
not exist yet, the unload only if `/sys/module/<name>` does. kpipe's deeper
checks (build identity, the log after the marker) stay kpipe's: run
`kpipe audit` after an exported rollout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kpipe.commands import Command
from kpipe.errors import ConfigError, NotFoundError
from kpipe.fleet import livepatch as lp
from kpipe.plan import Step, Upload
from kpipe.rollout.planner import Assignment, FailureBudget, RolloutPlan
from kpipe.transport.ansible import Unsafe, connection_vars, dump_yaml, safe_value

ANSIBLE_CFG = """[defaults]
inventory = inventory
host_key_checking = True
retry_files_enabled = False
gathering = explicit

[ssh_connection]
pipelining = True
"""

STEP_TASKS = """---
# One kpipe step of one host (`step` from vars/plan.yml), included once per step by the plays.
- name: "{{ step.name }} | {{ step.label }}"
  ansible.builtin.command:
    argv: "{{ step.argv }}"
    creates: "{{ step.creates | default(omit) }}"
    removes: "{{ step.removes | default(omit) }}"
    strip_empty_ends: false
  become: "{{ (step.sudo | bool) and (kpipe_become | bool) }}"
  timeout: "{{ step.timeout | int }}"
  register: kpipe_out
  changed_when: step.writes | bool
  failed_when: kpipe_out.rc | default(0) != 0
  when: step.action == 'command'

- name: "{{ step.name }} | {{ step.label }}"
  ansible.builtin.copy:
    src: "{{ step.src }}"
    dest: "{{ step.dest }}"
  become: "{{ kpipe_become | bool }}"
  when: step.action == 'copy'

- name: "{{ step.name }} | output must show"
  ansible.builtin.assert:
    that: kpipe_out.stdout is regex(item, multiline=True)
    fail_msg: "{{ step.name }}: the output does not show {{ item }}"
    quiet: true
  loop: "{{ step.expect | default([]) }}"
  when: step.action == 'command'

- name: "{{ step.name }} | output must not show"
  ansible.builtin.assert:
    that: kpipe_out.stdout is not regex(item, multiline=True)
    fail_msg: "{{ step.name }}: the output shows {{ item }}"
    quiet: true
  loop: "{{ step.reject | default([]) }}"
  when: step.action == 'command'
"""


EXPORT_README = """# kpipe rollout {rid} as an Ansible project

Written by `kpipe rollout export {rid} --ansible DIR`. Run it from this folder:

    ansible-playbook playbook.yml --private-key KEY     # apply, wave by wave (serial)
    ansible-playbook rollback.yml --private-key KEY     # roll back (add --limit HOSTS for some)

- `inventory`: the hosts in wave order with their connection settings; host keys are checked
  strictly against `known_hosts` (no private key is in this folder: use --private-key, an
  ssh-agent, or an AWX / Automation Platform machine credential).
- `vars/plan.yml`: every host's steps, the exact argv kpipe's executors run; `tasks/step.yml`
  runs one step (command or copy) and checks its exit status and output.
- `files/`: the module file(s), as stored by kpipe (sha256 in the folder name).

A host that fails a step is dropped; `max_fail_percentage` halts the play when a wave fails
beyond the failure budget. This project does not journal: afterwards `kpipe audit` reads what
the hosts really run.
"""


def _play(name: str, hosts: str, steps_var: str, serial: list[int] | None, max_fail: float) -> dict[str, Any]:
    play: dict[str, Any] = {"name": name, "hosts": hosts, "gather_facts": False, "order": "inventory"}
    if serial is not None:
        play["serial"] = serial
    play["max_fail_percentage"] = max_fail
    play["vars_files"] = ["vars/plan.yml"]
    play["tasks"] = [{"name": "kpipe steps", "ansible.builtin.include_tasks": "tasks/step.yml",
                      "loop": "{{ " + steps_var + "[inventory_hostname] }}",
                      "loop_control": {"loop_var": "step", "label": "{{ step.name }} {{ step.label }}"}}]
    return play


def max_fail_percentage(budget: FailureBudget, waves: list[list[str]]) -> float | int:
    """Ansible's per-batch brake from kpipe's failure budget: never halting earlier than the budget
    (a percentage p -> p; a count N -> 100*N / the smallest wave). Ansible halts when failed/batch > it."""
    sizes = [len(w) for w in waves if w] or [1]
    pct = float(budget.percent) if budget.percent is not None else min(100.0, 100.0 * (budget.count or 0) / min(sizes))
    return int(pct) if pct.is_integer() else pct


def _re(text: str) -> str:
    return re.escape(text)


def step_vars(step: Step[Any], a: Assignment, files: Mapping[str, str]) -> dict[str, Any]:
    """One step as plan data: its exact argv (or copy), become, timeout and the output checks Ansible makes."""
    name = a.sysfs_name
    if isinstance(step.action, Upload):
        return {"name": step.name, "label": step.action.label, "action": "copy",
                "src": Unsafe(files[a.artifact.sha256]), "dest": Unsafe(step.action.remote), "writes": True}
    cmd: Command = step.action
    v: dict[str, Any] = {"name": step.name, "label": cmd.label, "action": "command",
                         "argv": [Unsafe(x) for x in cmd.argv], "sudo": cmd.sudo,
                         "timeout": int((cmd.timeout or 600) + 0.999), "writes": step.writes}
    expect: list[str] = []
    reject: list[str] = []
    if cmd.label == "preflight":
        expect = [f"^release {_re(a.release)}$", "^livepatch_sysfs 1$"]
    elif cmd.label == "load":
        v["creates"] = Unsafe(f"/sys/kernel/livepatch/{name}")
    elif cmd.label == "wait-0":
        expect = ["^transition 0$"]
    elif cmd.label == "wait-gone":
        expect = ["^gone$"]
    elif cmd.label == "unload":
        v["removes"] = Unsafe(f"/sys/module/{name}")
    elif cmd.label == "verify-state" and step.name == "verify":
        expect = [f"^enabled {_re(name)} 1$", f"^transition {_re(name)} 0$", f"^module {_re(name)} 1 "]
    elif cmd.label == "verify-state":
        reject = [f"^patch {_re(name)}$", f"^module {_re(name)} 1 "]
    if expect:
        v["expect"] = [Unsafe(x) for x in expect]
    if reject:
        v["reject"] = [Unsafe(x) for x in reject]
    return v


def host_steps(plan: RolloutPlan, a: Assignment, local: Path) -> tuple[list[Step[Any]], list[Step[Any]]]:
    """A host's apply steps (preflight read included) and rollback steps, as the executors build them
    for a host without the patch (apply) and with it loaded (rollback)."""
    from kpipe.rollout.engine import apply_plan, preflight_step, probe_of, rollback_plan

    size = local.stat().st_size
    probe = probe_of(plan, a)
    timeout = plan.options.step_timeout_s
    fresh = lp.parse_host_livepatch("livepatch_sysfs 1\ntainted 0\nend\n")
    apply = [preflight_step(a, size),
             *apply_plan(a, {"staged": "absent", "kpatch_cli": "0"}, fresh, local, probe,
                         persist=plan.options.persist, timeout=timeout)]
    name = a.sysfs_name
    loaded = lp.parse_host_livepatch(f"livepatch_sysfs 1\ntainted 32768\npatch {name}\nenabled {name} 1\n"
                                     f"transition {name} 0\nmodule {name} 1 OK\nend\n")
    # the apply above is built for a host without the kpatch CLI: its --persist is kpipe's own layout
    rollback = rollback_plan(a, loaded, probe, timeout=timeout, persisted="kpipe" if plan.options.persist else False)
    return apply, rollback


def _known_lines(files: list[str], host: Any) -> list[str]:
    """The known_hosts lines for one host (`ssh-keygen -F`, hashed entries too)."""
    names = [host.address if int(host.port) == 22 else f"[{host.address}]:{int(host.port)}"]
    if host.name != host.address:
        names.append(host.name if int(host.port) == 22 else f"[{host.name}]:{int(host.port)}")
    out: list[str] = []
    for f in files:
        if not Path(f).is_file():
            continue
        for n in names:
            r = subprocess.run(["ssh-keygen", "-F", n, "-f", f], capture_output=True, text=True, timeout=30,
                               check=False)
            out += [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("#") and ln not in out]
    return out


def export_ansible(workspace: Any, rollout_id: str, plan: RolloutPlan, out: Path) -> dict[str, Any]:
    """Write the Ansible project for a stored rollout to `out` (a new or empty folder); return a summary."""
    from kpipe.fleet.inventory import load_inventory
    from kpipe.rollout.ansible_executor import known_hosts_files

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder", hint="name a new folder for the export")
    inv = load_inventory(workspace)
    hosts: dict[str, Any] = {}
    for name in plan.hosts:
        try:
            hosts[name] = inv.get(name)
        except NotFoundError:
            raise NotFoundError(f"plan host {name!r} is not in the inventory any more",
                                hint="export with the inventory the rollout was planned with") from None
    known = known_hosts_files(workspace)
    lines: list[str] = []
    for name, h in hosts.items():
        kh_files = [*known, *([os.path.expanduser(h.known_hosts)] if h.known_hosts else [])]
        got = _known_lines(kh_files, h)
        if not got:
            raise ConfigError(f"host {name}: no key in known_hosts ({', '.join(kh_files) or 'none configured'})",
                              hint="the export checks host keys strictly; add the host's key first")
        lines += [ln for ln in got if ln not in lines]

    # the module files, from the store (checked against their sha256 on the way out)
    files: dict[str, str] = {}
    locals_: dict[str, Path] = {}
    for a in plan.assignments.values():
        sha = a.artifact.sha256
        if sha in files:
            continue
        src = workspace.store.verified_path(sha)
        rel = f"{sha}/{safe_value(a.artifact.filename, 'module file name', a.host)}"
        files[sha] = rel
        locals_[sha] = src

    interp = workspace.settings.ansible.python_interpreter or "auto_silent"
    apply_steps: dict[str, Any] = {}
    rollback_steps: dict[str, Any] = {}
    inv_hosts: dict[str, Any] = {}
    for name in plan.hosts:
        a = plan.assignments[name]
        h = hosts[name]
        ap, rb = host_steps(plan, a, locals_[a.artifact.sha256])
        apply_steps[name] = [step_vars(s, a, files) for s in ap]
        rollback_steps[name] = [step_vars(s, a, files) for s in rb]
        v = connection_vars(h, [], interp, with_identity=False)
        # strict checking against the project's own known_hosts (inventory_dir: the project folder)
        v["ansible_ssh_common_args"] = ("-o StrictHostKeyChecking=yes "
                                        "-o UserKnownHostsFile={{ inventory_dir }}/known_hosts "
                                        "-o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no")
        v["kpipe_become"] = bool(h.become) or (h.user or "root") != "root"
        v["kpipe_wave"] = a.wave
        inv_hosts[name] = v

    waves = [list(w) for w in plan.waves if w]
    brake = max_fail_percentage(plan.options.max_failures, waves)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks").mkdir()
    (out / "vars").mkdir()
    (out / "ansible.cfg").write_text(ANSIBLE_CFG)
    (out / "known_hosts").write_text("".join(ln + "\n" for ln in lines))
    (out / "inventory").write_text(dump_yaml({"all": {"children": {
        "kpipe_rollout": {"hosts": inv_hosts}}}}))
    (out / "tasks" / "step.yml").write_text(STEP_TASKS)
    (out / "vars" / "plan.yml").write_text(
        "---\n# kpipe rollout " + rollout_id + ": the per-host steps (exact argv) kpipe's executors run.\n"
        + dump_yaml({"kpipe_rollout_id": Unsafe(rollout_id), "kpipe_waves": [[Unsafe(h) for h in w] for w in waves],
                     "kpipe_apply_steps": apply_steps, "kpipe_rollback_steps": rollback_steps}))
    header = (f"---\n# kpipe rollout {rollout_id}: waves {[len(w) for w in waves]} as `serial`, failure budget "
              f"{plan.options.max_failures} as max_fail_percentage. Run: ansible-playbook playbook.yml\n")
    (out / "playbook.yml").write_text(header + dump_yaml([
        _play(f"kpipe rollout {rollout_id}", "kpipe_rollout", "kpipe_apply_steps", [len(w) for w in waves], brake)]))
    (out / "rollback.yml").write_text(
        f"---\n# Roll back kpipe rollout {rollout_id} (all hosts, or --limit HOSTS).\n"
        + dump_yaml([_play(f"kpipe rollback {rollout_id}", "kpipe_rollout", "kpipe_rollback_steps", None, 100)]))
    (out / "README.md").write_text(EXPORT_README.format(rid=rollout_id))
    for sha, rel in files.items():
        dest = out / "files" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(locals_[sha], dest)
    return {"rollout_id": rollout_id, "folder": str(out), "hosts": len(plan.hosts), "waves": [len(w) for w in waves],
            "max_fail_percentage": brake, "modules": sorted(files.values())}
