"""tests/klp_convert.py on a real kbuild live patch built against the installed x86_64 headers (never loaded):
the output has the livepatch ELF format (read back with pyelftools), everything else in the file is unchanged,
and kpipe's validation accepts it and gives the kernel's finding for each deliberately wrong variant.
The same converter on the cross-built arm64 module, validated and loaded in arm64 VMs: test_arm64_klp.py."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import test_elf_support as es  # noqa: E402
from klp_convert import (  # noqa: E402
    KLP_FLAGS,
    SHF_ALLOC,
    SHF_INFO_LINK,
    SHF_RELA_LIVEPATCH,
    SHN_LIVEPATCH,
    ConvertError,
    klp_convert,
)
from kpipe.validation import validate_module  # noqa: E402

SYMBOL = "seq_printf"  # the exported function the sample's new cmdline_proc_show() calls
MISSING_ARM64 = "kpipe_no_such_function"


def _elf(data: bytes):
    from elftools.elf.elffile import ELFFile

    return ELFFile(io.BytesIO(data))


def _relas(elf, sec) -> list[tuple[int, int, int, int]]:
    return [(r["r_offset"], r["r_info_sym"], r["r_info_type"], r["r_addend"]) for r in sec.iter_relocations()]


@pytest.fixture(scope="module")
def original() -> bytes:
    return es.sample_bytes()


def test_the_converter_moves_the_symbols_relocations_into_a_klp_section(original: bytes):
    res = klp_convert(original, SYMBOL)
    before, after = _elf(original), _elf(res.data)
    symtab = after.get_section_by_name(".symtab")
    sym_index = next(i for i, s in enumerate(before.get_section_by_name(".symtab").iter_symbols()) if s.name == SYMBOL)
    assert res.symbol_index == sym_index
    sym = symtab.get_symbol(sym_index)
    assert sym.name == f".klp.sym.vmlinux.{SYMBOL},0" == res.klp_symbol
    assert sym["st_shndx"] == SHN_LIVEPATCH  # pyelftools has no name for 0xff20: the number
    assert res.sections == (".klp.rela.vmlinux.text",)
    klp = after.get_section_by_name(".klp.rela.vmlinux.text")
    hdr = klp.header
    assert hdr["sh_type"] == "SHT_RELA" and hdr["sh_entsize"] == 24
    assert hdr["sh_flags"] == SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH == KLP_FLAGS
    assert after.get_section(hdr["sh_link"]).name == ".symtab"
    assert after.get_section(hdr["sh_info"]).name == ".text"
    # the entries moved: the ordinary .rela.text lost exactly them, nothing else
    old = _relas(before, before.get_section_by_name(".rela.text"))
    moved = [r for r in old if r[1] == sym_index]
    assert moved and res.moved == len(moved)
    assert _relas(after, klp) == moved
    assert _relas(after, after.get_section_by_name(".rela.text")) == [r for r in old if r[1] != sym_index]
    # every old section keeps its index, name, type and bytes (but the tables that grew or shrank)
    changed = {".rela.text", ".symtab", ".strtab", ".shstrtab"}
    assert after.num_sections() == before.num_sections() + 1
    for i, s in enumerate(before.iter_sections()):
        t = after.get_section(i)
        assert (t.name, t["sh_type"], t["sh_flags"], t["sh_link"], t["sh_info"]) == \
            (s.name, s["sh_type"], s["sh_flags"], s["sh_link"], s["sh_info"])
        if s.name not in changed and s["sh_type"] != "SHT_NOBITS":
            assert t.data() == s.data(), s.name
    # every other symbol is unchanged
    for i, s in enumerate(before.get_section_by_name(".symtab").iter_symbols()):
        if i != sym_index:
            t = symtab.get_symbol(i)
            assert (t.name, t["st_shndx"], t["st_value"], t["st_info"]) == \
                (s.name, s["st_shndx"], s["st_value"], s["st_info"])


def test_the_converter_refuses_what_it_cannot_convert(original: bytes):
    with pytest.raises(ConvertError, match="undefined symbols named 'no_such_symbol'"):
        klp_convert(original, "no_such_symbol")
    with pytest.raises(ConvertError, match="signed"):
        klp_convert(original + b"x" * 40 + b"~Module signature appended~\n", SYMBOL)
    with pytest.raises(ConvertError, match="ELF64"):
        klp_convert(original[:16] + b"\2\0" + original[18:], SYMBOL)  # ET_EXEC


def _validate(data: bytes, tmp_path: Path, kallsyms: dict[str, int]) -> dict[str, list]:
    ko = tmp_path / "klp.ko"
    ko.write_bytes(data)
    syms = tmp_path / "kallsyms"
    syms.write_text(es.kallsyms_text(kallsyms))
    report = validate_module(None, ko, es.RELEASE, symbol_files=[syms])
    out: dict[str, list] = {}
    for f in report.findings:
        out.setdefault(f.id, []).append(f)
    return out


KALLSYMS = {SYMBOL: 1, "cmdline_proc_show": 1, "twice": 2}


def test_kpipe_validates_the_converted_module_and_its_klp_symbol(original: bytes, tmp_path: Path):
    plain = _validate(original, tmp_path, KALLSYMS)
    f = _validate(klp_convert(original, SYMBOL).data, tmp_path, KALLSYMS)
    assert not [x for v in f.values() for x in v if x.severity == "error"]
    [syms] = f["klp.syms"]
    assert syms.severity == "info" and syms.message.startswith("2 livepatch symbol(s)")  # seq_printf + the func
    assert plain["klp.syms"][0].message.startswith("1 livepatch symbol(s)")  # the func only
    assert f["reloc.type"][0].severity == "info"
    # the klp symbol is no longer an undefined symbol the loader resolves: one fewer to export
    n_plain = int(plain["symbols.exported"][0].message.split()[1])
    assert f["symbols.exported"][0].message == f"all {n_plain - 1} undefined symbols are exported"


@pytest.mark.parametrize("variant, finding, words", [
    (dict(target="kpipe_no_such_symbol"), "klp.syms", "symbol 'kpipe_no_such_symbol' not found in symbol table"),
    (dict(target="twice"), "klp.sym.sympos", "unresolvable ambiguity"),
    (dict(sympos=3), "klp.sym.sympos", "sympos 3 but vmlinux has only 1"),
    (dict(reloc_type=283), "reloc.type", "283"),  # R_AARCH64_CALL26 in an x86_64 module
    (dict(flags=KLP_FLAGS & ~SHF_RELA_LIVEPATCH), "klp.rela.name", "SHF_RELA_LIVEPATCH"),
    (dict(shndx=0), "klp.sym.name", "not SHN_LIVEPATCH"),
])
def test_each_wrong_variant_has_its_finding(original: bytes, tmp_path: Path, variant: dict, finding: str,
                                            words: str):
    f = _validate(klp_convert(original, SYMBOL, **variant).data, tmp_path, KALLSYMS)
    errors = [x for x in f.get(finding, []) if x.severity == "error"]
    assert errors and words in errors[0].message, f.get(finding)


# -- an arm64-shaped object: the converter and the aarch64 checks without a cross build ------------------------

def _arm64_object() -> bytes:
    """A minimal EM_AARCH64 livepatch-shaped ET_REL: .text calls the undefined seq_printf (R_AARCH64_CALL26) and
    printk (kept ordinary), with a .modinfo carrying livepatch=Y and the aarch64 vermagic."""
    b = es.ElfBuilder(machine=183)
    text = b.section(".text", b"\x1f\x20\x03\xd5" * 16, flags=0x6, align=4)  # nop x16
    b.section(".modinfo", es.modinfo_blob(name="lp_arm64", license="GPL", livepatch="Y", depends="",
                                          vermagic="7.2.13-kforge-0123abcd SMP mod_unload aarch64"), align=1)
    b.section(".gnu.linkonce.this_module", es.this_module_blob("lp_arm64"), flags=0x3, align=64)
    b.symbol("new_fn", bind=0, type=2, shndx=text, size=64)
    seq = b.symbol(SYMBOL)
    printk = b.symbol("_printk")
    b.symbol("__this_module", bind=1, type=1, shndx=3, size=896)
    b.rela(text, [(8, seq, 283, 0), (16, printk, 283, 0), (24, seq, 282, 0)])
    return b.build()


def _arm64_checks(data: bytes, kallsyms: dict[str, int]) -> dict[str, list]:
    from kpipe.checks import KernelFacts, run_checks
    from kpipe.elf.reader import parse_module
    from kpipe.elf.symbols import MemoryIndex, parse_nm_style

    index = MemoryIndex([parse_nm_style(es.kallsyms_text(kallsyms), "kallsyms", "k")])
    facts = KernelFacts(release="7.2.13-kforge-0123abcd", arch="aarch64")
    out: dict[str, list] = {}
    for f in run_checks(parse_module(data), facts, index):
        out.setdefault(f.id, []).append(f)
    return out


def test_an_arm64_object_converts_and_its_klp_relocations_are_judged_by_arm64s_table():
    data = _arm64_object()
    res = klp_convert(data, SYMBOL)
    assert res.moved == 2 and res.sections == (".klp.rela.vmlinux.text",)
    elf = _elf(res.data)
    assert elf["e_machine"] == "EM_AARCH64"
    klp = elf.get_section_by_name(".klp.rela.vmlinux.text")
    assert [(r["r_offset"], r["r_info_type"]) for r in klp.iter_relocations()] == [(8, 283), (24, 282)]
    assert [r["r_offset"] for r in elf.get_section_by_name(".rela.text").iter_relocations()] == [16]
    good = _arm64_checks(res.data, {SYMBOL: 1, "_printk": 1})
    assert good["reloc.type"][0].severity == "info"  # CALL26 / JUMP26: arm64's apply_relocate_add takes them
    assert good["klp.syms"][0].severity == "info"
    x86 = _arm64_checks(klp_convert(data, SYMBOL, reloc_type=4).data, {SYMBOL: 1})  # R_X86_64_PLT32
    [bad] = x86["reloc.type"]
    assert bad.severity == "error" and "aarch64 loader rejects: 4 (x2)" in bad.message
    missing = _arm64_checks(klp_convert(data, SYMBOL, target=MISSING_ARM64).data, {SYMBOL: 1})
    assert missing["klp.syms"][0].severity == "error"
    assert f"symbol '{MISSING_ARM64}' not found in symbol table" in missing["klp.syms"][0].message
