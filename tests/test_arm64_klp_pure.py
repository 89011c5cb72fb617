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
