"""The live progress display on a real terminal (issue 12, item 3): a rollout run inside tmux.

tmux is the terminal: a pane of a fixed size runs `kpipe rollout start`/`resume` as a user types it; the
test reads the screen the user sees (`tmux capture-pane`) while it runs and after it ended. The live
display must show the wave and the soak countdown with its verification ticks; the final screen holds the
summary. tmux runs on a socket of its own, stopped at the end (kill-server on that socket only).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kenv
from kpipe.rollout.journal import Journal
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_progress import TESTS, env, setup_ws

COLS, ROWS = 120, 40


class Term:
    """One tmux server on a private socket; `run` starts a command in a new COLSxROWS window."""

    def __init__(self, folder: Path) -> None:
        self.tmux = kenv.require_tool("tmux")  # .ci/run installs it; a skip fails under KPIPE_REQUIRE_REAL=1
        self.sock = folder / "tmux.sock"
        conf = folder / "tmux.conf"
        # the pane stays after its command exits: its last screen and exit status can be read
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 5000\nset -g status off\n")
        self.conf = conf
        self.folder = folder
        self.n = 0
        self.status_files: dict[str, Path] = {}

    def tm(self, *args: str) -> str:
        r = subprocess.run([self.tmux, "-S", str(self.sock), "-f", str(self.conf), *args], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    def run(self, argv: list[str]) -> str:
        self.n += 1
        name = f"w{self.n}"
        status_file = self.folder / f"{name}.status"
        # tmux runs the command through sh -c: the argv is quoted once, here. The shell then writes the exit
        # status to a file: the test's own record of the end, not tmux's pane flags (which may lag the reap).
        # PYTHONFAULTHANDLER: a command that hangs is sent SIGABRT and prints every thread's stack on screen.
        cmd = shlex.join(["env", *(f"{k}={v}" for k, v in env().items() if k in ("PYTHONPATH", "PATH", "HOME")),
                          "TERM=xterm-256color", "PYTHONFAULTHANDLER=1", *argv])
        cmd += f"; echo $? > {shlex.quote(str(status_file))}"
        if self.n == 1:
            self.tm("new-session", "-d", "-s", "kpipe", "-n", name, "-x", str(COLS), "-y", str(ROWS), cmd)
        else:
            self.tm("new-window", "-d", "-t", "kpipe", "-n", name, cmd)
        target = f"kpipe:{name}"
        self.status_files[target] = status_file
        return target

    def screen(self, target: str, history: bool = False) -> str:
        return self.tm("capture-pane", "-p", "-t", target, *(["-S", "-2000"] if history else []))

    def ended(self, target: str) -> int | None:
        """The command's exit status once it has ended (the shell wrote it), else None."""
        try:
            text = self.status_files[target].read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def watch(self, target: str, timeout: float = 300) -> tuple[list[str], int]:
        """Every distinct screen seen until the command exits, and its exit status."""
        screens: list[str] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.ended(target)
            s = self.screen(target)
            if not screens or screens[-1] != s:
                screens.append(s)
            if status is not None:
                return screens, status
            time.sleep(0.1)
        raise AssertionError("the command did not end:\n" + self._dump_stacks(target))

    def _dump_stacks(self, target: str) -> str:
        """SIGABRT to a hung command: faulthandler prints every thread's stack; the screen's history holds it."""
        pid = int(self.tm("display-message", "-p", "-t", target, "#{pane_pid}").strip() or 0)
        # the pane's process is sh; the command is its child (or sh itself after exec)
        kids = Path(f"/proc/{pid}/task/{pid}/children")
        pids = [int(p) for p in kids.read_text().split()] if kids.exists() else []
        for p in pids or [pid]:
            try:
                os.kill(p, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(2)
        return self.screen(target, history=True)

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", str(self.sock), "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def term(tmp_path: Path) -> Iterator[Term]:
    t = Term(tmp_path)
    try:
        yield t
    finally:
        t.close()


COUNTDOWN = re.compile(r"soak (\d+:\d\d) left · (check (\d+) ok|first check pending)")


def kpipe_argv(ws, *args: str) -> list[str]:
    return [sys.executable, "-m", "kpipe", "-W", str(ws.root), *args]


def test_the_live_display_shows_the_wave_and_the_soak_countdown(simfleet_factory, tmp_path, term):
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    target = term.run(kpipe_argv(ws, "rollout", "start", art.id, "--yes", "--waves", "1,100%", "--soak", "4",
                                 "--verify-interval", "1"))
    screens, status = term.watch(target)
    final = term.screen(target, history=True)
    if os.environ.get("KPIPE_SHOW_SCREENS"):
        print("\n=====\n".join([*screens, final]))
    assert status == 0, final
    seen = "\n".join(screens)
    # the live area: its header names the wave, then the soak counts down with the checks it made
    assert re.search(r"rollout \S+ · wave 1/2 · 1 host", seen), seen[-3000:]
    assert re.search(r"rollout \S+ · wave 2/2 · 2 hosts", seen), seen[-3000:]
    counts = {m.group(1) for m in COUNTDOWN.finditer(seen)}
    assert len(counts) >= 2, f"no countdown on screen: {counts}\n{seen[-3000:]}"
    ticks = {int(m.group(3)) for m in COUNTDOWN.finditer(seen) if m.group(3)}
    assert ticks & {1, 2, 3}, seen[-3000:]
    # milestones stay above it; the final screen holds the summary; no plain per-step lines on a terminal
    rid = json.loads(subprocess.run(kpipe_argv(ws, "rollout", "status", "--json"), capture_output=True, text=True,
                                    env=env(), timeout=60).stdout)["id"]
    assert re.search(rf"^rollout {re.escape(rid)}: completed — 3 applied\s*$", final, re.M), final
    assert re.search(r"^wave 1/2: 1 host", final, re.M) and re.search(r"gate after wave 2: proceed", final), final
    assert not re.search(r"^  \S+: load started", final, re.M), "plain step lines on a terminal"
    assert "progress output failed" not in final and "Traceback" not in final


def test_a_resumed_rollout_shows_the_same_live_display(simfleet_factory, tmp_path, term):
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    spec = json.dumps({"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 2, "when": "after"})
    crashed = subprocess.run([sys.executable, str(TESTS / "crashpoint.py"), spec, "-W", str(ws.root), "rollout",
                              "start", art.id, "--yes", "--waves", "1,100%", "--soak", "1", "--verify-interval", "1",
                              "--forks", "1"], capture_output=True, text=True, env=env(), timeout=300,
                             stdin=subprocess.DEVNULL)
    assert "crashpoint: killed at record" in crashed.stderr, crashed.stderr
    rid = re.search(r"^rollout (\S+): starting,", crashed.stdout, re.M).group(1)
    target = term.run(kpipe_argv(ws, "rollout", "resume", rid, "--yes"))
    screens, status = term.watch(target)
    final = term.screen(target, history=True)
    assert status == 0, final
    seen = "\n".join(screens)
    assert re.search(r"rollout \S+ · wave 2/2 · 2 hosts", seen), seen[-3000:]
    assert COUNTDOWN.search(seen), seen[-3000:]
    assert "resume: re-checked 1 applied host" in final, final
    assert re.search(rf"^rollout {re.escape(rid)}: completed — 3 applied\s*$", final, re.M), final
    assert Journal(ws.store).get(rid).state == "completed"
