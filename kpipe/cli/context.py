"""What every command shares: the workspace, the console, JSON output, and plain output for pipes.

Piped output (a file, `| grep`, a test) needs no Rich: `print_markup`, `print_table` and `print_fields`
write plain text there and use Rich only on a terminal, so that a listing started by a script loads no
terminal renderer (the start-up budget, tests/test_startup_budget.py). `esc` and `plain_text` follow Rich's
markup rules exactly (tests/test_startup_output.py compares them with Rich's own).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:  # Rich and the workspace load on first use: `kpipe --help` stays instant
    from rich.console import Console

    from kpipe.workspace import Workspace

E = TypeVar("E")


@dataclass
class AppState:
    """The process's options (--workspace, --debug) and what they lead to, loaded on first use."""

    workspace_arg: str | None = None
    debug: bool = False
    _workspace: Workspace | None = None
    _console: Console | None = None

    @property
    def workspace(self) -> Workspace:
        """The loaded Workspace, found on first use."""
        if self._workspace is None:
            from kpipe.workspace import open_workspace

            self._workspace = open_workspace(self.workspace_arg)
        return self._workspace

    def optional_workspace(self) -> Workspace | None:
        """The workspace, or None when there is none here (commands that can work without one)."""
        from kpipe.workspace import NoWorkspace

        try:
            return self.workspace
        except NoWorkspace:
            return None

    @property
    def is_terminal(self) -> bool:
        """Whether stdout is a terminal, decided as Rich decides it (TTY_COMPATIBLE, FORCE_COLOR, isatty),
        without loading Rich when no console exists yet."""
        if self._console is not None:
            return bool(self._console.is_terminal)
        return _stdout_is_terminal()

    @property
    def console(self) -> Console:
        """A rich Console on stdout."""
        if self._console is None:
            self._console = _new_console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
        return self._console

    def printer(self, stderr: bool = False) -> Console | PlainConsole:
        """Where a command's styled lines go: a Rich console on a terminal, a PlainConsole (no Rich) otherwise."""
        if stderr:
            return self.err_console if _stream_is_terminal(sys.stderr) else PlainConsole(sys.stderr)
        return self.console if self.is_terminal else PlainConsole(sys.stdout)

    @property
    def err_console(self) -> Console:
        """A rich Console on stderr (progress while stdout carries JSON, warnings)."""
        return _new_console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def _new_console(**kw: Any) -> Console:
    """A rich Console that survives its reader going away (`kpipe ... | head`).

    Rich's default answer to a broken pipe is SystemExit(1) from inside print(): raised in a progress
    callback, that would stop a rollout between two host steps. Here the rest of the output is
    dropped and the command finishes its work; its exit code still tells the outcome."""
    console: Console = _console_class()(**kw)
    return console


@functools.cache
def _console_class() -> type[Console]:
    from rich.console import Console  # imported on first use: `kpipe --help` stays instant

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            _to_devnull(self.file)

    return _Console


def _width(stream: TextIO) -> int | None:
    # Rich assumes 80 columns off a terminal; tables of ids and releases then get
    # truncated in logs and pipes. Let $COLUMNS or a terminal decide, else be wide.
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return 200


def _stdout_is_terminal() -> bool:
    return _stream_is_terminal(sys.stdout)


def _stream_is_terminal(stream: IO[str]) -> bool:
    # Rich's Console.is_terminal, in its order: TTY_COMPATIBLE=0/1 decides, a set FORCE_COLOR forces, else isatty
    tty_compatible = os.environ.get("TTY_COMPATIBLE", "")
    if tty_compatible in ("0", "1"):
        return tty_compatible == "1"
    force_color = os.environ.get("FORCE_COLOR")
    if force_color is not None:
        return force_color != ""
    try:
        return bool(stream.isatty())
    except (ValueError, AttributeError):  # a closed or replaced stream is no terminal
        return False


class PlainConsole:
    """The part of a Rich Console that progress printers use, for a stream that is no terminal: each
    print() writes the plain text of its markup (what Rich would show there, without loading Rich)."""

    is_terminal = False

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def print(self, *objects: object, markup: bool | None = None, end: str = "\n", **_style: object) -> None:
        """Write the objects' text, space-separated; markup tags are dropped unless markup=False."""
        text = " ".join(str(o) for o in objects)
        try:
            self.file.write((text if markup is False else plain_text(text)) + end)
            self.file.flush()
        except BrokenPipeError:  # like the Rich console here: the reader went away, the work goes on
            _to_devnull(self.file)


