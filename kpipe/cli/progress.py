"""Progress of long work (rollouts, lab boots, preflights): a Rich live display on a terminal, plain lines
otherwise.

- stderr is a terminal and no --no-progress: a live display on stderr (the current wave, each host's step,
  the soak countdown with its verification ticks); milestones (wave starts, host outcomes, gate verdicts,
  rollbacks) are printed above it and stay on the screen.
- otherwise: one plain line per event, no ANSI escapes, no carriage returns (the soak prints one line per
  verification tick, not per second), on stdout, or on stderr when stdout carries JSON.

The engine only emits events (kpipe.rollout.engine.Event); it never imports Rich. A printer that fails is
reported once and ignored (kpipe.cli.context.guarded): the work goes on, the journal is the record.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from kpipe.cli.context import esc, guarded, plural, state

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

NO_PROGRESS_HELP = ("Plain progress lines instead of the live display (the default when stderr is not a "
                    "terminal).")

# step names of the host plans as the operator reads them
_STEP_WORDS = {"intended": "started", "done": "done", "failed": "failed"}
_OUTCOME_COLOURS = {"applied": "green", "rolled_back": "cyan", "failed": "red", "unreachable": "red",
                    "skipped": "yellow"}
_MAX_ROWS = 12  # host rows in the live display; the rest is counted


def live_wanted(no_progress: bool) -> bool:
    """A live display only when asked for implicitly: stderr is a terminal that can redraw."""
    if no_progress:
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def plain(text: object) -> str:
    """Outside text for a plain line: control characters shown as escapes, so a line stays one line."""
    s = str(text)
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def clock(seconds: float) -> str:
    """9:41, 1:02:03: a countdown as people read it (rounded up: 0:00 only at the end)."""
    import math

    s = max(0, math.ceil(seconds - 1e-6))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _Lines:
    """Plain lines on one stream, each written and flushed whole (threads emit concurrently)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------- rollouts


class _RolloutState:
    """What the live display shows, updated from the engine's events."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rollout_id = ""
        self.title = "rollout"
        self.wave = 0
        self.waves = 0
        self.hosts: dict[str, tuple[str, str]] = {}  # host -> (step or outcome, status: running|done|<outcome>)
        self.soak_deadline: float | None = None
        self.soak_round = 0
        self.soak_ok = ""
        self.gate = ""

    def soak_text(self, now: float) -> str:
        if self.soak_deadline is None:
            return ""
        left = clock(self.soak_deadline - now)
        if not self.soak_round:
            return f"soak {left} left · first check pending"
        return f"soak {left} left · check {self.soak_round} {self.soak_ok}"


class _RolloutView:
    """The live display's renderable: computed at each refresh, so the countdown runs between events."""

    def __init__(self, st: _RolloutState) -> None:
        self.st = st
        self._spinners: dict[str, Any] = {}  # one per host: a spinner animates from its own start time

    def __rich__(self) -> RenderableType:
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        st = self.st
        with st.lock:
            head = Text.assemble((f"{st.title} {st.rollout_id}", "bold"))
            if st.wave:
                head.append(f" · wave {st.wave}/{st.waves} · {plural(len(st.hosts), 'host')}")
            rows = Table.grid(padding=(0, 1))
            rows.add_column(width=2)
            rows.add_column(no_wrap=True)
            rows.add_column()
            running = [h for h, (_, s) in st.hosts.items() if s == "running"]
            finished = [h for h in st.hosts if h not in running]
            shown = (running + finished)[:_MAX_ROWS]
            for h in shown:
                what, status = st.hosts[h]
                if status == "running":
                    spin = self._spinners.setdefault(h, Spinner("dots", style="cyan"))
                    rows.add_row(spin, Text(plain(h)), Text(plain(what)))
                else:
                    colour = _OUTCOME_COLOURS.get(status, "white")
                    mark = "✓" if status in ("applied", "rolled_back") else "✗"
                    rows.add_row(Text(mark, style=colour), Text(plain(h)), Text(plain(status), style=colour))
            parts: list[RenderableType] = [head, rows]
            if len(st.hosts) > len(shown):
                done = sum(1 for _, s in st.hosts.values() if s != "running")
                parts.append(Text(f"  … and {len(st.hosts) - len(shown)} more ({done} finished)", style="dim"))
            soak = st.soak_text(time.monotonic())
            if soak:
                parts.append(Text(soak, style="yellow"))
            if st.gate:
                parts.append(Text(st.gate))
        return Group(*parts)


def _start_live(view: Any, console: Console) -> Live:
    """A started live area on `console` (stderr). stdout is not redirected: it may carry JSON or be a pipe.
    Transient: at the end the live area goes; the lines printed above it and the summary stay."""
    from rich.live import Live

    live = Live(view, console=console, refresh_per_second=4, transient=True, redirect_stdout=False,
                redirect_stderr=True)
    live.start()
    return live


