"""The forge's klp-build pieces (pure): chroot packages by version, the build's flags, klp-tmp/1-orig priming."""

from __future__ import annotations

from pathlib import Path

from kpipe.forged import _tree_builder
from kpipe.lab import forge


def test_klp_build_packages_only_for_kernels_that_carry_it():
    assert forge.klp_build_packages("6.12") == ()  # trixie's chroot (and the 6.12 cache key) unchanged
    assert forge.klp_build_packages("6.18") == ()
    pkgs = forge.klp_build_packages("7.2")
    assert "libxxhash-dev" in pkgs and "patchutils" in pkgs  # objtool klp, klp-build's recountdiff
    assert forge.klp_build_packages("6.19") == pkgs
    assert forge.klp_build_packages("7.2", "aarch64") == ()  # only x86_64 selects HAVE_KLP_BUILD


def test_sid_chroots_accept_a_release_file_past_its_valid_until():
    argv = forge.mmdebstrap_argv("sid", Path("/c/root"), "http://m/debian", ("bc",))
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in argv
    assert argv[-3:] == ["sid", "/c/root", "http://m/debian"]


def test_klp_build_flags_match_the_tools_own_build():
    argv = forge.klp_make_argv(["vmlinux", "bzImage", "modules"], 2, src=Path("/k/src"))
    assert "KCFLAGS=-ffunction-sections -fdata-sections" in argv and "KLP_SYMIDS=1" in argv
    assert "KBUILD_MODPOST_WARN=1" in argv
    assert not any(a.startswith("ARCH=") for a in argv)  # klp-build's make runs without ARCH


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for rel in ("vmlinux.o", "vmlinux", "fs/proc/cmdline.o", "drivers/x/foo.o", "drivers/x/foo.ko",
                "net/a.ko/b/bar.o", "net/a.ko/b/bar.ko", "klp-tmp/old/zap.ko", ".git/x.ko", "rootmod.ko"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    return src


def test_orig_objects_are_klp_builds_find(tmp_path):
    src = _tree(tmp_path)
    # vmlinux.o and each module's .o (first ".ko" replaced); klp-tmp, .git and root-level .ko pruned
    assert forge.klp_orig_objects(src) == ["drivers/x/foo.o", "net/a.o/b/bar.ko", "vmlinux.o"]


def test_prime_lays_out_klp_builds_completed_original_build(tmp_path):
    src = _tree(tmp_path)
    (src / "net/a.ko/b/bar.ko").unlink()  # (the odd path has its own test above)
    n = forge.prime_klp_tmp(src, "primed")
    orig = src / "klp-tmp" / "1-orig"
    assert n == 2 and (orig / ".complete").is_file() and (src / "klp-tmp" / "timestamp").is_file()
    assert (orig / "vmlinux.o").read_bytes() == b"vmlinux.o" and (orig / "vmlinux").read_bytes() == b"vmlinux"
    assert (orig / "drivers/x/foo.o").read_bytes() == b"drivers/x/foo.o"
    assert not (src / "klp-tmp" / "old").exists()  # an earlier klp-tmp is replaced
    assert (orig / "build.log").read_text() == "primed\n"


def test_forged_catalog_entry_names_the_trees_builder(tmp_path):
    tree = tmp_path / "src"
    (tree / "scripts" / "livepatch").mkdir(parents=True)
    assert _tree_builder(tree, "x86_64") == "kpatch-build"
    (tree / "scripts" / "livepatch" / "klp-build").write_text("#!/bin/bash\n")
    assert _tree_builder(tree, "x86_64") == "klp-build"
    # Linux 7.2's arm64 tree carries the script too, but only x86_64 selects HAVE_KLP_BUILD
    assert _tree_builder(tree, "aarch64") == "kpatch-build"
