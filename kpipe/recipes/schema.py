"""The recipe schema: strict key and type checks with did-you-mean hints, before and after rendering."""

from __future__ import annotations

import math
import re
from typing import Any

from kpipe.kernel import normalize_arch
from kpipe.recipes.problems import _did_you_mean, _field, _Problems

# Where a value sits in the recipe: ("kpatch", "make_args", 0).
KeyPath = tuple[str | int, ...]

BUILDERS = ("kpatch-build", "klp-build", "kbuild", "auto")
# Builders that turn patches into a module; `auto` picks one of them per kernel (kpipe.recipes.select).
PATCH_BUILDERS = ("kpatch-build", "klp-build")
ROLLBACK_POLICIES = ("failed", "wave", "all")
MODULE_NAME_MAX = 55  # the kernel's module name field is 56 bytes with the NUL (MODULE_NAME_LEN)
MAX_RECIPE_BYTES = 1 << 20
MAX_TEMPLATE_BYTES = 1 << 20
MAX_RENDERED_CHARS = 1 << 20
MAX_YAML_NODES = 20_000  # stops alias bombs ("billion laughs") while composing
RECIPE_SUFFIXES = (".yaml", ".yml")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODULE_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MODULE_NAME_MAX}}}")
_SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
_GLOB_RE = re.compile(r"[0-9A-Za-z._+~*?\[\]!-]{1,64}")
_MAKE_ARG_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*=[^\x00-\x1f]*|-j\d{1,4}|-k|-s)")
_MAKE_RESERVED = ("M", "KBUILD_EXTMOD", "O", "KBUILD_OUTPUT", "src", "obj")
_TEMPLATE_MARK = re.compile(r"\{\{|\{%|\{#")
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")

# Keys whose values are never rendered: identity and matching happen before rendering,
# and `options` are the template's inputs.
_NOT_RENDERED = ("name", "builder", "kernels", "arches", "options", "stream", "version", "replace")


_TOP_KEYS = ("name", "description", "builder", "kernels", "arches", "patches", "options", "kpatch", "klp", "kbuild",
             "signing", "rollout", "fixes", "stream", "version", "replace")
VERSION_MAX = 1_000_000
RECIPE_ARCHES = ("x86_64", "aarch64", "loongarch64", "riscv64", "ppc64le", "s390x")
# Keys that identify a build (its stream, version and klp mode): never templates, so every kernel's
# artifact of one recipe belongs to the same stream and version.
_IDENTITY_KEYS = ("stream", "version", "replace")
_KPATCH_KEYS = ("jobs", "non_replace", "targets", "skip_compiler_check", "module_name")
_KLP_KEYS = ("jobs", "module_name", "short_circuit")
_KLP_STEPS = ("orig", "patched", "checksum", "diff", "kmod")  # klp-build --short-circuit (kpipe.builder.klp)
_KBUILD_KEYS = ("sources", "kbuild", "make_args", "module_name")
_SOURCE_KEYS = ("template", "name")
_SIGNING_KEYS = ("sign", "signer")
_MAX_SOAK_S = 7 * 24 * 3600  # as `kpipe rollout start --soak` allows
_ROLLOUT_KEYS = ("waves", "max_failures", "soak", "rollback", "probe", "health")
_HEALTH_KEYS = ("command", "timeout")
_PROBE_KEYS = ("argv", "expect", "expect_after_rollback")
_FIX_KEYS = ("cve", "severity", "summary")
# CVSS v3 qualitative ratings (plus "none"), lowest first: kpipe.cve orders by this.
SEVERITIES = ("none", "low", "medium", "high", "critical")
CVE_RE = re.compile(r"CVE-(?:19|20)\d{2}-\d{4,}")


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and bool(_TEMPLATE_MARK.search(value))


