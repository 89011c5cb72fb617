"""Shared helpers for the ELF / checks / signing tests (no tests here).

- `sample_module()`: a REAL livepatch module (like samples/livepatch/livepatch-sample.c, replacing
  cmdline_proc_show) built once per test process against the installed Debian headers. Never loaded.
- `ElfBuilder`: writes synthetic ET_REL modules by code, so every malformed or unusual shape is a
  fixture generated here rather than a committed binary.
- `make_signing_cert()`: RSA / ECDSA keys with module-signing certificate extensions.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import kenv

# The installed headers (tests/kenv.py): a module that imports these helpers skips
# (fails under KPIPE_REQUIRE_REAL=1) when no headers are installed.
KERNEL = kenv.kernel_env(module_level=True)
RELEASE = KERNEL.release
HEADERS = KERNEL.headers
SIGN_FILE = KERNEL.sign_file
VERMAGIC = KERNEL.vermagic

LIVEPATCH_C = r"""
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = livepatch_cmdline_proc_show,
	}, { }
};

static struct klp_object objs[] = {
	{
		/* name being NULL means vmlinux */
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	return klp_enable_patch(&patch);
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
"""

_WORK = Path(tempfile.mkdtemp(prefix="kpipe-elf-tests-"))
atexit.register(shutil.rmtree, _WORK, True)


@functools.cache
def _build_sample() -> Path:
    kenv.require_tool("make")
    src = _WORK / "lpsample"
    src.mkdir(exist_ok=True)
    (src / "livepatch-sample.c").write_text(LIVEPATCH_C)
    (src / "Kbuild").write_text("obj-m += livepatch-sample.o\n")
    proc = subprocess.run(["make", "-C", str(HEADERS), f"M={src}", "modules"], capture_output=True, text=True,
                          timeout=300)
    ko = src / "livepatch-sample.ko"
    if proc.returncode != 0 or not ko.is_file():
        raise RuntimeError(f"building the sample module failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return ko


def sample_module() -> Path:
    """The real livepatch sample module, built once against the discovered headers."""
    return _build_sample()


@functools.cache
def stripped_module() -> bytes:
    """The sample module without debug sections (small: a fast fuzzing seed)."""
    out = _WORK / "stripped.ko"
    subprocess.run(["strip", "--strip-debug", "-o", str(out), str(sample_module())], check=True)
    return out.read_bytes()


def sample_bytes() -> bytes:
    return sample_module().read_bytes()


def scratch(name: str) -> Path:
    """A fresh path under the shared scratch folder."""
    d = Path(tempfile.mkdtemp(dir=_WORK))
    return d / name


# -- keys and certificates -------------------------------------------------------------------------------------

@functools.cache
def make_signing_cert(kind: str = "rsa", cn: str = "kpipe test signing key") -> tuple[Path, Path]:
    """(key.pem, cert.pem) with the kernel's module-signing extensions; kind rsa | rsa4096 | p256 | p384."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if kind.startswith("rsa"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=4096 if kind == "rsa4096" else 2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kpipe tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{cn} {kind}")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    d = Path(tempfile.mkdtemp(dir=_WORK))
    kp, cp = d / f"{kind}.key", d / f"{kind}.crt"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


# -- synthetic ELF modules ----------------------------------------------------------------------------------------

@dataclass
class ElfBuilder:
    """A tiny ELF writer for ET_REL kernel-module-shaped files (ELF64 or ELF32, either endianness)."""

    machine: int = 62
    etype: int = 1
    is64: bool = True
    little: bool = True
    sections: list[dict] = field(default_factory=list)
    symbols: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # name, info, shndx, value, size

    def section(self, name: str, data: bytes = b"", *, type: int = 1, flags: int = 0x2, link: int = 0,
                info: int = 0, entsize: int = 0, align: int = 8) -> int:
        """Add a section; return its index (index 0 is the null section)."""
        self.sections.append(dict(name=name, data=data, type=type, flags=flags, link=link, info=info,
                                  entsize=entsize, align=align))
        return len(self.sections)

