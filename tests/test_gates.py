"""Gates that watch the kernel and the service: the pure parsers, the settings, and rollouts on SimFleet
where one host logs kernel trouble, gains a taint or fails its health command after the patch loaded."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest

import kenv
from kpipe.artifacts import add_artifact
from kpipe.commands import Command, CommandResult
from kpipe.errors import ConfigError
from kpipe.fleet import livepatch as lp
from kpipe.health import HealthCheck, judge_health
from kpipe.kernlog import find_trouble, patched_function_names
from kpipe.prometheus import PromCheck, PrometheusError, judge, parse_vector, query
from kpipe.rollout.gate import GateConfig, gate_schedule, judge_host, new_taint
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.rollout.world import engine_for
from kpipe.settings import parse_settings
from kpipe.taint import DEFAULT_ALLOWED_TAINT, taint_mask
from kpipe.workspace import open_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)

# -- the kernel log parser: real report lines (6.1 x86_64 formats; 4.19's where they differ) ----------------------

WARN_IN_PATCH = """\
------------[ cut here ]------------
WARNING: CPU: 1 PID: 412 at /tmp/kpipe/livepatch-cmdline-warn.c:24 {frame}
Modules linked in: livepatch_cmdline_warn(OEK) intel_rapl_msr joydev
CPU: 1 PID: 412 Comm: cat Tainted: G           OE K    6.1.0-13-amd64 #1  Debian 6.1.55-1
Hardware name: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
RIP: 0010:livepatch_cmdline_proc_show+0x1d/0x40 [livepatch_cmdline_warn]
Code: 0f 1f 44 00 00 55 48 89 fd 80 3d 00 00 00 00 00 74 0c
RSP: 0018:ffffb3a1c05dfd50 EFLAGS: 00010246
Call Trace:
 <TASK>
 ? __warn+0x7d/0xc0
 ? livepatch_cmdline_proc_show+0x1d/0x40 [livepatch_cmdline_warn]
 ? report_bug+0xe2/0x150
 seq_read_iter+0x12b/0x460
 proc_reg_read_iter+0x51/0xa0
 vfs_read+0x204/0x2f0
 </TASK>
