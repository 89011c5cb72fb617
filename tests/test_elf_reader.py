"""The module reader: real modules, compressed modules, generated odd and broken shapes."""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess

import pytest

import kenv
from kpipe.elf.reader import ModuleFormatError, parse_module, read_module
from kpipe.errors import ExitCode, KpipeError
from test_elf_support import (
    RELEASE,
    VERMAGIC,
    ElfBuilder,
    modinfo_blob,
    sample_bytes,
    sample_module,
    scratch,
    synthetic_livepatch,
    this_module_blob,
    versions_blob,
)


def test_reads_real_livepatch_module():
    info = read_module(sample_module())
    assert info.header.elf_class == 64 and info.header.machine == 62 and info.header.type == 1
    assert info.header.endianness == "little"
    assert info.name == "livepatch_sample"
    assert info.vermagic == VERMAGIC
    assert info.modinfo["livepatch"] == ["Y"] and info.modinfo["license"] == ["GPL"]
    assert info.this_module_name == "livepatch_sample" and info.this_module_size == 896
    assert info.this_module_count == 1
    names = {u.name for u in info.undefined}
    assert {"klp_enable_patch", "seq_printf"} <= names
    versions = {v.name for v in info.versions}
    assert {"module_layout", "klp_enable_patch", "seq_printf"} <= versions
    assert info.signature is None and info.signature_problem == ""
    assert info.payload_size == info.size
    # the hand-written klp_func array, recovered from relocation pairs
    assert [(f.name, f.objname, f.sympos, f.new_func) for f in info.patched_functions] == [
        ("cmdline_proc_show", "vmlinux", 0, "livepatch_cmdline_proc_show")]
    assert info.is_livepatch


def test_undefined_symbols_match_nm():
    info = read_module(sample_module())
    out = subprocess.run(["nm", "--undefined-only", str(sample_module())], capture_output=True, text=True,
                         check=True).stdout
    nm_names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert {u.name for u in info.undefined} == nm_names


def test_versions_match_modprobe_dump():
    info = read_module(sample_module())
    out = subprocess.run(["modprobe", "--dump-modversions", str(sample_module())], capture_output=True,
                         text=True)
    if out.returncode != 0:
        kenv.require_or_skip(f"modprobe --dump-modversions failed (kmod): {out.stderr.strip()}")
    want = {line.split()[1]: int(line.split()[0], 16) for line in out.stdout.splitlines() if line.strip()}
    assert {v.name: v.crc for v in info.versions} == want


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_compressed_modules_read_like_plain(kind):
    raw = sample_bytes()
    path = scratch(f"m.ko.{kind}")
    if kind == "xz":
        path.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    elif kind == "gz":
        path.write_bytes(gzip.compress(raw))
    else:
        subprocess.run(["zstd", "-q", "-o", str(path), str(sample_module())], check=True)
    info = read_module(path)
    assert info.compression == kind
    assert info.name == "livepatch_sample" and info.size == len(raw)


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_corrupt_compressed_module_is_a_clean_error(kind):
    raw = sample_bytes()
    blob = {"xz": lambda: lzma.compress(raw), "gz": lambda: gzip.compress(raw),
            "zst": lambda: subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                                          check=True).stdout}[kind]()
    path = scratch(f"bad.ko.{kind}")
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModuleFormatError) as e:
        read_module(path)
    assert str(path) in e.value.message


def test_klp_relocation_sections_and_symbols():
    data = synthetic_livepatch(klp_syms=(".klp.sym.vmlinux.foo_helper,0", ".klp.sym.ext4.ext4_bar,2"))
    info = parse_module(data, "synth.ko")
    assert [(s.name, s.objname, s.section, s.count, s.problem) for s in info.klp_relocations] == [
        (".klp.rela.vmlinux..text", "vmlinux", ".text", 2, "")]
    assert [(k.objname, k.symbol, k.sympos, k.problem) for k in info.klp_symbols] == [
        ("vmlinux", "foo_helper", 0, ""), ("ext4", "ext4_bar", 2, "")]
    assert info.is_livepatch


@pytest.mark.parametrize("sym,problem", [
    (".klp.sym.vmlinux.foo", "name is not"),  # no sympos
    (".klp.sym.vmlinuxfoo,0", "name is not"),  # no object/symbol split
    (".klp.sym." + "x" * 56 + ".foo,0", "name is not"),  # objname longer than 55
    (".klp.sym.vmlinux.foo,abc", "name is not"),
])
def test_bad_klp_symbol_names_are_flagged(sym, problem):
    info = parse_module(synthetic_livepatch(klp_syms=(sym,)), "synth.ko")
    assert len(info.klp_symbols) == 1 and problem in info.klp_symbols[0].problem


def test_klp_symbol_without_shn_livepatch_is_flagged():
    info = parse_module(synthetic_livepatch(klp_shndx=0), "synth.ko")
    assert "SHN_LIVEPATCH" in info.klp_symbols[0].problem


def test_klp_rela_section_without_flag_is_flagged():
    info = parse_module(synthetic_livepatch(klp_rela_flags=0x2), "synth.ko")
    # the name still marks it as a klp relocation section, but the kernel would apply it at load time
    assert info.klp_relocations and "SHF_RELA_LIVEPATCH" in info.klp_relocations[0].problem


