"""Validation and signing of modules and artifacts: the public API other components call.

This is the edge around the pure checks: it reads the module, gathers what is known of the
target kernel (catalog entry, locally installed headers, a stock module, cached symbol
indexes) and records the outcome on the artifact.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.checks import ARCH_MACHINE, Finding, KernelFacts, expected_vermagic, report_ok, run_checks
from kpipe.errors import ConfigError, NotFoundError, ValidationFailed

if TYPE_CHECKING:
    from kpipe.artifacts import Artifact
    from kpipe.store import Store
    from kpipe.workspace import Workspace

HEADERS_CANDIDATES = ("/usr/src/linux-headers-{r}", "/lib/modules/{r}/build", "/usr/src/kernels/{r}")


@dataclass
class ValidationReport:
    """The outcome of validating one module for one kernel."""

    module: str
    kernel: str
    ok: bool
    strict: bool
    findings: list[Finding]
    facts: KernelFacts
    symbol_sources: list[str] = field(default_factory=list)
    module_name: str = ""
    sha256: str = ""
    seconds: float = 0.0
    own: bool | None = None  # set when recorded on an artifact: its own validation, or a trial

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("error", "warning", "info", "skipped")}
        for f in self.findings:
            out[f.severity] = out.get(f.severity, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        verdict = "valid" if self.ok else "INVALID"
        return (f"{self.module_name or self.module} for {self.kernel}: {verdict} ({c['error']} errors, "
                f"{c['warning']} warnings, {c['skipped']} skipped)")

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "module_name": self.module_name, "sha256": self.sha256,
                "kernel": self.kernel, "ok": self.ok, "strict": self.strict, "counts": self.counts(),
                "findings": [f.to_dict() for f in self.findings], "facts": self.facts.to_dict(),
                "symbol_sources": self.symbol_sources, "seconds": round(self.seconds, 4),
                "validated_at": time.time()}


# -- kernel facts from local headers ---------------------------------------------------------------------------

def find_headers(release: str, explicit: str = "") -> Path | None:
    """The headers folder of release: the catalog's, else a standard local one."""
    cands = [explicit] if explicit else []
    cands += [c.format(r=release) for c in HEADERS_CANDIDATES]
    for c in cands:
        p = Path(os.path.expanduser(c))
        if (p / "include" / "config" / "auto.conf").is_file() or (p / ".config").is_file():
            return p
    return None


def read_kconfig(headers: Path) -> dict[str, str]:
    """CONFIG_* values from include/config/auto.conf (or .config), quotes stripped."""
    for name in ("include/config/auto.conf", ".config"):
        p = headers / name
        if p.is_file():
            out: dict[str, str] = {}
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("CONFIG_") and "=" in line:
                    k, _, v = line.partition("=")
                    out[k] = v.strip().strip('"')
            return out
    return {}


def _headers_release(headers: Path) -> str | None:
    p = headers / "include" / "generated" / "utsrelease.h"
    if p.is_file():
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', p.read_text(errors="replace"))
        if m:
            return m.group(1)
    return None


def _headers_arch(headers: Path, config: dict[str, str]) -> str:
    if config.get("CONFIG_X86_64") == "y":
        return "x86_64"
    if config.get("CONFIG_ARM64") == "y":
        return "aarch64"
    if config.get("CONFIG_LOONGARCH") == "y":
        return "loongarch64"
    return "unknown"