def _stop_live(live: Live | None) -> None:
    """Stop the live area (None: nothing to stop)."""
    if live is not None:
        try:
            live.stop()
        except Exception:  # noqa: BLE001 - the display going away must not hide the work's outcome
            pass


class RolloutProgress:
    """The rollout engine's progress callback: a live display (`live=True`) or plain lines.

    Use as a context manager around the engine run; `callback` is what the engine gets (never raises)."""

    def __init__(self, *, live: bool, json_out: bool = False) -> None:
        self.live = live
        self.state = _RolloutState()
        self._live: Live | None = None
        self._seen_regressions: set[str] = set()
        self._console: Console | None = None
        self._lines: _Lines | None = None
        if live:
            self._console = state().err_console
        else:
            self._lines = _Lines(sys.stderr if json_out else sys.stdout)
        self.callback: Callable[[Any], None] = guarded(self._event, self._console)

    def __enter__(self) -> RolloutProgress:
        if self.live and self._console is not None:

            self._live = _start_live(_RolloutView(self.state), self._console)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        _stop_live(self._live)
        self._live = None

    # -- events -------------------------------------------------------------------------------
    def _event(self, ev: Any) -> None:
        self._update(ev)
        for text, markup in self._milestones(ev):
            if self._lines is not None:
                self._lines(text)
            elif self._console is not None and markup is not None:
                self._console.print(markup, highlight=False, soft_wrap=True)

    def _update(self, ev: Any) -> None:
        st = self.state
        with st.lock:
            st.rollout_id = ev.rollout_id or st.rollout_id
            if ev.kind == "wave-start":
                st.wave, st.waves = ev.wave, int(ev.data.get("waves", 0) or st.waves)
                st.hosts = {h: ("waiting", "running") for h in ev.data.get("todo", [])}
                st.soak_deadline, st.soak_round, st.gate = None, 0, ""
            elif ev.kind == "rollback-start":
                st.title = "rollback of"
                st.wave = 0
                st.hosts = {h: ("waiting", "running") for h in ev.data.get("hosts", [])}
                st.soak_deadline, st.gate = None, ""
            elif ev.kind == "step" and ev.host:
                if st.hosts.get(ev.host, ("", "running"))[1] == "running":
                    st.hosts[ev.host] = (f"{ev.step} {_STEP_WORDS.get(ev.phase, ev.phase)}", "running")
            elif ev.kind == "host" and ev.host:
                st.hosts[ev.host] = (ev.message, ev.phase)
            elif ev.kind == "soak-start":
                st.soak_deadline = time.monotonic() + float(ev.data.get("soak_s", 0))
                st.soak_round = 0
            elif ev.kind == "soak":
                st.soak_round = int(ev.data.get("round", 0))
                st.soak_deadline = time.monotonic() + float(ev.data.get("remaining_s", 0))
                st.soak_ok = _tick_word(ev.data)
            elif ev.kind in ("gate", "wave-end"):
                st.soak_deadline = None
                if ev.kind == "gate":
                    st.gate = f"gate after wave {ev.wave}: {ev.phase}"

    def _milestones(self, ev: Any) -> list[tuple[str, str | None]]:
        """(plain line, Rich markup or None: a plain-only line) for one event."""
        d = ev.data
        wave_of = f"{ev.wave}/{d.get('waves')}" if d.get("waves") else str(ev.wave)
        if ev.kind == "rollout-start":
            n = sum(len(w) for w in d.get("waves", []))
            verb = "resuming" if d.get("resuming") else "starting"
            waves = plural(len(d.get("waves", [])), "wave")
            text = f"rollout {plain(ev.rollout_id)}: {verb}, {plural(n, 'host')} in {waves}"
            return [(text, None)]
        if ev.kind == "resume":
            return [(f"rollout {plain(ev.rollout_id)}: resume: {plain(ev.message)}",
                     f"resume: {esc(ev.message)}")]
        if ev.kind == "wave-start":
            todo = list(d.get("todo", []))
            names = ", ".join(plain(h) for h in todo[:10]) + (f" (+{len(todo) - 10} more)" if len(todo) > 10 else "")
            done = len(d.get("hosts", [])) - len(todo)
            extra = f" ({done} already done)" if done else ""
            text = f"wave {wave_of}: {plural(len(todo), 'host')}{extra}" + (f": {names}" if names else "")
            return [(text, f"[bold]wave {wave_of}[/bold]: {plural(len(todo), 'host')}{extra}"
                     + (f": {esc(names)}" if names else ""))]
        if ev.kind == "step" and ev.host:
            word = _STEP_WORDS.get(ev.phase, ev.phase)
            text = f"  {plain(ev.host)}: {plain(ev.step)} {plain(word)}" + (
                f": {plain(ev.message)}" if ev.message and ev.phase == "failed" else "")
            return [(text, None)]
        if ev.kind == "host":
            c = _OUTCOME_COLOURS.get(ev.phase, "white")
            why = f"  {ev.message}" if ev.message else ""
            # state first, as kpipe always printed it: `grep -w applied` still finds the hosts
            return [(f"  {plain(f'{ev.phase:<11}')} {plain(ev.host)}{plain(why)}",
                     f"  [{c}]{esc(f'{ev.phase:<11}')}[/{c}] {esc(ev.host)}{esc(why)}")]
        if ev.kind == "soak-start":
            text = (f"soak wave {ev.wave}: {clock(float(d.get('soak_s', 0)))}, a check every "
                    f"{float(d.get('interval_s', 0)):g} s on {plural(int(d.get('hosts', 0)), 'host')}")
            return [(text, None)]
        if ev.kind == "soak":
            if float(d.get("soak_s", 0) or 0) > 0:
                text = (f"soak wave {ev.wave}: {clock(float(d.get('remaining_s', 0)))} left · "
                        f"check {d.get('round', 0)} {_tick_word(d)}")
            else:  # no soak: the gate's one look at the wave (state, kernel log, taint, health)
                text = f"check wave {ev.wave}: {_tick_word(d)}"
            new = {h: r for h, r in dict(d.get("regressions", {})).items() if h not in self._seen_regressions}
            self._seen_regressions |= set(new)
            out: list[tuple[str, str | None]] = [(text, None)]
            for h, r in new.items():
                out.append((f"  {plain(h)}: regressed: {plain(r)}",
                            f"  [red]regressed[/red]   {esc(h)}  {esc(r)}"))
            return out
        if ev.kind == "gate":
            ok = ev.phase == "proceed"
            tail = f": {ev.message}" if ev.message else ""
            return [(f"gate wave {ev.wave}: {plain(ev.phase)}{plain(tail)}",
                     f"  gate after wave {ev.wave}: [{'green' if ok else 'red'}]{esc(ev.phase)}[/]{esc(tail)}")]
        if ev.kind == "wave-end":
            return [(f"wave {wave_of} done: {d.get('applied', 0)} applied, {d.get('failed', 0)} failed so far", None)]
        if ev.kind == "rollback-start":
            hosts = list(d.get("hosts", []))
            why = f" ({ev.message})" if ev.message else ""
            return [(f"rollback: {plural(len(hosts), 'host')}{plain(why)}",
                     f"[bold yellow]rolling back[/bold yellow] {plural(len(hosts), 'host')}{esc(why)}")]
        return []


