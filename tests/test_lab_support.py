"""Shared fixtures of the real-kernel tests: one lab for the session, the demo livepatch module.

Imported by tests/test_lab.py, tests/test_livepatch_ops.py and tests/test_preflight.py.
Every VM is stopped in a finalizer (also when a test fails), and at the end of
the session no qemu process this session started may remain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kenv
from kpipe.lab import Lab, LabState
from kpipe.lab import vm as vmmod

DATA = Path(__file__).parent / "data"
DEMO_SOURCE = DATA / "livepatch_demo"
DEMO_TEXT = "kpipe livepatch demo"


def headers_release() -> str:
    """The release of the installed headers (tests/kenv.py); the shared lab boots the same kernel."""
    return kenv.kernel_env().release


def kpipe_cli(workspace: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `kpipe` console script in a workspace."""
    env = dict(os.environ, KPIPE_WORKSPACE=str(workspace), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build_demo_module(dest: Path, release: str, *, text: str = DEMO_TEXT) -> Path:
    """Build tests/data/livepatch_demo against the installed headers (like lab.md); return the .ko."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(DEMO_SOURCE, dest)
    headers = Path(f"/usr/src/linux-headers-{release}")
    if not headers.is_dir():
        kenv.require_or_skip(f"no kernel headers at {headers} (install linux-headers-{release})")
    r = subprocess.run(["make", "-s", "-C", str(headers), f"M={dest}",
                        f"KPIPE_CFLAGS=-DKPIPE_TEXT='\"{text}\"'", "modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return dest / "livepatch_demo.ko"


def altered_vermagic(module: Path, dest: Path) -> Path:
    """A copy of module whose vermagic flags say PREEMPT instead of preempt (same length, .modinfo edited)."""
    data = module.read_bytes()
    i = data.find(b"vermagic=")
    assert i >= 0
    end = data.index(b"\0", i)
    magic = data[i:end]
    assert b" preempt " in magic, magic
    dest.write_bytes(data[:i] + magic.replace(b" preempt ", b" PREEMPT ") + data[end:])
    return dest


def qemu_alive(pid: int, start_time: int) -> bool:
    return vmmod.proc_start_time(pid) == start_time


@dataclass
class SharedLab:
    """The session's lab: lab1 plain, lab2 with module.sig_enforce=1 (booted with `kpipe lab up`)."""

    workspace: Path
    lab: Lab
    state: LabState


_SEEN: list[tuple[int, int]] = []  # (pid, start time) of every qemu the session's labs recorded


def remember(st: LabState | None) -> None:
    """Record a lab's PIDs for the end-of-session check."""
    if st is not None:
        _SEEN.extend((v.pid, v.start_time) for v in st.vms)


# Each test module that imports these fixtures gets its own copy of every session
# fixture (pytest registers fixtures per module), so the expensive resources are
# shared through these module globals with reference counts: the last user stops them.
_GUARDS = [0]
_LAB: dict[str, object] = {"users": 0, "value": None, "ws": None}


@pytest.fixture(scope="session")
def qemu_guard() -> Iterator[None]:
    """At the end of the session, no qemu started by this session is alive."""
    _GUARDS[0] += 1
    yield
    _GUARDS[0] -= 1
    if _GUARDS[0] > 0 or _LAB["users"]:
        return  # another module's copy of this fixture checks at the very end
    left = [(v.pid, v.name) for v in vmmod.STARTED if vmmod.alive(v)]
    left += [(pid, "recorded") for pid, st in _SEEN if qemu_alive(pid, st)]
    for v in vmmod.STARTED:  # never leave them behind, even when the assertion fails
        vmmod.stop(v)
    assert not left, f"qemu processes left running: {left}"


@pytest.fixture(scope="session")
def demo_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo livepatch built against the installed headers."""
    return build_demo_module(tmp_path_factory.mktemp("demo") / "src", headers_release())


@pytest.fixture(scope="session")
def shared_lab(tmp_path_factory: pytest.TempPathFactory, qemu_guard: None) -> Iterator[SharedLab]:
    """Two VMs of the current Debian kernel, booted once per session through the CLI."""
    _LAB["users"] += 1  # type: ignore[operator]
    try:
        if _LAB["value"] is None:
            _LAB["value"] = _boot_shared_lab(tmp_path_factory)
        yield _LAB["value"]  # type: ignore[misc]
    finally:
        _LAB["users"] -= 1  # type: ignore[operator]
        if not _LAB["users"]:
            _stop_shared_lab()


def _boot_shared_lab(tmp_path_factory: pytest.TempPathFactory) -> SharedLab:
    ws = tmp_path_factory.mktemp("labws")
    (ws / "kpipe.toml").write_text("# lab test workspace\n")
    _LAB["ws"] = ws
    lab = Lab(ws / ".lab")
    r = kpipe_cli(ws, "lab", "up", "--kernel", headers_release(), "--vms", "2", "--sig-enforce-vms", "lab2",
                  timeout=900)
    remember(lab.load_state())
    if r.returncode != 0:
        _stop_shared_lab()
        pytest.fail(f"kpipe lab up failed ({r.returncode}): {r.stderr}{r.stdout}")
    return SharedLab(ws, lab, lab.require_state())


def _stop_shared_lab() -> None:
    ws = _LAB["ws"]
    if ws is None:
        return
    lab = Lab(Path(ws) / ".lab")  # type: ignore[arg-type]
    remember(lab.load_state())
    kpipe_cli(Path(ws), "lab", "down", timeout=120)  # type: ignore[arg-type]
    lab.down()  # idempotent fallback (PID + start time checked)
    _LAB["value"] = None
    _LAB["ws"] = None