def stock_this_module_size(release: str, explicit: str = "") -> tuple[int | None, str]:
    """sizeof(struct module) (bytes) read from the first stock module under /lib/modules/<release>/."""
    from kpipe.elf.reader import ModuleFormatError, read_module

    # os.walk does not follow the build/ and source/ symlinks into the headers tree.
    roots = [Path(explicit)] if explicit else [Path(f"/lib/modules/{release}")]
    for root in roots:
        if root.is_file():
            cands: Iterable[Path] = [root]
        elif root.is_dir():
            cands = (Path(d) / f for d, _subdirs, files in os.walk(root) for f in sorted(files)
                     if f.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")))
        else:
            continue
        for path in cands:
            try:
                info = read_module(path)
            except ModuleFormatError:
                continue
            if info.this_module_size:
                return info.this_module_size, str(path)
    return None, ""


def kernel_facts(workspace: Workspace | None, release: str) -> KernelFacts:
    """What is known of release: its catalog entry, then its local headers, then a stock module."""
    from kpipe.kernel import normalize_arch, parse_release

    entry = workspace.kernels.get(release) if workspace is not None else None
    sources: list[str] = []
    arch = normalize_arch(entry.arch) if entry is not None and entry.arch else "unknown"
    headers = find_headers(release, entry.headers if entry is not None else "")
    config: dict[str, str] = {}
    if headers is not None:
        hrel = _headers_release(headers)
        if hrel is None or hrel == release:
            config = read_kconfig(headers)
            sources.append(str(headers))
    if arch in ("", "unknown"):
        arch = _headers_arch(headers, config) if headers is not None and config else "unknown"
    if arch in ("", "unknown"):
        arch = parse_release(release).arch
    vermagic, vsource = None, ""
    if entry is not None and entry.vermagic:
        vermagic, vsource = entry.vermagic, "the kernel catalog"
    elif config:
        vermagic, vsource = expected_vermagic(release, config, arch), f"{headers}/include/config"
    opts = dict(entry.options) if entry is not None else {}
    tm_size, tm_source = None, ""
    if isinstance(opts.get("this_module_size"), int):
        tm_size, tm_source = int(opts["this_module_size"]), "the kernel catalog"
    else:
        tm_size, tm_source = stock_this_module_size(release, str(opts.get("stock_module", "")))
    sig_hash = ((entry.sig_hash if entry is not None and entry.sig_hash else None)
                or config.get("CONFIG_MODULE_SIG_HASH"))
    return KernelFacts(
        release=release, arch=arch, vermagic=vermagic, vermagic_source=vsource,
        modversions=(config.get("CONFIG_MODVERSIONS") == "y") if config else None,
        sig_hash=sig_hash or None,
        sig_force=(config.get("CONFIG_MODULE_SIG_FORCE") == "y") if config else None,
        this_module_size=tm_size, this_module_source=tm_source, sources=tuple(sources),
    )


# -- symbol index ----------------------------------------------------------------------------------------------

def symbol_index(workspace: Workspace | None, release: str, symbol_files: Iterable[str | os.PathLike[str]] = ()) -> Any:
    """The symbol index for release: explicit files first, then the catalog's sources, the local headers'
    Module.symvers and sources cached in the store (e.g. fetched from hosts)."""
    from kpipe.elf import symbols as ks

    explicit = [Path(p) for p in symbol_files]
    auto: list[Path] = []
    entry = workspace.kernels.get(release) if workspace is not None else None
    if workspace is not None and entry is not None:
        auto += [workspace.path(s) for s in entry.symbols]
    headers = find_headers(release, entry.headers if entry is not None else "")
    if headers is not None and (headers / "Module.symvers").is_file():
        auto.append(headers / "Module.symvers")
    elif (local := ks.local_symvers(release)) is not None:
        auto.append(local)
    for p in explicit:
        if not p.is_file():
            raise ConfigError(f"--symbols {p}: no such file")
    if workspace is None:
        srcs = []
        kinds_given: set[str] = set()
        for p in explicit:
            data, origin = ks.read_source(p)
            src = ks.parse_source(data, origin)
            kinds_given.add("exports" if src.exports else "symbols")
            srcs.append(src)
        for p in auto:
            if p.is_file():
                data, origin = ks.read_source(p)
                src = ks.parse_source(data, origin)
                if ("exports" if src.exports else "symbols") not in kinds_given:
                    srcs.append(src)
        return ks.MemoryIndex(srcs)
    store = workspace.store
    first = [ks.add_file(store, release, p) for p in explicit]
    given = {r["id"]: r for r in ks.list_sources(store, release)}
    kinds = {"exports" if given[i]["exports"] else "symbols" for i in first if i in given}
    for p in auto:
        if p.is_file():
            sid = ks.add_file(store, release, p)
            row = next((r for r in ks.list_sources(store, release) if r["id"] == sid), None)
            if row is not None and ("exports" if row["exports"] else "symbols") not in kinds:
                first.append(sid)
    return ks.release_index(store, release, first)


# -- the public API --------------------------------------------------------------------------------------------

def _certificates(workspace: Workspace | None, certs: Iterable[Any]) -> list[Any]:
    from kpipe.elf.signature import Certificate, load_certificates

    out: list[Certificate] = []
    for c in certs:
        if isinstance(c, Certificate):
            out.append(c)
        else:
            out.extend(load_certificates(workspace.path(str(c)) if workspace is not None else Path(c)))
    return out


def _signer_certificates(workspace: Workspace | None) -> list[Any]:
    from kpipe.elf.signature import load_certificates

    out: list[Any] = []
    if workspace is None:
        return out
    for s in workspace.signers.values():
        if s.cert:
            p = workspace.path(s.cert)
            if p.is_file():
                try:
                    out.extend(load_certificates(p))
                except ConfigError:
                    continue
    return out


def validate_module(workspace: Workspace | None, module_path: Path | str, kernel_release: str, *,
                    symbol_files: Iterable[str | os.PathLike[str]] = (), certs: Iterable[Any] = (),
                    strict: bool = False, sm2_user_id: str | None = None) -> ValidationReport:
    """Validate a module file for kernel_release. Certificates given here make a signature mandatory;
    the workspace signers' certificates are used to verify one when present."""
    import hashlib

    from kpipe.elf.reader import map_module, parse_module

    t0 = time.process_time()
    path = Path(module_path)
    data, compression = map_module(path)
    info = parse_module(data, str(path), compression=compression)
    facts = kernel_facts(workspace, kernel_release)
    index = symbol_index(workspace, kernel_release, symbol_files)
    explicit = _certificates(workspace, certs)
    cert_list = explicit or (_signer_certificates(workspace) if info.signature is not None else [])
    if sm2_user_id is None and workspace is not None:
        sm2_user_id = next((s.sm2_user_id for s in workspace.signers.values() if s.sm2_user_id is not None), None)
    findings = run_checks(info, facts, index, cert_list, payload=memoryview(data)[:info.payload_size],
                          sm2_user_id=sm2_user_id, require_signature=bool(explicit))
    return ValidationReport(module=str(path), kernel=kernel_release, ok=report_ok(findings, strict=strict),
                            strict=strict, findings=findings, facts=facts, symbol_sources=list(index.sources),
                            module_name=info.name or "", sha256=hashlib.sha256(data).hexdigest(),
                            seconds=time.process_time() - t0)


def _validation_options(workspace: Workspace | None, kernel: str, symbol_files: Iterable[str | os.PathLike[str]],
                        certs: Iterable[Any], strict: bool) -> dict[str, Any]:
    """The options of one validation, comparable across runs (files by resolved path)."""
    def where(p: Any) -> str:
        p = getattr(p, "path", p)  # a loaded Certificate names its file
        path = workspace.path(str(p)) if workspace is not None else Path(p)
        return str(Path(path).resolve())

    return {"kernel": kernel, "certs": sorted(where(c) for c in certs),
            "symbols": sorted(where(p) for p in symbol_files), "strict": bool(strict)}


def _is_own(workspace: Workspace, artifact: Artifact, options: dict[str, Any]) -> bool:
    """Whether options are the artifact's own validation's: its kernel, the certificates and symbol files
    it was validated with (none before its first validation) and the workspace's strictness."""
    if options["kernel"] != artifact.kernel:
        return False
    if options["strict"] != workspace.settings.validation.strict:
        return False
    own = (artifact.validation or {}).get("options") or {}
    return (options["certs"], options["symbols"]) == (own.get("certs", []), own.get("symbols", []))


def _check_read(store: Store, artifact: Artifact, sha256: str) -> None:
    """The bytes a check read must be the artifact's (the blob may change between two reads)."""
    from kpipe.store import StoreCorrupt

    if sha256 and sha256 != artifact.sha256:
        raise StoreCorrupt(f"blob {artifact.sha256[:12]} of artifact {artifact.id} changed while it was read "
                           f"(its bytes hash to {sha256[:12]})",
                           hint="the file was changed after it was stored; rebuild it (`kpipe build --force`)")


def validate_and_record(workspace: Workspace, artifact: Artifact, *,
                        symbol_files: Iterable[str | os.PathLike[str]] = (), certs: Iterable[Any] = (),
                        strict: bool | None = None, kernel: str | None = None,
                        own: bool | None = None) -> ValidationReport:
    """Validate an artifact (for its kernel, or another) and keep the report as a record with its options.
    Only its own validation (own=True, or options equal to the artifact's own: see _is_own) sets its
    status to valid or rejected; any other is a trial that changes nothing. A module that cannot even be
    read is recorded the same way, then re-raised. strict=None takes `[validation] strict` from kpipe.toml.
    The report's `own` attribute says how it was recorded."""
    from kpipe.artifacts import record_validation
    from kpipe.elf.reader import ModuleFormatError

    if strict is None:
        strict = workspace.settings.validation.strict
    symbol_files, certs = list(symbol_files), list(certs)
    kernel = kernel or artifact.kernel
    options = _validation_options(workspace, kernel, symbol_files, certs, strict)
    if own is None:
        own = _is_own(workspace, artifact, options)
    store = workspace.store
    path = artifact.path(store)  # NotFoundError when missing, StoreCorrupt when its bytes changed
    try:
        report = validate_module(workspace, path, kernel, symbol_files=symbol_files, certs=certs,
                                 strict=strict)
    except ModuleFormatError as e:
        record_validation(store, artifact.id, kernel=kernel, options=options, own=own, ok=False, report={
            "ok": False, "kernel": kernel, "error": e.message, "validated_at": time.time(),
            "findings": [{"id": "elf.format", "severity": "error", "message": e.message, "hint": e.hint or ""}]})
        raise
    _check_read(store, artifact, report.sha256)
    report.module = f"{artifact.id} ({artifact.filename})"
    record_validation(store, artifact.id, kernel=kernel, options=options, own=own, ok=report.ok,
                      report=report.to_dict())
    report.own = own
    return report


def sign_artifact(workspace: Workspace, artifact: Artifact, signer: str | None = None, *, key: str | None = None,
                  cert: str | None = None, hash_name: str = "sha256", keyid: bool = False) -> Artifact:
    """Sign an artifact with a configured signer (or an explicit key + cert); store the signed module as a
    new artifact (parent_id = the original), validate and record it, and return it."""
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.elf.sign import sign_file, sign_with_signer

    if artifact.status == "rejected":
        raise ValidationFailed(f"artifact {artifact.id} failed validation; it cannot be signed",
                               hint=f"see `kpipe validate {artifact.id}`")
    store = workspace.store
    with tempfile.TemporaryDirectory(prefix="kpipe-sign-") as tmp:
        # Sign a private copy of checked bytes: the blob itself could change between a check and the read.
        src = Path(tmp) / "in" / artifact.filename
        src.parent.mkdir()
        src.write_bytes(store.get_bytes(artifact.sha256))
        out = Path(tmp) / artifact.filename
        cert_path: Path | None
        if key or cert:
            if not (key and cert):
                raise ConfigError("--key and --cert go together")
            sign_file(src, out, workspace.path(key), workspace.path(cert), hash_name, keyid=keyid)
            signer_name, cert_path = "builtin", workspace.path(cert)
        else:
            name = signer or workspace.default_signer
            if not name:
                raise ConfigError("no signer given and no [signing] default in kpipe.toml",
                                  hint="pass --signer NAME or --key KEY --cert CERT")
            conf = workspace.signers.get(name)
            if conf is None:
                raise NotFoundError(f"no signer {name!r} in {workspace.file}",
                                    hint=f"known signers: {', '.join(sorted(workspace.signers)) or 'none'}")
            sign_with_signer(conf, src, out, root=workspace.root)
            signer_name, cert_path = name, (workspace.path(conf.cert) if conf.cert else None)
        meta = dict(artifact.meta)
        meta.update({"signer": signer_name, "signed_from": artifact.id})
        new = add_artifact(store, out, kernel=artifact.kernel, filename=artifact.filename, status="built",
                           module_name=artifact.module_name, recipe=artifact.recipe, arch=artifact.arch,
                           builder=artifact.builder, builder_version=artifact.builder_version,
                           build_host=artifact.build_host, duration_s=artifact.duration_s,
                           log_sha256=artifact.log_sha256, signed=True, parent_id=artifact.id, meta=meta)
    certs = [cert_path] if cert_path is not None and Path(cert_path).is_file() else []
    validate_and_record(workspace, new, certs=certs, own=True)  # the signed artifact's own validation
    return get_artifact(store, new.id)


def machine_for_arch(arch: str) -> int | None:
    """e_machine for a normalised arch name."""
    return ARCH_MACHINE.get(arch)
