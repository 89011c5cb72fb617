"""Builds on real build hosts: OpenSSH sshd servers on loopback (strict known_hosts).

The kbuild path builds a real livepatch module against the installed Debian
headers. The kpatch-build path runs tests/doubles/kpatch-build, a TEST DOUBLE
of kpatch-build (the real tool cannot be installed here): it checks its
arguments like kpatch-build, prints the milestones, writes build.log and
either builds a real module or fails with a real kpatch-build message chosen
by a marker line in the patch.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from doubles.buildkit import (  # noqa: E402
    DEBIAN_HEADERS,
    DEBIAN_RELEASE,
    DOUBLE,
    KERNEL,
    PYTHON,
    fake_kernel_tree,
    kbuild_spec,
    kpatch_spec,
    kpipe_env,
    memcg_patch,
    ssh_host,
    write_workspace,
)
from kpipe.artifacts import get_artifact, list_artifacts  # noqa: E402
from kpipe.builder.records import build_record  # noqa: E402
from kpipe.builder.runner import BuildOptions, BuildRunner  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def modinfo(path: Path, field: str) -> str:
    """modinfo of a store blob (modinfo wants a .ko file name, so copy it)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ko = Path(d, "m.ko")
        shutil.copyfile(path, ko)
        return subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True, text=True,
                              check=True).stdout.strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive either
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class Events:
    """Collects BuildEvents; lets a test wait for one."""

    def __init__(self):
        self.items = []
        self.cv = threading.Condition()

    def __call__(self, ev):
        with self.cv:
            self.items.append(ev)
            self.cv.notify_all()

    def wait_for(self, pred, timeout=60.0):
        deadline = time.monotonic() + timeout
        with self.cv:
            while not any(pred(e) for e in self.items):
                left = deadline - time.monotonic()
                assert left > 0, f"event not seen; got {[(e.kind, e.message) for e in self.items][-10:]}"
                self.cv.wait(left)

    def kinds(self):
        return [e.kind for e in self.items]

    def milestones(self):
        return [e.data["step"] for e in self.items if e.kind == "milestone"]


@pytest.fixture
def env(tmp_path, sshd):
    """A workspace whose build host b1 is a real sshd; kernels: Debian headers + a fake tree for the double."""
    kern = fake_kernel_tree(tmp_path / "kernels", DEBIAN_RELEASE)
    kern["headers"] = DEBIAN_HEADERS
    ws = write_workspace(
        tmp_path / "ws",
        [ssh_host(sshd, "b1", workdir=str(tmp_path / "remote-work"), slots=2,
                  tools={"kpatch-build": str(DOUBLE)})],
        [kern],
        ssh={"known_hosts": str(sshd.known_hosts)},
    )
    return ws, sshd, tmp_path


def run_one(ws, spec, **opts):
    ev = Events()
    runner = BuildRunner(ws, on_event=ev, options=BuildOptions(**opts))
    try:
        res = runner.run([spec])[0]
    finally:
        runner.close()
    return res, ev


# -- kbuild: a real module on a real SSH build host -------------------------------------

def test_kbuild_builds_a_real_livepatch_module_over_ssh(env):
    ws, sshd, tmp = env
    res, ev = run_one(ws, kbuild_spec(ws))
    assert res.status == "built", res
    assert res.host == "b1" and not res.reattached
    art = get_artifact(ws.store, res.artifact_id)
    path = art.path(ws.store)
    assert modinfo(path, "livepatch") == "Y"
    # the headers' release is UTS_RELEASE (include/config/kernel.release holds the upstream version on Debian)
    uts = Path(DEBIAN_HEADERS, "include/generated/utsrelease.h").read_text()
    release = uts.split('UTS_RELEASE "', 1)[1].split('"', 1)[0]
    vermagic = modinfo(path, "vermagic").split()
    assert vermagic[0] == release
    assert {"SMP", "mod_unload", "modversions"} <= set(vermagic)
    assert art.builder == "kbuild" and "make=GNU Make" in art.builder_version and "gcc=" in art.builder_version
    assert art.inputs_digest == res.inputs_digest and art.build_host == "b1" and art.duration_s > 0
    log = ws.store.get_bytes(art.log_sha256).decode()
    assert "LD [M]" in log and "kpipe: builder exited with status 0" in log
    # the build ran detached in its own folder named by the inputs digest
    assert res.remote_dir == f"{tmp}/remote-work/{res.inputs_digest[:16]}"
    assert Path(res.remote_dir, "exit").read_text().strip() == "0"
    assert "compiling" in ev.milestones() and "linking" in ev.milestones()
    assert build_record(ws.store, res.inputs_digest, "b1")["status"] == "succeeded"


