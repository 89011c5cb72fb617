"""Plain output without Rich (issue 13, start-up budget): kpipe.cli.context's markup helpers agree with Rich,
piped tables are tab-separated rows, and a terminal still gets Rich's tables."""

from __future__ import annotations

import os
import pty
import random
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.markup import escape, render

from kpipe.cli import context
from kpipe.cli.context import esc, plain_text

REPO = Path(__file__).resolve().parent.parent
RELEASE = "5.10.0-amd64-UOS"  # parser test data

PIECES = ["[", "]", "\\", "a", "/", "@", "#", " ", "[bold]", "[/bold]", "[/]", "[red on white]", "\\[", "\x1b", "\t",
          "é", ":smile:"]


def _samples(n: int) -> list[str]:
    rng = random.Random(13)
    fixed = ["", "web[1]", "a\\", "a\\\\", "[bold]x[/bold]", "\\[not a tag]", "\\\\[bold]x[/]", "[1, 2]", "db\x1b[2J"]
    return fixed + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14))) for _ in range(n)]


@pytest.mark.parametrize("text", _samples(150))
def test_esc_is_rich_escape_of_the_printable_text(text: str):
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    assert esc(text) == escape(shown)
    # piped, the escaped text prints as a terminal would show it (Rich keeps a doubled trailing backslash)
    assert plain_text(esc(text)) == render(esc(text), emoji=False).plain


@pytest.mark.parametrize("markup", _samples(150))
def test_plain_text_is_what_rich_shows(markup: str):
    try:
        expected = render(markup, emoji=False).plain
    except Exception:  # markup Rich refuses (an unmatched closing tag): kpipe never prints such a line
        return
    assert plain_text(markup) == expected


@pytest.mark.parametrize("env", [{}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": ""}, {"TTY_COMPATIBLE": "1"},
                                 {"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "x"}])
@pytest.mark.parametrize("tty", [False, True])
def test_is_terminal_decides_as_rich_does(monkeypatch, env: dict[str, str], tty: bool):
    for k in ("FORCE_COLOR", "TTY_COMPATIBLE", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    class Stream:
        def isatty(self) -> bool:
            return tty

        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Stream())
    assert context.AppState().is_terminal == Console(file=sys.stdout).is_terminal


def test_a_piped_cell_cannot_split_its_row(monkeypatch, capsys):
    monkeypatch.setattr(context, "STATE", context.AppState())
    context.print_table(["host", "reason"], [["web\t1", "line one\nline two\x1b[2J"]])
    assert capsys.readouterr().out == "host\treason\nweb 1\tline one line two\\x1b[2J\n"


def _on_a_terminal(args: list[str], cwd: Path) -> str:
    """What `kpipe ARGS` prints to a pseudo-terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPIPE_", "_KPIPE_"))
           and k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(PYTHONPATH=str(REPO), COLUMNS="120", TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:  # the child: kpipe on the terminal's slave side
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "kpipe", *args], env)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    return out.decode()


def test_a_terminal_still_gets_rich_tables(tmp_path: Path):
    (tmp_path / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    seed = ("from kpipe.store import open_store\n"
            "from kpipe.rollout.journal import Journal\n"
            "j = Journal(open_store('.kpipe'))\n"
            "plan = {'target': 'all', 'target_kind': 'artifact', 'waves': [['web[1]']], 'assignments': {},"
            " 'excluded': [], 'options': {}}\n"
            "j.set_state(j.create(plan, {}, target='all'), 'completed')\n")
    subprocess.run([sys.executable, "-c", seed], cwd=tmp_path, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    out = _on_a_terminal(["rollout", "status", "last"], tmp_path)
    assert "┃" in out and "web[1]" in out and "\x1b[1m" in out  # a Rich table, bold header, the name unmangled
    out = _on_a_terminal(["kernels", "parse", RELEASE], tmp_path)
    assert "release" in out and RELEASE in out and "release:" not in out  # the borderless table, not key: value


def test_json_is_one_line_to_a_pipe_and_indented_on_a_terminal(tmp_path: Path):
    """--json: a program reading a pipe gets one line (and kpipe uses json's C encoder: the indenting
    one is pure Python, ~0.5 ms per host of a fleet's facts); a person at a terminal gets it indented.
    Both are the same document."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPIPE_", "_KPIPE_"))}
    piped = subprocess.run([sys.executable, "-m", "kpipe", "kernels", "parse", RELEASE, "--json"], cwd=tmp_path,
                           env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
                           stdin=subprocess.DEVNULL, timeout=120).stdout
    assert piped.count("\n") == 1 and json.loads(piped)["distro"] == "uos", piped
    shown = _on_a_terminal(["kernels", "parse", RELEASE, "--json"], tmp_path).replace("\r\n", "\n")
    assert shown.count("\n") > 5 and json.loads(shown) == json.loads(piped), shown