STATE = AppState()


def state() -> AppState:
    """The process's shared AppState."""
    return STATE


# Rich's markup grammar (rich.markup.RE_TAGS and escape): a tag is `[` + [a-z#/@] + up to the next `]`, and
# backslashes before it escape it in pairs.
_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def printable(value: object) -> str:
    """Outside text with its control characters shown as escapes, so a terminal never acts on them."""
    s = str(value)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s


def esc(value: object) -> str:
    """Outside text (host names, kernel releases, reasons, paths) made safe to put in Rich markup:
    brackets escaped as rich.markup.escape does, control characters shown as escapes."""
    s = _ESCAPE.sub(lambda m: f"{m[1]}{m[1]}\\{m[2]}", printable(value))
    if s.endswith("\\") and not s.endswith("\\\\"):
        return s + "\\"
    return s


def plain_text(markup: str) -> str:
    """The text a line of Rich markup shows, without its style tags (rich.markup.render(...).plain, emoji
    codes left as written)."""
    out: list[str] = []
    pos = 0
    for m in _TAG.finditer(markup):
        start, end = m.span()
        if start > pos:
            out.append(markup[pos:start].replace("\\[", "["))
        pairs, escaped = divmod(len(m[2]), 2)
        out.append("\\" * pairs)
        if escaped:  # an escaped tag is text
            out.append(m[1][len(m[2]):])
        pos = end
    if pos < len(markup):
        out.append(markup[pos:].replace("\\[", "["))
    return "".join(out)


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _to_devnull(sys.stdout)


def print_markup(markup: str) -> None:
    """One line of Rich markup: styled on a terminal, its plain text when piped (no Rich loaded)."""
    st = state()
    if st.is_terminal:
        st.console.print(markup)
    else:
        _write(plain_text(markup) + "\n")


def _cell(value: object) -> str:
    # one cell of a tab-separated row: no tab or newline may split it, no control character reaches a terminal
    return printable(str(value).replace("\t", " ").replace("\n", " ").replace("\r", " "))


def print_table(columns: list[str], rows: list[list[str]], *, no_wrap: tuple[str, ...] = ()) -> None:
    """A table of plain-text cells: a Rich table on a terminal; piped, one tab-separated header line and one
    line per row (no boxes, no padding, nothing cut), as `recipe list` does."""
    st = state()
    if not st.is_terminal:
        _write("".join("\t".join(_cell(c) for c in row) + "\n" for row in [columns, *rows]))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for col in columns:
        table.add_column(col, no_wrap=col in no_wrap)
    for row in rows:
        table.add_row(*(Text(printable(c)) for c in row))
    st.console.print(table)


def print_fields(rows: list[tuple[str, str]]) -> None:
    """Key and value pairs: a borderless two-column table on a terminal, `key: value` lines when piped."""
    st = state()
    if not st.is_terminal:
        _write("".join(f"{_cell(k)}: {_cell(v)}\n" for k, v in rows))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(Text(printable(key)), Text(printable(value)))
    st.console.print(table)


def guarded(fn: Callable[[E], None], console: Console | None = None) -> Callable[[E], None]:
    """A progress callback that never raises: a failure to print must not stop the work it reports on.
    A closed pipe (`| head`) sends the console's stream to /dev/null for the rest of the run, so the
    exit code still tells the outcome; any other error is reported once on stderr, then ignored."""
    warned = False

    def call(event: E) -> None:
        nonlocal warned
        try:
            fn(event)
        except BrokenPipeError:
            _to_devnull(getattr(console, "file", None) or sys.stdout)
        except Exception as e:  # noqa: BLE001 - whatever the printer tripped on, the engine goes on
            if not warned:
                warned = True
                try:
                    sys.stderr.write(f"kpipe: warning: progress output failed ({type(e).__name__}: {e}); "
                                     "the run goes on, see its status afterwards\n")
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001 - stderr is gone too: nothing left to tell
                    pass
    return call


def _to_devnull(stream: IO[str] | None) -> None:
    if stream is None:
        return
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout (dropped if the reader went away).

    Indented for a terminal; on one line for a pipe or file, where the reader is a program: json's
    indenting encoder is pure Python (~0.5 ms per host of a fleet's facts), the one-line one is C."""
    try:
        indent = 2 if sys.stdout.isatty() else None
        sys.stdout.write(json.dumps(data, indent=indent, sort_keys=False, default=_default) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _to_devnull(sys.stdout)


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 host`, `2 hosts`: a count with its noun in the right number (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