def test_identical_build_is_answered_from_the_store_without_the_host(env):
    ws, sshd, tmp = env
    spec = kbuild_spec(ws, comment="cache test")
    first, _ = run_one(ws, spec)
    assert first.status == "built"
    sshd.stop()  # no host to contact any more: a hit that tried SSH would end in a transport error
    again, ev = run_one(ws, spec)
    assert again.status == "cached" and again.artifact_id == first.artifact_id
    assert ev.kinds() == ["cached"]  # no connect, upload or build event: answered from the store alone
    # --force must go to the host: with the host down that is a transport error, not a silent cache hit
    forced, _ = run_one(ws, spec, force=True)
    assert forced.status == "error" and forced.exit_code == 6


def test_force_rebuilds_in_a_fresh_folder(env):
    ws, sshd, tmp = env
    spec = kbuild_spec(ws, comment="force test")
    first, _ = run_one(ws, spec)
    pid1 = int(Path(first.remote_dir, "pid").read_text())
    again, ev = run_one(ws, spec, force=True)
    assert again.status == "built" and not again.reattached
    assert "started" in ev.kinds()
    assert int(Path(again.remote_dir, "pid").read_text()) != pid1
    assert again.artifact_id == first.artifact_id  # same inputs, same bytes


# -- kpatch-build through the test double ---------------------------------------------

def test_kpatch_build_double_success_path(env):
    ws, sshd, tmp = env
    spec = kpatch_spec(ws, memcg_patch(), release=DEBIAN_RELEASE)
    res, ev = run_one(ws, spec)
    assert res.status == "built", res
    art = get_artifact(ws.store, res.artifact_id)
    assert art.module_name == "livepatch-memcg-fix" == spec.module_name
    assert modinfo(art.path(ws.store), "livepatch") == "Y"
    assert ev.milestones() == ["cache", "testing-patches", "building-original", "building-patched", "extracting",
                               "changed-function", "building-module", "success"]
    assert "kpatch-build-sha256=" in art.builder_version and "gcc=" in art.builder_version
    slot = Path(res.remote_dir, "slot").read_text().strip()
    assert slot in ("0", "1")
    log = ws.store.get_bytes(art.log_sha256).decode()
    assert f"CACHEDIR={tmp}/remote-work/cache/slot-{slot}" in log


FAILURES = [
    ("env-distro", "environment", "Unsupported distribution"),
    ("environment", "environment", "not installed"),
    ("kernel-config", "kernel-config", "CONFIG_DEBUG_INFO"),
    ("replace", "kernel-config", "klp replace"),
    ("compiler", "compiler", "gcc/kernel version mismatch"),
    ("patch", "patch", "file failed to apply"),
    ("nochange", "patch", "no functional changes found"),
    ("diff", "diff", "not selected for inclusion"),
    ("diff-static", "diff", "reference to static local variable"),
    ("symbols", "symbols", "Undefined symbols"),
    ("symvers", "symbols", "altered exported kernel symbols"),
    ("crash", "crash", "create-diff-object SIGSEGV"),
]