    def symbol(self, name: str, *, bind: int = 1, type: int = 0, shndx: int = 0, value: int = 0, size: int = 0) -> int:
        """Add a symbol; return its symtab index (0 is the null symbol)."""
        self.symbols.append((name, (bind << 4) | type, shndx, value, size))
        return len(self.symbols)

    def rela(self, target: int, entries: list[tuple[int, int, int, int]], *, name: str | None = None,
             flags: int = 0x40) -> int:
        """A RELA section for section index target: entries (offset, symbol index, type, addend).
        The symtab index is patched in at write time (link = -1 marker)."""
        e = "<" if self.little else ">"
        if self.is64:
            data = b"".join(struct.pack(e + "QQq", off, (sym << 32) | typ, add) for off, sym, typ, add in entries)
            ent = 24
        else:
            data = b"".join(struct.pack(e + "IIi", off, (sym << 8) | typ, add) for off, sym, typ, add in entries)
            ent = 12
        tname = self.sections[target - 1]["name"]
        return self.section(name or f".rela{tname}", data, type=4, flags=flags, link=-1, info=target, entsize=ent)

    def build(self) -> bytes:
        e = "<" if self.little else ">"
        strtab = bytearray(b"\0")
        sym_rows = [(0, 0, 0, 0, 0)]
        # locals first, as ELF requires (sh_info = first global)
        for name, info, shndx, value, size in self.symbols:
            off = len(strtab)
            strtab += name.encode() + b"\0"
            sym_rows.append((off, info, shndx, value, size))
        if self.is64:
            symdata = b"".join(struct.pack(e + "IBBHQQ", n, i, 0, s, v, z) for n, i, s, v, z in sym_rows)
        else:
            symdata = b"".join(struct.pack(e + "IIIBBH", n, v, z, i, 0, s) for n, i, s, v, z in sym_rows)
        secs = list(self.sections)
        symtab_index = len(secs) + 1
        secs.append(dict(name=".symtab", data=symdata, type=2, flags=0, link=symtab_index + 1, info=1,
                         entsize=24 if self.is64 else 16, align=8))
        secs.append(dict(name=".strtab", data=bytes(strtab), type=3, flags=0, link=0, info=0, entsize=0, align=1))
        shstr = bytearray(b"\0")
        names = []
        for s in secs:
            names.append(len(shstr))
            shstr += s["name"].encode() + b"\0"
        names.append(len(shstr))
        shstr += b".shstrtab\0"
        secs.append(dict(name=".shstrtab", data=bytes(shstr), type=3, flags=0, link=0, info=0, entsize=0, align=1))
        ehsize = 64 if self.is64 else 52
        body = bytearray(b"\0" * ehsize)
        offsets = []
        for s in secs:
            while len(body) % max(1, s["align"]):
                body += b"\0"
            offsets.append(len(body))
            if s["type"] != 8:
                body += s["data"]
        while len(body) % 8:
            body += b"\0"
        shoff = len(body)
        shentsize = 64 if self.is64 else 40
        shnum = len(secs) + 1
        body += b"\0" * shentsize
        for i, s in enumerate(secs):
            link = symtab_index if s["link"] == -1 else s["link"]
            size = len(s["data"]) if s["type"] != 8 else s.get("size", len(s["data"]))
            if self.is64:
                body += struct.pack(e + "IIQQQQIIQQ", names[i], s["type"], s["flags"], 0, offsets[i], size, link,
                                    s["info"], s["align"], s["entsize"])
            else:
                body += struct.pack(e + "IIIIIIIIII", names[i], s["type"], s["flags"], 0, offsets[i], size, link,
                                    s["info"], s["align"], s["entsize"])
        ident = b"\x7fELF" + bytes([2 if self.is64 else 1, 1 if self.little else 2, 1, 0]) + b"\0" * 8
        if self.is64:
            hdr = ident + struct.pack(e + "HHIQQQIHHHHHH", self.etype, self.machine, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                      shentsize, shnum, shnum - 1)
        else:
            hdr = ident + struct.pack(e + "HHIIIIIHHHHHH", self.etype, self.machine, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                      shentsize, shnum, shnum - 1)
        body[:ehsize] = hdr
        return bytes(body)


def this_module_blob(name: str, size: int = 896) -> bytes:
    blob = bytearray(size)
    raw = name.encode()[:55]
    blob[24:24 + len(raw)] = raw
    return bytes(blob)


def modinfo_blob(**kv: str | list[str]) -> bytes:
    out = b""
    for k, v in kv.items():
        for item in (v if isinstance(v, list) else [v]):
            out += f"{k}={item}".encode() + b"\0"
    return out


def versions_blob(entries: list[tuple[str, int]]) -> bytes:
    return b"".join(struct.pack("<Q", crc) + name.encode().ljust(56, b"\0") for name, crc in entries)


def synthetic_livepatch(*, name: str = "lp_synth", klp_syms: tuple[str, ...] = (".klp.sym.vmlinux.foo_helper,0",),
                        klp_shndx: int = 0xFF20, klp_rela_name: str = ".klp.rela.vmlinux..text",
                        klp_rela_flags: int = 0x00100000 | 0x2, livepatch: bool = True, license: str = "GPL",
                        modinfo_name: str | None = None, machine: int = 62, vermagic: str = VERMAGIC,
                        reloc_type: int = 2, kpatch_funcs: tuple[tuple[str, str, int], ...] = (),
                        this_module: bytes | None = None) -> bytes:
    """A livepatch-shaped module: .klp.rela section + .klp.sym symbols (+ optional .kpatch.funcs)."""
    b = ElfBuilder(machine=machine)
    text = b.section(".text", b"\x90" * 64, flags=0x6, align=16)
    info = dict(name=modinfo_name if modinfo_name is not None else name, vermagic=vermagic, license=license,
                depends="")
    if livepatch:
        info["livepatch"] = "Y"
    b.section(".modinfo", modinfo_blob(**info), align=1)
    b.section(".gnu.linkonce.this_module", this_module if this_module is not None else this_module_blob(name),
              flags=0x3, align=64)
    b.symbol("new_foo", bind=0, type=2, shndx=text, value=0, size=16)
    klp = [b.symbol(s, bind=1, shndx=klp_shndx) for s in klp_syms]
    b.symbol("__this_module", bind=1, type=1, shndx=3, size=896)
    b.rela(text, [(8 + 8 * i, s, reloc_type, -4) for i, s in enumerate(klp)], name=klp_rela_name,
           flags=klp_rela_flags)
    if kpatch_funcs:
        strings = bytearray()
        offs = []
        for fname, obj, _pos in kpatch_funcs:
            offs.append((len(strings), len(strings) + len(fname) + 1))
            strings += fname.encode() + b"\0" + obj.encode() + b"\0"
        kstr = b.section(".kpatch.strings", bytes(strings), align=1)
        funcs = b"".join(struct.pack("<QQQQQQQ", 0, 16, 0, 16, pos, 0, 0) for _f, _o, pos in kpatch_funcs)
        kf = b.section(".kpatch.funcs", funcs, flags=0x3)
        ssym = b.symbol("", bind=0, type=3, shndx=kstr)  # section symbol of .kpatch.strings
        ents = []
        for i, (noff, ooff) in enumerate(offs):
            ents += [(i * 56 + 40, ssym, 1, noff), (i * 56 + 48, ssym, 1, ooff)]
        b.rela(kf, ents)
    return b.build()


def kallsyms_text(entries: dict[str, int], module_entries: dict[tuple[str, str], int] | None = None) -> str:
    """A /proc/kallsyms-format text: name -> how many times it occurs in vmlinux."""
    lines = []
    addr = 0xFFFFFFFF81000000
    for name, n in entries.items():
        for _ in range(n):
            lines.append(f"{addr:016x} t {name}")
            addr += 16
    for (mod, name), n in (module_entries or {}).items():
        for _ in range(n):
            lines.append(f"{addr:016x} t {name}\t[{mod}]")
            addr += 16
    return "\n".join(lines) + "\n"
