"""Read a kernel module (.ko, .ko.xz, .ko.zst, .ko.gz) into a plain ModuleInfo.

pyelftools parses the ELF header and the section table; every bulk scan
(symbols, relocations) goes through `struct.iter_unpack` over raw bytes, which
module-format.md measured at 20-40x faster than pyelftools' iterators. Every
malformed, truncated or foreign input ends in a ModuleFormatError naming the
file and what is wrong, never in a traceback.
"""

from __future__ import annotations

import gzip
import io
import lzma
import mmap
import os
import re
import struct
import subprocess
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from kpipe.elf.signature import SignatureTrailer, split_signature
from kpipe.errors import ExitCode, KpipeError

# Kernel ABI constants (include/uapi/linux/elf.h, Linux 4.7+ for livepatch).
SHF_RELA_LIVEPATCH = 0x00100000
SHN_LIVEPATCH = 0xFF20
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 2, 3, 4, 8, 9
SHF_ALLOC = 0x2
STT_FUNC, STT_SECTION = 2, 3
STB_WEAK = 2
MODULE_NAME_LEN = 56  # include/linux/module.h: (64 - sizeof(unsigned long)); name field incl. NUL
KSYM_NAME_LEN = 512  # 6.1: include/linux/kallsyms.h

EM_NAMES = {3: "i386", 62: "x86_64", 183: "aarch64", 258: "loongarch64", 40: "arm", 8: "mips",
            21: "ppc64", 22: "s390", 243: "riscv"}
ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}

# pyelftools raises these on malformed input; struct/Index/... come from our own raw slicing.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    struct.error, IndexError, ValueError, KeyError, UnicodeDecodeError, OverflowError, TypeError,
    AttributeError, AssertionError, MemoryError, RecursionError,
)


class ModuleFormatError(KpipeError):
    """The file is not a readable kernel module (corrupt, truncated, foreign, bad compression)."""

    exit_code = ExitCode.INVALID


@dataclass(frozen=True)
class ElfHeader:
    elf_class: int  # 32 or 64
    endianness: str  # "little" | "big"
    type: int  # e_type
    machine: int  # e_machine
    osabi: int = 0

    @property
    def type_name(self) -> str:
        return ET_NAMES.get(self.type, f"e_type {self.type}")

    @property
    def machine_name(self) -> str:
        return EM_NAMES.get(self.machine, f"e_machine {self.machine}")


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int = 0
    info: int = 0
    entsize: int = 0


@dataclass(frozen=True)
class VersionEntry:
    """One `__versions` (or extended modversions) entry: the CRC the module was built against."""

    name: str
    crc: int


@dataclass(frozen=True)
class UndefinedSymbol:
    name: str
    weak: bool = False


@dataclass(frozen=True)
class KlpSymbol:
    """A `.klp.sym.<objname>.<symbol>,<sympos>` symbol; `problem` is set when the name or shndx is wrong."""

    name: str
    objname: str = ""
    symbol: str = ""
    sympos: int = 0
    problem: str = ""


@dataclass(frozen=True)
class KlpRelaSection:
    """A `.klp.rela.<objname>.<section>` relocation section."""

    name: str
    objname: str
    section: str
    flags: int
    count: int
    problem: str = ""


@dataclass(frozen=True)
class PatchedFunction:
    """A function the module replaces: `objname` is "vmlinux" or a module name."""

    name: str
    objname: str = "vmlinux"
    sympos: int = 0
    new_func: str = ""
    source: str = ""  # kpatch.funcs | klp_funcs | klp_func-relocs


@dataclass
class ModuleInfo:
    """Everything the checks need to know about one module file, as plain data."""

    path: str
    size: int  # bytes of the (decompressed) file, signature included
    compression: str  # "" | xz | zst | gz
    header: ElfHeader
    sections: list[Section]
    modinfo: dict[str, list[str]]
    versions: list[VersionEntry]
    undefined: list[UndefinedSymbol]
    this_module_name: str | None
    this_module_size: int | None
    this_module_count: int
    klp_relocations: list[KlpRelaSection]
    klp_symbols: list[KlpSymbol]
    patched_functions: list[PatchedFunction]
    relocation_types: dict[int, int]  # r_type -> count, over sections the loader applies
    symbol_count: int
    signature: SignatureTrailer | None
    signature_problem: str = ""  # set when a trailer is present but malformed
    payload_size: int = 0  # bytes covered by the signature (the ELF image)
    problems: list[str] = field(default_factory=list)  # non-fatal structural oddities

    def first(self, key: str) -> str | None:
        """The first modinfo value for key, or None."""
        values = self.modinfo.get(key)
        return values[0] if values else None

    @property
    def name(self) -> str | None:
        return self.first("name")

    @property
    def vermagic(self) -> str | None:
        return self.first("vermagic")

    @property
    def is_livepatch(self) -> bool:
        return self.first("livepatch") == "Y" or bool(self.klp_relocations) or self.has_section(".kpatch.funcs")

    def has_section(self, name: str) -> bool:
        return any(s.name == name for s in self.sections)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.signature is not None:
            d["signature"] = self.signature.to_dict()
        return d


