"""Shared fixtures: real OpenSSH servers on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshd import SshdServer, keygen  # noqa: E402


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
