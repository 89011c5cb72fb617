"""The rollout CLI tells the truth (issue 8, section 2: items 2, 3, 10, 15), on SimFleet.

- `last` is the last rollout that was started; a plan that never ran is refused by resume and rollback.
- Host text (a `uname -r` printing `...[/x]`, reasons, inventory fields) is printed as text, never
  as Rich markup, and a failing progress printer never stops a rollout.
- Numeric options are usage errors (exit 2) at parse time, before any host is asked.
- Ctrl-C leaves an `interrupted` rollout and says how to resume it; resume and rollback take --yes;
  a non-interactive start without --yes exits 2 and changes nothing.

Every test drives the real `kpipe` command line in a subprocess against real sshd hosts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpipe.artifacts import add_artifact
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.workspace import open_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)

MODULE = "livepatch_demo"
HOSTILE = "[/x]"  # a closing tag that opens nothing: Rich raises MarkupError on it


def setup_ws(fleet, tmp_path: Path):
    """A workspace over the fleet and one valid, preflighted artifact for the fleet's release."""
    ws = open_workspace(fleet.write_workspace(tmp_path / "ws", forks=10))
    ko = tmp_path / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(4096))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": "passed"})
    return ws, art


def kp(ws, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m kpipe -W WS ARGS` with stdin from /dev/null (no terminal); assert the exit code."""
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout, env=env)
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def popen(ws, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def loaded(host) -> bool:
    p = host.patches().get(MODULE)
    return bool(p) and str(p.get("enabled")) == "1"


def no_trace(r: subprocess.CompletedProcess) -> None:
    assert "internal error" not in r.stderr and "MarkupError" not in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-3000:]


# -- item 2: `last` is the last started rollout ---------------------------------------------------
def test_last_is_the_last_started_rollout_and_a_plan_that_never_ran_is_refused(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    started = json.loads(kp(ws, "rollout", "start", art.id, "--yes", "--waves", "100%", "--json").stdout)
    assert set(started["hosts"].values()) == {"applied"}
    plan_id = json.loads(kp(ws, "rollout", "plan", art.id, "--json").stdout)["id"]
    assert plan_id != started["rollout_id"]

    st = json.loads(kp(ws, "rollout", "status", "--json").stdout)
    assert st["id"] == started["rollout_id"], "status `last` named the plan, not the started rollout"

    r = kp(ws, "rollout", "rollback", "last", "--json")
    out = json.loads(r.stdout)
    assert out["rollout_id"] == started["rollout_id"]
    assert set(out["hosts"].values()) == {"rolled_back"}, out
    assert not any(loaded(h) for h in fleet.hosts)

    # the plan itself: resume and rollback say it never ran, exit 4, and leave it a plan
    for verb in ("rollback", "resume"):
        r = kp(ws, "rollout", verb, plan_id, ok=(4,))
        assert "never ran" in r.stderr and f"kpipe rollout start --plan {plan_id}" in r.stderr, r.stderr
        no_trace(r)
    assert Journal(ws.store).get(plan_id).state == "planned"
    assert not any(loaded(h) for h in fleet.hosts)

    # `start --plan last` is the newest plan (it has not run yet)
    out = json.loads(kp(ws, "rollout", "start", "--plan", "last", "--yes", "--json").stdout)
    assert out["rollout_id"] == plan_id and set(out["hosts"].values()) == {"applied"}
    assert all(loaded(h) for h in fleet.hosts)
    kp(ws, "rollout", "rollback", "last", "--yes")
    assert not any(loaded(h) for h in fleet.hosts)


def test_last_with_only_plans_is_not_found(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, art = setup_ws(fleet, tmp_path)
    kp(ws, "rollout", "plan", art.id)
    for args in (("status",), ("rollback", "last"), ("resume", "last")):
        r = kp(ws, "rollout", *args, ok=(5,))
        assert "no rollout has been started" in r.stderr, r.stderr
    assert not fleet.hosts[0].staged() and not fleet.hosts[0].patches()


# -- item 3: host text is data ------------------------------------------------------------------
def _stored_plan(ws, art, fleet, **opts) -> str:
    """A plan that expects every host on the fleet's release (as if planned before a host changed)."""
    options = RolloutOptions(**{"waves": "100%", "forks": 10, "step_timeout_s": 30.0, **opts})
    views = [HostView(h.name, release=fleet.release, arch="x86_64") for h in fleet.hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    return Journal(ws.store).create(plan.to_dict(), options.to_dict(), target=art.id)


def test_hostile_release_prints_as_text_in_plan_start_resume_status_and_facts(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    odd = fleet.host("sim001")
    hostile = fleet.release + HOSTILE
    odd.set_release(hostile)
    try:
        # plan: sim001 is excluded, its reason names the release as written
        r = kp(ws, "rollout", "plan", art.id)
        no_trace(r)
        assert hostile in r.stdout and "sim001" in r.stdout

        # start: the plan expected the old release; the engine's preflight refuses sim001 and the gate
        # halts (budget 0) and rolls it back: the printer shows the reason, the engine runs to the end
        rid = _stored_plan(ws, art, fleet)
        r = kp(ws, "rollout", "start", "--plan", rid, "--yes", ok=(8,))
        no_trace(r)
        assert f"release changed: host runs {hostile}" in r.stdout, r.stdout
        rec = Journal(ws.store).get(rid)
        assert rec.state == "halted" and rec.detail["rollback"]["done"] is True, rec
        assert not odd.patches() and not odd.staged()

        r = kp(ws, "rollout", "status", rid)
        no_trace(r)
        assert hostile in r.stdout
        r = kp(ws, "rollout", "resume", rid, "--yes", ok=(0, 8))
        no_trace(r)
        assert hostile in r.stdout + r.stderr

        # fleet facts, verify and audit show the release verbatim
        r = kp(ws, "fleet", "facts")
        no_trace(r)
        assert hostile in r.stdout
        for cmd in (("verify",), ("audit",)):
            r = kp(ws, *cmd, ok=(0, 1))
            no_trace(r)
            assert hostile in r.stdout, r.stdout
    finally:
        odd.set_release("")
        kp(ws, "rollout", "rollback", "last", "--yes", ok=(0, 1))


def test_hostile_inventory_text_in_fleet_list(tmp_path):
    (tmp_path / "kpipe.toml").write_text('[fleet]\ninventories = ["hosts.yml"]\n')
    (tmp_path / "hosts.yml").write_text(
        "all:\n  children:\n    \"ops[/x]\":\n      hosts:\n        web1:\n          ansible_host: 127.0.0.1\n")
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(tmp_path), "fleet", "list"], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ops[/x]" in r.stdout


def test_lab_status_prints_names_and_args_as_text():
    from rich.console import Console

    from kpipe.cli import lab
    from kpipe.cli.context import STATE

    console = Console(record=True, width=300)
    saved = STATE._console
    STATE._console = console
    try:
        lab._print_status({"kernel": {"release": "6.1.0-x[/x]"}, "folder": "/tmp/[/lab]", "ready_seconds": 0,
                           "vms": [{"name": "lab[/1]", "alive": True, "ssh": "127.0.0.1:2222", "pid": 1,
                                    "rss_mib": 10.0, "sig_enforce": False, "append": "foo=[/bar]"}]})
    finally:
        STATE._console = saved
    text = console.export_text()
    assert "6.1.0-x[/x]" in text and "lab[/1]" in text and "foo=[/bar]" in text


def test_a_closed_stdout_never_stops_the_engine(simfleet_factory, tmp_path):
    """`kpipe rollout start ... | head`: once head exits every print fails (EPIPE); the rollout must still
    run every wave to the end, journal it, and exit with its own outcome."""
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    p = popen(ws, "rollout", "start", art.id, "--yes", "--waves", "1,100%", "--soak", "1",
              "--verify-interval", "0.5")
    rid = ""
    try:
        for line in p.stdout:
            if line.startswith("rollout ") and not rid:
                rid = line.split()[1].rstrip(":")
            if line.startswith("wave 1"):
                break
        p.stdout.close()  # the reader is gone: the next progress line meets a broken pipe
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert rid, "the plan header was not printed"
    assert p.returncode == 0, err
    assert "internal error" not in err
    rec = Journal(ws.store).get(rid)
    assert rec.state == "completed", (rec.state, err)
    assert all(loaded(h) for h in fleet.hosts)
    kp(ws, "rollout", "rollback", rid, "--yes")
    assert not any(loaded(h) for h in fleet.hosts)


# -- item 10: rollout options are validated ---------------------------------------------------
BAD_OPTIONS = [
    ("--soak", "nan"), ("--soak", "inf"), ("--soak", "-1"),
    ("--verify-interval", "1e-7"), ("--verify-interval", "0"), ("--verify-interval", "nan"),
    ("--step-timeout", "nan"), ("--step-timeout", "-1"), ("--step-timeout", "0"), ("--step-timeout", "inf"),
    ("--forks", "0"), ("--forks", "-1"),
    ("--max-failures", "nan%"), ("--max-failures", "-1"), ("--max-failures", "150%"),
    ("--waves", "0"), ("--waves", "nan%"), ("--rollback-policy", "sometimes"),
]


@pytest.fixture(scope="module")
def one_host(simfleet_factory):
    return simfleet_factory(1)


@pytest.mark.parametrize("command,option,value",
                         [("start", o, v) for o, v in BAD_OPTIONS]
                         + [("plan", o, v) for o, v in BAD_OPTIONS if v in ("nan", "1e-7", "0")])
def test_bad_numeric_option_is_a_usage_error_before_anything_happens(one_host, tmp_path, command, option, value):
    fleet = one_host
    ws, art = setup_ws(fleet, tmp_path)
    extra = ("--yes",) if command == "start" else ()
    r = kp(ws, "rollout", command, art.id, *extra, "--waves", "100%", f"{option}={value}", ok=(2,))
    assert f"Invalid value for '{option}'" in r.stderr, r.stderr
    assert r.stderr.startswith("kpipe: error: "), r.stderr  # click's own check, in kpipe's one-line format
    no_trace(r)
    assert Journal(ws.store).list() == []  # nothing planned, nothing stored
    host = fleet.hosts[0]
    assert not host.patches() and not host.staged()


@pytest.mark.parametrize("command", ["resume", "rollback"])
@pytest.mark.parametrize("value", ["0", "-1", "100000"])
def test_bad_forks_of_resume_and_rollback_is_a_usage_error(one_host, tmp_path, command, value):
    ws, art = setup_ws(one_host, tmp_path)
    r = kp(ws, "rollout", command, "last", f"--forks={value}", ok=(2,))
    assert "Invalid value for '--forks'" in r.stderr, r.stderr
    no_trace(r)


def test_sane_options_are_accepted(one_host, tmp_path):
    ws, art = setup_ws(one_host, tmp_path)
    r = kp(ws, "rollout", "plan", art.id, "--soak", "0.5", "--verify-interval", "0.5", "--step-timeout", "1",
           "--max-failures", "10%", "--waves", "1,100%", "--rollback-policy", "all", "--forks", "1", "--json")
    opts = json.loads(r.stdout)["options"]
    assert (opts["soak_s"], opts["verify_interval_s"], opts["step_timeout_s"]) == (0.5, 0.5, 1.0)
    assert (opts["max_failures"], opts["rollback_policy"], opts["forks"]) == ("10%", "all", 1)


# -- item 15: Ctrl-C, --yes, no terminal --------------------------------------------------------
def test_ctrl_c_while_soaking_leaves_an_interrupted_rollout_that_resumes(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    p = popen(ws, "rollout", "start", art.id, "--yes", "--waves", "100%", "--soak", "8", "--verify-interval", "4")
    rid, applied = "", set()
    try:
        for line in p.stdout:
            if line.startswith("rollout ") and not rid:
                rid = line.split()[1].rstrip(":")
            words = line.split()
            if len(words) >= 2 and words[0] == "applied":
                applied.add(words[1])
            if applied == {h.name for h in fleet.hosts}:
                break
        assert applied == {h.name for h in fleet.hosts}, "the wave did not apply"
        time.sleep(1.0)  # into the soak (8 s long): the engine sleeps between verification rounds
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert f"interrupted; resume with `kpipe rollout resume {rid}`" in err, err
    assert "Traceback" not in err
    st = json.loads(kp(ws, "rollout", "status", rid, "--json").stdout)
    assert st["state"] == "interrupted" and not st["owner_pid"], st
    r = kp(ws, "rollout", "status")
    assert f"rollout {rid}: interrupted" in r.stdout and f"kpipe rollout resume {rid}" in r.stdout
    assert all(loaded(h) for h in fleet.hosts)  # Ctrl-C stops kpipe, it does not undo the hosts

    out = json.loads(kp(ws, "rollout", "resume", rid, "--yes", "--json").stdout)
    assert out["state"] == "completed" and set(out["hosts"].values()) == {"applied"}, out
    out = json.loads(kp(ws, "rollout", "rollback", rid, "--yes", "--json").stdout)
    assert set(out["hosts"].values()) == {"rolled_back"}
    assert not any(loaded(h) for h in fleet.hosts)


def test_start_without_a_terminal_and_without_yes_says_pass_yes(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, art = setup_ws(fleet, tmp_path)
    r = kp(ws, "rollout", "start", art.id, ok=(2,))
    assert "--yes" in r.stderr and "aborted" not in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2  # one line and its hint
    assert Journal(ws.store).list() == []  # nothing was planned or stored
    assert not fleet.hosts[0].patches() and not fleet.hosts[0].staged()
    # a dry run needs no confirmation
    r = kp(ws, "rollout", "start", art.id, "--dry-run")
    assert "dry run: nothing was changed" in r.stdout


def _on_terminal(ws, answer: str, *args: str) -> tuple[int, str]:
    """Run kpipe with a pseudo-terminal as stdin/stdout/stderr; answer its question; (exit code, output)."""
    import pty
    import selectors

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    p = subprocess.Popen([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], stdin=slave, stdout=slave,
                         stderr=slave, env=env)
    os.close(slave)
    out, answered = b"", False
    deadline = time.monotonic() + 300
    sel = selectors.DefaultSelector()  # epoll: the fd may be past select()'s FD_SETSIZE in a long session
    sel.register(master, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            ready = sel.select(1.0)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if not answered and b"[y/N]" in out:
                os.write(master, answer.encode() + b"\n")
                answered = True
        p.wait(timeout=60)
    finally:
        sel.close()
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out.decode(errors="replace")


def test_resume_and_rollback_ask_on_a_terminal_unless_yes(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, art = setup_ws(fleet, tmp_path)
    host = fleet.hosts[0]
    rid = json.loads(kp(ws, "rollout", "start", art.id, "--yes", "--waves", "100%", "--json").stdout)["rollout_id"]
    code, out = _on_terminal(ws, "n", "rollout", "rollback", rid)
    assert f"Roll back rollout {rid}" in out and code == 1 and "not started" in out, out  # a "no" exits 1
    assert loaded(host)  # "no" means no
    code, out = _on_terminal(ws, "y", "rollout", "rollback", rid)
    assert code == 0 and "rolled_back" in out, out
    assert not loaded(host)
    code, out = _on_terminal(ws, "n", "rollout", "resume", rid)
    assert f"Resume rollout {rid}" in out and code == 1 and "not started" in out, out
    # --yes: no question, on a terminal too
    code, out = _on_terminal(ws, "n", "rollout", "resume", rid, "--yes")
    assert "[y/N]" not in out and code in (0, 8), out