def test_every_failure_category_is_classified_through_the_ssh_build_host(env):
    ws, sshd, tmp = env
    specs = []
    for kind, _, _ in FAILURES:
        patch = memcg_patch(f"// KPATCH_DOUBLE_FAIL: {kind}\n")
        spec = kpatch_spec(ws, patch, release=DEBIAN_RELEASE, recipe=f"fail-{kind}", patch_name=f"fail-{kind}.patch")
        if kind == "env-distro":  # no source tree: kpatch-build must know the distro itself
            from dataclasses import replace

            spec = replace(spec, kernel_entry=replace(spec.kernel_entry, source=""))
        specs.append(spec)
    runner = BuildRunner(ws, options=BuildOptions())
    try:
        results = runner.run(specs)
    finally:
        runner.close()
    for (kind, category, text), res in zip(FAILURES, results, strict=True):
        assert res.status == "failed", (kind, res)
        assert res.category == category, (kind, res.category, res.lines)
        assert any(text in line for line in res.lines), (kind, res.lines)
        assert res.hint and res.exit_code == 7
        rec = build_record(ws.store, res.inputs_digest, "b1")
        assert rec["status"] == "failed" and rec["category"] == category
        log = ws.store.get_bytes(rec["log_sha256"]).decode()
        assert text in log


def test_cachedir_build_log_is_fetched_after_a_failure(env):
    ws, sshd, tmp = env
    spec = kpatch_spec(ws, memcg_patch("// KPATCH_DOUBLE_FAIL: diff\n"), release=DEBIAN_RELEASE, recipe="bl",
                       patch_name="bl.patch")
    res, _ = run_one(ws, spec)
    rec = build_record(ws.store, res.inputs_digest, "b1")
    log = ws.store.get_bytes(rec["log_sha256"]).decode()
    assert "===== $CACHEDIR/build.log" in log
    assert "make -j" in log.split("===== $CACHEDIR/build.log")[1]  # a line only build.log has


def test_log_bytes_are_kept_exactly_even_when_not_utf8(env):
    ws, sshd, tmp = env
    spec = kpatch_spec(ws, memcg_patch("// KPATCH_DOUBLE_RAW: 1\n"), release=DEBIAN_RELEASE, recipe="raw",
                       patch_name="raw.patch")
    res, _ = run_one(ws, spec)
    assert res.status == "built", res
    art = get_artifact(ws.store, res.artifact_id)
    log = ws.store.get_bytes(art.log_sha256)
    assert b"odd bytes \xff\xfe in a message" in log
    assert log == Path(res.remote_dir, "log").read_bytes()


def test_failed_build_is_retried_fresh_next_time(env):
    ws, sshd, tmp = env
    spec = kpatch_spec(ws, memcg_patch("// KPATCH_DOUBLE_FAIL: crash\n"), release=DEBIAN_RELEASE, recipe="retry",
                       patch_name="retry.patch")
    first, _ = run_one(ws, spec)
    second, ev = run_one(ws, spec)
    assert first.status == second.status == "failed"
    assert "started" in ev.kinds()  # not a replay of the old result
    assert build_record(ws.store, second.inputs_digest, "b1")["attempts"] == 2


# -- detached builds survive the connection and kpipe; a rerun reattaches -----------------

def slow_spec(ws, seconds: int, name: str):
    return kpatch_spec(ws, memcg_patch(f"// KPATCH_DOUBLE_SLEEP: {seconds}\n"), release=DEBIAN_RELEASE, recipe=name,
                       patch_name=f"{name}.patch")


def test_dropped_ssh_connection_does_not_stop_the_build_and_a_rerun_reattaches(env):
    ws, sshd, tmp = env
    spec = slow_spec(ws, 10, "drop")
    ev = Events()
    runner = BuildRunner(ws, on_event=ev)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("res", runner.run([spec])[0]))
    th.start()
    ev.wait_for(lambda e: e.kind == "milestone" and e.data["step"] == "building-original")
    started = next(e for e in ev.items if e.kind == "started")
    pid, remote_dir = started.data["pid"], started.data["dir"]
    sshd.kill_sessions()  # kill the sshd process serving kpipe's connection
    th.join(60)
    runner.close()
    cut = out["res"]
    assert cut.status == "error" and cut.exit_code == 6
    assert "reattach" in cut.hint
    assert alive(pid) or Path(remote_dir, "exit").read_text().strip() == "0", \
        f"the build died with the SSH connection: {Path(remote_dir, 'log').read_text()}"

    again, ev2 = run_one(ws, spec)
    assert again.status == "built", again
    assert again.reattached and again.pid == pid and again.remote_dir == remote_dir
    assert "reattached" in ev2.kinds() and "started" not in ev2.kinds()
    # the reattached follower still sees every milestone (it reads the log from the start)
    assert ev2.milestones()[-1] == "success"


