"""The CLI's entry point: version, python -m, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kpipe

REPO = Path(__file__).resolve().parent.parent


def kpipe_run(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    env.pop("KPIPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_version_via_python_dash_m():
    r = kpipe_run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kpipe {kpipe.__version__}"


def test_unknown_option_is_a_usage_error_without_traceback():
    r = kpipe_run("rollout", "rollback", "last", "--no-such-flag")
    assert r.returncode == 2
    assert "No such option" in r.stderr and "Traceback" not in r.stderr


def test_missing_workspace_is_one_line_with_hint_and_exit_4(tmp_path):
    r = kpipe_run("recipe", "list", cwd=tmp_path, env_extra={"KPIPE_WORKSPACE": ""})
    assert r.returncode == 4
    assert r.stderr.startswith("kpipe: error: no kpipe.toml") and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_workspace_names_the_file(tmp_path):
    (tmp_path / "kpipe.toml").write_text("[[build_hosts]]\nname = 'x'\nslots = 'many'\n")
    r = kpipe_run("kernels", "list", cwd=tmp_path, env_extra={"KPIPE_WORKSPACE": ""})
    assert r.returncode == 4
    assert f"{tmp_path / 'kpipe.toml'}:3: build_hosts[0].slots must be an integer" in r.stderr


def test_exit_code_of_a_failing_command_is_kept(tmp_path):
    # an unknown artifact: NotFoundError -> 5
    r = kpipe_run("artifacts", "show", "abcdef123456")
    assert r.returncode == 5 and "no artifact" in r.stderr


import pytest  # noqa: E402


@pytest.mark.parametrize("args, message", [
    (("build",), "give --kernel RELEASE"),
    (("build", "--all-kernels", "--kernel", "5.10.0-amd64-UOS"), "--all-kernels goes with --recipe NAME"),
    (("build", "--recipe", "cmdline-demo"), "which kernels should recipe 'cmdline-demo' be built for?"),
    (("sign", "x.ko", "--key", "k.pem"), "--key and --cert go together"),
    (("keys", "generate", "--signer", "lab", "--key", "k", "--cert", "c"), "not both"),
])
def test_usage_errors_kpipe_checks_itself_exit_2(tmp_path, args, message):
    r = kpipe_run(*args, cwd=tmp_path)  # no workspace needed to say how the command is used
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("kpipe: error: ") and message in r.stderr and "Traceback" not in r.stderr
