"""Kernel symbol indexes: parsers, the store cache, fetching from a host over a real SSH server."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from kpipe.elf import symbols as ks
from kpipe.errors import ConfigError
from kpipe.store import Store
from kpipe.transport.local import LocalTransport
from test_elf_support import HEADERS, RELEASE, kallsyms_text, sample_module, scratch

RUNNING = os.uname().release


def test_symvers_both_column_orders():
    new = "0x00000001\tfoo\tvmlinux\tEXPORT_SYMBOL\t\n0x00000002\tbar\tdrivers/x\tEXPORT_SYMBOL_GPL\tNS_X\n"
    src = ks.parse_symvers(new)
    assert src.exports["foo"] == ks.Export("foo", 1, "vmlinux", "EXPORT_SYMBOL", "")
    assert src.exports["bar"].namespace == "NS_X" and src.exports["bar"].module == "drivers/x"
    old = "0x00000003\tbaz\tNS_Y\tfs/y\tEXPORT_SYMBOL_GPL\n"  # 5.4-5.8: namespace third
    assert ks.parse_symvers(old).exports["baz"] == ks.Export("baz", 3, "fs/y", "EXPORT_SYMBOL_GPL", "NS_Y")
    with pytest.raises(ConfigError, match="f:2"):
        ks.parse_symvers("0x1\ta\tvmlinux\tEXPORT_SYMBOL\nnonsense\n", "f")


def test_real_symvers():
    data, origin = ks.read_source(HEADERS / "Module.symvers")
    src = ks.parse_source(data, origin)
    assert src.kind == "symvers" and len(src.exports) == len(data.decode().splitlines())
    assert src.exports["seq_printf"].module == "vmlinux"


def test_kallsyms_objects_and_counts():
    text = kallsyms_text({"a": 2, "b": 1}, {("ext4", "e"): 1, ("nf-x", "n"): 3})
    src = ks.parse_nm_style(text, "kallsyms", "k")
    idx = ks.MemoryIndex([src])
    assert idx.symbol_count("vmlinux", "a") == 2 and idx.symbol_count("ext4", "e") == 1
    assert idx.has_object("nf-x") and idx.symbol_count("nf_x", "n") == 3  # '-' folds to '_'
    assert not idx.has_object("xfs") and idx.symbol_count("vmlinux", "zzz") == 0


def test_debian_placeholder_system_map_is_refused():
    text = "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"
    with pytest.raises(ConfigError, match="placeholder"):
        ks.parse_nm_style(text, "system.map", f"System.map-{RELEASE}")


def test_system_map():
    src = ks.parse_source(b"ffffffff81000000 T _stext\nffffffff81000010 t foo\nffffffff81000020 t foo\n",
                          "System.map-x")
    assert src.kind == "system.map" and src.objects["vmlinux"]["foo"] == 2


def test_elf_symtab_counts_match_nm():
    """A vmlinux-style source: per-name counts from the raw .symtab equal nm's (functions, objects, labels)."""
    data = sample_module().read_bytes()
    src = ks.parse_source(data, str(sample_module()))
    assert src.kind == "vmlinux"
    (obj, counts), = src.objects.items()
    assert obj == "livepatch_sample"
    out = subprocess.run(["nm", "--defined-only", str(sample_module())], capture_output=True, text=True,
                         check=True).stdout
    nm_counts = Counter(line.split()[2] for line in out.splitlines() if len(line.split()) == 3)
    # nm lists section symbols too (as the section's name); kallsyms does not
    for name in ("livepatch_cmdline_proc_show", "__this_module", "init_module", "cleanup_module"):
        assert counts[name] == nm_counts[name] == 1


def test_stripped_vmlinux_is_refused(tmp_path):
    stripped = tmp_path / "vmlinux"
    subprocess.run(["strip", "-o", str(stripped), str(sample_module())], check=True)
    with pytest.raises(ConfigError, match="no .symtab"):
        ks.parse_source(stripped.read_bytes(), str(stripped), "vmlinux")


def test_store_cache_by_release_and_digest(tmp_path):
    store = Store(tmp_path / "store")
    f = scratch("kallsyms")
    f.write_text(kallsyms_text({"x": 1}))
    a = ks.add_file(store, "6.1.0-1-amd64", f)
    assert ks.add_file(store, "6.1.0-1-amd64", f) == a  # same digest: not parsed or stored again
    b = ks.add_file(store, "6.1.0-2-amd64", f)
    assert b != a
    f.write_text(kallsyms_text({"x": 1, "y": 1}))
    c = ks.add_file(store, "6.1.0-1-amd64", f)
    assert c not in (a, b)
    idx = ks.release_index(store, "6.1.0-1-amd64")
    assert idx.symbol_count("vmlinux", "y") == 1  # the newest source of that kind
    rows = ks.list_sources(store, "6.1.0-1-amd64")
    assert [r["id"] for r in rows] == [c, a]


def test_explicit_sources_take_precedence(tmp_path):
    store = Store(tmp_path / "store")
    auto = scratch("auto.symvers")
    auto.write_text("0x00000001\tfoo\tvmlinux\tEXPORT_SYMBOL\t\n")
    mine = scratch("mine.symvers")
    mine.write_text("0x00000002\tfoo\tvmlinux\tEXPORT_SYMBOL\t\n")
    a = ks.add_file(store, "r", auto)
    m = ks.add_file(store, "r", mine)
    assert ks.store_index(store, [a, m]).export("foo").crc == 1
    assert ks.store_index(store, [m, a]).export("foo").crc == 2
    assert ks.release_index(store, "r", [a]).export("foo").crc == 1


def test_fetch_from_local_host():
    sources = ks.fetch_from_host(LocalTransport(), RUNNING)
    kinds = {s.kind for s in sources}
    assert "kallsyms" in kinds
    kall = next(s for s in sources if s.kind == "kallsyms")
    assert kall.symbol_total > 1000 and kall.digest


def test_fetch_for_another_kernel_refuses_kallsyms():
    if Path(f"/lib/modules/{RELEASE}/build/Module.symvers").is_file() and RELEASE != RUNNING:
        sources = ks.fetch_from_host(LocalTransport(), RELEASE)
        assert [s.kind for s in sources] == ["symvers"]  # kallsyms of a different running kernel is skipped
    from kpipe.errors import TransportError

    with pytest.raises(TransportError, match="no symbol data"):
        ks.fetch_from_host(LocalTransport(), "0.0.0-none")


def test_cli_fetch_over_ssh_then_list(tmp_path, sshd):
    (tmp_path / "kpipe.toml").write_text(
        f'[workspace]\nstore = ".kpipe"\n[ssh]\nknown_hosts = "{sshd.known_hosts}"\n'
        f'identity_file = "{sshd.client_key}"\n')
    r = subprocess.run(["kpipe", "kernels", "symbols", "fetch", RUNNING, "--from",
                        f"root@{sshd.address}:{sshd.port}", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["release"] == RUNNING and any(s["kind"] == "kallsyms" and s["symbols"] > 1000 for s in doc["sources"])
    r = subprocess.run(["kpipe", "kernels", "symbols", "list", "--json"], capture_output=True, text=True, cwd=tmp_path)
    rows = json.loads(r.stdout)
    assert any(row["release"] == RUNNING and row["kind"] == "kallsyms" for row in rows)
    # an unreachable host is one clean line with the transport's exit code
    r = subprocess.run(["kpipe", "kernels", "symbols", "fetch", RUNNING, "--from", "root@127.0.0.1:1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 6 and "Traceback" not in r.stderr
