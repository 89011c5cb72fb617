"""Checks: a module + what we know of its target kernel -> findings, each with a stable id.

Pure: no files, no network. Each check mirrors a refusal of the kernel's module loader or
livepatch core (Linux 6.1 unless stated) so that a module kpipe calls valid loads, and one
it rejects would have been refused by the kernel, with the kernel's own words in the message.
A check that lacks its reference data yields a `skipped` finding saying how to provide it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kpipe.elf.reader import ModuleInfo
from kpipe.elf.signature import (
    KERNEL_HASHES,
    Certificate,
    Pkcs7Error,
    parse_pkcs7,
    verify_pkcs7,
)
from kpipe.elf.symbols import SymbolIndex
from kpipe.findings import Finding, Severity

__all__ = ["SEVERITIES", "Finding", "KernelFacts", "Severity", "expected_vermagic", "report_ok", "run_checks"]

SEVERITIES = tuple(Severity)  # error, warning, info, skipped

ARCH_MACHINE = {"x86_64": 62, "aarch64": 183, "loongarch64": 258}
# MODULE_ARCH_VERMAGIC (arch/*/include/asm/module.h, 6.1)
ARCH_VERMAGIC = {"x86_64": "", "aarch64": "aarch64", "loongarch64": "LOONGARCH 64BIT "}

# Relocation types the arch's apply_relocate_add accepts (6.1). x86_64: arch/x86/kernel/module.c.
ALLOWED_RELOCS: dict[str, dict[int, str]] = {
    "x86_64": {0: "R_X86_64_NONE", 1: "R_X86_64_64", 10: "R_X86_64_32", 11: "R_X86_64_32S", 2: "R_X86_64_PC32",
               4: "R_X86_64_PLT32", 24: "R_X86_64_PC64"},
    # arch/arm64/kernel/module.c (6.1)
    "aarch64": {0: "R_AARCH64_NONE", 256: "R_ARM_NONE", 257: "R_AARCH64_ABS64", 258: "R_AARCH64_ABS32",
                259: "R_AARCH64_ABS16", 260: "R_AARCH64_PREL64", 261: "R_AARCH64_PREL32", 262: "R_AARCH64_PREL16",
                **{n: f"R_AARCH64_MOVW_UABS_{n}" for n in range(263, 270)},
                **{n: f"R_AARCH64_MOVW_SABS_{n}" for n in range(270, 273)},
                **{n: f"R_AARCH64_MOVW_PREL_{n}" for n in range(287, 294)},
                273: "R_AARCH64_LD_PREL_LO19", 274: "R_AARCH64_ADR_PREL_LO21", 275: "R_AARCH64_ADR_PREL_PG_HI21",
                276: "R_AARCH64_ADR_PREL_PG_HI21_NC", 277: "R_AARCH64_ADD_ABS_LO12_NC",
                278: "R_AARCH64_LDST8_ABS_LO12_NC", 284: "R_AARCH64_LDST16_ABS_LO12_NC",
                285: "R_AARCH64_LDST32_ABS_LO12_NC", 286: "R_AARCH64_LDST64_ABS_LO12_NC",
                299: "R_AARCH64_LDST128_ABS_LO12_NC", 279: "R_AARCH64_TSTBR14", 280: "R_AARCH64_CONDBR19",
                282: "R_AARCH64_JUMP26", 283: "R_AARCH64_CALL26"},
}

# What apply_relocate_add logs for a type outside that table (arch/*/kernel/module.c, 6.1-7.2), so that the
# finding and the kernel's log line (kpipe.fleet.livepatch) read alike.
LOADER_REFUSAL = {"x86_64": "{module}: Unknown rela relocation: {type}",
                  "aarch64": "module {module}: unsupported RELA relocation: {type}"}

# include/linux/license.h (6.1) license_is_gpl_compatible
GPL_COMPATIBLE = ("GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL")
LIVEPATCH_API = ("klp_enable_patch", "klp_register_patch", "klp_shadow_alloc", "klp_shadow_get")


@dataclass(frozen=True)
class KernelFacts:
    """What kpipe knows about the target kernel; None means unknown (its checks are skipped)."""

    release: str
    arch: str = "unknown"
    vermagic: str | None = None  # the full expected vermagic string, trailing space included
    vermagic_source: str = ""
    modversions: bool | None = None
    sig_hash: str | None = None  # CONFIG_MODULE_SIG_HASH
    sig_force: bool | None = None  # CONFIG_MODULE_SIG_FORCE
    this_module_size: int | None = None  # sizeof(struct module), from a stock module
    this_module_source: str = ""
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_vermagic(release: str, config: dict[str, str], arch: str) -> str:
    """include/linux/vermagic.h (6.1): release + SMP + preempt/preempt_rt + mod_unload + modversions + arch."""
    def on(k: str) -> bool:
        return config.get(k) in ("y", "m")

    parts = [release + " "]
    if on("CONFIG_SMP"):
        parts.append("SMP ")
    # CONFIG_PREEMPT_BUILD exists since 5.16 (PREEMPT_DYNAMIC); earlier kernels test CONFIG_PREEMPT.
    if on("CONFIG_PREEMPT_BUILD") or (on("CONFIG_PREEMPT") and "CONFIG_PREEMPT_BUILD" not in config
                                      and not on("CONFIG_PREEMPT_RT")):
        parts.append("preempt ")
    elif on("CONFIG_PREEMPT_RT"):
        parts.append("preempt_rt ")
    if on("CONFIG_MODULE_UNLOAD"):
        parts.append("mod_unload ")
    if on("CONFIG_MODVERSIONS"):
        parts.append("modversions ")
    parts.append(ARCH_VERMAGIC.get(arch, ""))
    return "".join(parts)


@dataclass
class _Out:
    findings: list[Finding] = field(default_factory=list)

    def add(self, id: str, severity: Severity | str, message: str, hint: str = "") -> None:
        self.findings.append(Finding(id, Severity(severity), message, hint))


def run_checks(module: ModuleInfo, facts: KernelFacts, index: SymbolIndex | None = None,
               certs: Iterable[Certificate] = (), *, payload: bytes | memoryview | None = None,
               sm2_user_id: str | None = None, require_signature: bool = False) -> list[Finding]:
    """Every check of module against facts, index and certs; payload (the signed bytes) enables sig checks."""
    out = _Out()
    certs = list(certs)
    _elf(out, module, facts)
    _vermagic(out, module, facts)
    _name(out, module)
    _this_module(out, module, facts)
    _livepatch(out, module)
    _symbols(out, module, facts, index)
    _klp(out, module, index)
    _relocs(out, module, facts)
    _signature(out, module, facts, certs, payload, sm2_user_id, require_signature or bool(certs))
    return out.findings


def report_ok(findings: Iterable[Finding], *, strict: bool = False) -> bool:
    """True when no finding is an error (nor, with strict, skipped)."""
    bad = (Severity.ERROR, Severity.SKIPPED) if strict else (Severity.ERROR,)
    return not any(f.severity in bad for f in findings)


# -- ELF ---------------------------------------------------------------------------------------------------------

def _elf(out: _Out, m: ModuleInfo, facts: KernelFacts) -> None:
    h = m.header
    if h.elf_class == 64:
        out.add("elf.class", "info", "ELFCLASS64")
    else:
        out.add("elf.class", "error", f"ELF class is {h.elf_class}-bit; {facts.arch or 'the target'} kernels load "
                "64-bit modules", "rebuild for the target architecture")
    if h.endianness == "little":
        out.add("elf.endianness", "info", "little-endian")
    else:
        out.add("elf.endianness", "error", f"module is {h.endianness}-endian; the target is little-endian")
    if h.type == 1:
        out.add("elf.type", "info", "ET_REL")
    else:
        out.add("elf.type", "error", f"e_type is {h.type_name}, the kernel loads only ET_REL modules",
                "a kernel module is a relocatable object (.ko)")
    want = ARCH_MACHINE.get(facts.arch)
    if want is None:
        out.add("elf.machine", "skipped", f"architecture of {facts.release} is unknown ({facts.arch})",
                "name it with `arch` in the kernel's [[kernels]] entry")
    elif h.machine == want:
        out.add("elf.machine", "info", f"e_machine {h.machine} ({h.machine_name}) matches {facts.arch}")
    else:
        out.add("elf.machine", "error", f"e_machine is {h.machine} ({h.machine_name}); {facts.release} is "
                f"{facts.arch} (e_machine {want})", "build the module on a build host of the target architecture")
    for p in m.problems:
        out.add("elf.structure", "warning", p)


# -- vermagic ----------------------------------------------------------------------------------------------------

def _vermagic(out: _Out, m: ModuleInfo, facts: KernelFacts) -> None:
    vm = m.vermagic
    if vm is None:
        out.add("vermagic.release", "error", "the module has no vermagic in .modinfo",
                "the kernel refuses it ('no version magic'); build it with kbuild")
        return
    release, _, flags = vm.partition(" ")
    # With __versions the kernel skips the release word (same_magic, 6.1); kpipe still requires it,
    # because the patch was built for one exact kernel.
    if release == facts.release:
        out.add("vermagic.release", "info", f"vermagic release {release}")
    else:
        out.add("vermagic.release", "error", f"vermagic release is {release!r}, the target kernel is "
                f"{facts.release!r}", "build the patch for this exact kernel release")
    if facts.vermagic is None:
        out.add("vermagic.flags", "skipped", f"no expected vermagic for {facts.release}",
                f"install its headers (/usr/src/linux-headers-{facts.release}) or set `vermagic` in its "
                "[[kernels]] entry")
        return
    want_flags = facts.vermagic.partition(" ")[2]
    if flags == want_flags:
        out.add("vermagic.flags", "info", f"vermagic flags '{flags}' ({facts.vermagic_source})")
    else:
        out.add("vermagic.flags", "error", f"version magic '{vm}' should be '{facts.vermagic}' (flags "
                f"'{flags}' vs '{want_flags}', from {facts.vermagic_source})",
                "build against the target's own headers and .config")


# -- names -------------------------------------------------------------------------------------------------------

def _name(out: _Out, m: ModuleInfo) -> None:
    name = m.name
    if not name:
        out.add("name.present", "error", "the module has no name= in .modinfo", "build it with kbuild (modpost)")
        return
    if m.this_module_name is not None:
        if m.this_module_name == name:
            out.add("name.match", "info", f"name {name!r} in .modinfo and this_module")
        else:
            out.add("name.match", "error", f"modinfo name {name!r} differs from this_module name "
                    f"{m.this_module_name!r}", "the module was edited after modpost; rebuild it")
    if len(name) > 55:
        out.add("name.length", "error", f"name {name!r} has {len(name)} characters; the kernel's limit is 55",
                "shorten the patch name")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_-"))})
        out.add("name.chars", "error", f"name {name!r} contains characters outside [A-Za-z0-9_-]: {bad}",
                "rename the patch")


def _this_module(out: _Out, m: ModuleInfo, facts: KernelFacts) -> None:
    if m.this_module_count != 1:
        out.add("this_module.count", "error", f"{m.this_module_count} .gnu.linkonce.this_module sections; the kernel "
                "needs exactly one ('No module found in object')", "build the module with kbuild")
        return
    if facts.this_module_size is None:
        out.add("this_module.size", "skipped", f"sizeof(struct module) of {facts.release} is unknown "
                f"(this module: {m.this_module_size} bytes)",
                f"install a stock module of the kernel under /lib/modules/{facts.release}/ or set "
                "options.this_module_size in its [[kernels]] entry")
    elif m.this_module_size == facts.this_module_size:
        out.add("this_module.size", "info", f"struct module is {m.this_module_size} bytes, as in "
                f"{facts.this_module_source}")
    else:
        out.add("this_module.size", "error", f".gnu.linkonce.this_module is {m.this_module_size} bytes; "
                f"{facts.release} has {facts.this_module_size} ({facts.this_module_source})",
                "the module was built against other headers or .config")


# -- livepatch ---------------------------------------------------------------------------------------------------

def _looks_livepatch(m: ModuleInfo) -> bool:
    return (bool(m.klp_relocations) or any(s.name == ".kpatch.funcs" for s in m.sections)
            or any(u.name in LIVEPATCH_API for u in m.undefined))


def _livepatch(out: _Out, m: ModuleInfo) -> None:
    declared = "Y" in m.modinfo.get("livepatch", [])
    if not declared and not _looks_livepatch(m):
        out.add("livepatch.flag", "info", "not a livepatch module (no livepatch=Y, no klp relocations)")
        return
    if declared:
        out.add("livepatch.flag", "info", "livepatch=Y")
    else:
        out.add("livepatch.flag", "error", f"module {m.name!r} is not marked as a livepatch module "
                "(no livepatch=Y in .modinfo) but uses livepatch structures",
                "add MODULE_INFO(livepatch, \"Y\")")
    lic = m.first("license")
    if lic in GPL_COMPATIBLE:
        out.add("license.gpl", "info", f"license {lic!r}")
    else:
        out.add("license.gpl", "error", f"license is {lic!r}; livepatch modules must be GPL-compatible "
                "(klp_* are EXPORT_SYMBOL_GPL)", "MODULE_LICENSE(\"GPL\")")
    if not m.patched_functions and not m.klp_relocations:
        out.add("klp.funcs", "warning", "no patched functions found (.kpatch.funcs, klp_funcs or klp_func "
                "arrays)")


# -- symbols -----------------------------------------------------------------------------------------------------

def _symbols(out: _Out, m: ModuleInfo, facts: KernelFacts, index: SymbolIndex | None) -> None:
    if index is None or not index.has_exports:
        out.add("symbols.exported", "skipped", f"no Module.symvers for {facts.release}: undefined symbols and CRCs "
                "not checked", f"install linux-headers-{facts.release}, pass --symbols Module.symvers, or run "
                f"`kpipe kernels symbols fetch {facts.release} --from HOST`")
        return
    versions = {v.name: v.crc for v in m.versions}
    imports = set(m.modinfo.get("import_ns", []))
    gpl_ok = m.first("license") in GPL_COMPATIBLE
    unknown, crc_bad, ns_bad, gpl_bad, no_version = [], [], [], [], []
    for u in m.undefined:
        if u.name == "_GLOBAL_OFFSET_TABLE_" and m.header.machine in (3, 62):
            continue  # kernel/module/main.c ignore_undef_symbol (6.1)
        exp = index.export(u.name)
        if exp is None:
            if not u.weak:
                unknown.append(u.name)
            continue
        if exp.namespace and exp.namespace not in imports:
            ns_bad.append((u.name, exp.namespace))
        if exp.export_type.endswith("_GPL") and not gpl_ok:
            gpl_bad.append(u.name)
        if u.name not in versions and m.versions:
            no_version.append(u.name)
    for name, crc in versions.items():
        exp = index.export(name)
        if exp is not None and exp.crc is not None and exp.crc != crc:
            crc_bad.append((name, crc, exp.crc))
    if unknown:
        out.add("symbols.exported", "error", f"{len(unknown)} undefined symbol(s) not exported by {facts.release}: "
                f"{', '.join(unknown[:20])} (the kernel: 'Unknown symbol')",
                "the patch calls functions the target does not export; use klp relocations or kallsyms")
    else:
        out.add("symbols.exported", "info", f"all {len(m.undefined)} undefined symbols are exported")
    if crc_bad:
        out.add("symbols.crc", "error", "; ".join(f"disagrees about version of symbol {n} (module {c:#010x}, "
                                                   f"kernel {k:#010x})" for n, c, k in crc_bad[:20]),
                "the module was built against other headers; rebuild with the target's Module.symvers")
    elif facts.modversions and not m.versions and m.undefined:
        out.add("symbols.crc", "error", f"the module has no __versions but {facts.release} uses modversions "
                "('disagrees about version of symbol module_layout')", "build with CONFIG_MODVERSIONS headers")
    else:
        out.add("symbols.crc", "info", f"{len(versions)} symbol CRCs match")
    if no_version:
        out.add("symbols.versions", "warning", f"no symbol version for {', '.join(no_version[:20])}")
    if ns_bad:
        out.add("symbols.namespace", "error", "; ".join(f"uses symbol {n} from namespace {ns}, but does not import it"
                                                         for n, ns in ns_bad[:20]),
                "add MODULE_IMPORT_NS(...) for each namespace")
    if gpl_bad:
        out.add("license.gpl", "error", f"license {m.first('license')!r} is not GPL-compatible but the module uses "
                f"GPL-only symbols: {', '.join(gpl_bad[:20])}", "MODULE_LICENSE(\"GPL\")")


def _klp(out: _Out, m: ModuleInfo, index: SymbolIndex | None) -> None:
    for s in m.klp_relocations:
        if s.problem:
            out.add("klp.rela.name", "error", f"livepatch relocation section {s.name}: {s.problem}")
    for sym in m.klp_symbols:
        if sym.problem:
            out.add("klp.sym.name", "error", f"symbol {sym.name!r}: {sym.problem} (the kernel: 'incorrectly "
                    "formatted name' / 'not marked as a livepatch symbol')")
    wanted = [("klp.sym", s.objname, s.symbol, s.sympos, s.name) for s in m.klp_symbols if not s.problem]
    wanted += [("klp.func", f.objname, f.name, f.sympos, f"{f.objname}:{f.name},{f.sympos}")
               for f in m.patched_functions]
    if not wanted:
        return
    if index is None or not index.has_symbols:
        out.add("klp.syms", "skipped", f"{len(wanted)} livepatch symbol(s)/function(s) not checked: no "
                "kallsyms or vmlinux symbols for the target",
                "pass --symbols with the target's /proc/kallsyms or debuginfo vmlinux, or "
                "`kpipe kernels symbols fetch RELEASE --from HOST`")
        return
    skipped_objs: set[str] = set()
    problems = 0
    for kind, obj, name, sympos, label in wanted:
        if not index.has_object(obj):
            skipped_objs.add(obj)
            continue
        n = index.symbol_count(obj, name)
        # kernel/livepatch/core.c klp_find_object_symbol (6.1): sympos 0 needs a unique name,
        # sympos N needs at least N occurrences.
        if n == 0:
            problems += 1
            out.add("klp.syms" if kind == "klp.sym" else "klp.funcs", "error",
                    f"{label}: symbol {name!r} not found in {obj} (the kernel: "
                    f"\"symbol '{name}' not found in symbol table\")",
                    "the patch targets a symbol this kernel does not have")
        elif sympos == 0 and n > 1:
            problems += 1
            out.add(f"{kind}.sympos" if kind == "klp.func" else "klp.sym.sympos", "error",
                    f"{label}: {n} symbols named {name!r} in {obj}, sympos 0 is ambiguous "
                    "('unresolvable ambiguity')", "give the position (sympos) of the intended one")
        elif sympos > n:
            problems += 1
            out.add(f"{kind}.sympos" if kind == "klp.func" else "klp.sym.sympos", "error",
                    f"{label}: sympos {sympos} but {obj} has only {n} symbol(s) named {name!r}")
    for obj in sorted(skipped_objs):
        out.add("klp.syms", "skipped", f"symbols of object {obj!r} are not in the index",
                f"add /proc/kallsyms of a target with {obj} loaded")
    if not problems:
        out.add("klp.syms", "info", f"{len(wanted) - sum(1 for w in wanted if w[1] in skipped_objs)} livepatch "
                "symbol(s)/function(s) resolve in the target")


def _relocs(out: _Out, m: ModuleInfo, facts: KernelFacts) -> None:
    allowed = ALLOWED_RELOCS.get(facts.arch)
    if allowed is None:
        out.add("reloc.type", "skipped", f"no relocation table for architecture {facts.arch}")
        return
    if m.header.machine != ARCH_MACHINE.get(facts.arch):
        return  # elf.machine already fails; relocation numbers of another arch mean nothing here
    bad = {t: n for t, n in m.relocation_types.items() if t not in allowed}
    if bad:
        out.add("reloc.type", "error", f"relocation type(s) the {facts.arch} loader rejects: "
                + ", ".join(f"{t} (x{n})" for t, n in sorted(bad.items()))
                + f" (the kernel: \"{LOADER_REFUSAL[facts.arch].format(module=m.name or 'MODULE', type=min(bad))}\")",
                "the module was built with unsupported code model or toolchain flags, or for another architecture")
    else:
        out.add("reloc.type", "info", f"{sum(m.relocation_types.values())} relocations of accepted types")


# -- signature ---------------------------------------------------------------------------------------------------

def _signature(out: _Out, m: ModuleInfo, facts: KernelFacts, certs: list[Certificate],
               payload: bytes | memoryview | None, sm2_user_id: str | None, require: bool) -> None:
    if m.signature_problem:
        out.add("sig.format", "error", f"signature trailer is malformed: {m.signature_problem}",
                "re-sign the unsigned module")
        return
    if m.signature is None:
        severity = "error" if (require or facts.sig_force) else "warning"
        out.add("sig.present", severity, "the module is not signed (the kernel taints it 'E', or refuses it under "
                "module.sig_enforce / lockdown)", "kpipe sign ARTIFACT")
        return
    try:
        p7 = parse_pkcs7(m.signature.der)
    except Pkcs7Error as e:
        out.add("sig.format", "error", f"PKCS#7 signature: {e}", "re-sign the module")
        return
    out.add("sig.present", "info", f"signed by {p7.signer_text()} ({p7.digest}, {p7.signature_algorithm})")
    if p7.has_content:
        out.add("sig.content", "error", "the PKCS#7 embeds the content; the kernel needs a detached signature",
                "sign with sign-file or kpipe sign")
    if p7.has_signed_attrs:
        out.add("sig.authattrs", "error", "the PKCS#7 has signed attributes; the kernel refuses them ('has "
                "authattrs')", "sign without attributes (sign-file, kpipe sign)")
    if p7.digest not in KERNEL_HASHES:
        out.add("sig.hash", "error", f"digest {p7.digest} is not one the kernel accepts ({', '.join(KERNEL_HASHES)})")
    elif facts.sig_hash is None:
        out.add("sig.hash", "skipped", f"CONFIG_MODULE_SIG_HASH of {facts.release} is unknown (module uses "
                f"{p7.digest})", "install the kernel's headers or set sig_hash in its [[kernels]] entry")
    elif p7.digest != facts.sig_hash:
        out.add("sig.hash", "warning", f"signed with {p7.digest}; {facts.release} uses CONFIG_MODULE_SIG_HASH="
                f"{facts.sig_hash}", f"sign with --hash {facts.sig_hash}")
    else:
        out.add("sig.hash", "info", f"digest {p7.digest} matches CONFIG_MODULE_SIG_HASH")
    if p7.has_content or p7.has_signed_attrs:
        return
    if not certs:
        out.add("sig.verify", "skipped", "signature not verified: no certificate given",
                "pass --cert with the kernel's module-signing certificate(s)")
        return
    if payload is None:
        out.add("sig.verify", "skipped", "signature not verified: the signed bytes were not supplied")
        return
    v = verify_pkcs7(payload, p7, certs, sm2_user_id=sm2_user_id)
    if v.status == "valid":
        out.add("sig.verify", "info", v.message)
    elif v.status == "signer_unknown":
        out.add("sig.signer", "error", v.message, "pass the certificate of the key that signed it, or re-sign")
    else:
        out.add("sig.verify", "error", v.message, "the module or its signature was altered; re-sign it")
