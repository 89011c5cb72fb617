"""Shared fixtures: the installed kernel headers (tests/kenv.py) and real OpenSSH servers on loopback.

KPIPE_REQUIRE_REAL=1 (.ci/run sets it) makes every environment skip a failure: the
helpers in kenv.py fail instead of skipping, and any skip that still reaches a report
is turned into a failure naming its reason, so a CI run can only end with 0 skipped.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import kenv  # noqa: E402

# The Ctrl-C tests send SIGINT to kpipe as a terminal would. A suite started in the background of a
# non-interactive shell (`bash .ci/run &`, nohup) inherits SIGINT *ignored*, and an ignored signal stays
# ignored across exec: every kpipe the tests start would then shrug off their Ctrl-C. A handler (unlike
# SIG_IGN) is reset to the default by exec, so kpipe starts with SIGINT as an operator's shell gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
from kenv import KernelEnv, require_or_skip  # noqa: E402,F401  (require_or_skip: the one skip helper)
from sshd import SshdServer, keygen  # noqa: E402


@pytest.fixture(scope="session")
def kernel_env() -> KernelEnv:
    """The installed kernel headers (newest, or KPIPE_TEST_KERNEL): release, headers tree, sign-file."""
    return kenv.kernel_env()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under KPIPE_REQUIRE_REAL=1 a skip of any origin (skipif, importorskip, a plugin) fails the test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and kenv.require_real() and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"{kenv.REQUIRE_ENV}=1 and the test was skipped: {reason}"


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One client key pair for the whole session."""
    return keygen(tmp_path_factory.mktemp("client") / "id_ed25519")


@pytest.fixture
def sshd_factory(tmp_path_factory: pytest.TempPathFactory, client_key: Path) -> Iterator:
    """Start real sshd servers: `sshd_factory(extra_config="")` -> SshdServer; all stopped at teardown."""
    servers: list[SshdServer] = []

    def start(**kw) -> SshdServer:
        server = SshdServer.start(tmp_path_factory.mktemp("sshd"), client_key=client_key, **kw)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def sshd(sshd_factory) -> SshdServer:
    """One real sshd on a loopback port."""
    return sshd_factory()


@pytest.fixture(scope="session")
def debian_lab(tmp_path_factory: pytest.TempPathFactory, kernel_env: KernelEnv) -> Iterator:
    """One `kpipe lab up --rootfs debian` VM (lab1) + the cmdline demo artifact, for the whole session."""
    from rootfs_lab import rootfs_lab

    yield from rootfs_lab(tmp_path_factory, kernel_env, "debian")


@pytest.fixture(scope="session")
def selinux_lab(tmp_path_factory: pytest.TempPathFactory, kernel_env: KernelEnv) -> Iterator:
    """One `kpipe lab up --rootfs debian-selinux` VM (lab1) + the cmdline demo artifact."""
    from rootfs_lab import rootfs_lab

    yield from rootfs_lab(tmp_path_factory, kernel_env, "debian-selinux")
