"""Rollouts on real kernels: lab VMs booted with `kpipe lab up`, a real livepatch module (cmdline demo).

One lab for the whole module (session fixture): lab1-lab3 are plain, lab4 boots with
module.sig_enforce=1. Every test leaves the VMs as it found them (rolled back).

Kill point used here: tests/crashpoint.py runs the CLI with the journal wrapped (test code
only) so every host is held right after its load is journaled as done, and kpipe is SIGKILLed
when the last one arrives: between load and verification, at a known point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kenv

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "tests" / "data" / "livepatch_demo"
TEXT = "kpipe live patch active"
MODULE = "livepatch_demo"


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), env: dict | None = None,
       timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m kpipe -W ws ...` like a user would; assert the exit code."""
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})}, cwd=ws)
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def on_vm(ws: Path, vm: str, *cmd: str) -> str:
    return kp(ws, "lab", "ssh", vm, "--", *cmd, timeout=120).stdout


def cmdline(ws: Path, vm: str) -> str:
    return on_vm(ws, vm, "cat", "/proc/cmdline").strip()


def livepatch_dirs(ws: Path, vm: str) -> str:
    return on_vm(ws, vm, "sh", "-c",
                 "ls /sys/kernel/livepatch 2>/dev/null; ls -d /sys/module/livepatch_* 2>/dev/null; true")


def build_module(out: Path, headers: Path) -> Path:
    src = out / "src"
    shutil.copytree(DEMO, src)
    c = src / "livepatch_demo.c"
    c.write_text(f'#define KPIPE_TEXT "{TEXT}"\n' + c.read_text())
    subprocess.run(["make", "-C", str(headers), f"M={src}", "modules"], check=True,
                   capture_output=True, timeout=600)
    return src / "livepatch_demo.ko"


def sign_with_unknown_key(ko: Path, out: Path, sign_file: Path) -> Path:
    """Sign with a fresh key the VM's kernel does not hold: sig_enforce=1 must refuse it."""
    key, crt = out / "key.pem", out / "cert.der"
    subprocess.run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "2", "-batch", "-x509",
                    "-subj", "/CN=kpipe test unknown key", "-outform", "DER", "-out", str(crt), "-keyout", str(key),
                    "-newkey", "rsa:2048"], check=True, capture_output=True)
    signed = out / "signed" / ko.name
    signed.parent.mkdir()
    subprocess.run([str(sign_file), "sha256", str(key), str(crt), str(ko), str(signed)],
                   check=True, capture_output=True)
    return signed


@pytest.fixture(scope="session")
def lab(tmp_path_factory, kernel_env):
    """A workspace with 4 lab VMs (lab4: module.sig_enforce=1) and two artifacts (unsigned, signed)."""
    kenv.require_tool("qemu-system-x86_64")
    release = kernel_env.release
    ws = tmp_path_factory.mktemp("rollout-vm")
    (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    shutil.copytree(REPO / "recipes", ws / "recipes")
    ko = build_module(ws, kernel_env.headers)
    signed = sign_with_unknown_key(ko, ws, kernel_env.sign_file)
    from kpipe.artifacts import add_artifact
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    plain = add_artifact(store, ko, kernel=release, status="valid", recipe="cmdline-demo", arch="x86_64",
                         module_name=MODULE)
    sig = add_artifact(store, signed, kernel=release, status="valid", recipe="cmdline-demo", arch="x86_64",
                       module_name=MODULE, signed=True, parent_id=plain.id)
    store.close()
    try:
        kp(ws, "lab", "up", "--kernel", release, "--vms", "4", "--sig-enforce-vms", "lab4", timeout=1200)
        yield {"ws": ws, "plain": plain.id, "signed": sig.id, "release": release}
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), "lab", "down"], capture_output=True,
                       timeout=300)


def status(ws: Path, rid: str = "last") -> dict:
    return json.loads(kp(ws, "rollout", "status", rid, "--json").stdout)


def journal(ws: Path, rid: str) -> list[dict]:
    from kpipe.rollout.journal import Journal
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    try:
        return [e.__dict__ for e in Journal(store).entries(rid)]
    finally:
        store.close()


def assert_clean(ws: Path, vms=("lab1", "lab2", "lab3", "lab4")) -> None:
    for vm in vms:
        assert TEXT not in cmdline(ws, vm), vm
        assert "console=" in cmdline(ws, vm)
        assert "livepatch_demo" not in livepatch_dirs(ws, vm), vm


def test_plan_refuses_without_preflight(lab):
    ws = lab["ws"]
    r = kp(ws, "rollout", "start", lab["plain"], "--limit", "lab1:lab2:lab3", "--yes", ok=(9,))
    assert "preflight" in r.stderr
    r = kp(ws, "rollout", "plan", lab["plain"], "--limit", "lab1:lab2:lab3:lab4", "--json")
    plan = json.loads(r.stdout)
    reasons = {e["host"]: e["reason"] for e in plan["excluded"]}
    assert "not preflighted" in reasons["lab1"]
    # with --skip-preflight lab4 (sig_enforce) is still excluded for the unsigned module, with its reason
    r = kp(ws, "rollout", "plan", lab["plain"], "--limit", "lab1:lab2:lab3:lab4", "--skip-preflight", "--json")
    plan = json.loads(r.stdout)
    assert [e["host"] for e in plan["excluded"]] == ["lab4"] and "unsigned" in plan["excluded"][0]["reason"]