def _kpipe(ws_root: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "kpipe", *args], env=kpipe_env(ws_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def write_recipe(ws, name: str, patch_name: str, patch_text: str, kernels=("6.1.*-amd64",)) -> None:
    (ws.patches_dir / patch_name).write_text(patch_text)
    (ws.recipes_dir / f"{name}.yaml").write_text(
        f"name: {name}\nbuilder: kpatch-build\nkernels: {json.dumps(list(kernels))}\n"
        f"patches: [{json.dumps(patch_name)}]\nkpatch:\n  jobs: 2\n")


def test_sigkilled_kpipe_leaves_the_build_running_and_a_rerun_reattaches(env):
    ws, sshd, tmp = env
    write_recipe(ws, "slowfix", "slowfix.patch", memcg_patch("// KPATCH_DOUBLE_SLEEP: 10\n"))
    proc = _kpipe(ws.root, "build", "--recipe", "slowfix", "--kernel", DEBIAN_RELEASE)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Building original source" in line:
                break
        else:
            pytest.fail(f"no milestone: {seen} {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    started = next(line for line in seen if "started on b1" in line)
    pid = int(started.rsplit("(pid ", 1)[1].split(")")[0])
    assert alive(pid), "the build died with kpipe"

    again = _kpipe(ws.root, "build", "--recipe", "slowfix", "--kernel", DEBIAN_RELEASE, "--json")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    res = json.loads(out)[0]
    assert res["status"] == "built" and res["reattached"] and res["pid"] == pid
    assert "reattached to the running build" in err
    assert not alive(pid)


def test_ctrl_c_stops_following_at_once_and_leaves_the_build_running(env):
    ws, sshd, tmp = env
    write_recipe(ws, "intfix", "intfix.patch", memcg_patch("// KPATCH_DOUBLE_SLEEP: 10\n"))
    proc = _kpipe(ws.root, "build", "--recipe", "intfix", "--kernel", DEBIAN_RELEASE)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Building original source" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: the started builds keep running" in err and "reattach" in err
    assert "Traceback" not in err
    pid = int(next(line for line in seen if "started on b1" in line).rsplit("(pid ", 1)[1].split(")")[0])
    assert alive(pid)  # the build (10 s) outlived kpipe: kpipe stopped following, it did not wait
    again = _kpipe(ws.root, "build", "--recipe", "intfix", "--kernel", DEBIAN_RELEASE, "--json")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    res = json.loads(out)[0]
    assert res["reattached"] and res["pid"] == pid


def test_finished_but_uncollected_build_is_collected_not_rebuilt(env):
    ws, sshd, tmp = env
    spec = slow_spec(ws, 1, "late")
    ev = Events()
    runner = BuildRunner(ws, on_event=ev)
    th = threading.Thread(target=lambda: runner.run([spec]))
    th.start()
    ev.wait_for(lambda e: e.kind == "started")
    pid = next(e for e in ev.items if e.kind == "started").data["pid"]
    # The whole server goes, not just this connection: with no listener the first run can neither follow on
    # nor connect again, so the finished build is certainly left for the second run to collect.
    sshd.stop()
    th.join(60)
    runner.close()
    while alive(pid):
        time.sleep(0.1)
    sshd.restart()
    again, ev2 = run_one(ws, spec)
    assert again.status == "built" and again.reattached and again.pid == pid
    assert "reattached to the finished build" in [e.message for e in ev2.items if e.kind == "reattached"][0]


# -- the matrix ------------------------------------------------------------------------

def test_matrix_runs_in_parallel_up_to_the_slots_each_with_its_own_cachedir(env):
    ws, sshd, tmp = env  # b1 has 2 slots
    specs = [slow_spec(ws, 2, f"par{i}") for i in range(3)]
    runner = BuildRunner(ws)
    try:
        results = runner.run(specs)
    finally:
        runner.close()
    assert [r.status for r in results] == ["built"] * 3, [r.message for r in results]
    spans = []
    for r in results:
        d = Path(r.remote_dir)
        spans.append((float(d.joinpath("started").read_text()), float(d.joinpath("finished").read_text()),
                      d.joinpath("slot").read_text().strip()))
    # at most two at once, and two did overlap
    events = sorted([(s, 1) for s, _, _ in spans] + [(f, -1) for _, f, _ in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2
    # overlapping builds used different slots (the double refuses a shared CACHEDIR)
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = spans[i], spans[j]
            if a[0] < b[1] and b[0] < a[1]:
                assert a[2] != b[2]


def test_matrix_partial_failure_is_data(env):
    ws, sshd, tmp = env
    ok = kpatch_spec(ws, memcg_patch(), release=DEBIAN_RELEASE, recipe="good", patch_name="good.patch")
    bad = kpatch_spec(ws, memcg_patch("// KPATCH_DOUBLE_FAIL: symbols\n"), release=DEBIAN_RELEASE, recipe="bad",
                      patch_name="bad.patch")
    runner = BuildRunner(ws)
    try:
        results = runner.run([ok, bad])
    finally:
        runner.close()
    assert [r.status for r in results] == ["built", "failed"]
    assert results[1].category == "symbols"


# -- the CLI: exit codes, hints, host selection, concurrency ------------------------------

def test_cli_failed_build_exits_7_with_the_lines_and_the_hint(env):
    ws, sshd, tmp = env
    write_recipe(ws, "difffail", "difffail.patch", memcg_patch("// KPATCH_DOUBLE_FAIL: diff-static\n"))
    p = _kpipe(ws.root, "build", "--recipe", "difffail", "--kernel", DEBIAN_RELEASE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 7, (out, err)
    assert "failed (diff)" in out and "reference to static local variable" in out
    assert "kpipe: error: kpatch-build failed (diff) on b1" in err
    assert "hint: the change cannot be live-patched" in err
    assert "Traceback" not in err


def test_cli_matrix_summary_and_nonzero_exit(env):
    ws, sshd, tmp = env
    write_recipe(ws, "m-good", "m-good.patch", memcg_patch())
    write_recipe(ws, "m-bad", "m-bad.patch", memcg_patch("// KPATCH_DOUBLE_FAIL: compiler\n"))
    p = _kpipe(ws.root, "build", "--kernel", DEBIAN_RELEASE, "--json")
    out, err = p.communicate(timeout=180)
    assert p.returncode == 7, err
    res = {r["recipe"]: r for r in json.loads(out)}
    assert res["m-good"]["status"] == "built" and res["m-bad"]["category"] == "compiler"
    assert "1 of 2 builds did not produce a usable module: m-bad@" in err


def test_cli_host_selection_error_lists_candidates(env, tmp_path):
    ws, sshd, tmp = env
    kern = fake_kernel_tree(tmp / "kernels", "5.10.0-arm64-UOS")
    kern["arch"] = "aarch64"
    ws2 = write_workspace(ws.root, [ssh_host(sshd, "b1", workdir=str(tmp / "w2"))], [kern],
                          ssh={"known_hosts": str(sshd.known_hosts)})
    write_recipe(ws2, "armfix", "armfix.patch", memcg_patch(), kernels=("5.10.0-*-UOS",))
    p = _kpipe(ws2.root, "build", "--recipe", "armfix", "--kernel", "5.10.0-arm64-UOS")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 5
    assert "no build host can build kernel 5.10.0-arm64-UOS (aarch64 arch): b1 (arch x86_64 != kernel arch " \
           "aarch64)" in err
    assert "Traceback" not in err
    p = _kpipe(ws2.root, "build", "--recipe", "armfix", "--kernel", "5.10.0-arm64-UOS", "--host", "nope")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 5 and "no build host named 'nope'" in err


def test_two_kpipe_processes_at_once_share_the_store_safely(env):
    ws, sshd, tmp = env
    write_recipe(ws, "c-one", "c-one.patch", memcg_patch("// KPATCH_DOUBLE_SLEEP: 2\n"))
    write_recipe(ws, "c-two", "c-two.patch", memcg_patch("// KPATCH_DOUBLE_SLEEP: 2\n// two\n"))
    procs = [_kpipe(ws.root, "build", "--recipe", r, "--kernel", DEBIAN_RELEASE, "--json")
             for r in ("c-one", "c-two", "c-one")]  # the third builds the same inputs as the first
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    results = [json.loads(o[0])[0] for o in outs]
    assert results[0]["artifact_id"] == results[2]["artifact_id"]
    # one of the two c-one processes started the build, the other reattached to it (or found it in the store)
    assert results[0]["reattached"] or results[2]["reattached"] or "cached" in (results[0]["status"],
                                                                                results[2]["status"])
    db = sqlite3.connect(ws.store_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {a.id for a in list_artifacts(ws.store)}
    assert {r["artifact_id"] for r in results} <= ids
    for a in list_artifacts(ws.store):
        assert a.path(ws.store).is_file()


# -- hostile values stay data ------------------------------------------------------------

def test_shell_metacharacters_reach_the_host_as_data(env, tmp_path):
    ws, sshd, tmp = env
    # No '/' (these become file names); an injection would create kpwn* files in some working folder.
    evil = "$(touch kpwn1)`touch kpwn2`;touch kpwn3&&echo 'x\"y'|cat>kpwn4 #"
    kern = fake_kernel_tree(tmp / f"k {evil}", DEBIAN_RELEASE)
    work = tmp / "work2"
    ws2 = write_workspace(ws.root, [ssh_host(sshd, "b1", workdir=str(work), tools={"kpatch-build": str(DOUBLE)})],
                          [kern], ssh={"known_hosts": str(sshd.known_hosts)})
    patch_name = f"fix {evil}.patch"
    spec = kpatch_spec(ws2, memcg_patch(), release=DEBIAN_RELEASE, recipe=f"r{evil}", patch_name=patch_name,
                       options={"module_name": f"lp;{evil}", "targets": [f"vmlinux;{evil}"]})
    res, ev = run_one(ws2, spec)
    assert res.status == "built", (res.message, res.lines)
    art = get_artifact(ws2.store, res.artifact_id)
    assert art.module_name == spec.module_name  # kpatch-build's sanitised -n
    assert Path(res.remote_dir).parent == work
    assert [p.name for p in Path(res.remote_dir, "patches", "00").iterdir()] == [patch_name]
    for folder in (tmp, Path.home(), Path.cwd()):
        hits = [str(p) for p in folder.rglob("kpwn*")] if folder == tmp else [str(p) for p in folder.glob("kpwn*")]
        assert not hits, hits


def test_workdir_with_whitespace_is_refused_with_a_clear_error(env):
    ws, sshd, tmp = env
    ws2 = write_workspace(ws.root, [ssh_host(sshd, "b1", workdir=str(tmp / "my builds"))],
                          [fake_kernel_tree(tmp / "kernels", DEBIAN_RELEASE)],
                          ssh={"known_hosts": str(sshd.known_hosts)})
    res, _ = run_one(ws2, kbuild_spec(ws2))
    assert res.status == "error" and res.exit_code == 4
    assert "workdir" in res.message and "b1" in res.message


def test_arch_is_not_exported_to_kpatch_build(tmp_path, monkeypatch):
    """The local build host inherits kpipe's environment; ARCH must still not reach kpatch-build."""
    monkeypatch.setenv("ARCH", "arm64")
    kern = fake_kernel_tree(tmp_path / "kernels", DEBIAN_RELEASE)
    ws = write_workspace(tmp_path / "ws", [{"name": "local", "workdir": str(tmp_path / "work"),
                                            "tools": {"kpatch-build": str(DOUBLE)}}], [kern])
    res, ev = run_one(ws, kpatch_spec(ws, memcg_patch(), release=DEBIAN_RELEASE))
    assert res.status == "built", (res.message, res.lines)
    assert res.host == "local"


def test_matrix_spreads_kernels_over_the_build_hosts_that_accept_them(tmp_path, sshd_factory):
    a, b = sshd_factory(), sshd_factory()
    other = KERNEL.uninstalled_release()  # same flavour, another ABI, no headers here
    k_cur = fake_kernel_tree(tmp_path / "kernels", DEBIAN_RELEASE)
    k_other = fake_kernel_tree(tmp_path / "kernels", other)
    ws = write_workspace(tmp_path / "ws", [
        ssh_host(a, "host-cur", workdir=str(tmp_path / "wa"), kernels=[KERNEL.abi_glob()],
                 tools={"kpatch-build": str(DOUBLE)}),
        ssh_host(b, "host-other", workdir=str(tmp_path / "wb"), kernels=[KERNEL.abi_glob(other)],
                 tools={"kpatch-build": str(DOUBLE)}),
    ], [k_cur, k_other], ssh={"known_hosts": str(a.known_hosts)})
    # one known_hosts file for both servers, as an operator would have
    with open(a.known_hosts, "a") as f:
        f.write(b.known_hosts.read_text())
    first = run_one(ws, kpatch_spec(ws, memcg_patch(), release=DEBIAN_RELEASE), validate=False)[0]
    assert first.status == "built", first
    fixture = tmp_path / "prebuilt.ko"  # the double copies it for a release without headers here
    fixture.write_bytes(get_artifact(ws.store, first.artifact_id).path(ws.store).read_bytes())
    patch = memcg_patch(f"// KPATCH_DOUBLE_MODULE: {fixture}\n// matrix\n")
    specs = [kpatch_spec(ws, patch, release=r, recipe="mx", patch_name="mx.patch") for r in
             (DEBIAN_RELEASE, other)]
    runner = BuildRunner(ws, options=BuildOptions(validate=False))
    try:
        results = runner.run(specs)
    finally:
        runner.close()
    assert [(r.status, r.host) for r in results] == [("built", "host-cur"), ("built", "host-other")], \
        [r.message for r in results]
    assert Path(results[0].remote_dir).parent == tmp_path / "wa"
    assert Path(results[1].remote_dir).parent == tmp_path / "wb"


def test_cli_build_host_that_cannot_be_reached_or_trusted_exits_unreachable(env, tmp_path):
    """The build host is connected to while the recipe renders (kpipe.builder.warmup): what connecting meets is
    still the build's error, reported once with its exit code (6), with --force and without."""
    import socket

    ws, sshd, tmp = env
    write_recipe(ws, "reach", "reach.patch", memcg_patch())
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = dict(ssh_host(sshd, "b1", workdir=str(tmp / "w3")), port=closed_port)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cases = [(refused, str(sshd.known_hosts), f"b1: connection to {sshd.address}:{closed_port} refused"),
             (ssh_host(sshd, "b1", workdir=str(tmp / "w3")), str(empty), "is not in known_hosts")]
    for host, known, message in cases:
        ws2 = write_workspace(ws.root, [host], [{"release": DEBIAN_RELEASE, "headers": DEBIAN_HEADERS}],
                              ssh={"known_hosts": known})
        for force in ((), ("--force",)):
            p = _kpipe(ws2.root, "build", "--recipe", "reach", "--kernel", DEBIAN_RELEASE, *force)
            out, err = p.communicate(timeout=60)
            assert p.returncode == 6, (force, out, err)
            assert err.count(message) == 1 and "Traceback" not in err, (force, err)
