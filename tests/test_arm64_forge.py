"""The forged arm64 kernel, real: Debian sid's linux-source-7.2 cross-compiled in a sid chroot (marker `forge`).

Built once and cached (tests/arm64_support.py); the first run on a machine takes most of an hour on 2 busy cores.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import ARM64_SOURCE, forged_arm64, kp  # noqa: E402, F401  (fixtures)
from kpipe.elf.programs import elf_machine  # noqa: E402
from kpipe.forged import ForgedKernel  # noqa: E402
from kpipe.lab.forge import FORGE_TARGETS, check_fragment, dropped_options, forge, parse_config, parse_source  # noqa: E402
from kpipe.lab.kernel import image_arch  # noqa: E402

pytestmark = [pytest.mark.forge, pytest.mark.timeout(7200)]


def test_no_option_of_the_arm64_fragment_was_dropped(forged_arm64: ForgedKernel):
    frag_name = FORGE_TARGETS["aarch64"].fragment
    frag = check_fragment(resources.files("kpipe").joinpath("lab_assets", frag_name).read_text(), frag_name)
    final = parse_config(forged_arm64.config.read_text())
    assert dropped_options(final, frag) == []
    for name in ("ARM64", "LIVEPATCH", "HAVE_LIVEPATCH", "HAVE_RELIABLE_STACKTRACE", "DYNAMIC_FTRACE_WITH_ARGS",
                 "MODULE_SIG", "SERIAL_AMBA_PL011_CONSOLE", "VIRTIO_NET", "DEBUG_INFO"):
        assert final.get(f"CONFIG_{name}") == "y", name
    assert final["CONFIG_SYSTEM_TRUSTED_KEYS"] == '"certs/kpipe-lab-cert.pem"'


def test_the_forged_arm64_kernel_is_arm64_through_and_through(forged_arm64: ForgedKernel):
    assert forged_arm64.arch == "aarch64"
    assert forged_arm64.boot_image.name == "Image" and image_arch(forged_arm64.boot_image) == "aarch64"
    assert image_arch(forged_arm64.folder / "Image.gz") == "aarch64"
    assert elf_machine(forged_arm64.vmlinux) == "EM_AARCH64"
    record = json.loads((forged_arm64.folder / "forge.json").read_text())
    assert record["arch"] == "aarch64" and record["source"] == ARM64_SOURCE
    assert record["gcc"].startswith("aarch64-linux-gnu-gcc")  # the suite's cross gcc built it
    vmlinux = forged_arm64.vmlinux.read_bytes()
    assert forged_arm64.release.encode() in vmlinux
    assert (forged_arm64.modules_dir / "modules.order").is_file()


def test_forging_arm64_again_is_a_cache_hit_and_x86_64_has_its_own_key(forged_arm64: ForgedKernel, tmp_path):
    again = forge(parse_source(ARM64_SOURCE), arch="aarch64")
    assert again.folder == forged_arm64.folder and again.release == forged_arm64.release
    out = json.loads(kp(tmp_path, "lab", "forge", "--source", ARM64_SOURCE, "--arch", "arm64", "--json").stdout)
    assert out["release"] == forged_arm64.release and out["arch"] == "aarch64"
    assert out["boot_image"].endswith("/Image")


def test_the_arm64_kernel_is_aarch64_in_the_catalog(forged_arm64: ForgedKernel, tmp_path):
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    rows = {r["release"]: r for r in json.loads(kp(tmp_path, "kernels", "list", "--json").stdout)}
    assert rows[forged_arm64.release]["arch"] == "aarch64"
