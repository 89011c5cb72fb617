"""The verify/audit CLI rendering: Rich table without markup injection, formats, exit codes.

run_audit is replaced by a function returning a fixed AuditResult, so these tests
cover only the command layer (the SSH path is in test_audit_fleet.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys
    import kpipe.audit as A
    from kpipe.audit import ObservedHost as H, ObservedPatch as P

    def fake_run_audit(ws, limit=None, **kw):
        d = A.desired_from_records([A.AppliedRecord(1, "r1", "[bold red]x[/]", "lp", "applied")])
        hosts = [H("[bold red]x[/]", kernel="k"), H("ok-host", patches={}),
                 H("esc\\x1b[2Jhost", patches={"lp": P("lp")})]
        if limit == "ok-host":
            hosts = hosts[1:2]
        return A.evaluate(d, hosts, generated_at=0)

    import kpipe.fleet.auditing
    kpipe.fleet.auditing.run_audit = fake_run_audit
    from kpipe.cli.app import main
    sys.argv = ["kpipe", *sys.argv[1:]]
    main()
''')


def run(ws, *args):
    return subprocess.run([sys.executable, "-c", SCRIPT, "-W", str(ws), *args], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "kpipe.toml").write_text("")
    return tmp_path


def test_table_shows_markup_in_host_names_literally(ws):
    r = run(ws, "verify")
    assert r.returncode == 1, r.stderr
    assert "[bold red]x[/]" in r.stdout
    assert "\x1b[2J" not in r.stdout and "\\x1b[2Jhost" in r.stdout
    assert "not compliant" in r.stderr and "Traceback" not in r.stderr


def test_verify_exits_0_when_compliant(ws):
    r = run(ws, "verify", "--limit", "ok-host", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["compliant"] is True


@pytest.mark.parametrize("fmt,check", [
    ("json", lambda out: json.loads(out)["schema"] == "kpipe.audit/v1"),
    ("junit", lambda out: out.startswith("<?xml")),
    ("prometheus", lambda out: "# TYPE kpipe_livepatch_state gauge" in out),
    ("html", lambda out: "&lt;" not in out or "<script" not in out),
])
def test_audit_formats_to_stdout_exit_0(ws, fmt, check):
    r = run(ws, "audit", "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert check(r.stdout)


def test_audit_strict_and_output_errors(ws, tmp_path):
    assert run(ws, "audit", "--strict").returncode == 1
    r = run(ws, "audit", "-F", "json", "-o", str(tmp_path / "no" / "such" / "dir" / "x.json"))
    assert r.returncode == 4 and "does not exist" in r.stderr
    out = tmp_path / "report.json"
    r = run(ws, "audit", "-F", "json", "-o", str(out))
    assert r.returncode == 0 and json.loads(out.read_text())["summary"]["hosts"] == 3