# -- decompression -----------------------------------------------------------------------------------------

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZ_MAGIC = b"\x1f\x8b"
# The largest module file kpipe reads, compressed or decompressed. Real livepatch modules are a few MB and
# modules with full debug info a few hundred MB; a larger file is the wrong file (or a decompression bomb),
# and refusing it up front beats running out of memory half way.
MAX_MODULE_BYTES = 512 << 20
# Symbol sources (a debug vmlinux) may be larger than any module: the bound for decompressing those.
MAX_DECOMPRESSED_BYTES = 2 << 30


def import_pyelftools() -> None:
    """Import the pyelftools modules a module's reading needs, now: `kpipe build` does it in a background thread
    while the build host compiles, so that reading the finished module costs no import on the way to the
    result."""
    from elftools.common.exceptions import ELFError  # noqa: F401
    from elftools.elf.elffile import ELFFile  # noqa: F401


def _too_large(label: str, what: str, limit: int, kind: str) -> ModuleFormatError:
    setting = "MAX_MODULE_BYTES" if kind == "kernel module" else "MAX_DECOMPRESSED_BYTES"
    return ModuleFormatError(f"{label}: {what} more than {limit >> 20} MiB, larger than any {kind}",
                             hint=f"check the path: kpipe reads a {kind} of up to {limit >> 20} MiB "
                                  f"({setting} in kpipe/elf/reader.py)")


