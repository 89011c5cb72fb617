"""An installed wheel carries every file kpipe reads at run time (templates, lab and init assets, the
Ansible step playbook): nothing is found through the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("kpipe-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_the_wheel_ships_the_step_playbook(wheel_files):
    assert "kpipe/ansible_assets/playbooks/kpipe-step.yml" in wheel_files


def test_every_package_data_file_the_code_reads_is_in_the_wheel(wheel_files):
    for folder in ("report/templates", "lab_assets", "init_assets", "ansible_assets/playbooks"):
        files = [p for p in (REPO / "kpipe" / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        for p in files:
            assert str(p.relative_to(REPO)) in wheel_files, p


def test_the_repositorys_ansible_folder_shows_the_shipped_playbook():
    from kpipe.transport.ansible import ANSIBLE_DIR, STEP_PLAYBOOK

    shipped = ANSIBLE_DIR / STEP_PLAYBOOK
    assert shipped.is_file() and REPO / "kpipe" in shipped.resolve().parents
    assert (REPO / "ansible" / "playbooks" / "kpipe-step.yml").read_bytes() == shipped.read_bytes()