def _check_keys(d: dict[str, Any], allowed: tuple[str, ...], path: KeyPath, probs: _Problems) -> None:
    for key in d:
        if key not in allowed:
            probs.error(path + (key,), f"unknown key {key!r} in {_field(path)}",
                        _did_you_mean(key, allowed) + f"allowed keys: {', '.join(allowed)}", key=True)


class _Checker:
    """Typed field checks that coerce rendered strings ("4" -> 4) and return normalised values."""

    def __init__(self, probs: _Problems, rendered: bool):
        self.probs, self.rendered = probs, rendered

    def deferred(self, value: Any) -> bool:
        # Before rendering, a template string can stand for any type; check it after rendering.
        return not self.rendered and _is_template(value)

    def string(self, d: dict[str, Any], key: str, path: KeyPath, *, required: bool = False,
               nonempty: bool = False) -> Any:
        p = path + (key,)
        if key not in d:
            if required:
                self.probs.error(path, f"{_field(p)} is required", f"add `{key}:`")
            return None
        v = d[key]
        if not isinstance(v, str):
            self.probs.error(p, f"{_field(p)} must be a string, got {_type(v)}", "quote the value")
            return None
        if nonempty and not v.strip():
            self.probs.error(p, f"{_field(p)} must not be empty", f"give `{key}:` a value or remove it")
        return v

    def boolean(self, d: dict[str, Any], key: str, path: KeyPath) -> Any:
        p = path + (key,)
        if key not in d:
            return None
        v = d[key]
        if isinstance(v, bool) or self.deferred(v):
            return v
        if self.rendered and isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
            return v.strip().lower() in ("true", "yes", "on")
        self.probs.error(p, f"{_field(p)} must be true or false, got {_type(v)} {v!r}", "write true or false")
        return None

    def integer(self, d: dict[str, Any], key: str, path: KeyPath, *, minimum: int = 0, maximum: int = 1 << 20) -> Any:
        p = path + (key,)
        if key not in d:
            return None
        v = d[key]
        if self.deferred(v):
            return v
        if self.rendered and isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.probs.error(p, f"{_field(p)} must be an integer, got {_type(v)} {v!r}", "write a whole number, e.g. 4")
            return None
        if not minimum <= v <= maximum:
            self.probs.error(p, f"{_field(p)} must be between {minimum} and {maximum}, got {v}",
                             f"use a value from {minimum} to {maximum}")
            return None
        return v

    def str_list(self, d: dict[str, Any], key: str, path: KeyPath, *, required: bool = False,
                 nonempty: bool = False) -> Any:
        p = path + (key,)
        if key not in d:
            if required:
                self.probs.error(path, f"{_field(p)} is required", f"add `{key}:` with a list")
            return None
        v = d[key]
        if not isinstance(v, list):
            self.probs.error(p, f"{_field(p)} must be a list of strings, got {_type(v)}",
                             f"write it as a YAML list, e.g. `{key}: [a, b]`")
            return None
        if nonempty and not v:
            self.probs.error(p, f"{_field(p)} must not be empty", f"list at least one item under `{key}:`")
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.probs.error(p + (i,), f"{_field(p + (i,))} must be a string, got {_type(item)}",
                                 "quote it")
            elif not item.strip():
                self.probs.error(p + (i,), f"{_field(p + (i,))} must not be empty", "remove the empty item")
            else:
                out.append(item)
        return out

    def table(self, d: dict[str, Any], key: str, path: KeyPath,
              allowed: tuple[str, ...] | None) -> dict[str, Any] | None:
        p = path + (key,)
        if key not in d or d[key] is None:
            return None
        v = d[key]
        if not isinstance(v, dict):
            self.probs.error(p, f"{_field(p)} must be a mapping, got {_type(v)}",
                             "write `key: value` lines indented under it")
            return None
        if allowed is not None:
            _check_keys(v, allowed, p, self.probs)
        return v


