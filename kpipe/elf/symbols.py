"""Kernel symbol indexes: what a target kernel exports (Module.symvers) and which symbols each
object holds (/proc/kallsyms, System.map, a vmlinux .symtab).

Parsers are pure (text or bytes in, SymbolSource out). An index is built once per kernel
source and cached in the store, keyed by release and content digest (table ksym_*), so a
warm validation only runs a handful of indexed SQL lookups.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kpipe.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from kpipe.store import Store
    from kpipe.transport.base import Transport

KINDS = ("symvers", "kallsyms", "system.map", "vmlinux")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ksym_sources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release TEXT NOT NULL,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,
    digest TEXT NOT NULL,
    exports INTEGER NOT NULL DEFAULT 0,
    symbols INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE (release, kind, digest)
);
CREATE TABLE IF NOT EXISTS ksym_exports (
    source_id INTEGER NOT NULL REFERENCES ksym_sources(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    crc INTEGER,
    module TEXT NOT NULL,
    export_type TEXT NOT NULL,
    namespace TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ksym_exports_name ON ksym_exports(source_id, name);
CREATE TABLE IF NOT EXISTS ksym_symbols (
    source_id INTEGER NOT NULL REFERENCES ksym_sources(id) ON DELETE CASCADE,
    object TEXT NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ksym_symbols_name ON ksym_symbols(source_id, object, name)
"""


@dataclass(frozen=True)
class Export:
    """One Module.symvers line."""

    name: str
    crc: int | None
    module: str  # "vmlinux" or a module path like "drivers/foo/bar"
    export_type: str  # EXPORT_SYMBOL | EXPORT_SYMBOL_GPL
    namespace: str = ""


@dataclass
class SymbolSource:
    """One parsed source: exports and/or per-object symbol counts."""

    kind: str
    origin: str
    digest: str
    exports: dict[str, Export] = field(default_factory=dict)
    objects: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def symbol_total(self) -> int:
        return sum(len(c) for c in self.objects.values())


class SymbolIndex:
    """Lookups the checks need; implemented over memory or the store."""

    sources: list[str]

    @property
    def has_exports(self) -> bool:
        raise NotImplementedError

    @property
    def has_symbols(self) -> bool:
        raise NotImplementedError

    def export(self, name: str) -> Export | None:
        """The export of name, or None."""
        raise NotImplementedError

    def has_object(self, obj: str) -> bool:
        """True if the index knows the symbols of object obj ("vmlinux" or a module name)."""
        raise NotImplementedError

    def symbol_count(self, obj: str, name: str) -> int:
        """How many symbols named name object obj holds (kallsyms semantics)."""
        raise NotImplementedError


class MemoryIndex(SymbolIndex):
    """An index over parsed sources held in memory."""

    def __init__(self, sources: Iterable[SymbolSource] = ()):
        self.exports: dict[str, Export] = {}
        self.objects: dict[str, Counter[str]] = {}
        self.sources = []
        for s in sources:
            self.add(s)

    def add(self, s: SymbolSource) -> None:
        self.sources.append(f"{s.kind}:{s.origin}")
        self.exports.update(s.exports)
        for obj, counts in s.objects.items():
            # Two sources of one object (kallsyms and vmlinux) describe the same symbols: keep the larger view.
            mine = self.objects.get(obj)
            if mine is None or sum(counts.values()) > sum(mine.values()):
                self.objects[obj] = counts

    @property
    def has_exports(self) -> bool:
        return bool(self.exports)

    @property
    def has_symbols(self) -> bool:
        return bool(self.objects)

    def export(self, name: str) -> Export | None:
        return self.exports.get(name)

    def has_object(self, obj: str) -> bool:
        return _modname(obj) in self.objects

    def symbol_count(self, obj: str, name: str) -> int:
        c = self.objects.get(_modname(obj))
        return c.get(name, 0) if c else 0


