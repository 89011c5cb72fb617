"""Progress of long work, as a user sees it when the output is piped (issue 12, item 3).

Every test drives the real `kpipe` command line in a subprocess against SimFleet (real sshd hosts with a
simulated livepatch sysfs): plain lines, one per event, no ANSI escapes, no carriage returns; the soak
prints one line per verification tick; `--json` keeps stdout one JSON document; `--no-progress` on a
terminal gives the same plain lines; a resumed rollout shows the same. The lab's stages are checked on a
real VM (marked `vm`). The live display on a terminal is tests/test_progress_tty.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from kpipe.artifacts import add_artifact
from kpipe.rollout.journal import Journal
from kpipe.workspace import open_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_lab_support import qemu_guard  # noqa: F401  (fixture: no qemu left running)

TESTS = Path(__file__).resolve().parent
ANSI = re.compile(r"\x1b[\[\]()]|\x1b")


def setup_ws(fleet, tmp_path: Path):
    """A workspace over the fleet and one valid, preflighted artifact for the fleet's release."""
    ws = open_workspace(fleet.write_workspace(tmp_path / "ws", forks=10))
    ko = tmp_path / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(4096))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": "passed"})
    return ws, art


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "COLUMNS")}
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return e


def kp(ws, *args: str, ok: tuple[int, ...] = (0,), prefix: tuple[str, ...] = ("-m", "kpipe"),
       timeout: float = 300) -> subprocess.CompletedProcess:
    """`kpipe -W WS ARGS` with stdin, stdout and stderr all pipes (no terminal anywhere)."""
    r = subprocess.run([sys.executable, *prefix, "-W", str(ws.root), *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout, env=env())
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean(text: str) -> None:
    """Plain output: no escape sequence, no carriage return, no traceback."""
    assert not ANSI.search(text), repr(text[:2000])
    assert "\r" not in text
    assert "Traceback" not in text and "progress output failed" not in text


def rollout_id(out: str) -> str:
    m = re.search(r"^rollout (\S+): (starting|resuming),", out, re.M)
    assert m, out
    return m.group(1)


def soak_ticks(out: str, wave: int) -> list[str]:
    return re.findall(rf"^soak wave {wave}: (\d+:\d\d) left · check (\d+) ok \((\d+)/(\d+)\)$", out, re.M)


def test_a_piped_rollout_prints_a_plain_line_per_event(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    r = kp(ws, "rollout", "start", art.id, "--yes", "--waves", "1,100%", "--soak", "3", "--verify-interval", "1")
    out = r.stdout
    clean(out + r.stderr)
    rid = rollout_id(out)
    hosts = sorted(h.name for h in fleet.hosts)
    first = re.search(r"^wave 1/2: 1 host: (\S+)$", out, re.M)
    assert first, out
    assert re.search(r"^wave 2/2: 2 hosts: ", out, re.M), out
    for h in hosts:  # every host's steps, each its start and its end on a line of its own
        for step in ("stage", "load", "verify"):
            assert f"  {h}: {step} started\n" in out and f"  {h}: {step} done\n" in out, (h, step, out)
        assert re.search(rf"^  applied +{h}$", out, re.M), out
    # the soak: one line per verification tick (3 s, a check every second), the countdown going down
    for wave, n in ((1, 1), (2, 3)):
        assert f"soak wave {wave}: 0:03, a check every 1 s on {n} host" in out, out
        ticks = soak_ticks(out, wave)
        assert [t[1] for t in ticks] == ["1", "2", "3"], out
        assert [t[0] for t in ticks] == ["0:02", "0:01", "0:00"], out
        assert all(t[2] == t[3] == str(n) for t in ticks), ticks
        assert f"gate wave {wave}: proceed\n" in out
    assert out.index("wave 1/2:") < out.index("soak wave 1:") < out.index("gate wave 1:") < out.index("wave 2/2:")
    assert re.search(rf"^rollout {rid}: completed — 3 applied$", out, re.M), out

    back = kp(ws, "rollout", "rollback", rid, "--yes")
    clean(back.stdout + back.stderr)
    assert "rollback: 3 hosts\n" in back.stdout
    for h in hosts:
        assert f"  {h}: rb-disable started\n" in back.stdout, back.stdout
        assert re.search(rf"^  rolled_back +{h}$", back.stdout, re.M), back.stdout
    assert re.search(rf"^rollout {rid}: rolled_back — 3 rolled_back$", back.stdout, re.M), back.stdout


def test_json_keeps_stdout_one_document_and_progress_on_stderr(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    r = kp(ws, "rollout", "start", art.id, "--yes", "--waves", "1,100%", "--soak", "1", "--verify-interval", "1",
           "--json")
    doc = json.loads(r.stdout)  # nothing but the summary
    assert doc["state"] == "completed" and set(doc["hosts"].values()) == {"applied"}
    clean(r.stdout + r.stderr)
    assert re.search(r"^wave 1/2: 1 host", r.stderr, re.M) and "soak wave 2: 0:00 left · check 1 ok (2/2)" \
        in r.stderr, r.stderr
    back = kp(ws, "rollout", "rollback", doc["rollout_id"], "--yes", "--json")
    assert json.loads(back.stdout)["state"] == "rolled_back"
    assert "rollback: 2 hosts" in back.stderr


def test_no_progress_on_a_terminal_prints_the_same_plain_lines(simfleet_factory, tmp_path):
    """On a pty (stdout and stderr terminals) --no-progress gives plain lines, never a redrawn display."""
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    child = pexpect.spawn(sys.executable, ["-m", "kpipe", "-W", str(ws.root), "rollout", "start", art.id, "--yes",
                                           "--waves", "1,100%", "--soak", "2", "--verify-interval", "1",
                                           "--no-progress"],
                          env={**env(), "TERM": "xterm-256color"}, dimensions=(40, 120), encoding="utf-8",
                          timeout=300)
    child.expect(pexpect.EOF)
    child.close()
    text = child.before
    assert child.exitstatus == 0, text
    lines = text.split("\r\n")  # the pty turns each \n into \r\n; no other \r may appear
    assert not any("\r" in ln for ln in lines), [ln for ln in lines if "\r" in ln][:5]
    assert "\x1b[2K" not in text and "\x1b[1A" not in text and "\x1b[?25l" not in text, "a live display was drawn"
    progress = [ln for ln in lines if re.match(r"(wave \d|soak wave|gate wave|  \S+: (stage|load|verify) )", ln)]
    assert any(ln.startswith("wave 2/2: 1 host") for ln in progress), text
    assert "soak wave 2: 0:00 left · check 2 ok (2/2)" in progress, text
    assert all(not ANSI.search(ln) for ln in progress), progress


def test_a_resumed_rollout_shows_the_same_progress(simfleet_factory, tmp_path):
    """Killed in wave 2 (tests/crashpoint.py), then resumed: the resume says what it re-checked, then the
    waves left, their steps, the soak ticks and the summary, as plain lines."""
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    spec = json.dumps({"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 2, "when": "after"})
    crashed = kp(ws, "rollout", "start", art.id, "--yes", "--waves", "1,100%", "--soak", "1",
                 "--verify-interval", "1", "--forks", "1", ok=(-9, 137), prefix=(str(TESTS / "crashpoint.py"), spec))
    assert "crashpoint: killed at record" in crashed.stderr, crashed.stderr
    rid = rollout_id(crashed.stdout)
    assert "wave 2/2: 2 hosts" in crashed.stdout
    r = kp(ws, "rollout", "resume", rid, "--yes", "--forks", "1")
    out = r.stdout
    clean(out + r.stderr)
    assert f"rollout {rid}: resuming, 3 hosts in 2 waves\n" in out, out
    assert f"rollout {rid}: resume: re-checked 1 applied host\n" in out, out
    assert not re.search(r"^wave 1/2", out, re.M), "wave 1 was done: it is not run again"
    assert re.search(r"^wave 2/2: 2 hosts: ", out, re.M), out
    assert [t[1] for t in soak_ticks(out, 2)] == ["1"], out
    assert "gate wave 2: proceed\n" in out
    assert re.search(rf"^rollout {rid}: completed — 3 applied$", out, re.M), out
    assert Journal(ws.store).get(rid).state == "completed"
    kp(ws, "rollout", "rollback", rid, "--yes")


def test_progress_options_have_help_text():
    """--no-progress is on every command that runs long work, with its help."""
    for cmd in (["rollout", "start"], ["rollout", "resume"], ["rollout", "rollback"], ["lab", "up"], ["preflight"]):
        r = subprocess.run([sys.executable, "-m", "kpipe", *cmd, "--help"], capture_output=True, text=True,
                           env={**env(), "COLUMNS": "200"}, timeout=60)
        assert r.returncode == 0, r.stderr
        assert re.search(r"--no-progress\s+Plain progress lines", r.stdout), (cmd, r.stdout)


# -- lab up and preflight: their stages, on one real VM ------------------------------------------------
@pytest.mark.vm
@pytest.mark.timeout(1500)
def test_lab_up_and_preflight_show_their_stages_when_piped(tmp_path, qemu_guard):  # noqa: F811
    """`kpipe lab up` piped prints each stage as a plain line, in order; `kpipe preflight --vm` on that VM
    prints its own (attach, stage, load, verify, disable, unload, verify-removed, unstage); with --json
    they go to stderr and stdout stays one document. One VM boot."""
    from kpipe.lab import Lab
    from test_lab_support import build_demo_module, headers_release, kpipe_cli, remember

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "kpipe.toml").write_text("# progress test workspace\n")
    release = headers_release()
    lab = Lab(ws / ".lab")
    r = kpipe_cli(ws, "lab", "up", "--kernel", release, "--vms", "1", timeout=1200)
    remember(lab.load_state())
    try:
        assert r.returncode == 0, f"kpipe lab up failed ({r.returncode}): {r.stderr}{r.stdout}"
        clean(r.stdout + r.stderr)
        lines = r.stdout.splitlines()
        ready = next(i for i, ln in enumerate(lines) if ln.startswith("lab: ready: "))
        stages = [ln for ln in lines[:ready + 1] if ln.startswith("lab: ")]  # then the lab's table
        expected = [rf"lab: kernel: resolving {re.escape(release)} ", rf"lab: kernel: {re.escape(release)} ready ",
                    r"lab: initramfs: for ", r"lab: boot: starting 1 VM \(lab1\)$", r"lab: host keys: 1 pinned in ",
                    r"lab: ssh: waiting for 1 VM to answer", r"lab: ssh: lab1 answers on 127\.0\.0\.1:\d+ ",
                    r"lab: ready: 1 VM in \d+\.\d s$"]
        assert len(stages) == len(expected), stages
        for line, pattern in zip(stages, expected, strict=True):
            assert re.match(pattern, line), (pattern, stages)
        assert r.stdout.index("lab: ready:") < r.stdout.index("inventory:")  # then the lab's table

        from kpipe.artifacts import add_artifact
        from kpipe.workspace import open_workspace

        ko = build_demo_module(tmp_path / "demo", release)
        art = add_artifact(open_workspace(str(ws)).store, ko, kernel=release, module_name="livepatch_demo",
                           status="valid")
        pf = kpipe_cli(ws, "preflight", art.id, "--vm", "lab1", timeout=600)
        assert pf.returncode == 0, pf.stdout + pf.stderr
        clean(pf.stdout + pf.stderr)
        steps = [ln.split(":")[1].strip() for ln in pf.stdout.splitlines() if ln.startswith("preflight: ")]
        assert steps == ["attach", "stage", "load", "wait", "verify", "disable", "unload", "verify-removed",
                         "unstage"], pf.stdout
        js = kpipe_cli(ws, "preflight", art.id, "--vm", "lab1", "--json", timeout=600)
        assert js.returncode == 0 and json.loads(js.stdout)["status"] == "passed", js.stdout + js.stderr
        assert "preflight: attach: lab VM lab1" in js.stderr and "preflight: unstage: " in js.stderr
    finally:
        remember(lab.load_state())
        lab.down()


def test_without_a_soak_the_gate_check_is_not_called_a_soak(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, art = setup_ws(fleet, tmp_path)
    r = kp(ws, "rollout", "start", art.id, "--yes", "--waves", "100%")
    clean(r.stdout + r.stderr)
    assert re.search(r"^check wave 1: ok \(1/1\)$", r.stdout, re.M), r.stdout
    assert "soak" not in r.stdout.replace("soak 0 s", ""), r.stdout
