"""The store never reports what is not true (issue 8, items 4, 7 and 14).

- a blob whose bytes changed after it was stored never leaves the store (validate, sign, export, a build
  cache hit, a rollout);
- a locked store makes a writer give up after a bounded wait naming the holder, and read-only commands
  never take the lock; a damaged or emptied state.db is one line with its path and a hint;
- a validation or preflight with other options is kept as a record and never changes the artifact's status.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from test_elf_support import make_signing_cert, sample_module


@pytest.fixture(scope="module")
def sample(kernel_env, tmp_path_factory) -> tuple[str, Path]:
    """(release, a real livepatch module built against it): the installed headers (tests/kenv.py)."""
    ko = tmp_path_factory.mktemp("lpbuild") / "livepatch-sample.ko"
    shutil.copyfile(sample_module(), ko)  # a private copy: these tests may change its bytes
    return kernel_env.release, ko


@pytest.fixture
def ws_root(tmp_path: Path) -> Path:
    key, cert = make_signing_cert("rsa")
    (tmp_path / "kpipe.toml").write_text(f"""
[workspace]
store = ".kpipe"

[signing]
default = "team"

[signing.signers.team]
type = "builtin"
key = "{key}"
cert = "{cert}"
hash = "sha256"
""")
    return tmp_path


def _kpipe(root: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kpipe", *args], capture_output=True, text=True, cwd=root, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **env})


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("kpipe: error:") and len([ln for ln in err.splitlines() if ln.strip()]) <= 2, err
    return err


def _valid_artifact(root: Path, sample: tuple[str, Path]):
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.validation import validate_and_record
    from kpipe.workspace import load_workspace

    release, ko = sample
    ws = load_workspace(root)
    art = add_artifact(ws.store, ko, kernel=release, filename="livepatch-sample.ko", recipe="lp-sample")
    assert validate_and_record(ws, art).ok
    art = get_artifact(ws.store, art.id)
    assert art.status == "valid"
    return ws, art


def _tamper(store, digest: str) -> None:
    """Flip one byte of a stored blob, keeping it a well-formed module (a letter of a string)."""
    path = store.blob_path(digest)
    data = bytearray(path.read_bytes())
    at = data.find(b"this has been live patched")
    assert at > 0
    data[at] ^= 0x20
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)


# -- item 4: a tampered blob never leaves the store -----------------------------------------------------------

def test_tampered_blob_is_refused_by_validate_sign_and_export(ws_root, sample):
    from kpipe.artifacts import get_artifact, list_artifacts

    ws, art = _valid_artifact(ws_root, sample)
    _tamper(ws.store, art.sha256)
    before = len(list_artifacts(ws.store))

    r = _kpipe(ws_root, "validate", art.id)
    err = _one_line_error(r)
    assert r.returncode == 1 and "corrupt" in err and art.sha256[:12] in err, r.stdout + r.stderr
    assert get_artifact(ws.store, art.id).status == "valid"  # nothing recorded from the changed bytes
    from kpipe.artifacts import validation_records

    assert len(validation_records(ws.store, art.id)) == 1

    r = _kpipe(ws_root, "sign", art.id)
    err = _one_line_error(r)
    assert r.returncode == 1 and "corrupt" in err, r.stdout + r.stderr
    assert len(list_artifacts(ws.store)) == before  # no signed artifact of the changed bytes

    r = _kpipe(ws_root, "artifacts", "export", art.id, "-o", str(ws_root / "out.ko"))
    assert r.returncode == 1 and "corrupt" in _one_line_error(r)
    assert not (ws_root / "out.ko").exists()


def test_build_cache_hit_refuses_a_tampered_blob_and_a_rebuild_repairs_it(ws_root, sample):
    from kpipe.artifacts import add_artifact, find_by_inputs
    from kpipe.errors import KpipeError
    from kpipe.workspace import load_workspace

    release, ko = sample
    ws = load_workspace(ws_root)
    art = add_artifact(ws.store, ko, kernel=release, inputs_digest="d" * 64)
    assert find_by_inputs(ws.store, "d" * 64).id == art.id
    _tamper(ws.store, art.sha256)
    with pytest.raises(KpipeError, match="corrupt") as e:
        find_by_inputs(ws.store, "d" * 64)
    assert e.value.exit_code == 1
    # a rebuild (`kpipe build --force`) of the same bytes replaces the damaged copy
    add_artifact(ws.store, ko, kernel=release, inputs_digest="d" * 64)
    assert ws.store.blob_path(art.sha256).read_bytes() == ko.read_bytes()
    assert find_by_inputs(ws.store, "d" * 64).id == art.id


def test_rollout_refuses_a_tampered_blob_before_contacting_any_host(ws_root, sample, client_key):
    import yaml

    ws, art = _valid_artifact(ws_root, sample)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        port = listener.getsockname()[1]
        (ws_root / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {"h1": {
            "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "root",
            "ansible_ssh_private_key_file": str(client_key)}}}}))
        with open(ws_root / "kpipe.toml", "a") as f:
            f.write('\n[ssh]\nconnect_timeout = 2\n\n[fleet]\ninventories = ["hosts.yml"]\n')
        _tamper(ws.store, art.sha256)
        r = _kpipe(ws_root, "rollout", "start", art.id, "--yes", "--skip-preflight", timeout=120)
        err = _one_line_error(r)
        assert r.returncode == 1 and "corrupt" in err, r.stdout + r.stderr
        with pytest.raises(BlockingIOError):  # nobody knocked
            listener.accept()
    finally:
        listener.close()


def test_store_reads_check_the_hash(tmp_path):
    from kpipe.errors import KpipeError
    from kpipe.store import Store

    store = Store(tmp_path / "s")
    digest = store.put_bytes(b"module bytes")
    assert store.get_bytes(digest) == b"module bytes"
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"module bytez")
    with pytest.raises(KpipeError, match="corrupt"):
        store.get_bytes(digest)
    with pytest.raises(KpipeError, match="corrupt"):
        store.verified_path(digest)
    assert store.put_bytes(b"module bytes") == digest  # storing the true bytes again repairs it
    assert store.get_bytes(digest) == b"module bytes"
    assert store.verified_path(digest) == path


# -- item 7: a locked or damaged store ------------------------------------------------------------------------

def _hold_write_lock(db: Path) -> subprocess.Popen:
    code = ("import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_locked_store_reads_go_on_and_a_writer_gives_up_naming_the_holder(ws_root, sample):
    ws, art = _valid_artifact(ws_root, sample)
    ws.store.close()
    holder = _hold_write_lock(ws.store.db_path)
    try:
        # read-only commands never take the write lock (the schema exists: it is not written again)
        r = _kpipe(ws_root, "artifacts", "list", "--json", timeout=40, KPIPE_STORE_WAIT="1")
        assert r.returncode == 0, r.stderr
        assert [a["id"] for a in json.loads(r.stdout)] == [art.id]
        r = _kpipe(ws_root, "artifacts", "show", art.id, timeout=40, KPIPE_STORE_WAIT="1")
        assert r.returncode == 0, r.stderr
        # a writer waits the bounded time, then exits 10 naming the holder
        r = _kpipe(ws_root, "validate", art.id, timeout=40, KPIPE_STORE_WAIT="1")
        err = _one_line_error(r)
        assert r.returncode == 10, r.stdout + r.stderr
        assert f"pid {holder.pid}" in err and str(ws.store.db_path) in err and "KPIPE_STORE_WAIT" in err
    finally:
        holder.kill()
        holder.wait()
    r = _kpipe(ws_root, "validate", art.id, timeout=40)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_store_wait_setting_is_one_line(ws_root):
    r = _kpipe(ws_root, "artifacts", "list", KPIPE_STORE_WAIT="soon")
    assert r.returncode == 4 and "KPIPE_STORE_WAIT" in _one_line_error(r)


def _populated_store(root: Path, sample) -> Path:
    ws, _art = _valid_artifact(root, sample)
    ws.store.close()
    db = ws.store.db_path
    c = sqlite3.connect(db)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return db


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "schemaless", "emptied-pages"])
def test_damaged_state_db_is_one_line_with_its_path(ws_root, sample, damage):
    db = _populated_store(ws_root, sample)
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(b"not a database at all\n" * 200)
    elif damage == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[:len(data) // 3])
    elif damage == "schemaless":  # a well-formed SQLite file with nothing of kpipe's in it
        db.unlink()
        c = sqlite3.connect(db)
        c.execute("PRAGMA user_version=7")
        c.close()
    else:  # the right header, every page after the first zeroed
        data = db.read_bytes()
        db.write_bytes(data[:4096] + bytes(len(data) - 4096))
    size = db.stat().st_size
    r = _kpipe(ws_root, "artifacts", "list")
    err = _one_line_error(r)
    assert r.returncode == 1, r.stdout + r.stderr
    assert str(db) in err and "hint: " in err, err
    assert db.stat().st_size == size  # not silently turned into a fresh store


def test_a_new_store_is_made_whole_and_reopened(tmp_path):
    from kpipe.store import Store

    store = Store(tmp_path / "s")
    store.ensure_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    with store.write() as c:
        c.execute("INSERT INTO t VALUES (1)")
    store.close()
    again = Store(tmp_path / "s")  # another process: no tables of its own yet, still a kpipe store
    assert again.query_one("SELECT count(*) AS n FROM t")["n"] == 1
    assert not list((tmp_path / "s").glob(".state.db.new-*"))


# -- item 14: a validation or preflight with other options changes nothing -------------------------------------

def test_trial_validation_with_another_cert_is_recorded_and_changes_nothing(ws_root, sample):
    from kpipe.artifacts import get_artifact, validation_records

    ws, art = _valid_artifact(ws_root, sample)
    _k, other_cert = make_signing_cert("p384")
    r = _kpipe(ws_root, "validate", art.id, "--cert", str(other_cert))
    err = _one_line_error(r)
    assert r.returncode == 3, r.stdout + r.stderr
    # the one-line summary names the first real error, not a skipped check
    assert "first: sig.present" in err, err
    assert "trial" in r.stdout
    assert get_artifact(ws.store, art.id).status == "valid"
    recs = validation_records(ws.store, art.id)
    assert [(x["own"], x["ok"]) for x in recs] == [(True, True), (False, False)]
    assert recs[1]["options"]["certs"] == [str(Path(other_cert).resolve())]
    # ... so it can still be signed
    r = _kpipe(ws_root, "sign", art.id, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["status"] == "valid"
    # validating with the artifact's own options again is its own validation
    r = _kpipe(ws_root, "validate", art.id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["own"] is True


def test_trial_with_looser_options_does_not_make_a_rejected_artifact_valid(tmp_path, sample):
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.validation import validate_and_record
    from kpipe.workspace import load_workspace

    release, ko = sample
    (tmp_path / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    ws = load_workspace(tmp_path)
    art = add_artifact(ws.store, ko, kernel=release)
    strict = validate_and_record(ws, art, strict=True)  # not the workspace's strictness: a trial
    assert get_artifact(ws.store, art.id).status == "built"
    other = validate_and_record(ws, art, kernel="6.1.0-1-arm64")  # another kernel: a trial
    assert not other.ok and get_artifact(ws.store, art.id).status == "built"
    assert validate_and_record(ws, art).ok
    assert get_artifact(ws.store, art.id).status == "valid"
    assert (strict.own, other.own) == (False, False)


def test_preflight_records_keep_the_passing_run_of_the_default_options(tmp_path):
    from kpipe.artifacts import add_artifact, get_artifact, preflight_records, record_preflight
    from kpipe.preflight import preflight_options
    from kpipe.rollout.planner import Candidate
    from kpipe.store import Store

    store = Store(tmp_path / "s")
    mod = tmp_path / "m.ko"
    mod.write_bytes(b"\x7fELF not really")
    art = add_artifact(store, mod, kernel="r", status="valid")
    default, sig = preflight_options(), preflight_options(sig_enforce=True)

    record_preflight(store, art.id, sig, {"status": "passed"})  # no default run yet: the last pass counts
    assert get_artifact(store, art.id).preflight["status"] == "passed"
    record_preflight(store, art.id, preflight_options(append="nokaslr"), {"status": "failed"})
    assert get_artifact(store, art.id).preflight["status"] == "passed"
    record_preflight(store, art.id, default, {"status": "passed"})
    record_preflight(store, art.id, sig, {"status": "failed", "problems": ["kernel: key rejected"]})
    art = get_artifact(store, art.id)
    assert art.preflight["status"] == "passed" and art.preflight["options"] == default
    assert Candidate.of(art).preflight == "passed"
    record_preflight(store, art.id, default, {"status": "failed"})  # the same options: the last run counts
    assert get_artifact(store, art.id).preflight["status"] == "failed"
    assert [r["status"] for r in preflight_records(store, art.id)] == ["passed", "failed", "passed", "failed",
                                                                      "failed"]


def test_failed_trial_preflight_command_keeps_the_passing_one(ws_root, sample, monkeypatch):
    """run_preflight's store path, with the VM boot replaced by a lab error (no VM on this path)."""
    from kpipe import preflight
    from kpipe.artifacts import get_artifact, update_artifact
    from kpipe.errors import KpipeError

    ws, art = _valid_artifact(ws_root, sample)
    # a passing preflight as an earlier kpipe stored it (before records were kept)
    update_artifact(ws.store, art.id, preflight={"status": "passed", "problems": [], "sig_enforce": False})

    def no_vm(*_a, **_k):
        raise KpipeError("no kernel image for the test")

    monkeypatch.setattr(preflight, "lab_kernel", no_vm)
    result = preflight.run_preflight(ws, art.id, sig_enforce=True)
    assert result["status"] == "failed"
    art = get_artifact(ws.store, art.id)
    assert art.preflight["status"] == "passed"
    from kpipe.artifacts import preflight_records

    recs = preflight_records(ws.store, art.id)
    assert [(r["options"]["sig_enforce"], r["status"]) for r in recs] == [(False, "passed"), (True, "failed")]