---[ end trace 0000000000000000 ]---""".replace(
    "{frame}", "livepatch_cmdline_proc_show+0x1d/0x40 [livepatch_cmdline_warn]")

NULL_DEREF = """\
BUG: kernel NULL pointer dereference, address: 0000000000000008
#PF: supervisor read access in kernel mode
#PF: error_code(0x0000) - not-present page
PGD 0 P4D 0
Oops: 0000 [#1] PREEMPT SMP NOPTI
CPU: 0 PID: 377 Comm: cat Tainted: G           OE K    6.1.0-13-amd64 #1  Debian 6.1.55-1
RIP: 0010:cmdline_proc_show+0x12/0x30 [livepatch_x]
Call Trace:
 <TASK>
 seq_read_iter+0x12b/0x460
 </TASK>"""

CASES = [
    # (log text, [(kind, names a patched function)])
    (WARN_IN_PATCH, [("warning", True)]),
    (NULL_DEREF, [("bug", True)]),  # the BUG: line and its Oops: are one incident
    ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:31]", [("soft_lockup", False)]),
    ("INFO: task cat:377 blocked for more than 120 seconds.\n"
     "      Tainted: G           OE K    6.1.0-13-amd64 #1 Debian 6.1.55-1\n"
     "\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.", [("hung_task", False)]),
    ("rcu: INFO: rcu_sched self-detected stall on CPU\nrcu: \t0-....: (5250 ticks this GP)", [("rcu_stall", False)]),
    ("INFO: rcu_sched self-detected stall on CPU", [("rcu_stall", False)]),  # 4.19
    ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", [("rcu_stall", False)]),
    ("general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI",
     [("gpf", False)]),
    ("general protection fault: 0000 [#1] SMP PTI", [("gpf", False)]),  # 4.19
    ("kernel BUG at mm/slub.c:309!\ninvalid opcode: 0000 [#1] PREEMPT SMP NOPTI", [("bug", False)]),
    # dump_stack() from a patched function: no header, the trace names it
    ("CPU: 0 PID: 1 Comm: cat Tainted: G OE K 6.1.0-13-amd64 #1\nCall Trace:\n <TASK>\n dump_stack_lvl+0x44/0x5c\n"
     " cmdline_proc_show+0x1d/0x40 [livepatch_x]\n seq_read_iter+0x12b/0x460\n </TASK>", [("call_trace", True)]),
    # a trace that names nothing of the patch, with no header: not this patch's trouble
    ("Call Trace:\n <TASK>\n dump_stack_lvl+0x44/0x5c\n seq_read_iter+0x12b/0x460\n </TASK>", []),
    # what a good load logs
    ("livepatch: enabling patch 'livepatch_x'\nlivepatch: 'livepatch_x': starting patching transition\n"
     "livepatch: 'livepatch_x': patching complete\nlivepatch_x: tainting kernel with TAINT_LIVEPATCH", []),
]


@pytest.mark.parametrize("text,want", CASES)
def test_kernel_trouble_is_parsed_into_typed_findings(text, want):
    found = find_trouble(lp.log_lines(text), ["vmlinux/cmdline_proc_show,1"], "livepatch_x")
    assert [(f.kind, bool(f.patched)) for f in found] == want


def test_a_warning_names_the_patched_function_and_its_line():
    (f,) = find_trouble(WARN_IN_PATCH.splitlines(), ["vmlinux/cmdline_proc_show,1"], "livepatch_cmdline_warn")
    assert f.line.startswith("WARNING: CPU: 1 PID: 412 at ")
    assert f.patched == ("livepatch_cmdline_proc_show [livepatch_cmdline_warn]",)
    assert "kernel warning: WARNING: CPU: 1" in f.describe() and "livepatch_cmdline_proc_show" in f.describe()
    # the same log, a patch of other functions and another module: the warning stays, it names no patch frame
    (g,) = find_trouble(WARN_IN_PATCH.splitlines(), ["vmlinux/meminfo_proc_show,1"], "livepatch_other")
    assert g.kind == "warning" and g.patched == ()


def test_patched_function_names_accept_sysfs_and_plain_forms():
    assert patched_function_names(["vmlinux/cmdline_proc_show,1", "ext4/ext4_foo,2", "bar"]) == \
        {"cmdline_proc_show", "ext4_foo", "bar"}


def test_two_incidents_are_two_findings_in_log_order():
    text = "INFO: task a:1 blocked for more than 120 seconds.\n" + WARN_IN_PATCH
    assert [f.kind for f in find_trouble(text.splitlines())] == ["hung_task", "warning"]


# -- taint, the host judgement ---------------------------------------------------------------------------------

W = taint_mask("W")


def test_new_taint_is_beyond_the_load_and_o_e_k():
    assert new_taint(0, DEFAULT_ALLOWED_TAINT) == 0  # what the load itself sets
    assert new_taint(0, DEFAULT_ALLOWED_TAINT | W) == W
    assert new_taint(W, DEFAULT_ALLOWED_TAINT | W) == 0  # W was there before the load
    assert new_taint(None, W) == 0  # no read before the load: not judged


STATE = """livepatch_sysfs 1
tainted {taint}
patch livepatch_x
enabled livepatch_x 1
transition livepatch_x 0
object livepatch_x vmlinux 1
function livepatch_x vmlinux cmdline_proc_show,1
module livepatch_x 1 OEK
end
"""


def _state(taint: int) -> lp.HostLivepatch:
    return lp.parse_host_livepatch(STATE.format(taint=taint))


def test_judge_host_reads_the_log_only_after_the_marker_and_taint_since_the_load():
    marker = "kpipe: marker 0123 rollout livepatch_x"
    before = "INFO: task old:1 blocked for more than 120 seconds.\n"  # before the load: not this patch's
    log = before + f"[   5.1] {marker}\n" + "livepatch: 'livepatch_x': patching complete\n"
    ok = judge_host("livepatch_x", _state(DEFAULT_ALLOWED_TAINT), log, marker=marker, taint_before=0)
    assert ok.ok, ok.problems
    bad = judge_host("livepatch_x", _state(DEFAULT_ALLOWED_TAINT | W), log + NULL_DEREF, marker=marker,
                     taint_before=0)
    assert not bad.ok
    assert [f.kind for f in bad.findings] == ["bug"]
    assert any("new kernel taint W" in p for p in bad.problems)
    assert not any("old:1" in p for p in bad.problems)
    # a marker the log lost: the log is not judged (its lines are not this patch's), the rest is
    lost = judge_host("livepatch_x", _state(DEFAULT_ALLOWED_TAINT), NULL_DEREF, marker=marker, taint_before=0)
    assert lost.ok


def test_one_gate_tick_per_wave_without_a_soak():
    assert gate_schedule(0, 10) == [0.0]
    assert gate_schedule(1.0, 0.5) == [0.5, 1.0]


# -- health ------------------------------------------------------------------------------------------------------

def _result(status: int, out: str = "") -> CommandResult:
    return CommandResult("h", Command.of("x"), status, out)


def test_health_exit_status_and_timeout_are_judged():
    check = HealthCheck(("check-svc", "--quiet"), 3)
    assert judge_health(check, _result(0)).ok
    bad = judge_health(check, _result(2, "nginx: inactive\n"))
    assert not bad.ok and bad.problem == "health command 'check-svc --quiet' exited 2: nginx: inactive"
    slow = judge_health(check, _result(124))
    assert not slow.ok and "timed out after 3 s" in slow.problem


# -- prometheus (pure; the real server is tests/test_gates_prometheus.py) ---------------------------------------

def test_prometheus_vector_by_host_label_and_threshold():
    body = ('{"status":"success","data":{"resultType":"vector","result":['
            '{"metric":{"instance":"sim001:9100"},"value":[1,"0.2"]},'
            '{"metric":{"instance":"sim002:9100"},"value":[1,"0.9"]}]}}')
    values = parse_vector(body, "instance")
    assert values == {"sim001": 0.2, "sim002": 0.9}
    check = PromCheck("http://127.0.0.1:1", "x", 0.5)
    bad = judge(check, values, ["sim001", "sim002", "sim003"])
    assert set(bad) == {"sim002", "sim003"}
    assert "0.9" in bad["sim002"] and "no sample" in bad["sim003"]
    assert set(judge(replace(check, fail_when="below"), values, ["sim001", "sim002"])) == {"sim001"}


def test_prometheus_errors_are_gate_errors():
    with pytest.raises(PrometheusError, match="bad_data"):
        parse_vector('{"status":"error","errorType":"bad_data","error":"parse error"}', "instance")
    with pytest.raises(PrometheusError, match="not an instant vector"):
        parse_vector('{"status":"success","data":{"resultType":"matrix","result":[]}}', "instance")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PrometheusError, match="cannot be reached"):
        query(PromCheck(f"http://127.0.0.1:{port}", "up", 1, timeout=2))


# -- settings and the recipe schema ------------------------------------------------------------------------------

def test_rollout_settings_parse_and_errors_name_the_line(tmp_path):
    f = tmp_path / "kpipe.toml"
    s = parse_settings(f, b'[rollout.health]\ncommand = ["systemctl", "is-active", "nginx"]\ntimeout = 5\n'
                          b'[rollout.prometheus]\nurl = "http://127.0.0.1:9090"\nquery = "up"\nthreshold = 0.5\n')
    assert s.rollout.health.command == ("systemctl", "is-active", "nginx") and s.rollout.health.timeout == 5
    assert s.rollout.prometheus.threshold == 0.5 and s.rollout.prometheus.host_label == "instance"
    for text, line, what in (
            (b'[rollout.health]\ntimeout = 5\n', 1, "rollout.health.command is required"),
            (b'[rollout.health]\ncommand = "systemctl is-active nginx"\n', 2, "must be an array of strings"),
            (b'[rollout.prometheus]\nurl = "http://x"\nquery = "up"\nthreshold = "1"\n', 4, "must be a number"),
            (b'[rollout.prometheus]\nurl = "x:9090"\nquery = "up"\nthreshold = 1\n', 2, "not an http(s) URL"),
            (b'[rollout.prometheus]\nurl = "http://x"\nquery = "up"\nthreshold = 1\nfail = "above"\n', 5,
             "unknown key 'fail'")):
        with pytest.raises(ConfigError) as e:
            parse_settings(f, text)
        assert str(e.value.message).startswith(f"{f}:{line}: ") and what in e.value.message, e.value.message
        assert e.value.hint


def test_recipe_rollout_health_is_checked():
    from kpipe.recipes.problems import _Problems
    from kpipe.recipes.schema import _check_rollout, _Checker

    def check(ro):
        probs = _Problems("r.yaml")
        out, _ = _check_rollout(ro, _Checker(probs, True), probs, True)
        return out, [p.message for p in probs.items if str(p.severity.value) == "error"]

    out, errors = check({"health": {"command": ["systemctl", "is-active", "nginx"], "timeout": 5}})
    assert not errors and out["health"] == {"command": ["systemctl", "is-active", "nginx"], "timeout": 5}
    assert check({"health": {"command": "systemctl is-active nginx"}})[1]
    assert check({"health": {"command": ["x"], "timeout": 0}})[1]
    assert check({"health": {"argv": ["x"]}})[1]


# -- rollouts on SimFleet --------------------------------------------------------------------------------------

RELEASE = kenv.kernel_env(module_level=True).release
MODULE = "livepatch_demo"


def setup(fleet, tmp_path: Path, gates: GateConfig | None = None, **opts):
    ws = open_workspace(fleet.write_workspace(tmp_path / "ws", forks=50))
    ko = tmp_path / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(4096))
    art = add_artifact(ws.store, ko, kernel=RELEASE, status="valid", arch="x86_64", module_name="livepatch-demo",
                       preflight={"status": "passed"})
    options = RolloutOptions(**{"waves": "100%", "forks": 50, "step_timeout_s": 30.0, "rollback_policy": "all",
                                **opts})
    views = [HostView(h.name, release=RELEASE, arch="x86_64") for h in fleet.hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    g = gates or GateConfig()
    health = {art.id: next(iter(g.health.values()))} if g.health else {}  # the test's check, for this artifact
    plan = replace(plan, gates=GateConfig(health, g.prometheus).to_dict())
    journal = Journal(ws.store)
    rid = journal.create(plan.to_dict(), options.to_dict(), target=art.id)
    return ws, journal, rid


def run(ws, journal, rid, on_applied=None):
    def event(e):
        if on_applied is not None and e.kind == "host" and e.phase == "applied":
            on_applied(e.host)

    engine, runner = engine_for(ws, journal, rid, on_event=event)
    try:
        return engine.start(rid)
    finally:
        runner.close()


def assert_halted_and_clean(s, fleet, bad: str, words: str):
    assert s.state == "rolled_back", s
    assert set(s.hosts.values()) == {"rolled_back"}, s
    assert words in s.reasons[bad], s.reasons
    assert bad in s.halt_reason and words in s.halt_reason
    assert [h for h, r in s.reasons.items() if words in r] == [bad]
    for h in fleet.hosts:
        assert MODULE not in h.patches() and MODULE not in h.modules()


def test_a_kernel_warning_naming_the_patch_halts_and_rolls_back(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    bad = fleet.hosts[1]
    ws, journal, rid = setup(fleet, tmp_path)  # no soak: the wave's own gate tick judges it

    def warn(host):
        if host == bad.name:  # what the kernel prints when the patched function WARNs
            for ln in WARN_IN_PATCH.replace("livepatch_cmdline_warn", MODULE).splitlines():
                bad.klog(ln)

    s = run(ws, journal, rid, warn)
    assert_halted_and_clean(s, fleet, bad.name, "kernel warning: WARNING: CPU: 1 PID: 412")
    assert "call trace names patched livepatch_cmdline_proc_show" in s.reasons[bad.name]
    gate = [e for e in journal.entries(rid, "") if e.step == "gate"]
    assert gate[-1].detail["verdict"] == "halt" and "kernel warning" in gate[-1].detail["reason"]


def test_a_new_taint_during_the_soak_halts(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    bad = fleet.hosts[0]
    ws, journal, rid = setup(fleet, tmp_path, soak_s=1.0, verify_interval_s=0.5)

    def taint(host):
        if host == bad.name:
            bad.taint |= W | taint_mask("D")
            (bad.dir / "tainted").write_text(f"{bad.taint}\n")

    s = run(ws, journal, rid, taint)
    assert_halted_and_clean(s, fleet, bad.name, "new kernel taint DW since the load")


UNHEALTHY = HealthCheck(("test", "!", "-e", "/var/lib/kpipe-unhealthy"), 5)


def test_a_passing_health_command_lets_the_rollout_complete(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, journal, rid = setup(fleet, tmp_path, GateConfig({"x": UNHEALTHY}), soak_s=1.0, verify_interval_s=0.5)
    s = run(ws, journal, rid)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s


def test_a_failing_health_command_halts_and_rolls_back(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    bad = fleet.hosts[2]
    # the hosts share this machine's files except their bind mounts: /var/lib is the host's own
    (bad.dir / "var_lib" / "kpipe-unhealthy").write_text("")
    ws, journal, rid = setup(fleet, tmp_path, GateConfig({"x": UNHEALTHY}))
    s = run(ws, journal, rid)
    assert_halted_and_clean(s, fleet, bad.name, "health command 'test ! -e /var/lib/kpipe-unhealthy' exited 1")


def test_a_hung_health_command_is_a_timeout_failure(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, journal, rid = setup(fleet, tmp_path, GateConfig({"x": HealthCheck(("sleep", "30"), 1)}))
    s = run(ws, journal, rid)
    assert_halted_and_clean(s, fleet, fleet.hosts[0].name, "timed out after 1 s")


def test_an_unreachable_prometheus_halts_the_gate(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prom = PromCheck(f"http://127.0.0.1:{port}", "up", 0.5, timeout=2)
    ws, journal, rid = setup(fleet, tmp_path, GateConfig({}, prom))
    s = run(ws, journal, rid)
    assert s.state == "rolled_back" and set(s.hosts.values()) == {"rolled_back"}, s
    assert all("gate error: Prometheus at" in r and "cannot be reached" in r for r in s.reasons.values()), s.reasons


def test_the_plan_takes_the_recipes_health_else_kpipe_tomls_and_prometheus(tmp_path):
    from kpipe.rollout.world import gates_for

    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    (ws_dir / "kpipe.toml").write_text(
        '[workspace]\nstore = ".kpipe"\n[rollout.health]\ncommand = ["systemctl", "is-active", "nginx"]\n'
        '[rollout.prometheus]\nurl = "http://127.0.0.1:9090"\nquery = "up"\nthreshold = 0.5\nhost_label = "host"\n')
    recipes = ws_dir / "recipes"
    shutil.copytree(Path(__file__).resolve().parent.parent / "recipes", recipes)
    demo = (recipes / "cmdline-demo.yaml").read_text()
    assert "\n  probe:\n" in demo
    (recipes / "cmdline-demo.yaml").write_text(
        demo.replace("\n  probe:\n", "\n  health:\n    command: [/usr/local/bin/check, --fast]\n    timeout: 4\n"
                                     "  probe:\n"))
    ws = open_workspace(ws_dir)

    def cand(i: str, recipe: str) -> Candidate:
        return Candidate(id=i, sha256="0" * 64, module_name="m", filename="m.ko", kernel=RELEASE, recipe=recipe)

    g = GateConfig.from_dict(gates_for(ws, [cand("a1", "cmdline-demo"), cand("a2", "cmdline-warn"), cand("a3", "")]))
    assert g.health["a1"] == HealthCheck(("/usr/local/bin/check", "--fast"), 4)
    assert g.health["a2"] == g.health["a3"] == HealthCheck(("systemctl", "is-active", "nginx"), 10)
    assert g.prometheus == PromCheck("http://127.0.0.1:9090", "up", 0.5, host_label="host")
    # --no-probe reads no recipe: kpipe.toml's check for every artifact
    g = GateConfig.from_dict(gates_for(ws, [cand("a1", "cmdline-demo")], no_probe=True))
    assert g.health["a1"] == HealthCheck(("systemctl", "is-active", "nginx"), 10)