def _type(v: Any) -> str:
    return {type(None): "nothing", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_schema(data: dict[str, Any], probs: _Problems, *, rendered: bool) -> dict[str, Any]:
    """Check the whole recipe; returns normalised sections (meaningful once rendered)."""
    c = _Checker(probs, rendered)
    _check_keys(data, _TOP_KEYS, (), probs)
    out: dict[str, Any] = {}
    name = c.string(data, "name", ())
    if isinstance(name, str) and not _NAME_RE.fullmatch(name):
        probs.error(("name",), f"name {name!r} is not a valid recipe name",
                    "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
    out["description"] = c.string(data, "description", ()) or ""
    builder = c.string(data, "builder", (), required=True)
    if isinstance(builder, str) and builder not in BUILDERS:
        probs.error(("builder",), f"builder {builder!r} is not one of {', '.join(BUILDERS)}",
                    _did_you_mean(builder, BUILDERS) + "kpatch-build diffs a patched kernel tree; klp-build is "
                    "the kernel's own (>= 6.19); auto picks one of them per kernel; kbuild builds livepatch source "
                    "against kernel headers")
    out["builder"] = builder
    kernels = c.str_list(data, "kernels", (), required=True, nonempty=True) or []
    for i, pattern in enumerate(kernels):
        if not _GLOB_RE.fullmatch(pattern):
            probs.error(("kernels", i), f"kernel pattern {pattern!r} is not a release name or glob",
                        "a release (`uname -r`) or a glob such as 5.10.0-*-UOS; letters, digits, . _ + ~ - * ? [ ]")
    out["kernels"] = kernels
    # arches: which of the matched kernels the recipe is for (a glob such as 7.*-kforge-* may name kernels of
    # several architectures, and a builder may serve only some of them)
    arches = c.str_list(data, "arches", ()) or []
    for i, arch in enumerate(arches):
        if normalize_arch(arch) not in RECIPE_ARCHES:
            probs.error(("arches", i), f"arch {arch!r} is not one of {', '.join(RECIPE_ARCHES)}",
                        _did_you_mean(arch, RECIPE_ARCHES) + "kernel arches as `uname -m` prints them")
    out["arches"] = [normalize_arch(a) for a in arches]
    _check_stream(data, c, probs, out)
    patches = c.str_list(data, "patches", ()) or []
    out["patches"] = patches
    opts = c.table(data, "options", (), None)
    out["options"] = opts or {}

    kp = c.table(data, "kpatch", (), _KPATCH_KEYS)
    kl = c.table(data, "klp", (), _KLP_KEYS)
    kb = c.table(data, "kbuild", (), _KBUILD_KEYS)
    if builder in PATCH_BUILDERS or builder == "auto":
        if not patches and "patches" not in data:
            probs.error((), f"a {builder} recipe needs `patches:`",
                        "list the patch files under patches/, e.g. `patches: [fix.patch]`")
        elif not patches and isinstance(data.get("patches"), list):
            probs.error(("patches",), f"a {builder} recipe needs at least one patch",
                        "list the patch files under patches/, e.g. `patches: [fix.patch]`")
        if kb is not None:
            probs.error(("kbuild",), f"`kbuild:` is set but the builder is {builder}",
                        "remove `kbuild:` or set `builder: kbuild`", key=True)
    if builder == "kpatch-build" and kl is not None:
        probs.error(("klp",), "`klp:` is set but the builder is kpatch-build",
                    "remove `klp:` or set `builder: klp-build` (or `auto`)", key=True)
    if builder == "klp-build" and kp is not None:
        probs.error(("kpatch",), "`kpatch:` is set but the builder is klp-build",
                    "remove `kpatch:` or set `builder: kpatch-build` (or `auto`)", key=True)
    if builder == "kbuild":
        for section, table in (("kpatch", kp), ("klp", kl)):
            if table is not None:
                probs.error((section,), f"`{section}:` is set but the builder is kbuild",
                            f"remove `{section}:` or set `builder: auto`", key=True)
        if kb is None:
            probs.error((), "a kbuild recipe needs `kbuild:` with `sources:`",
                        "add kbuild: {sources: [{template: templates/x.c.j2, name: x.c}]}")
    kpatch: dict[str, Any] = {}
    if kp is not None:
        path = ("kpatch",)
        kpatch["jobs"] = c.integer(kp, "jobs", path, minimum=1, maximum=4096)
        kpatch["non_replace"] = c.boolean(kp, "non_replace", path)
        kpatch["targets"] = c.str_list(kp, "targets", path)
        for i, t in enumerate(kpatch["targets"] or []):
            if (rendered or not _is_template(t)) and not re.fullmatch(r"[A-Za-z0-9_./-]+", t) or t.startswith("-"):
                probs.error(path + ("targets", i), f"make target {t!r} is not a plain target name",
                            "e.g. vmlinux, modules, bzImage")
        kpatch["skip_compiler_check"] = c.boolean(kp, "skip_compiler_check", path)
        kpatch["module_name"] = _module_name(c, kp, path, rendered)
        kpatch = {k: v for k, v in kpatch.items() if v is not None}
    out["kpatch"] = kpatch
    klp: dict[str, Any] = {}
    if kl is not None:
        path = ("klp",)
        klp["jobs"] = c.integer(kl, "jobs", path, minimum=1, maximum=4096)
        klp["module_name"] = _module_name(c, kl, path, rendered)
        sc = kl.get("short_circuit")
        step_ok = (isinstance(sc, str) and sc in _KLP_STEPS) or (
            isinstance(sc, int) and not isinstance(sc, bool) and 1 <= sc <= 5)
        if sc is not None and not step_ok and (rendered or not _is_template(sc)):
            probs.error(path + ("short_circuit",), f"klp.short_circuit {sc!r} is not a klp-build step",
                        f"one of {', '.join(_KLP_STEPS)} (or 1-5); `patched` reuses the original kernel build of "
                        "the last klp-build run on the same tree")
            sc = None
        klp["short_circuit"] = sc
        klp = {k: v for k, v in klp.items() if v is not None}
    out["klp"] = klp
    nr = kpatch.get("non_replace")
    if isinstance(nr, bool) and isinstance(out.get("replace"), bool) and "replace" in data and nr == out["replace"]:
        probs.error(("kpatch", "non_replace"), f"kpatch.non_replace: {str(nr).lower()} contradicts "
                    f"replace: {str(out['replace']).lower()}", "keep `replace:` and remove kpatch.non_replace")
    elif isinstance(nr, bool) and "replace" not in data:
        out["replace"] = not nr  # the older spelling of `replace: false`
    kbuild: dict[str, Any] = {}
    if kb is not None:
        path = ("kbuild",)
        sources = kb.get("sources")
        norm_sources = []
        if "sources" not in kb:
            probs.error(path, "kbuild.sources is required", "add sources: [{template: ..., name: ...}]")
        elif not isinstance(sources, list) or not sources:
            probs.error(path + ("sources",), "kbuild.sources must be a non-empty list of {template, name}",
                        "e.g. sources: [{template: templates/x.c.j2, name: x.c}]")
        else:
            for i, s in enumerate(sources):
                sp = path + ("sources", i)
                if not isinstance(s, dict):
                    probs.error(sp, f"{_field(sp)} must be a mapping with template: and name:",
                                "e.g. {template: templates/x.c.j2, name: x.c}")
                    continue
                _check_keys(s, _SOURCE_KEYS, sp, probs)
                tmpl = c.string(s, "template", sp, required=True, nonempty=True)
                sname = c.string(s, "name", sp, required=True, nonempty=True)
                if isinstance(sname, str) and (rendered or not _is_template(sname)):
                    _check_source_name(sname, sp + ("name",), probs)
                norm_sources.append({"template": tmpl, "name": sname})
            names = [s["name"] for s in norm_sources if isinstance(s["name"], str)]
            for i, n in enumerate(names):
                if names.index(n) != i and (rendered or not _is_template(n)):
                    probs.error(path + ("sources", i, "name"), f"two sources are both named {n!r}",
                                "give every output file its own name")
        kbuild["sources"] = norm_sources
        kbuild["kbuild"] = c.string(kb, "kbuild", path, nonempty=True)
        margs = c.str_list(kb, "make_args", path) or []
        for i, a in enumerate(margs):
            if rendered or not _is_template(a):
                _check_make_arg(a, path + ("make_args", i), probs)
        kbuild["make_args"] = margs
        kbuild["module_name"] = _module_name(c, kb, path, rendered)
        kbuild = {k: v for k, v in kbuild.items() if v is not None}
    out["kbuild"] = kbuild

    sg = c.table(data, "signing", (), _SIGNING_KEYS)
    signing: dict[str, Any] = {}
    if sg is not None:
        signing["sign"] = c.boolean(sg, "sign", ("signing",))
        signing["signer"] = c.string(sg, "signer", ("signing",), nonempty=True)
        if (signing["signer"] is not None and (rendered or not _is_template(signing["signer"]))
                and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", signing["signer"])):
            probs.error(("signing", "signer"), f"signer {signing['signer']!r} is not a signer name",
                        "name a signer of kpipe.toml [signing.signers]")
        signing = {k: v for k, v in signing.items() if v is not None}
    out["signing"] = signing

    ro = c.table(data, "rollout", (), _ROLLOUT_KEYS)
    out["rollout"], out["probe"] = _check_rollout(ro, c, probs, rendered) if ro is not None else ({}, None)
    out["fixes"] = check_fixes(data, probs, rendered=rendered)
    return out


def _check_stream(data: dict[str, Any], c: _Checker, probs: _Problems, out: dict[str, Any]) -> None:
    """`stream:` (default: the recipe's name), `version:` (default 1) and `replace:` (default true)."""
    for key in _IDENTITY_KEYS:
        if _is_template(data.get(key)):
            probs.error((key,), f"{key} must be a plain value, not a template",
                        f"a build's {key} is the same for every kernel; write it out")
    stream = c.string(data, "stream", (), nonempty=True)
    if isinstance(stream, str) and not _is_template(stream) and not _NAME_RE.fullmatch(stream):
        probs.error(("stream",), f"stream {stream!r} is not a valid stream name",
                    "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
        stream = None
    out["stream"] = stream if isinstance(stream, str) and not _is_template(stream) else None
    version = c.integer(data, "version", (), minimum=1, maximum=VERSION_MAX)
    out["version"] = version if isinstance(version, int) else None
    replace = c.boolean(data, "replace", ())
    out["replace"] = replace if isinstance(replace, bool) else True


def check_fixes(data: dict[str, Any], probs: _Problems, *, rendered: bool) -> list[dict[str, str]]:
    """Check `fixes:` (the CVEs a recipe's patch fixes); the normalised entries {cve, severity, summary}.

    Template values are checked once rendered; before that they stand for any string.
    """
    c = _Checker(probs, rendered)
    path = ("fixes",)
    if "fixes" not in data or data["fixes"] is None:
        return []
    fixes = data["fixes"]
    if not isinstance(fixes, list):
        probs.error(path, f"fixes must be a list of {{cve, severity, summary}}, got {_type(fixes)}",
                    "e.g. fixes: [{cve: CVE-2024-12345, severity: high, summary: \"...\"}]")
        return []
    out: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for i, fix in enumerate(fixes):
        fp = path + (i,)
        if not isinstance(fix, dict):
            probs.error(fp, f"{_field(fp)} must be a mapping with cve, severity and summary, got {_type(fix)}",
                        "e.g. {cve: CVE-2024-12345, severity: high, summary: \"...\"}")
            continue
        _check_keys(fix, _FIX_KEYS, fp, probs)
        cve = c.string(fix, "cve", fp, required=True, nonempty=True)
        severity = c.string(fix, "severity", fp, required=True, nonempty=True)
        summary = c.string(fix, "summary", fp, required=True, nonempty=True)
        if isinstance(cve, str) and (rendered or not _is_template(cve)):
            norm = cve.strip().upper()
            if not CVE_RE.fullmatch(norm):
                probs.error(fp + ("cve",), f"{_field(fp + ('cve',))} {cve!r} is not a CVE id",
                            "write CVE-YYYY-NNNN (four or more digits after the year), e.g. CVE-2024-12345")
                cve = None
            elif norm in seen:
                probs.error(fp + ("cve",), f"{norm} is listed twice in fixes (also fixes[{seen[norm]}])",
                            "keep one entry per CVE")
                cve = None
            else:
                seen[norm] = i
                cve = norm
        if isinstance(severity, str) and (rendered or not _is_template(severity)):
            sev = severity.strip().lower()
            if sev not in SEVERITIES:
                probs.error(fp + ("severity",), f"{_field(fp + ('severity',))} {severity!r} is not a severity",
                            _did_you_mean(sev, SEVERITIES) + f"use one of {', '.join(SEVERITIES)} (CVSS ratings)")
                severity = None
            else:
                severity = sev
        if isinstance(summary, str) and not summary.strip():
            summary = None
        if isinstance(cve, str) and isinstance(severity, str) and isinstance(summary, str):
            out.append({"cve": cve, "severity": severity, "summary": summary.strip()})
    return out


def _module_name(c: _Checker, d: dict[str, Any], path: KeyPath, rendered: bool) -> Any:
    v = c.string(d, "module_name", path, nonempty=True)
    if isinstance(v, str) and (rendered or not _is_template(v)) and not _MODULE_RE.fullmatch(v):
        c.probs.error(path + ("module_name",), f"module name {v!r} is not a valid module name",
                      f"use letters, digits, '_' and '-', at most {MODULE_NAME_MAX} characters")
        return None
    return v


def _check_source_name(name: str, path: KeyPath, probs: _Problems) -> None:
    if not _SOURCE_NAME_RE.fullmatch(name) or name in (".", ".."):
        probs.error(path, f"source file name {name!r} must be a plain file name",
                    "letters, digits, '_', '.', '+', '-'; no '/' (it is written into the build folder)")
    elif name in ("Kbuild", "Makefile"):
        probs.error(path, f"source file name {name!r} is reserved", "use `kbuild.kbuild:` for the Kbuild template")
    elif not name.endswith((".c", ".h", ".S")):
        probs.error(path, f"source file name {name!r} should end in .c, .h or .S", "e.g. livepatch-fix.c")


def _check_make_arg(arg: str, path: KeyPath, probs: _Problems) -> None:
    if not _MAKE_ARG_RE.fullmatch(arg):
        probs.error(path, f"make argument {arg!r} is not VAR=value or -jN",
                    "kpipe runs make with -C <headers> M=<build folder>; pass only variables such as KCFLAGS=-O2")
        return
    var = arg.split("=", 1)[0]
    if var in _MAKE_RESERVED:
        probs.error(path, f"make argument {var}= is set by kpipe itself", "remove it")


def _percent_or_int(v: Any, p: KeyPath, c: _Checker, *, minimum: int, what: str) -> Any:
    if c.deferred(v):
        return v
    if isinstance(v, str) and c.rendered and re.fullmatch(r"\s*\d+\s*", v):
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        if v < minimum:
            c.probs.error(p, f"{_field(p)} must be at least {minimum}, got {v}", "e.g. 1, 10 or '25%'")
            return None
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", v)
        if m and 0 < float(m.group(1)) <= 100:
            return f"{m.group(1)}%"
    c.probs.error(p, f"{_field(p)} must be {what}, got {_type(v)} {v!r}", "e.g. 1, 10 or '25%'")
    return None


def parse_duration(value: Any) -> float | None:
    """Seconds from 30, 30s, 5m, 1h30m; None when the value is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if 0 <= value < math.inf else None  # false for nan and inf too
    if not isinstance(value, str) or not value.strip():
        return None
    m = _DURATION_RE.fullmatch(value.strip())
    if not m or not any(m.groups()):
        return None
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def _check_rollout(ro: dict[str, Any], c: _Checker, probs: _Problems,
                   rendered: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    path = ("rollout",)
    out: dict[str, Any] = {}
    if "waves" in ro:
        waves = ro["waves"]
        if not isinstance(waves, list) or not waves:
            probs.error(path + ("waves",), "rollout.waves must be a non-empty list",
                        "e.g. waves: [1, '10%', '100%']")
        else:
            out["waves"] = [_percent_or_int(w, path + ("waves", i), c, minimum=1, what="a host count or a percentage")
                            for i, w in enumerate(waves)]
    if "max_failures" in ro:
        out["max_failures"] = _percent_or_int(ro["max_failures"], path + ("max_failures",), c, minimum=0,
                                              what="a host count or a percentage")
    if "soak" in ro:
        v = ro["soak"]
        if not c.deferred(v):
            seconds = parse_duration(v)
            if seconds is not None and seconds > _MAX_SOAK_S:
                probs.error(path + ("soak",), f"rollout.soak {v!r} is longer than a week", "seconds, or 30s / 5m / 1h")
            elif seconds is None:
                probs.error(path + ("soak",), f"rollout.soak must be a duration, got {_type(v)} {v!r}",
                            "seconds, or 30s / 5m / 1h")
            else:
                out["soak"] = int(seconds) if seconds == int(seconds) else seconds
    rb = c.string(ro, "rollback", path)
    if isinstance(rb, str) and (rendered or not _is_template(rb)):
        if rb not in ROLLBACK_POLICIES:
            probs.error(path + ("rollback",), f"rollout.rollback {rb!r} is not one of {', '.join(ROLLBACK_POLICIES)}",
                        _did_you_mean(rb, ROLLBACK_POLICIES) + "failed: the failed hosts; wave: the whole wave; "
                        "all: every host patched so far")
        else:
            out["rollback"] = rb
    probe = None
    pr = c.table(ro, "probe", path, _PROBE_KEYS)
    if pr is not None:
        pp = path + ("probe",)
        argv = c.str_list(pr, "argv", pp, required=True, nonempty=True)
        expect = c.string(pr, "expect", pp, required=True, nonempty=True)
        after = c.string(pr, "expect_after_rollback", pp)
        for key, rx in (("expect", expect), ("expect_after_rollback", after)):
            if isinstance(rx, str) and (rendered or not _is_template(rx)):
                try:
                    re.compile(rx)
                except re.error as e:
                    probs.error(pp + (key,), f"rollout.probe.{key} is not a valid regular expression: {e}",
                                "it is a Python regex searched in the probe's output; escape ( ) [ ] . * + ?")
        if argv and isinstance(expect, str):
            probe = {"argv": argv, "expect": expect, "expect_after_rollback": after or ""}
    hc = c.table(ro, "health", path, _HEALTH_KEYS)
    if hc is not None:
        hp = path + ("health",)
        argv = c.str_list(hc, "command", hp, required=True, nonempty=True)
        timeout = hc.get("timeout", 10)
        if not c.deferred(timeout) and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                        or not 0 < timeout <= 3600):
            probs.error(hp + ("timeout",), f"rollout.health.timeout must be seconds above 0 and at most 3600, "
                        f"got {_type(timeout)} {timeout!r}", "write a number without quotes, e.g. timeout: 10")
        elif argv and isinstance(timeout, (int, float)):
            out["health"] = {"command": list(argv), "timeout": timeout}
    return out, probe
