"""Piped listings are plain tables: `kpipe kernels list`, `kpipe rollout list` and `kpipe builds` print one
tab-separated header line and one line per row when stdout is not a terminal (as `artifacts list`, `recipe
list` and `rollout status` do), so `cut -f`, awk and scripts read them by column; no box drawing, no Rich."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RELEASE = "6.1.0-999-amd64"  # catalog test data
OTHER = "5.10.0-amd64-UOS"  # parser test data
BOX = {chr(c) for c in range(0x2500, 0x2580)}  # the box-drawing block Rich draws tables with

SEED = f"""\
from kpipe.builder.records import ensure_schema, record
from kpipe.rollout.journal import Journal
from kpipe.store import open_store
store = open_store('.kpipe')
ensure_schema(store)
j = Journal(store)
plan = {{'target': 'web*', 'target_kind': 'artifact', 'waves': [['web1', 'web2']], 'assignments': {{}},
        'excluded': [], 'options': {{}}}}
j.set_state(j.create(plan, {{}}, target='web*'), 'completed')
record(store, 'ab' * 32, 'far', recipe='cmdline-demo', kernel='{RELEASE}', builder='kbuild', status='failed',
       category='compile', remote_dir='/srv/kpipe builds/abab', pid=4242, started_at=1.0)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KPIPE_", "_KPIPE_")) and k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**env, "PYTHONPATH": str(REPO), "COLUMNS": "60"}  # narrow: a Rich table would wrap and cut


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("piped")
    (root / "kpipe.toml").write_text(
        '[workspace]\nstore = ".kpipe"\n\n[[build_hosts]]\nname = "far"\naddress = "192.0.2.1"\n'
        f'kernels = ["6.1.*"]\narch = "x86_64"\n\n[[kernels]]\nrelease = "{RELEASE}"\narch = "x86_64"\n'
        f'headers = "/nonexistent/headers"\n\n[[kernels]]\nrelease = "{OTHER}"\nheaders = "{root}"\n')
    subprocess.run([sys.executable, "-c", SEED], cwd=root, env=_env(), check=True, timeout=120)
    return root


def piped(ws: Path, *args: str) -> list[list[str]]:
    """`kpipe ARGS` with stdout a pipe: its lines split at tabs (each checked to hold no box drawing)."""
    r = subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=ws, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert not BOX & set(r.stdout), r.stdout
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows and all(len(row) == len(rows[0]) for row in rows), r.stdout  # every line has every column
    return rows


def test_kernels_list_piped(ws: Path):
    head, *rows = piped(ws, "kernels", "list")
    assert head == ["release", "arch", "distro", "builder", "headers", "source", "vmlinux", "config", "build hosts"]
    by_release = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    assert {RELEASE, OTHER} <= set(by_release)
    assert by_release[RELEASE]["headers"] == "remote" and by_release[RELEASE]["source"] == "-"
    assert by_release[RELEASE]["build hosts"] == "far" and by_release[RELEASE]["arch"] == "x86_64"
    assert by_release[OTHER]["headers"] == "here" and by_release[OTHER]["build hosts"] == "none"


def test_rollout_list_piped(ws: Path):
    head, *rows = piped(ws, "rollout", "list")
    assert head == ["id", "created", "state", "target", "hosts"]
    assert len(rows) == 1
    row = dict(zip(head, rows[0], strict=True))
    assert row["id"].startswith("r") and row["state"] == "completed" and row["target"] == "web*"
    assert row["hosts"] == "2" and len(row["created"]) == len("2026-01-01 00:00:00")


def test_builds_piped(ws: Path):
    head, *rows = piped(ws, "builds")
    assert head == ["id", "recipe", "kernel", "host", "status", "category", "artifact", "folder on host", "pid"]
    assert rows == [["ab" * 6, "cmdline-demo", RELEASE, "far", "failed", "compile", "", "/srv/kpipe builds/abab",
                     "4242"]]