class StoreIndex(SymbolIndex):
    """An index over cached sources in the store: per-lookup indexed queries, nothing loaded up front."""

    def __init__(self, store: Store, source_ids: list[int], descriptions: list[str], has_exports: bool,
                 objects: set[str]):
        self.store = store
        self.ids = source_ids
        self.sources = descriptions
        self._has_exports = has_exports
        self._objects = objects
        self._marks = ",".join("?" * len(source_ids)) or "NULL"

    @property
    def has_exports(self) -> bool:
        return self._has_exports

    @property
    def has_symbols(self) -> bool:
        return bool(self._objects)

    def export(self, name: str) -> Export | None:
        rows = self.store.query(
            f"SELECT source_id, name, crc, module, export_type, namespace FROM ksym_exports "
            f"WHERE source_id IN ({self._marks}) AND name = ?", (*self.ids, name))
        if not rows:
            return None
        # Sources earlier in self.ids take precedence (explicitly given files before automatic ones).
        best = min(rows, key=lambda r: self.ids.index(r[0]))
        return Export(*tuple(best)[1:])

    def has_object(self, obj: str) -> bool:
        return _modname(obj) in self._objects

    def symbol_count(self, obj: str, name: str) -> int:
        row = self.store.query_one(
            f"SELECT MAX(count) FROM ksym_symbols WHERE source_id IN ({self._marks}) AND object = ? AND name = ?",
            (*self.ids, _modname(obj), name))
        return int(row[0]) if row and row[0] is not None else 0


def _modname(obj: str) -> str:
    # The kernel compares module names with '-' folded to '_' (kallsyms shows the folded name).
    return obj if obj == "vmlinux" else obj.replace("-", "_")


# -- parsers ---------------------------------------------------------------------------------------------------

def digest_of(data: bytes) -> str:
    """Hex sha256 of a source's bytes: the cache key next to the release."""
    return hashlib.sha256(data).hexdigest()


def parse_symvers(text: str, origin: str = "Module.symvers") -> SymbolSource:
    """Module.symvers: crc, symbol, module, export type, namespace (5.9+); 5.4-5.8 put the namespace third."""
    exports: dict[str, Export] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 4:
            raise ConfigError(f"{origin}:{lineno}: not a Module.symvers line (expected 4-5 tab-separated columns)")
        try:
            crc = int(cols[0], 16)
        except ValueError:
            raise ConfigError(f"{origin}:{lineno}: bad CRC {cols[0]!r}") from None
        if cols[3].startswith("EXPORT_"):
            name, module, etype, ns = cols[1], cols[2], cols[3], cols[4] if len(cols) > 4 else ""
        elif len(cols) >= 5 and cols[4].startswith("EXPORT_"):
            name, ns, module, etype = cols[1], cols[2], cols[3], cols[4]
        else:
            raise ConfigError(f"{origin}:{lineno}: no EXPORT_SYMBOL column")
        exports[name] = Export(name, crc, module, etype, ns.strip())
    return SymbolSource("symvers", origin, "", exports=exports)


_KALLSYMS_PLACEHOLDER = re.compile(r"The real System\.map is in")


def parse_nm_style(text: str, kind: str, origin: str) -> SymbolSource:
    """/proc/kallsyms ("addr type name [module]") or System.map ("addr type name")."""
    objects: dict[str, Counter[str]] = {}
    vm = objects.setdefault("vmlinux", Counter())
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3 or len(parts[1]) != 1:
            raise ConfigError(f"{origin}:{lineno}: not a {kind} line: {line[:80]!r}")
        if len(parts) >= 4 and parts[3].startswith("[") and parts[3].endswith("]"):
            objects.setdefault(_modname(parts[3][1:-1]), Counter())[parts[2]] += 1
        else:
            vm[parts[2]] += 1
    if kind == "system.map" and sum(vm.values()) <= 2 and _KALLSYMS_PLACEHOLDER.search(text):
        raise ConfigError(f"{origin}: is the distribution's placeholder System.map, without symbols",
                          hint="use the vmlinux of the -dbg/debuginfo package, or /proc/kallsyms of a running target")
    if not vm:
        del objects["vmlinux"]
    if not objects:
        raise ConfigError(f"{origin}: holds no symbols")
    return SymbolSource(kind, origin, "", objects=objects)


