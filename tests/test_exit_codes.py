"""The README's exit-code table is true: for each documented code, one real `kpipe` invocation produces it.

The table and kpipe/errors.py must agree (a code added to one and not the other fails here), and every
code in the table needs a producer below: a documented code nothing can produce is a documentation lie.
Click's own usage errors follow kpipe's one-line `kpipe: error: ...` format with a hint (exit 2), and a
rollout answered "no" at its confirmation exits 1 saying it was not started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kpipe.artifacts import add_artifact  # noqa: E402
from kpipe.errors import ExitCode  # noqa: E402
from kpipe.rollout.journal import Journal  # noqa: E402
from kpipe.workspace import open_workspace  # noqa: E402
from simfleet import simfleet_factory  # noqa: E402,F401  (the session fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def readme_codes() -> dict[int, str]:
    """The rows of README.md's `## Exit codes` table: code -> meaning."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def kp(*args: str, cwd: Path, ws: Path | None = None, stdin: int | None = subprocess.DEVNULL,
       timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "KPIPE_WORKSPACE")}
    pre = ["-W", str(ws)] if ws else []
    return subprocess.run([sys.executable, "-m", "kpipe", *pre, *args], cwd=cwd, capture_output=True, text=True,
                          stdin=stdin, timeout=timeout, env=env)


def fresh_ws(tmp: Path) -> Path:
    folder = tmp / "ws"
    r = kp("init", str(folder), cwd=tmp)
    assert r.returncode == 0, r.stderr
    return folder


def installed_release() -> str:
    """A kernel release whose headers are installed here (discovered, never hard-coded)."""
    for d in sorted(Path("/usr/src").glob("linux-headers-*")):
        if (d / "Module.symvers").is_file() or (d / "Makefile").is_file():
            name = d.name.removeprefix("linux-headers-")
            if not name.endswith("-common"):
                return name
    pytest.fail("no kernel headers under /usr/src")


def fleet_ws(request: pytest.FixtureRequest, tmp: Path, n: int = 2, *, preflight: str = "passed"):
    """A SimFleet workspace with one valid artifact for the fleet's release."""
    fleet = request.getfixturevalue("simfleet_factory")(n)
    ws = open_workspace(fleet.write_workspace(tmp / "fleet-ws", forks=10))
    ko = tmp / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(4096))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": preflight})
    return fleet, ws, art


