"""kpipe init: a new user's workspace from nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kpipe.errors import ConfigError
from kpipe.init import WORKSPACE_FILES, init_workspace, kernel_glob
from kpipe.recipes import list_recipes
from kpipe.workspace import load_workspace


@pytest.mark.parametrize("release, glob", [
    ("6.1.0-998-amd64", "6.1.*-amd64"),  # parser test data: releases that never have to exist
    ("6.1.0-998-rt-amd64", "6.1.*-rt-amd64"),
    ("5.10.0-32-cloud-arm64", "5.10.*-cloud-arm64"),
    ("5.10.0-amd64-UOS", "5.10.0-amd64-UOS"),        # not Debian's scheme: the exact release
    ("4.19.90-24.4.v2101.ky10.aarch64", "4.19.90-24.4.v2101.ky10.aarch64"),
])
def test_kernel_globs_survive_debian_abi_bumps(release, glob):
    assert kernel_glob(release) == glob


def test_init_writes_a_workspace_that_loads_and_lints(tmp_path):
    result = init_workspace(tmp_path / "ws", ["6.1.0-998-amd64", "6.1.0-999-amd64"], arch="amd64")
    assert sorted(result.written) == sorted(WORKSPACE_FILES) and result.globs == ["6.1.*-amd64"]
    ws = load_workspace(tmp_path / "ws")
    assert ws.build_host("local").arch == "x86_64" and ws.default_signer == "lab"
    assert ws.signers["lab"].type == "builtin" and not ws.signers["lab"].key.startswith("/")
    recipes = list_recipes(ws)
    assert [r.name for r in recipes] == ["cmdline-demo"]
    assert recipes[0].kernels == ("6.1.*-amd64",)


def test_init_never_overwrites_a_workspace(tmp_path):
    (tmp_path / "kpipe.toml").write_text("# mine\n")
    with pytest.raises(ConfigError, match="already exists"):
        init_workspace(tmp_path, [])
    assert (tmp_path / "kpipe.toml").read_text() == "# mine\n"
    init_workspace(tmp_path, [], force=True)
    assert "[[build_hosts]]" in (tmp_path / "kpipe.toml").read_text()


def test_init_command_in_an_empty_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_WORKSPACE"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "init", "new"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "kpipe.toml").is_file() and (tmp_path / "new" / "patches").is_dir()
    lint = subprocess.run([sys.executable, "-m", "kpipe", "recipe", "lint"], cwd=tmp_path / "new",
                          capture_output=True, text=True, env=env, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_command_without_a_workspace_points_at_kpipe_init(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_WORKSPACE"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "artifacts", "list"], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 4
    assert r.stderr.splitlines()[0] == f"kpipe: error: no kpipe.toml in {tmp_path} or any parent folder"
    assert "kpipe init" in r.stderr


def test_inventory_paths_are_the_users_relative_to_the_current_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_WORKSPACE"}
    (tmp_path / "hosts.ini").write_text("[web]\nweb1 ansible_host=127.0.0.1\n")
    alone = subprocess.run([sys.executable, "-m", "kpipe", "fleet", "list", "-i", "hosts.ini", "--json"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert alone.returncode == 0, alone.stderr  # no workspace needed with -i
    assert [h["name"] for h in json.loads(alone.stdout)["hosts"]] == ["web1"]
    init_workspace(tmp_path / "ws", [])
    sub = tmp_path / "ws" / "inventories"
    sub.mkdir()
    (sub / "db.ini").write_text("[db]\ndb1 ansible_host=127.0.0.2\n")
    inside = subprocess.run([sys.executable, "-m", "kpipe", "fleet", "list", "-i", "db.ini", "--json"],
                            cwd=sub, capture_output=True, text=True, env=env, timeout=120)
    assert inside.returncode == 0, inside.stderr  # db.ini is here, not at the workspace root
    assert [h["name"] for h in json.loads(inside.stdout)["hosts"]] == ["db1"]