def test_kpatch_funcs_are_read():
    data = synthetic_livepatch(kpatch_funcs=(("cmdline_proc_show", "vmlinux", 0), ("ext4_foo", "ext4", 2)))
    info = parse_module(data, "kp.ko")
    assert [(f.name, f.objname, f.sympos, f.source) for f in info.patched_functions] == [
        ("cmdline_proc_show", "vmlinux", 0, "kpatch.funcs"), ("ext4_foo", "ext4", 2, "kpatch.funcs")]


def test_klp_funcs_section_is_read():
    b = ElfBuilder()
    text = b.section(".text", b"\x90" * 32, flags=0x6)
    rodata = b.section(".rodata.str1.1", b"old_fn\0", flags=0x32, align=1)
    funcs = b.section(".init.klp_funcs", struct.pack("<QQQ", 0, 0, 3), flags=0x3)
    b.section(".modinfo", modinfo_blob(name="k", livepatch="Y"), align=1)
    s_ro = b.symbol("", bind=0, type=3, shndx=rodata)
    s_fn = b.symbol("new_fn", bind=0, type=2, shndx=text, value=0, size=8)
    b.rela(funcs, [(0, s_ro, 1, 0), (8, s_fn, 1, 0)])
    info = parse_module(b.build(), "k.ko")
    assert [(f.name, f.new_func, f.sympos, f.source) for f in info.patched_functions] == [
        ("old_fn", "new_fn", 3, "klp_funcs")]


def test_extended_modversions_are_read():
    b = ElfBuilder()
    b.section("__versions", versions_blob([("module_layout", 0x1234)]))
    b.section("__version_ext_crcs", struct.pack("<II", 0xDEADBEEF, 0x01020304))
    b.section("__version_ext_names", b"a_very_long_symbol_name\0short\0", align=1)
    info = parse_module(b.build(), "ext.ko")
    assert [(v.name, v.crc) for v in info.versions] == [
        ("module_layout", 0x1234), ("a_very_long_symbol_name", 0xDEADBEEF), ("short", 0x01020304)]


def test_multi_valued_modinfo():
    b = ElfBuilder()
    b.section(".modinfo", modinfo_blob(name="m", import_ns=["NS_A", "NS_B"], alias=["a", "b", "c"]), align=1)
    info = parse_module(b.build(), "m.ko")
    assert info.modinfo["import_ns"] == ["NS_A", "NS_B"] and info.modinfo["alias"] == ["a", "b", "c"]


def test_elf32_and_big_endian_parse_for_the_checks_to_judge():
    for is64, little in ((False, True), (True, False)):
        b = ElfBuilder(is64=is64, little=little, machine=3 if not is64 else 22)
        b.section(".modinfo", modinfo_blob(name="x"), align=1)
        b.section(".gnu.linkonce.this_module", this_module_blob("x", 600), flags=0x3)
        info = parse_module(b.build(), "x.ko")
        assert info.header.elf_class == (64 if is64 else 32)
        assert info.header.endianness == ("little" if little else "big")


# -- broken inputs: one clean error each, naming the file and the problem ------------------------------------------

def _broken(data: bytes, expect: str) -> None:
    with pytest.raises(ModuleFormatError) as e:
        parse_module(data, "/x/broken.ko")
    assert "/x/broken.ko" in e.value.message
    assert expect in e.value.message, e.value.message
    assert isinstance(e.value, KpipeError) and e.value.exit_code == ExitCode.INVALID


def test_garbage():
    _broken(b"this is not an ELF file at all" * 10, "not an ELF file")


def test_empty_file():
    _broken(b"", "truncated")


@pytest.mark.parametrize("cut", [10, 40, 63, 1000, -1000, -100])
def test_truncated(cut):
    data = sample_bytes()
    _broken(data[:cut], "")


def test_section_headers_outside_the_file():
    data = bytearray(sample_bytes())
    struct.pack_into("<Q", data, 0x28, len(data) + 4096)  # e_shoff
    _broken(bytes(data), "outside the file")


def test_absurd_section_count():
    data = bytearray(sample_bytes())
    struct.pack_into("<H", data, 0x3C, 0xFFFF)  # e_shnum
    _broken(bytes(data), "outside the file")


def test_section_data_outside_the_file():
    data = bytearray(sample_bytes())
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    # section 3 (.text): sh_size absurd
    struct.pack_into("<Q", data, shoff + 3 * 64 + 0x20, 1 << 40)
    _broken(bytes(data), "past the end of the file")


def test_bad_shstrndx():
    data = bytearray(sample_bytes())
    struct.pack_into("<H", data, 0x3E, 500)
    _broken(bytes(data), "e_shstrndx")


def test_bad_symtab_link():
    data = bytearray(sample_bytes())
    info = parse_module(bytes(data), "ok.ko")
    symtab = next(s for s in info.sections if s.name == ".symtab")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    struct.pack_into("<I", data, shoff + symtab.index * 64 + 0x28, 9999)  # sh_link
    _broken(bytes(data), "string table")


def test_wrong_section_entry_size():
    data = bytearray(sample_bytes())
    struct.pack_into("<H", data, 0x3A, 32)  # e_shentsize
    _broken(bytes(data), "e_shentsize")


def test_no_symbol_table():
    b = ElfBuilder()
    raw = bytearray(b.build())
    # retype .symtab (section 1) to PROGBITS
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    struct.pack_into("<I", raw, shoff + 64 + 4, 1)
    _broken(bytes(raw), "no symbol table")


def test_cli_reports_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.ko"
    bad.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 20)
    proc = subprocess.run(["kpipe", "validate", str(bad), "--kernel", RELEASE], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "truncated" in proc.stderr