def parse_elf_symbols(data: bytes, origin: str, objname: str = "vmlinux") -> SymbolSource:
    """Per-name counts of a vmlinux (or module) .symtab through the raw struct path."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ConfigError(f"{origin}: not an ELF file")
    is64 = data[4] == 2
    e = "<" if data[5] == 1 else ">"
    try:
        if is64:
            shoff, = struct.unpack_from(e + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
            shfmt, symsize = e + "IIQQQQIIQQ", 24
        else:
            shoff, = struct.unpack_from(e + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(e + "HH", data, 0x2E)
            shfmt, symsize = e + "IIIIIIIIII", 16
        if shoff + shnum * shentsize > len(data) or shentsize != struct.calcsize(shfmt):
            raise ConfigError(f"{origin}: section headers lie outside the file")
        shdrs = list(struct.iter_unpack(shfmt, data[shoff:shoff + shnum * shentsize]))
        symtab = next((h for h in shdrs if h[1] == 2), None)  # SHT_SYMTAB
        if symtab is None:
            raise ConfigError(f"{origin}: has no .symtab (stripped)", hint="use the debuginfo vmlinux (-dbg package)")
        stroff, strsize = shdrs[symtab[6]][4], shdrs[symtab[6]][5]
        strtab = data[stroff:stroff + strsize]
        raw = data[symtab[4]:symtab[4] + symtab[5]]
        raw = raw[:len(raw) // symsize * symsize]
        # Only st_name, st_info and st_shndx are unpacked; everything per-symbol stays in C where possible:
        # names come from one split of the string table (latin-1 keeps byte offsets), counting is Counter's.
        fmt = (e + "IBxH16x") if is64 else (e + "I8xBxH")
        # kallsyms keeps functions, objects and untyped labels; section and file symbols never appear.
        offs = [n for n, i, sh in struct.iter_unpack(fmt, raw) if n and sh and (i & 0xF) < 3]
        text = strtab.decode("latin-1")
        parts = text.split("\0")
        starts = itertools.accumulate(parts, lambda a, p: a + len(p) + 1, initial=0)
        lookup = dict(zip(starts, parts, strict=False))  # starts has one more: the offset past the end
        found: Counter[str | None] = Counter(map(lookup.get, offs))
        tails = found.pop(None, 0)
        counts = cast("Counter[str]", found)  # None (an offset inside a string) is popped just above
        if tails:  # names that share a tail of another string (linker string merging)
            for off in offs:
                if off not in lookup:
                    counts[text[off:text.find("\0", off)]] += 1
    except (struct.error, IndexError) as ex:
        raise ConfigError(f"{origin}: malformed ELF ({ex})") from None
    decoded = counts
    if not text.isascii():
        decoded = Counter()
        for k, v in counts.items():
            decoded[k if k.isascii() else k.encode("latin-1").decode("utf-8", "replace")] += v
    return SymbolSource("vmlinux", origin, "", objects={_modname(objname): decoded})


def detect_kind(data: bytes, name: str) -> str:
    """Guess a symbol file's kind from its content (and name)."""
    if data[:4] == b"\x7fELF":
        return "vmlinux"
    head = data[:4096].decode("utf-8", "replace")
    first = head.splitlines()[0] if head.strip() else ""
    if first.startswith("0x") and "\t" in first:
        return "symvers"
    if "kallsyms" in name or "[" in head:
        return "kallsyms"
    return "system.map" if "system.map" in name.lower() else "kallsyms"


def parse_source(data: bytes, origin: str, kind: str | None = None) -> SymbolSource:
    """Parse any supported symbol source; kind is detected when not given."""
    from kpipe.elf.reader import decompress

    data, _ = decompress(data, origin)
    kind = kind or detect_kind(data, origin)
    if kind == "vmlinux":
        objname = "vmlinux"
        if data[16:18] in (b"\x01\x00", b"\x00\x01"):  # ET_REL: a module; its object is its name
            objname = Path(origin).name.split(".ko")[0]
        src = parse_elf_symbols(data, origin, objname)
    elif kind == "symvers":
        src = parse_symvers(data.decode("utf-8", "replace"), origin)
    elif kind in ("kallsyms", "system.map"):
        src = parse_nm_style(data.decode("utf-8", "replace"), kind, origin)
    else:
        raise ConfigError(f"unknown symbol source kind {kind!r}", hint=f"one of {', '.join(KINDS)}")
    src.digest = digest_of(data)
    return src


