"""Help (issue 12, item 5): every option says what it is for, placeholders name what to type (TARGET,
PATTERN, SECONDS, ID, FILE, N), never the Python type (`<str>`, `<float>`) or click's `TEXT`, and a
default described in the help shows its value (no Rich markup swallowing `[ssh]`).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kpipe.cli.app import app, full_command
from kpipe.settings import SshSettings

PLACEHOLDER = re.compile(r"^\[?[A-Z][A-Z0-9_|-]*(\.\.\.)?\]?$")
BAD_IN_HELP = ("<str>", "<float>", "<int", "<path>", "<bool>", "<text>", "<function>", " TEXT ",
               "(default:  ", "default: )", "default: ,", "that  names")


def commands() -> list[tuple[list[str], object]]:
    """(path, click command) for every leaf command of the app."""
    out = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        else:
            out.append((path, cmd))
    walk(full_command(), [])
    return out


def test_every_value_placeholder_names_what_to_type():
    bad = []
    for path, cmd in commands():
        for p in cmd.params:
            if getattr(p, "is_flag", False) or p.name in ("help",):
                continue
            mv = p.metavar
            if mv is None or not (PLACEHOLDER.match(mv) or mv == "CVE-YYYY-NNNN"):
                bad.append(f"kpipe {' '.join(path)} {'/'.join(p.opts)}: {mv!r}")
    assert not bad, "placeholders that do not name what to type:\n" + "\n".join(bad)


@pytest.mark.parametrize("group", ["start", "resume", "rollback", "status", "abort", "list", "plan"])
def test_every_rollout_option_has_help(group):
    cmd = full_command().commands["rollout"].commands[group]
    missing = [p.opts for p in cmd.params if not (getattr(p, "help", None) or "").strip()]
    assert not missing, f"kpipe rollout {group}: options without help: {missing}"


def test_rendered_help_never_shows_a_python_type_or_an_empty_default():
    runner = CliRunner()
    bad = []
    for path, _ in commands():
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
        assert r.exit_code == 0, (path, r.output)
        bad += [f"kpipe {' '.join(path)}: {word!r}" for word in BAD_IN_HELP if word in r.output]
    assert not bad, "\n".join(bad)


def test_fleet_facts_help_shows_the_real_forks_default():
    r = subprocess.run([sys.executable, "-m", "kpipe", "fleet", "facts", "--help"], capture_output=True, text=True,
                       env={"COLUMNS": "250", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 0, r.stderr
    line = " ".join(r.stdout.split())
    assert f"(default: {SshSettings().forks}, or forks in the ssh section of kpipe.toml)" in line, line
