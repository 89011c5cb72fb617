"""A small klp-convert for tests: turn a kbuild live patch's relocations against one kernel symbol into a
livepatch relocation section, the way kpatch's create-klp-module and objtool's `klp post-link` (Linux 6.19+)
do, so that a module built by plain kbuild (any arch, cross builds included) carries real klp relocations.

The format (Documentation/livepatch/module-elf-format.rst, kernel/livepatch/core.c klp_write_section_relocs
and klp_resolve_symbols, kernel/module/main.c apply_relocations and simplify_symbols, 7.2):
- a SHT_RELA section named `.klp.rela.<objname>.<target section>` with SHF_ALLOC | SHF_INFO_LINK |
  SHF_RELA_LIVEPATCH (objtool's flags; the document says SHF_ALLOC keeps it in module memory), sh_link = the
  symbol table, sh_info = the section the relocations patch;
- the entries moved out of the ordinary `.rela<target>` section (the module loader must not resolve them);
- the symbol renamed `.klp.sym.<objname>.<name>,<sympos>` with st_shndx = SHN_LIVEPATCH (0xff20): the module
  loader leaves it alone (simplify_symbols) and livepatch looks it up in kallsyms, writes its address into
  st_value and calls the arch's apply_relocate_add on the section; for objname vmlinux that happens while the
  module loads (apply_relocations -> klp_apply_section_relocs), so a missing symbol refuses the module.

An ET_REL file is the ELF header, section blobs and the section header table: the output is written whole,
sections in their old order (every index in the file stays valid), the grown .strtab and .shstrtab in place
and the new sections appended. pyelftools reads, struct writes. ELF64 only (x86_64, aarch64).

    python3 tests/klp_convert.py IN.ko OUT.ko --symbol seq_printf [--target NAME] [--reloc-type N]
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

SHF_ALLOC = 0x2
SHF_INFO_LINK = 0x40
SHF_RELA_LIVEPATCH = 0x00100000
SHN_UNDEF = 0
SHN_LIVEPATCH = 0xFF20
SHT_SYMTAB, SHT_RELA, SHT_NOBITS = 2, 4, 8
KLP_FLAGS = SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH
SIGNATURE_MAGIC = b"~Module signature appended~\n"


class ConvertError(Exception):
    """The input cannot be converted (not ELF64 ET_REL, signed, no such symbol...)."""


@dataclass
class _Sec:
    name: str
    name_offset: int  # sh_name
    type: int
    flags: int
    addr: int
    link: int
    info: int
    addralign: int
    entsize: int
    data: bytes
    nobits_size: int = 0  # SHT_NOBITS: its size (it has no bytes in the file)


@dataclass(frozen=True)
class Converted:
    """The converted module and what was done to it."""

    data: bytes
    klp_symbol: str  # the renamed symbol: .klp.sym.<objname>.<target>,<sympos>
    symbol_index: int
    sections: tuple[str, ...]  # the new .klp.rela.* sections, in file order
    moved: int  # relocation entries moved into them


def klp_convert(data: bytes, symbol: str, *, objname: str = "vmlinux", target: str | None = None,
                sympos: int = 0, reloc_type: int | None = None, flags: int = KLP_FLAGS,
                shndx: int = SHN_LIVEPATCH) -> Converted:
    """Move every relocation against the undefined `symbol` into `.klp.rela.<objname>.<section>` sections
    and rename the symbol `.klp.sym.<objname>.<target>,<sympos>` (target defaults to symbol).

    The other knobs make deliberately wrong modules: reloc_type replaces the moved entries' relocation type
    (e.g. an x86_64 type in an arm64 klp section), flags the new sections' sh_flags, shndx the symbol's."""
    if data.endswith(SIGNATURE_MAGIC):
        raise ConvertError("the module is signed: convert the unsigned module, then sign the result")
    elf = ELFFile(io.BytesIO(data))
    if elf.elfclass != 64 or elf["e_type"] != "ET_REL":
        raise ConvertError(f"not an ELF64 relocatable object (class {elf.elfclass}, {elf['e_type']})")
    e = "<" if elf.little_endian else ">"
    secs: list[_Sec] = []
    for i, s in enumerate(elf.iter_sections()):
        h = s.header
        # sh_type as a number, read raw: pyelftools names them by machine (SHT_AARCH64_ATTRIBUTES...)
        (sh_type,) = struct.unpack_from(e + "I", data, elf["e_shoff"] + i * elf["e_shentsize"] + 4)
        nobits = sh_type == SHT_NOBITS
        raw = b"" if nobits else data[h["sh_offset"]:h["sh_offset"] + h["sh_size"]]
        secs.append(_Sec(s.name, h["sh_name"], sh_type, h["sh_flags"], h["sh_addr"], h["sh_link"],
                         h["sh_info"], h["sh_addralign"], h["sh_entsize"], raw, h["sh_size"] if nobits else 0))
    symtab_idx = next((i for i, s in enumerate(secs) if s.type == SHT_SYMTAB), None)
    if symtab_idx is None:
        raise ConvertError("no symbol table")
    symtab = secs[symtab_idx]
    strtab = secs[symtab.link]
    syms = list(struct.iter_unpack(e + "IBBHQQ", symtab.data))
    found = [i for i, (name_at, _info, _other, sym_shndx, _value, _size) in enumerate(syms)
             if i and sym_shndx == SHN_UNDEF and _cstr(strtab.data, name_at) == symbol]
    if len(found) != 1:
        raise ConvertError(f"{len(found)} undefined symbols named {symbol!r} (want exactly one)")
    [sym_idx] = found

    klp_name = f".klp.sym.{objname}.{target or symbol},{sympos}"
    name_off = len(strtab.data)
    strtab.data += klp_name.encode() + b"\0"
    _name_at, st_info, st_other, _undef, _value, st_size = syms[sym_idx]
    entry = struct.pack(e + "IBBHQQ", name_off, st_info, st_other, shndx, 0, st_size)
    symtab.data = symtab.data[:sym_idx * 24] + entry + symtab.data[(sym_idx + 1) * 24:]

    new_secs: list[_Sec] = []
    moved = 0
    for s in list(secs):
        if s.type != SHT_RELA or s.link != symtab_idx or s.flags & SHF_RELA_LIVEPATCH:
            continue
        base = secs[s.info]
        if not base.flags & SHF_ALLOC:  # the loader skips these; so does livepatch
            continue
        keep, take = [], []
        for off, r_info, addend in struct.iter_unpack(e + "QQq", s.data):
            if r_info >> 32 == sym_idx:
                rtype = r_info & 0xFFFFFFFF if reloc_type is None else reloc_type
                take.append(struct.pack(e + "QQq", off, (sym_idx << 32) | rtype, addend))
            else:
                keep.append(struct.pack(e + "QQq", off, r_info, addend))
        if not take:
            continue
        s.data = b"".join(keep)
        moved += len(take)
        new_secs.append(_Sec(f".klp.rela.{objname}{base.name}", 0, SHT_RELA, flags, 0, symtab_idx, s.info, 8,
                             24, b"".join(take)))
    if not moved:
        raise ConvertError(f"no relocation of an allocated section refers to {symbol!r}")
    shstrtab = secs[elf["e_shstrndx"]]
    for s in new_secs:
        s.name_offset = len(shstrtab.data)
        shstrtab.data += s.name.encode() + b"\0"
    out = _write(data, e, secs + new_secs)
    return Converted(out, klp_name, sym_idx, tuple(s.name for s in new_secs), moved)


def _cstr(blob: bytes, off: int) -> str:
    end = blob.find(b"\0", off)
    return blob[off:end if end >= 0 else len(blob)].decode("utf-8", "replace")


def _write(original: bytes, e: str, secs: list[_Sec]) -> bytes:
    """ELF header, section blobs (each at its alignment), section header table; the header's e_shoff and
    e_shnum updated, every other field (machine, flags, e_shstrndx...) as it was."""
    ehdr = list(struct.unpack_from(e + "16sHHIQQQIHHHHHH", original))
    if ehdr[5] != 0:  # e_phoff: an ET_REL module has no program headers
        raise ConvertError("the object has program headers")
    ehsize = ehdr[8]
    out = bytearray(ehsize)
    headers = [bytes(64)]  # section 0: SHN_UNDEF, all zero
    for s in secs[1:]:
        out += b"\0" * (-len(out) % max(s.addralign, 1))
        offset = len(out)
        size = s.nobits_size if s.type == SHT_NOBITS else len(s.data)
        if s.type != SHT_NOBITS:
            out += s.data
        headers.append(struct.pack(e + "IIQQQQIIQQ", s.name_offset, s.type, s.flags, s.addr, offset, size,
                                   s.link, s.info, s.addralign, s.entsize))
    out += b"\0" * (-len(out) % 8)
    ehdr[6], ehdr[12] = len(out), len(secs)  # e_shoff, e_shnum
    out += b"".join(headers)
    out[:ehsize] = struct.pack(e + "16sHHIQQQIHHHHHH", *ehdr)
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--symbol", required=True, help="the undefined symbol whose relocations become klp ones")
    p.add_argument("--objname", default="vmlinux")
    p.add_argument("--target", help="the kernel symbol the klp symbol names (default: --symbol)")
    p.add_argument("--sympos", type=int, default=0)
    p.add_argument("--reloc-type", type=int, help="write this relocation type into the klp section")
    a = p.parse_args(argv)
    try:
        res = klp_convert(a.input.read_bytes(), a.symbol, objname=a.objname, target=a.target, sympos=a.sympos,
                          reloc_type=a.reloc_type)
    except ConvertError as err:
        print(f"klp_convert: {a.input}: {err}", file=sys.stderr)
        return 1
    a.output.write_bytes(res.data)
    print(f"{a.output}: {res.moved} relocation(s) against {res.klp_symbol} in {', '.join(res.sections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