def test_preflight_refuses_a_tampered_blob_before_booting(ws_root, sample, monkeypatch):
    from kpipe import preflight
    from kpipe.artifacts import get_artifact
    from kpipe.errors import KpipeError

    ws, art = _valid_artifact(ws_root, sample)
    booted = []

    def no_vm(*a, **_k):
        booted.append(a)
        raise KpipeError("no VM in this test")

    monkeypatch.setattr(preflight, "lab_kernel", no_vm)
    _tamper(ws.store, art.sha256)
    with pytest.raises(KpipeError, match="corrupt"):
        preflight.run_preflight(ws, art.id)
    assert booted == [] and get_artifact(ws.store, art.id).preflight == {}


_RECIPE = """name: lp-demo
description: "demo for {{ kernel.release }}"
builder: kbuild
kernels: ["*"]
options:
  message: "patched by a kpipe test"
kbuild:
  module_name: livepatch-lp-demo
  sources:
    - template: templates/livepatch-cmdline.c.j2
      name: livepatch-lp-demo.c
  kbuild: templates/Kbuild.j2
"""


@pytest.mark.timeout(600)
def test_build_cache_hit_with_a_tampered_blob_fails_and_force_rebuilds(tmp_path, sample):
    import shutil

    from doubles.buildkit import write_workspace

    release, _ko = sample
    ws = write_workspace(tmp_path / "ws", [{"name": "local", "workdir": str(tmp_path / "work"), "slots": 1}],
                         [{"release": release, "arch": "x86_64", "headers": f"/usr/src/linux-headers-{release}"}])
    shutil.copytree(Path(__file__).resolve().parents[1] / "recipes" / "templates", ws.recipes_dir / "templates")
    (ws.recipes_dir / "lp-demo.yaml").write_text(_RECIPE)
    r = _kpipe(ws.root, "build", "--kernel", release, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)[0]
    from kpipe.artifacts import get_artifact

    art = get_artifact(ws.store, built["artifact_id"])
    data = bytearray(ws.store.blob_path(art.sha256).read_bytes())
    path = ws.store.blob_path(art.sha256)
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))

    r = _kpipe(ws.root, "build", "--kernel", release, "--json", timeout=300)
    res = json.loads(r.stdout)[0]
    assert r.returncode == 1 and res["status"] != "cached" and "corrupt" in res["message"], r.stdout + r.stderr
    r = _kpipe(ws.root, "build", "--kernel", release, "--force", "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    fresh = get_artifact(ws.store, json.loads(r.stdout)[0]["artifact_id"])
    r = _kpipe(ws.root, "build", "--kernel", release, "--json", timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["status"] == "cached", r.stdout + r.stderr
    ws.store.verified_path(fresh.sha256)