# -- one producer per documented code ------------------------------------------------------------------
def code_0(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    return kp("kernels", "parse", "6.1.0-26-amd64", cwd=tmp)


def code_1(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    # an empty or foreign state.db is a damaged store (exit 1)
    ws = fresh_ws(tmp)
    (ws / ".kpipe").mkdir(exist_ok=True)
    (ws / ".kpipe" / "state.db").write_text("this is not an SQLite database " * 10)
    r = kp("artifacts", "list", cwd=ws)
    assert "is not an SQLite database" in r.stderr
    return r


def code_2(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    r = kp("rollout", "start", "--no-such-flag", cwd=tmp)
    assert r.stderr.splitlines()[0] == "kpipe: error: No such option: --no-such-flag", r.stderr
    return r


def code_3(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    (tmp / "junk.ko").write_bytes(b"\x7fNOT an ELF file" * 8)
    return kp("validate", "junk.ko", "--kernel", installed_release(), cwd=tmp)


def code_4(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    (tmp / "kpipe.toml").write_text("[ssh]\nforks = 'many'\n")
    r = kp("kernels", "list", cwd=tmp)
    assert "kpipe.toml:2" in r.stderr, r.stderr
    return r


def code_5(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    return kp("artifacts", "show", "abcdef", cwd=fresh_ws(tmp))


def code_6(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    ws = fresh_ws(tmp)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "hosts.ini").write_text(f"[web]\nw1 ansible_host=127.0.0.1 ansible_port={port}\n")
    return kp("fleet", "facts", "-i", str(tmp / "hosts.ini"), "--strict", cwd=ws)


def code_7(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    from doubles.buildkit import DEBIAN_HEADERS, DEBIAN_RELEASE, write_workspace

    ws = write_workspace(tmp / "bws", [{"name": "local", "workdir": str(tmp / "work"), "slots": 1}],
                         [{"release": DEBIAN_RELEASE, "arch": "x86_64", "headers": DEBIAN_HEADERS}])
    import shutil

    shutil.copytree(REPO / "recipes" / "templates", ws.recipes_dir / "templates")
    (ws.recipes_dir / "broken.yaml").write_text(
        'name: broken\nbuilder: kbuild\nkernels: ["6.1.*-amd64"]\noptions:\n  message: "x"\nkbuild:\n'
        "  module_name: livepatch-broken\n  sources:\n    - template: templates/livepatch-cmdline.c.j2\n"
        "      name: livepatch-broken.c\n  kbuild: templates/Kbuild.j2\n"
        '  make_args: ["KCFLAGS=-include kpipe-no-such-header.h"]\n')
    return kp("build", "--recipe", "broken", "--kernel", DEBIAN_RELEASE, cwd=ws.root, ws=ws.root)


def code_8(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    fleet, ws, art = fleet_ws(request, tmp)
    fleet.hosts[0].inject("ebusy_enable")  # the load fails: the gate halts
    try:
        return kp("rollout", "start", art.id, "--yes", "--waves", "100%", cwd=tmp, ws=ws.root)
    finally:
        fleet.hosts[0].clear()


def code_9(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    _, ws, art = fleet_ws(request, tmp, preflight="failed")
    return kp("rollout", "start", art.id, "--yes", cwd=tmp, ws=ws.root)


def code_10(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    _, ws, art = fleet_ws(request, tmp)
    rid = json.loads(kp("rollout", "plan", art.id, "--json", cwd=tmp, ws=ws.root).stdout)["id"]
    journal = Journal(ws.store)
    journal.acquire(rid)  # this (live) test process drives the rollout now
    try:
        return kp("rollout", "start", "--plan", rid, "--yes", cwd=tmp, ws=ws.root)
    finally:
        journal.release(rid)


def code_130(tmp: Path, request: pytest.FixtureRequest) -> subprocess.CompletedProcess:
    ws = fresh_ws(tmp)
    with socket.socket() as mute:  # accepts the connection, never says a word: kpipe waits
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        (tmp / "hosts.ini").write_text(f"[web]\nw1 ansible_host=127.0.0.1 ansible_port={mute.getsockname()[1]}\n")
        env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
        p = subprocess.Popen([sys.executable, "-m", "kpipe", "fleet", "facts", "-i", str(tmp / "hosts.ini")],
                             cwd=ws, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        try:
            mute.settimeout(60)
            conn, _ = mute.accept()  # kpipe is connecting: it is inside its work
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
            conn.close()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


PRODUCERS: dict[int, Callable[[Path, pytest.FixtureRequest], subprocess.CompletedProcess]] = {
    0: code_0, 1: code_1, 2: code_2, 3: code_3, 4: code_4, 5: code_5, 6: code_6, 7: code_7, 8: code_8, 9: code_9,
    10: code_10, 130: code_130,
}


def test_readme_table_and_errors_py_agree():
    documented = readme_codes()
    assert documented, "README.md has no exit-code table"
    assert set(documented) == {int(c) for c in ExitCode}, (
        f"README documents {sorted(documented)}, kpipe/errors.py defines {sorted(int(c) for c in ExitCode)}")


@pytest.mark.parametrize("code", sorted(readme_codes()))
def test_each_documented_exit_code_is_produced_by_a_real_invocation(code, tmp_path, request):
    assert code in PRODUCERS, f"README documents exit code {code}, but no invocation here produces it"
    r = PRODUCERS[code](tmp_path, request)
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    if code:
        first = r.stderr.strip().splitlines()[0] if r.stderr.strip() else ""
        assert first.startswith("kpipe: error: "), r.stderr


# -- click's own errors in kpipe's format ----------------------------------------------------------------
@pytest.mark.parametrize("args, message, hint", [
    (("rollout", "start", "--bogus"), "No such option: --bogus", "kpipe rollout start --help"),
    (("rollout", "status", "a", "b"), "unexpected extra argument", "kpipe rollout status --help"),
    (("rollout", "start", "--soak", "abc"), "Invalid value for '--soak'", "kpipe rollout start --help"),
    (("no-such-command",), "No such command 'no-such-command'", "kpipe --help"),
])
def test_click_usage_errors_are_one_kpipe_error_line_with_a_hint(tmp_path, args, message, hint):
    r = kp(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("kpipe: error: ") and message in lines[0], r.stderr
    assert lines[1].startswith("  hint: ") and hint in lines[1], r.stderr
    assert "Usage:" not in r.stderr and "Try '" not in r.stderr


# -- answering no ------------------------------------------------------------------------------------------
def test_answering_no_at_the_confirmation_exits_1_not_started(simfleet_factory, tmp_path, request):
    import pexpect

    fleet, ws, art = fleet_ws(request, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_DEBUG"}
    child = pexpect.spawn(sys.executable, ["-m", "kpipe", "-W", str(ws.root), "rollout", "start", art.id,
                                           "--waves", "100%"], env=env, encoding="utf-8", timeout=120,
                          cwd=str(tmp_path))
    child.expect(r"Roll out to 2 hosts in 1 wave\?")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1, child.before
    assert "not started" in child.before and "Traceback" not in child.before
    assert not any(h.patches() for h in fleet.hosts), "a declined rollout changed a host"
    rows = json.loads(kp("rollout", "list", "--json", cwd=tmp_path, ws=ws.root).stdout)
    assert rows and rows[0]["state"] == "planned", rows

    rid = rows[0]["id"]
    r = kp("rollout", "start", "--plan", rid, "--yes", cwd=tmp_path, ws=ws.root)
    assert r.returncode == 0, r.stderr
    child = pexpect.spawn(sys.executable, ["-m", "kpipe", "-W", str(ws.root), "rollout", "rollback", rid],
                          env=env, encoding="utf-8", timeout=120, cwd=str(tmp_path))
    child.expect(r"Roll back rollout .*\?")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1, child.before
    assert f"rollback of rollout {rid} not started" in child.before
    assert all(h.patches() for h in fleet.hosts), "a declined rollback changed a host"


# -- usage errors kpipe checks itself ------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (("rollout", "start", "--yes"), "name what to roll out"),
    (("validate", "m.ko"), "--kernel is required when validating a file"),
    (("audit", "--format", "yaml"), "--format 'yaml' is unknown"),
])
def test_usage_errors_kpipe_checks_itself_exit_2(tmp_path, args, message):
    ws = fresh_ws(tmp_path)
    (ws / "m.ko").write_bytes(b"\x7fELF")
    r = kp(*args, cwd=ws)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"kpipe: error: {message}") and "hint:" in r.stderr, r.stderr