def _tick_word(d: dict[str, Any]) -> str:
    checked, ok = int(d.get("checked", 0)), int(d.get("ok", 0))
    if checked and ok == checked:
        return f"ok ({ok}/{checked})"
    if not checked:
        return "ok (no host to check)"
    return f"FAILED on {checked - ok} of {checked}"


# --------------------------------------------------------------------------------------------- stages


class _StageView:
    """A spinner, the current stage and the time since the work began."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.text = "starting"
        self.t0 = time.monotonic()

    def __rich__(self) -> RenderableType:
        from rich.spinner import Spinner
        from rich.text import Text

        return Spinner("dots", Text.assemble((f"{self.label}: ", "bold"), plain(self.text),
                                             (f"  {clock(time.monotonic() - self.t0)}", "dim")), style="cyan")


class StageProgress:
    """Stages of a lab boot or a preflight: `say(message)` per stage; live spinner or plain `LABEL: message`
    lines (on stderr when stdout carries JSON). Use as a context manager around the work."""

    def __init__(self, label: str, *, live: bool, json_out: bool = False) -> None:
        self.label = label
        self.live = live
        self._view = _StageView(label)
        self._console: Console | None = state().err_console if live else None
        self._lines = None if live else _Lines(sys.stderr if json_out else sys.stdout)
        self._live: Live | None = None
        self.say: Callable[[str], None] = guarded(self._say, self._console)

    def __enter__(self) -> StageProgress:
        if self._console is not None:

            self._live = _start_live(self._view, self._console)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        _stop_live(self._live)
        self._live = None

    def _say(self, message: str) -> None:
        if self._lines is not None:
            self._lines(f"{self.label}: {plain(message)}")
            return
        assert self._console is not None
        self._view.text = message
        self._console.print(f"[dim]{esc(self.label)}:[/] {esc(message)}", highlight=False, soft_wrap=True)
