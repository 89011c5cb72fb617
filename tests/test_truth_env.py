"""The test environment itself (tests/kenv.py, tests/conftest.py): which headers the suite uses, and that
KPIPE_REQUIRE_REAL=1 turns every environment skip into a failure naming what is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kenv

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def fake_headers(root: Path, release: str, *, makefile: bool = True, sign_file: bool = True,
                 symvers: bool = True) -> Path:
    """A /usr/src/linux-headers-<release> shape: Makefile, Module.symvers, scripts/sign-file."""
    d = root / f"linux-headers-{release}"
    (d / "scripts").mkdir(parents=True)
    if makefile:
        (d / "Makefile").write_text("include ../Makefile\n")
    if symvers:
        (d / "Module.symvers").write_text("0x00000001\tseq_printf\tvmlinux\tEXPORT_SYMBOL\t\n")
    if sign_file:
        (d / "scripts" / "sign-file").write_bytes(b"\x7fELF")
    return d


def test_the_newest_installed_headers_win_numerically(tmp_path, monkeypatch):
    monkeypatch.delenv(kenv.OVERRIDE_ENV, raising=False)
    for r in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-10-rt-amd64", "5.10.0-30-amd64"):
        fake_headers(tmp_path, r)
    fake_headers(tmp_path, "6.1.0-11-amd64", sign_file=False)  # no linux-kbuild: not usable
    fake_headers(tmp_path, "6.1.0-12-amd64", symvers=False)  # the -common half: not a kernel
    (tmp_path / "linux-headers-6.1.0-10-common").mkdir()
    got = kenv.discover(None, (tmp_path,))
    assert got.release == "6.1.0-10-amd64"  # 10 > 9 (not string order), plain flavour over rt
    assert got.headers == tmp_path / "linux-headers-6.1.0-10-amd64"
    assert got.sign_file == (got.headers / "scripts" / "sign-file").resolve()
    assert got.vermagic.startswith("6.1.0-10-amd64 SMP ")
    assert kenv.discover(None, (tmp_path,)) == got  # the same answer every time


def test_an_override_pins_another_installed_release(tmp_path):
    for r in ("6.1.0-56-amd64", "6.1.0-57-amd64"):
        fake_headers(tmp_path, r)
    assert kenv.discover("6.1.0-56-amd64", (tmp_path,)).release == "6.1.0-56-amd64"
    with pytest.raises(kenv.KernelEnvMissing, match=r"KPIPE_TEST_KERNEL=6\.1\.0-55-amd64 .*installed: "
                                                    r"6\.1\.0-56-amd64, 6\.1\.0-57-amd64"):
        kenv.discover("6.1.0-55-amd64", (tmp_path,))


def test_no_usable_headers_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(kenv.OVERRIDE_ENV, raising=False)
    fake_headers(tmp_path, "6.1.0-57-amd64", sign_file=False)
    with pytest.raises(kenv.KernelEnvMissing, match="sign-file is missing .*install linux-headers-amd64"):
        kenv.discover(None, (tmp_path,))


@pytest.mark.parametrize("release, delta, want, glob", [
    ("6.1.0-57-amd64", -1, "6.1.0-56-amd64", "6.1.0-56-*"),
    ("6.1.0-57-amd64", 1, "6.1.0-58-amd64", "6.1.0-58-*"),
    ("6.1.0-1-amd64", -1, "6.1.0-2-amd64", "6.1.0-2-*"),  # never ABI 0 or below: step the other way
    ("6.1.0-57-rt-amd64", -1, "6.1.0-56-rt-amd64", "6.1.0-56-*"),
])
def test_another_release_is_derived_from_the_discovered_one(release, delta, want, glob):
    assert kenv.other_release(release, delta) == want
    assert kenv.KernelEnv(release, Path("/x"), Path("/y")).other_release(delta) == want
    assert kenv.KernelEnv(release, Path("/x"), Path("/y")).abi_glob(want) == glob


def test_the_session_fixture_is_the_discovered_headers(kernel_env):
    assert kernel_env == kenv.discover()
    assert (kernel_env.headers / "Module.symvers").is_file() and kernel_env.sign_file.is_file()
    assert kernel_env.uninstalled_release() != kernel_env.release


SKIPPING = '''
import shutil
import pytest
import kenv

@pytest.mark.skipif(True, reason="the widget tool is not installed")
def test_skipif():
    pass

def test_helper():
    kenv.require_or_skip("the gadget service is missing")

def test_importorskip():
    pytest.importorskip("kpipe_no_such_module_xyz")

def test_module():
    kenv.require_module("kpipe_no_such_module_abc")

def test_passes():
    assert shutil.which("sh")
'''


def _run_suite(tmp_path: Path, require: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    # the suite's conftest, loaded under its own name (this folder's conftest only forwards to it)
    (tmp_path / "conftest.py").write_text(
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('kpipe_suite_conftest', {str(TESTS / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "pytest_runtest_makereport = mod.pytest_runtest_makereport\n")
    env = {k: v for k, v in os.environ.items() if k != kenv.REQUIRE_ENV}
    if require:
        env[kenv.REQUIRE_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p",
                           "no:randomly", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_require_real_a_missing_environment_skips(tmp_path):
    r = _run_suite(tmp_path, require=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 4 skipped" in r.stdout, r.stdout


def test_require_real_fails_every_environment_skip_naming_it(tmp_path):
    r = _run_suite(tmp_path, require=True)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    # a skipif fires at setup, so it fails as an error; the others fail in the call
    assert "skipped" not in last and re.match(r"3 failed, 1 passed, 1 error in ", last), last
    for what in ("the widget tool is not installed", "the gadget service is missing", "kpipe_no_such_module_xyz",
                 "kpipe_no_such_module_abc"):
        assert what in r.stdout, (what, r.stdout)