def read_source(path: Path | str, kind: str | None = None) -> tuple[bytes, str]:
    """(bytes, origin label) of a local symbol file; ConfigError if unreadable."""
    p = Path(path)
    try:
        return p.read_bytes(), str(p)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read symbol file: {e.strerror}") from None


# -- the store cache -------------------------------------------------------------------------------------------

def cached_source_id(store: Store, release: str, digest: str) -> int | None:
    """The id of an already indexed source of release with this digest, or None."""
    store.ensure_schema(SCHEMA)
    row = store.query_one("SELECT id FROM ksym_sources WHERE release = ? AND digest = ?", (release, digest))
    return int(row[0]) if row else None


def save_source(store: Store, release: str, src: SymbolSource) -> int:
    """Store a parsed source for release (idempotent by digest); return its id."""
    store.ensure_schema(SCHEMA)
    existing = cached_source_id(store, release, src.digest)
    if existing is not None:
        return existing
    with store.write() as c:
        # re-check inside the write transaction: another kpipe may have indexed it meanwhile
        row = c.execute("SELECT id FROM ksym_sources WHERE release = ? AND digest = ?",
                        (release, src.digest)).fetchone()
        if row is not None:
            return int(row[0])
        cur = c.execute("INSERT INTO ksym_sources (release, kind, origin, digest, exports, symbols, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (release, src.kind, src.origin, src.digest, len(src.exports), src.symbol_total, time.time()))
        assert cur.lastrowid is not None  # an INSERT always sets it
        sid = cur.lastrowid
        c.executemany("INSERT INTO ksym_exports (source_id, name, crc, module, export_type, namespace) "
                      "VALUES (?, ?, ?, ?, ?, ?)",
                      ((sid, e.name, e.crc, e.module, e.export_type, e.namespace) for e in src.exports.values()))
        c.executemany("INSERT INTO ksym_symbols (source_id, object, name, count) VALUES (?, ?, ?, ?)",
                      ((sid, obj, name, n) for obj, counts in src.objects.items() for name, n in counts.items()))
    return sid


def add_file(store: Store, release: str, path: Path | str, kind: str | None = None) -> int:
    """Index a symbol file for release (parsed only if its digest is new); return the source id."""
    data, origin = read_source(path)
    sid = cached_source_id(store, release, digest_of(data))
    if sid is not None:
        return sid
    src = parse_source(data, origin, kind)
    src.digest = digest_of(data)
    return save_source(store, release, src)


def list_sources(store: Store, release: str | None = None) -> list[dict[str, Any]]:
    """Cached sources (newest first), optionally for one release."""
    store.ensure_schema(SCHEMA)
    sql = "SELECT id, release, kind, origin, digest, exports, symbols, created_at FROM ksym_sources"
    rows = store.query(sql + (" WHERE release = ?" if release else "") + " ORDER BY created_at DESC",
                       (release,) if release else ())
    return [dict(r) for r in rows]


def store_index(store: Store, source_ids: list[int]) -> StoreIndex:
    """A StoreIndex over these cached source ids."""
    store.ensure_schema(SCHEMA)
    if not source_ids:
        return StoreIndex(store, [], [], False, set())
    marks = ",".join("?" * len(source_ids))
    rows = store.query(f"SELECT id, kind, origin, exports, symbols FROM ksym_sources WHERE id IN ({marks})",
                       tuple(source_ids))
    rows.sort(key=lambda r: source_ids.index(r["id"]))
    objs = {r[0] for r in store.query(f"SELECT DISTINCT object FROM ksym_symbols WHERE source_id IN ({marks})",
                                      tuple(source_ids))} if any(r["symbols"] for r in rows) else set()
    return StoreIndex(store, list(source_ids), [f"{r['kind']}:{r['origin']}" for r in rows],
                      any(r["exports"] for r in rows), objs)


def release_index(store: Store, release: str, first_ids: Iterable[int] = (), *, auto: bool = True) -> StoreIndex:
    """An index over first_ids (in precedence order), then, with auto, the newest cached source of each
    kind of release that first_ids do not already provide (exports vs symbols)."""
    ids = list(dict.fromkeys(first_ids))
    if auto:
        have = {("exports" if r["exports"] else "symbols") for r in list_sources(store) if r["id"] in ids}
        seen: set[str] = set()
        for row in list_sources(store, release):
            what = "exports" if row["kind"] == "symvers" else "symbols"
            if what in have or row["kind"] in seen:
                continue
            seen.add(row["kind"])
            ids.append(int(row["id"]))
    return store_index(store, ids)


# -- fetching from a host --------------------------------------------------------------------------------------

def symvers_candidates(release: str) -> list[str]:
    """Where distributions install Module.symvers for a release (Debian/Ubuntu, then RHEL-likes)."""
    return [f"/lib/modules/{release}/build/Module.symvers", f"/usr/src/linux-headers-{release}/Module.symvers",
            f"/usr/src/kernels/{release}/Module.symvers"]


# One round trip finds everything: the running release, a private snapshot of /proc/kallsyms (proc files
# report size 0, so they cannot be copied directly) when the host runs the wanted release, and the first
# readable Module.symvers. Values travel as "$1".. only.
_PROBE_SH = r"""
rel=$(cat /proc/sys/kernel/osrelease 2>/dev/null)
echo "release=$rel"
want=$1; shift
if [ "$rel" = "$want" ]; then
  f=$(mktemp "${TMPDIR:-/tmp}/kpipe-ksyms.XXXXXX") && cat /proc/kallsyms > "$f" && echo "kallsyms=$f"
fi
for p in "$@"; do if [ -r "$p" ]; then echo "symvers=$p"; break; fi; done
true
"""


def _copy_text(transport: Transport, remote: str) -> str | None:
    """A remote file's text, copied as a file: bulk data through a command's stdout is very slow over SSH."""
    import tempfile

    from kpipe.commands import Command

    with tempfile.TemporaryDirectory(prefix="kpipe-fetch-") as tmp:
        local = Path(tmp) / "copy"
        try:
            transport.get(remote, local)
            return local.read_bytes().decode("utf-8", "replace")
        except (TransportError, OSError):
            res = transport.run(Command.of("cat", remote, label="read", timeout=600))  # no file transfer here
            return res.stdout if res.ok else None


def fetch_from_host(transport: Transport, release: str) -> list[SymbolSource]:
    """Read /proc/kallsyms (only if the host runs `release`) and Module.symvers from a host; parsed sources.

    TransportError if nothing usable could be read.
    """
    from kpipe.commands import Command

    host = getattr(transport, "name", "host")
    res = transport.run(Command.script(_PROBE_SH, release, *symvers_candidates(release), label="symbols-probe",
                                       timeout=120))
    found = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    out: list[SymbolSource] = []
    problems: list[str] = []
    running_release = found.get("release", "")
    snapshot = found.get("kallsyms")
    if running_release != release:
        problems.append(f"the host runs {running_release or 'an unknown kernel'}, not {release}: kallsyms skipped")
    elif snapshot:
        try:
            text = _copy_text(transport, snapshot)
        finally:
            transport.run(Command.of("rm", "-f", "--", snapshot, label="cleanup"))
        if text and text.strip():
            src = parse_nm_style(text, "kallsyms", f"{host}:/proc/kallsyms")
            src.digest = digest_of(text.encode())
            out.append(src)
        else:
            problems.append("cannot read /proc/kallsyms")
    else:
        problems.append("cannot snapshot /proc/kallsyms")
    path = found.get("symvers")
    text = _copy_text(transport, path) if path else None
    if path and text and text.strip():
        src = parse_symvers(text, f"{host}:{path}")
        src.digest = digest_of(text.encode())
        out.append(src)
    else:
        problems.append(f"no Module.symvers for {release} under /lib/modules/{release}/build or /usr/src")
    if not out:
        raise TransportError(f"{host}: no symbol data for {release}: " + "; ".join(problems), host=host,
                             hint="fetch from a host running that kernel, or install its headers there")
    return out


def local_symvers(release: str) -> Path | None:
    """Module.symvers of locally installed headers for release, if present."""
    for cand in symvers_candidates(release):
        p = Path(cand)
        if p.is_file():
            return p
    return None