def map_module(path: Path) -> tuple[Any, str]:
    """A module file as a read-only buffer (a memory map when uncompressed) and its compression ("" if none).

    The parser only touches the headers and the sections it needs, so a mapped file is never read whole.
    Files over MAX_MODULE_BYTES, and compressed ones that decompress to more, are refused.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MODULE_BYTES:
                raise _too_large(str(path), f"is {size >> 20} MiB,", MAX_MODULE_BYTES, "kernel module")
            if size == 0:
                return b"", ""
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModuleFormatError(f"{path}: cannot read: {e.strerror}") from None
    return decompress(raw, str(path), limit=MAX_MODULE_BYTES, kind="kernel module")


def load_module_bytes(path: Path) -> tuple[bytes, str]:
    """The decompressed bytes of a module file and the compression it used ("" if none); see map_module."""
    data, compression = map_module(path)
    return bytes(data), compression


def decompress(raw: Any, label: str, *, limit: int = MAX_DECOMPRESSED_BYTES,
               kind: str = "symbol source") -> tuple[Any, str]:
    """Decompress xz/zstd/gzip by magic number (the kernel's own loader also goes by content); past `limit`
    decompressed bytes it stops and refuses (naming `kind`). Anything else comes back unchanged."""
    try:
        if raw[:6] == _XZ_MAGIC:
            return _bounded(lzma.LZMADecompressor(), raw, label, limit, kind), "xz"
        if raw[:2] == _GZ_MAGIC:
            with gzip.GzipFile(fileobj=io.BufferedReader(_ViewReader(memoryview(raw)))) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise _too_large(label, "decompresses to", limit, kind)
            return data, "gz"
        if raw[:4] == _ZSTD_MAGIC:
            return _unzstd(raw, label, limit, kind), "zst"
    except (lzma.LZMAError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise ModuleFormatError(f"{label}: corrupt compressed module: {e}",
                                hint="re-fetch the file; check it with xz -t / zstd -t / gzip -t") from None
    return raw, ""


def _bounded(dec: lzma.LZMADecompressor, raw: Any, label: str, limit: int, kind: str) -> bytes:
    data = dec.decompress(raw, max_length=limit + 1)
    if len(data) > limit:
        raise _too_large(label, "decompresses to", limit, kind)
    if not dec.eof:
        raise ModuleFormatError(f"{label}: truncated xz stream")
    return data


def _unzstd(raw: Any, label: str, limit: int, kind: str) -> bytes:
    try:
        # zstandard is optional (not a declared dependency): faster and no subprocess when installed
        import zstandard
    except ImportError:  # not installed: the zstd command does the same, in a subprocess
        return _unzstd_cli(raw, label, limit, kind)
    try:
        with zstandard.ZstdDecompressor().stream_reader(_ViewReader(memoryview(raw))) as r:
            data: bytes = r.read(limit + 1)
    except zstandard.ZstdError as e:
        raise ModuleFormatError(f"{label}: corrupt zstd stream: {e}") from None
    if len(data) > limit:
        raise _too_large(label, "decompresses to", limit, kind)
    return data


def _unzstd_cli(raw: Any, label: str, limit: int, kind: str) -> bytes:
    """zstd -dc, reading at most limit+1 bytes of its output (a bomb is stopped, not buffered)."""
    try:
        proc = subprocess.Popen(["zstd", "-dc", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ModuleFormatError(f"{label}: is zstd-compressed and neither python zstandard nor zstd is installed",
                                hint="apt-get install zstd, or pip install zstandard") from None
    # all three are pipes (asked for above)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    errors: list[bytes] = []

    def feed() -> None:
        try:
            stdin.write(memoryview(raw))
        except OSError:  # zstd stopped reading: it failed, or we stopped it
            pass
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def drain() -> None:
        errors.append(stderr.read())

    timed_out = threading.Event()

    def stop() -> None:  # a stuck zstd must not hang kpipe
        timed_out.set()
        proc.kill()

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    timer = threading.Timer(120, stop)
    timer.start()
    data = b""
    try:
        data = stdout.read(limit + 1)
    finally:
        if len(data) > limit:
            proc.kill()
        stdout.close()
        code = proc.wait()
        timer.cancel()
        for t in threads:
            t.join()
    if timed_out.is_set():
        raise ModuleFormatError(f"{label}: zstd took more than 120 s")
    if len(data) > limit:
        raise _too_large(label, "decompresses to", limit, kind)
    if code != 0:
        msg = b"".join(errors).decode("utf-8", "replace").strip().splitlines()
        raise ModuleFormatError(f"{label}: corrupt zstd stream: {msg[-1] if msg else f'zstd exited with {code}'}")
    return data


class _ViewReader(io.RawIOBase):
    """A read-only, seekable stream over a buffer without copying it (io.BytesIO would copy)."""

    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self.view) - self.pos))
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


# -- reading -------------------------------------------------------------------------------------------------

def read_module(path: Path | str) -> ModuleInfo:
    """Read and parse a module file (compressed or not); ModuleFormatError if it is not a sane module."""
    data, compression = map_module(Path(path))
    return parse_module(data, str(path), compression=compression)


def parse_module(data: Any, label: str = "<module>", *, compression: str = "") -> ModuleInfo:
    """Parse decompressed module bytes (any buffer: bytes, a memory map); ModuleFormatError names `label`."""
    try:
        return _Parser(data, label, compression).parse()
    except ModuleFormatError:
        raise
    except _PARSE_ERRORS as e:
        raise ModuleFormatError(f"{label}: malformed ELF ({type(e).__name__}: {_short(e)})",
                                hint="the file is corrupt or not a kernel module") from None
    except Exception as e:  # pyelftools' own ELFError / ELFParseError and construct errors
        if type(e).__module__.startswith(("elftools", "construct")):
            raise ModuleFormatError(f"{label}: malformed ELF ({_short(e)})",
                                    hint="the file is corrupt or not a kernel module") from None
        raise


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


class _Parser:
    def __init__(self, data: bytes, label: str, compression: str):
        self.file_data = data
        self.label = label
        self.compression = compression

    def fail(self, what: str) -> ModuleFormatError:
        return ModuleFormatError(f"{self.label}: {what}", hint="the file is corrupt, truncated or not a kernel module")

    def parse(self) -> ModuleInfo:
        data = self.file_data
        signature, sig_problem, payload_len = split_signature(data)
        if sig_problem:
            payload_len = len(data)  # the ELF image cannot be delimited; parse what is there
        self.data = memoryview(data)[:payload_len]  # no copy: only the sections read are sliced out
        self._read_header()
        self._read_sections()
        self._read_symbols()
        modinfo = self._modinfo()
        versions = self._versions()
        tm_name, tm_size, tm_count = self._this_module()
        klp_rela = self._klp_rela_sections()
        klp_syms = self._klp_symbols()
        self._index_relocations()
        patched = self._patched_functions(modinfo)
        undefined = [UndefinedSymbol(name, bind == STB_WEAK)
                     for (name, info, shndx, _v, _s) in self.symbols
                     if shndx == SHN_UNDEF and name and (bind := info >> 4) in (1, 2)]
        return ModuleInfo(
            path=self.label, size=len(data), compression=self.compression, header=self.header,
            sections=self.sections, modinfo=modinfo, versions=versions, undefined=undefined,
            this_module_name=tm_name, this_module_size=tm_size, this_module_count=tm_count,
            klp_relocations=klp_rela, klp_symbols=klp_syms, patched_functions=patched,
            relocation_types=dict(self.reloc_types), symbol_count=len(self.symbols),
            signature=signature, signature_problem=sig_problem, payload_size=payload_len,
            problems=self.problems,
        )

    # ELF header and section table through pyelftools, after bounds checks of our own so
    # that absurd counts fail fast instead of making pyelftools allocate or loop.
    def _read_header(self) -> None:
        d = self.data
        if len(d) < 16 or d[:4].tobytes() != b"\x7fELF":
            raise self.fail("not an ELF file (bad magic)" if len(d) >= 4 else f"truncated: only {len(d)} bytes")
        ei_class, ei_data = d[4], d[5]
        if ei_class not in (1, 2):
            raise self.fail(f"unknown ELF class {ei_class}")
        if ei_data not in (1, 2):
            raise self.fail(f"unknown ELF data encoding {ei_data}")
        self.is64 = ei_class == 2
        self.e = "<" if ei_data == 1 else ">"
        hdr_size = 64 if self.is64 else 52
        if len(d) < hdr_size:
            raise self.fail(f"truncated: {len(d)} bytes, shorter than the ELF header")
        from elftools.elf.elffile import ELFFile

        # ELFFile only reads, seeks and tells: the view reader is enough of a binary file for it
        self.elf = ELFFile(cast(IO[bytes], _ViewReader(self.data)))
        h = self.elf.header
        # pyelftools maps known e_type/e_machine values to names; the kernel compares numbers, so read those.
        raw_type, raw_machine = struct.unpack_from(self.e + "HH", d, 16)
        self.header = ElfHeader(elf_class=64 if self.is64 else 32, endianness="little" if ei_data == 1 else "big",
                                type=raw_type, machine=raw_machine, osabi=d[7])
        self.shoff = h["e_shoff"]
        self.shnum = h["e_shnum"]
        self.shentsize = h["e_shentsize"]
        self.shstrndx = h["e_shstrndx"]
        want = 64 if self.is64 else 40
        if self.shnum == 0:
            raise self.fail("no section headers (e_shnum is 0); a kernel module always has sections")
        if self.shentsize != want:
            raise self.fail(f"e_shentsize is {self.shentsize}, expected {want}")
        end = self.shoff + self.shnum * self.shentsize
        if self.shoff < hdr_size or end > len(d):
            raise self.fail(f"section headers at {self.shoff:#x}..{end:#x} lie outside the file ({len(d)} bytes)")
        if self.shstrndx >= self.shnum:
            raise self.fail(f"e_shstrndx {self.shstrndx} is not below e_shnum {self.shnum}")

    def _read_sections(self) -> None:
        d = self.data
        fmt = self.e + ("IIQQQQIIQQ" if self.is64 else "IIIIIIIIII")
        raw = list(struct.iter_unpack(fmt, d[self.shoff:self.shoff + self.shnum * self.shentsize]))
        # Cross-check the table with pyelftools on one entry (the string table) — it must agree.
        sh_shstr = self.elf.get_section(self.shstrndx).header
        shstr = raw[self.shstrndx]
        if sh_shstr["sh_offset"] != shstr[4]:
            raise self.fail("inconsistent section table")
        self.problems: list[str] = []
        sections: list[Section] = []
        names_blob = self._bytes_of(shstr[4], shstr[5], "section name table") if shstr[1] != SHT_NOBITS else b""
        for i, (sh_name, sh_type, flags, _addr, off, size, link, info, _align, entsize) in enumerate(raw):
            name = _cstr(names_blob, sh_name) if sh_name < len(names_blob) else ""
            if sh_type != SHT_NOBITS and i and off + size > len(d):
                raise self.fail(f"section {i} {name or '?'} ({off:#x}+{size:#x}) extends past the end of the file "
                                f"({len(d)} bytes)")
            sections.append(Section(i, name, sh_type, flags, off, size, link, info, entsize))
        self.sections = sections
        self.by_name: dict[str, Section] = {}
        for s in sections:
            self.by_name.setdefault(s.name, s)

    def _bytes_of(self, off: int, size: int, what: str) -> bytes:
        if off + size > len(self.data) or off < 0:
            raise self.fail(f"{what} ({off:#x}+{size:#x}) lies outside the file")
        return self.data[off:off + size].tobytes()

    def _section_bytes(self, s: Section) -> bytes:
        if s.type == SHT_NOBITS:
            return b""
        cache = self.__dict__.setdefault("_sec_cache", {})
        raw: bytes | None = cache.get(s.index)
        if raw is None:  # sliced once: string and pointer lookups come back to the same sections
            raw = cache[s.index] = self._bytes_of(s.offset, s.size, f"section {s.name}")
        return raw

    def _read_symbols(self) -> None:
        symtabs = [s for s in self.sections if s.type == SHT_SYMTAB]
        self.symbols: list[tuple[str, int, int, int, int]] = []
        if not symtabs:
            raise self.fail("no symbol table (.symtab); the kernel refuses such modules")
        if len(symtabs) > 1:
            self.problems.append(f"{len(symtabs)} symbol tables; the kernel uses the first")
        st = symtabs[0]
        if st.link >= len(self.sections):
            raise self.fail(f".symtab links to string table {st.link}, which does not exist")
        strtab = self._section_bytes(self.sections[st.link])
        raw = self._section_bytes(st)
        size = 24 if self.is64 else 16
        if len(raw) % size:
            raise self.fail(f".symtab size {len(raw)} is not a multiple of {size}")
        syms = self.symbols
        if self.is64:
            for st_name, st_info, _o, st_shndx, st_value, st_size in struct.iter_unpack(self.e + "IBBHQQ", raw):
                syms.append((_cstr(strtab, st_name), st_info, st_shndx, st_value, st_size))
        else:
            for st_name, st_value, st_size, st_info, _o, st_shndx in struct.iter_unpack(self.e + "IIIBBH", raw):
                syms.append((_cstr(strtab, st_name), st_info, st_shndx, st_value, st_size))

    def _modinfo(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        s = self.by_name.get(".modinfo")
        if s is None:
            return out
        for item in self._section_bytes(s).split(b"\0"):
            if not item:
                continue
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                out.setdefault(key, []).append(value)
        return out

    def _versions(self) -> list[VersionEntry]:
        out: list[VersionEntry] = []
        s = self.by_name.get("__versions")
        if s is not None:
            raw = self._section_bytes(s)
            crc_fmt = self.e + ("Q" if self.is64 else "I")
            crc_size = 8 if self.is64 else 4
            entry = crc_size + MODULE_NAME_LEN
            if len(raw) % entry:
                self.problems.append(f"__versions size {len(raw)} is not a multiple of {entry}")
            for i in range(0, len(raw) - entry + 1, entry):
                (crc,) = struct.unpack_from(crc_fmt, raw, i)
                out.append(VersionEntry(_cstr(raw[i + crc_size:i + entry], 0), crc & 0xFFFFFFFF))
        crcs_s, names_s = self.by_name.get("__version_ext_crcs"), self.by_name.get("__version_ext_names")
        if crcs_s is not None and names_s is not None:
            # CONFIG_EXTENDED_MODVERSIONS (Linux 6.14+): u32 CRCs and NUL-separated names, same order.
            crcs = [c for (c,) in struct.iter_unpack(self.e + "I", self._section_bytes(crcs_s)[:crcs_s.size // 4 * 4])]
            raw_names = self._section_bytes(names_s).split(b"\0")
            names = [n.decode("utf-8", "replace") for n in raw_names if n]
            if len(crcs) != len(names):
                self.problems.append(f"__version_ext_crcs has {len(crcs)} entries, __version_ext_names {len(names)}")
            out.extend(VersionEntry(n, c) for n, c in zip(names, crcs, strict=False))  # a mismatch is a problem above
        return out

    def _this_module(self) -> tuple[str | None, int | None, int]:
        tms = [s for s in self.sections if s.name == ".gnu.linkonce.this_module"]
        if not tms:
            return None, None, 0
        s = tms[0]
        off = 24 if self.is64 else 12  # struct module: state, list_head, then char name[56]
        raw = self._section_bytes(s)
        name = _cstr(raw[off:off + MODULE_NAME_LEN], 0) if len(raw) >= off + MODULE_NAME_LEN else None
        return name, s.size, len(tms)

    def _klp_rela_sections(self) -> list[KlpRelaSection]:
        out = []
        for s in self.sections:
            if not (s.flags & SHF_RELA_LIVEPATCH or s.name.startswith(".klp.rela.")):
                continue
            entsize = (24 if self.is64 else 12) if s.type == SHT_RELA else (16 if self.is64 else 8)
            problem = ""
            # kernel/livepatch/core.c (6.1) klp_apply_section_relocs: sscanf ".klp.rela.%55[^.]"
            m = re.fullmatch(r"\.klp\.rela\.([^.]{1,55})\.(.+)", s.name)
            objname, secname = (m.group(1), m.group(2)) if m else ("", "")
            if not m:
                problem = "name is not .klp.rela.<objname>.<section> (objname at most 55 characters, no dot)"
            elif s.type != SHT_RELA:
                problem = f"type {s.type} is not SHT_RELA"
            elif not s.flags & SHF_RELA_LIVEPATCH:
                problem = "flag SHF_RELA_LIVEPATCH (0x00100000) is missing"
            out.append(KlpRelaSection(s.name, objname, secname, s.flags, s.size // entsize, problem))
        return out

    def _klp_symbols(self) -> list[KlpSymbol]:
        out = []
        pat = re.compile(r"\.klp\.sym\.([^.]{1,55})\.([^,]{1,511}),(\d+)")
        for name, _info, shndx, _v, _s in self.symbols:
            if not name.startswith(".klp.sym"):
                if shndx == SHN_LIVEPATCH:
                    out.append(KlpSymbol(name, problem="has st_shndx SHN_LIVEPATCH but no .klp.sym. name"))
                continue
            # kernel/livepatch/core.c (6.1) klp_resolve_symbols: sscanf(".klp.sym.%55[^.].%511[^,],%lu")
            m = pat.fullmatch(name)
            if not m:
                out.append(KlpSymbol(name, problem="name is not .klp.sym.<objname>.<symbol>,<sympos>"))
                continue
            problem = "" if shndx == SHN_LIVEPATCH else f"st_shndx is {shndx:#x}, not SHN_LIVEPATCH (0xff20)"
            sympos = int(m.group(3))
            if sympos > 0xFFFFFFFFFFFFFFFF:
                problem = "sympos overflows unsigned long"
                sympos = 0
            out.append(KlpSymbol(name, m.group(1), m.group(2), sympos, problem))
        return out

    def _index_relocations(self) -> None:
        """Relocation types per loader-applied section, and the relocations of data sections by offset."""
        self.reloc_types: Counter[int] = Counter()
        self.relocs: dict[int, dict[int, tuple[int, int, int]]] = {}  # target shndx -> offset -> (sym, type, addend)
        nsec = len(self.sections)
        for s in self.sections:
            if s.type not in (SHT_RELA, SHT_REL) or s.size == 0:
                continue
            rela = s.type == SHT_RELA
            if self.is64:
                fmt, size = (self.e + "QQq", 24) if rela else (self.e + "QQ", 16)
            else:
                fmt, size = (self.e + "IIi", 12) if rela else (self.e + "II", 8)
            raw = self._section_bytes(s)
            if len(raw) % size:
                raise self.fail(f"relocation section {s.name} size {len(raw)} is not a multiple of {size}")
            klp = bool(s.flags & SHF_RELA_LIVEPATCH)
            target = self.sections[s.info] if 0 < s.info < nsec else None
            # kernel/module/main.c (6.1) apply_relocations: sections whose target is not SHF_ALLOC are skipped.
            applied = klp or (target is not None and target.flags & SHF_ALLOC)
            wanted = target is not None and not klp and target.type != SHT_NOBITS and (
                target.name in (".data", ".kpatch.funcs", ".init.klp_funcs", "__klp_funcs", ".init.klp_objects",
                                "__klp_objects") or target.name.startswith((".data.", ".rodata")))
            if not (applied or wanted):
                continue
            shift, mask = (32, 0xFFFFFFFF) if self.is64 else (8, 0xFF)
            table = self.relocs.setdefault(s.info, {}) if wanted else None
            types = self.reloc_types
            for ent in struct.iter_unpack(fmt, raw):
                r_info = ent[1]
                if applied:
                    types[r_info & mask] += 1
                if table is not None:
                    table[ent[0]] = (r_info >> shift, r_info & mask, ent[2] if rela else 0)

    # -- patched functions -----------------------------------------------------------------------
    def _target_of(self, sym_index: int, addend: int) -> tuple[int, int, str] | None:
        """(section index, offset, symbol name) a relocation points at, or None."""
        if not 0 <= sym_index < len(self.symbols):
            return None
        name, info, shndx, value, _size = self.symbols[sym_index]
        if shndx == SHN_UNDEF or shndx >= SHN_LORESERVE or shndx >= len(self.sections):
            return None
        return shndx, value + addend, name if (info & 0xF) != STT_SECTION else ""

    def _string_at(self, shndx: int, off: int) -> str | None:
        s = self.sections[shndx]
        if s.type == SHT_NOBITS or not 0 <= off < s.size:
            return None
        raw = self._section_bytes(s)
        end = raw.find(b"\0", off)
        if end < 0:
            return None
        try:
            return raw[off:end].decode("ascii")
        except UnicodeDecodeError:
            return None

    def _function_at(self, shndx: int, off: int, fallback: str) -> str:
        funcs: dict[tuple[int, int], str] | None = getattr(self, "_funcs", None)
        if funcs is None:  # built once: a big module may have many candidate pointers
            funcs = {}
            for name, info, sh, value, _size in self.symbols:
                if (info & 0xF) == STT_FUNC:
                    funcs.setdefault((sh, value), name)
            self._funcs = funcs
        return funcs.get((shndx, off), fallback)

    def _pointer(self, shndx: int, off: int) -> int:
        s = self.sections[shndx]
        raw = self._section_bytes(s)
        fmt = self.e + ("Q" if self.is64 else "I")
        if off + struct.calcsize(fmt) > len(raw):
            return 0
        pointer: int = struct.unpack_from(fmt, raw, off)[0]
        return pointer

    def _patched_functions(self, modinfo: dict[str, list[str]]) -> list[PatchedFunction]:
        ptr = 8 if self.is64 else 4
        kp = self.by_name.get(".kpatch.funcs")
        if kp is not None:
            return self._kpatch_funcs(kp, ptr)
        for secname in (".init.klp_funcs", "__klp_funcs"):
            s = self.by_name.get(secname)
            if s is not None:
                return self._klp_funcs(s, ptr)
        if "Y" in modinfo.get("livepatch", ()) or any(s.flags & SHF_RELA_LIVEPATCH for s in self.sections):
            return self._klp_func_pairs(ptr)
        return []

    def _kpatch_funcs(self, s: Section, ptr: int) -> list[PatchedFunction]:
        # kpatch-build (kpatch 0.9) struct kpatch_patch_func: new_addr, new_size, old_addr, old_size,
        # sympos, name*, objname* = 7 words; name/objname relocate into .kpatch.strings.
        entry = 7 * ptr
        relocs = self.relocs.get(s.index, {})
        out = []
        for i in range(s.size // entry):
            base = i * entry
            name = self._reloc_string(relocs.get(base + 5 * ptr))
            obj = self._reloc_string(relocs.get(base + 6 * ptr))
            if name is None:
                self.problems.append(f".kpatch.funcs entry {i} has no name relocation")
                continue
            out.append(PatchedFunction(name, obj or "vmlinux", self._pointer(s.index, base + 4 * ptr),
                                       source="kpatch.funcs"))
        return out

    def _klp_funcs(self, s: Section, ptr: int) -> list[PatchedFunction]:
        # klp-build (6.19+) struct klp_func_ext: old_name*, new_func*, sympos -> 3 words.
        entry = 3 * ptr
        relocs = self.relocs.get(s.index, {})
        objnames = self._klp_object_names()
        obj = objnames[0] if len(objnames) == 1 else "vmlinux"
        out = []
        for i in range(s.size // entry):
            base = i * entry
            name = self._reloc_string(relocs.get(base))
            if name is None:
                continue
            new = self._reloc_function(relocs.get(base + ptr))
            sympos = self._pointer(s.index, base + 2 * ptr) & 0xFFFFFFFF
            out.append(PatchedFunction(name, obj, sympos, new or "", source="klp_funcs"))
        return out

    def _klp_object_names(self) -> list[str]:
        names: list[str] = []
        for secname in (".init.klp_objects", "__klp_objects"):
            s = self.by_name.get(secname)
            if s is None:
                continue
            for _off, rel in sorted(self.relocs.get(s.index, {}).items()):
                text = self._reloc_string(rel)
                if text and re.fullmatch(r"[A-Za-z0-9_-]{1,55}", text):
                    names.append(text)
        return names

    def _reloc_string(self, rel: tuple[int, int, int] | None) -> str | None:
        if rel is None:
            return None
        t = self._target_of(rel[0], rel[2])
        if t is None:
            return None
        s = self.sections[t[0]]
        if s.flags & SHF_ALLOC == 0 and not s.name.startswith(".kpatch"):
            return None
        return self._string_at(t[0], t[1])

    def _reloc_function(self, rel: tuple[int, int, int] | None) -> str | None:
        if rel is None:
            return None
        t = self._target_of(rel[0], rel[2])
        if t is None:
            return None
        s = self.sections[t[0]]
        if not s.flags & 0x4:  # SHF_EXECINSTR: a function lives in code
            return None
        return self._function_at(t[0], t[1], t[2] or f"{s.name}+{t[1]:#x}")

    def _klp_func_pairs(self, ptr: int) -> list[PatchedFunction]:
        """Hand-written klp_func arrays: a string pointer at X and a code pointer at X+ptr."""
        ident = re.compile(r"[A-Za-z_][A-Za-z0-9_.$]{0,510}")
        out: list[PatchedFunction] = []
        for shndx, table in self.relocs.items():
            sec = self.sections[shndx]
            if not sec.name.startswith(".data"):
                continue
            # struct klp_object (4.8+): name* then funcs*; a funcs pointer tells which object an array serves.
            array_obj: dict[int, str] = {}
            for off, rel in table.items():
                t = self._target_of(rel[0], rel[2])
                if t is not None and t[0] == shndx:
                    obj = self._reloc_string(table.get(off - ptr)) if off >= ptr else None
                    array_obj[t[1]] = obj or "vmlinux"
            starts = sorted(array_obj)
            for off in sorted(table):
                name = self._reloc_string(table[off])
                if name is None or not ident.fullmatch(name):
                    continue
                new = self._reloc_function(table.get(off + ptr))
                if new is None:
                    continue
                array_start = max((a for a in starts if a <= off), default=None)
                obj = array_obj.get(array_start, "vmlinux") if array_start is not None else "vmlinux"
                sympos = self._pointer(shndx, off + 2 * ptr)  # klp_func.old_sympos follows new_func
                out.append(PatchedFunction(name, obj, sympos, new, source="klp_func-relocs"))
        return out


def _cstr(blob: bytes, off: int) -> str:
    end = blob.find(b"\0", off)
    raw = blob[off:end] if end >= 0 else blob[off:]
    return raw.decode("utf-8", "replace")


def identity_sections(path: Path | str) -> tuple[bytes, str]:
    """A module file's raw `.note.gnu.build-id` section and its `.modinfo` srcversion (decompressed
    first); b"" / "" when it has none. ModuleFormatError when it is no ELF file kpipe can read."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    data, _ = load_module_bytes(Path(path))
    try:
        elf = ELFFile(io.BytesIO(data))
        notes = elf.get_section_by_name(".note.gnu.build-id")
        raw = notes.data() if notes is not None else b""
        srcversion = ""
        info = elf.get_section_by_name(".modinfo")
        if info is not None:
            for item in info.data().split(b"\0"):
                if item.startswith(b"srcversion="):
                    srcversion = item[len(b"srcversion="):].decode("ascii", "replace")
    except (ELFError, ValueError, struct.error) as e:
        raise ModuleFormatError(f"{path}: not a readable ELF module: {_short(e)}") from None
    return raw, srcversion