def test_waves_of_one_then_two_then_rollback(lab):
    ws = lab["ws"]
    r = kp(ws, "rollout", "start", lab["plain"], "--limit", "lab1:lab2:lab3", "--waves", "1,100%",
           "--skip-preflight", "--yes", "--json")
    summary = json.loads(r.stdout)
    rid = summary["rollout_id"]
    assert summary["state"] == "completed"
    assert summary["hosts"] == {"lab1": "applied", "lab2": "applied", "lab3": "applied"}
    for vm in ("lab1", "lab2", "lab3"):
        assert cmdline(ws, vm) == TEXT
        assert "livepatch_demo" in livepatch_dirs(ws, vm)
    # wave 1 (one canary) was verified and gated before wave 2 touched anything
    entries = journal(ws, rid)
    gate1 = next(e["seq"] for e in entries if e["step"] == "gate" and e["wave"] == 1)
    assert [e["host"] for e in entries if e["step"] == "load" and e["phase"] == "done" and e["seq"] < gate1] == ["lab1"]
    assert {e["host"] for e in entries if e["step"] == "load" and e["seq"] > gate1} == {"lab2", "lab3"}
    r = kp(ws, "rollout", "rollback", rid, "--json")
    assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
    assert status(ws, rid)["state"] == "rolled_back"
    assert_clean(ws)


def test_sig_enforce_refusal_halts_and_rolls_back(lab):
    ws = lab["ws"]
    # signed by a key the kernel does not hold: plain VMs load it (tainted), lab4 refuses it
    r = kp(ws, "rollout", "start", lab["signed"], "--limit", "lab1:lab2:lab4", "--waves", "1,100%",
           "--rollback-policy", "all", "--skip-preflight", "--yes", "--json", ok=(8,))
    summary = json.loads(r.stdout)
    assert summary["state"] == "rolled_back"
    assert summary["hosts"] == {"lab1": "rolled_back", "lab2": "rolled_back", "lab4": "rolled_back"}
    assert "lab4" in summary["halt_reason"]
    entries = journal(ws, summary["rollout_id"])
    failed_load = [e for e in entries if e["host"] == "lab4" and e["step"] == "load" and e["phase"] == "failed"]
    assert failed_load and "rejected" in json.dumps(failed_load[0]["detail"]).lower()
    assert_clean(ws)


def test_sigkill_between_load_and_verify_then_resume(lab):
    ws = lab["ws"]
    hold = json.dumps({"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 3, "hold": True})
    crashpoint = str(Path(__file__).with_name("crashpoint.py"))
    p = subprocess.Popen([sys.executable, crashpoint, hold, "-W", str(ws), "rollout", "start", lab["plain"],
                          "--limit", "lab1:lab2:lab3", "--waves", "100%", "--skip-preflight", "--yes"],
                         cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused = set()
    deadline = time.monotonic() + 600
    try:
        while len(paused) < 3 and time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            if line.startswith("crashpoint: ") and " record " in line:
                paused.add(line.split(" record ", 1)[1].split()[0])
        assert paused == {"lab1", "lab2", "lab3"}
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    st = status(ws)
    rid = st["id"]
    assert st["state"] == "running" and set(st["hosts"].values()) == {"interrupted"}
    for vm in ("lab1", "lab2", "lab3"):  # loaded, not yet verified by kpipe
        assert cmdline(ws, vm) == TEXT
    r = kp(ws, "rollout", "resume", rid, "--json")
    summary = json.loads(r.stdout)
    assert summary["state"] == "completed"
    assert summary["hosts"] == {"lab1": "applied", "lab2": "applied", "lab3": "applied"}
    entries = journal(ws, rid)
    for vm in ("lab1", "lab2", "lab3"):
        loads = [e for e in entries if e["host"] == vm and e["step"] == "load" and e["phase"] == "done"]
        assert [e["detail"]["changed"] for e in loads] == [True, False]  # loaded once; resume found it loaded
        assert any(e["host"] == vm and e["step"] == "verify" and e["phase"] == "done" for e in entries)
        assert cmdline(ws, vm) == TEXT
    # the build the kernel shows (its GNU build-id note) is the artifact's, and the journal recorded it
    from kpipe.artifacts import get_artifact
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    try:
        blob = store.blob_path(get_artifact(store, lab["plain"]).sha256)
    finally:
        store.close()
    want = subprocess.run(["readelf", "-n", str(blob)], capture_output=True, text=True,
                          check=True).stdout.split("Build ID:")[1].split()[0]
    raw = on_vm(ws, "lab1", "od", "-An", "-v", "-tx1", "/sys/module/livepatch_demo/notes/.note.gnu.build-id")
    assert want in "".join(raw.split())
    outcome = [e for e in entries if e["host"] == "lab1" and e["step"] == "outcome"][-1]
    assert outcome["detail"]["build_id"] == want
    kp(ws, "rollout", "rollback", rid)
    assert_clean(ws)
