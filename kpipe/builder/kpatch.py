"""The kpatch-build builder: a binary diff of the kernel built with and without the patches.

Checked against Debian trixie's kpatch-build 0.9.10 (tests/test_forge_kpatch.py):
positional arguments are the patches (applied with -p1); -o must exist; one
build per CACHEDIR at a time (the runner gives each build slot its own CACHEDIR
under a lock); the build runs in place in the -s tree; ARCH in the environment
breaks aarch64 builds, so it is removed with `env -u ARCH`; --skip-cleanup
leaves the tree patched and is never passed.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from kpipe.builder.base import Builder, BuildPlan, Milestone, StagedFile, safe_relpath
from kpipe.builder.spec import BuildSpec
from kpipe.errors import ConfigError
from kpipe.settings import BuildHost

# The kernel's module name field is 56 bytes with the NUL (MODULE_NAME_LEN).
MODULE_NAME_MAX = 55

_MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("cache", re.compile(r"^(Using cache at|Using source directory at)\b")),
    ("testing-patches", re.compile(r"^Testing patch file\(s\)")),
    ("building-original", re.compile(r"^Building original source")),
    ("building-patched", re.compile(r"^Building patched source")),
    ("extracting", re.compile(r"^Extracting new and modified ELF sections")),
    ("changed-function", re.compile(r"changed function: ")),
    ("building-module", re.compile(r"^Building patch module: ")),
    ("success", re.compile(r"^SUCCESS\s*$")),
)


def module_name_string(name: str) -> str:
    """kpatch-build's sanitising: characters outside [A-Za-z0-9_-] become '-', at most 55 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:MODULE_NAME_MAX]


def predict_module_name(patch_names: list[str] | tuple[str, ...], name: str = "", *, livepatch: bool = True) -> str:
    """The module name kpatch-build will choose: -n, else livepatch-<patch basename> ('patch' for several)."""
    if name:
        return module_name_string(name)
    if len(patch_names) == 1:
        base = posixpath.basename(patch_names[0])
        if base.endswith((".patch", ".diff")):
            base = base.rsplit(".", 1)[0]
    else:
        base = "patch"
    return module_name_string(("livepatch-" if livepatch else "kpatch-") + base)


def _opt(options: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in options and options[k] not in (None, ""):
            return options[k]
    return default


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"kpatch-build option {what} must be a positive integer, got {value!r}")
    return int(value)


class KpatchBuilder(Builder):
    """kpatch-build on a build host of the target's architecture and distro."""

    name = "kpatch-build"
    # --version exists (0.9.10 still prints "Version : 0.9.9": its VERSION line was not bumped), so
    # the script's own sha256 identifies the tool as well; the compiler matters too.
    version_script = r"""
tool=$1; cc=$2
p=$(command -v "$tool" 2>/dev/null) || { echo "kpatch-build=missing"; exit 0; }
echo "kpatch-build-sha256=$(sha256sum "$p" 2>/dev/null | cut -c1-16)"
v=$("$tool" --version 2>/dev/null | head -n 1)
[ -n "$v" ] && echo "kpatch-build=$v"
echo "gcc=$("$cc" --version 2>/dev/null | head -n 1)"
"""

    def version_args(self, host: BuildHost) -> tuple[str, ...]:
        return (host.tool("kpatch-build"), host.tool("gcc"))

    def plan(self, spec: BuildSpec, host: BuildHost, build_dir: str, *, jobs: int | None = None) -> BuildPlan:
        if not spec.patches:
            raise ConfigError(f"{spec.recipe_file}: recipe {spec.recipe!r} names no patch files",
                              hint="kpatch-build needs at least one patch")
        opts = dict(spec.kernel_entry.options or {})
        opts.update(spec.options or {})
        entry = spec.kernel_entry
        files: list[StagedFile] = [StagedFile("out/.keep", b"")]
        patch_paths: list[str] = []
        for i, p in enumerate(spec.patches):
            base = posixpath.basename(p.name.replace("\\", "/")) or f"patch-{i}"
            # One folder per patch keeps each basename (kpatch-build names the module after it) and the order.
            rel = safe_relpath(f"patches/{i:02d}/{base}")
            files.append(StagedFile(rel, p.path.read_bytes()))
            patch_paths.append(f"{build_dir}/{rel}")

        argv: list[str] = ["env", "-u", "ARCH", host.tool("kpatch-build")]
        if entry.source:
            argv += ["-s", entry.source]
        if entry.config:
            argv += ["-c", entry.config]
        if entry.vmlinux:
            argv += ["-v", entry.vmlinux]
        argv += ["-a", spec.kernel.release]
        njobs = jobs if jobs is not None else _opt(opts, "jobs")
        if njobs is not None:
            argv += ["-j", str(_positive_int(njobs, "jobs"))]
        targets = _opt(opts, "targets", "extra_targets", default=[])
        if isinstance(targets, str):
            targets = [targets]
        for t in targets:
            argv += ["-t", str(t)]
        name = str(_opt(opts, "module_name", "name", default=""))
        if name:
            argv += ["-n", name]
        out_dir = f"{build_dir}/out"
        argv += ["-o", out_dir]
        if _opt(opts, "non_replace", "non-replace", default=False):
            argv += ["-R"]
        if _opt(opts, "skip_compiler_check", "skip-compiler-check", default=False):
            argv += ["--skip-compiler-check"]
        argv += patch_paths
        module = predict_module_name([p.name for p in spec.patches], name)
        return BuildPlan(
            builder=self.name, build_dir=build_dir, argv=tuple(argv), module_name=module,
            module_path=f"{out_dir}/{module}.ko", output_dir=out_dir, files=tuple(files), cachedir_log=True,
            summary={"module": module, "release": spec.kernel.release},
        )

    def milestone(self, line: str) -> Milestone | None:
        text = line.strip()
        for step, rx in _MILESTONES:
            if rx.search(text):
                return Milestone(step, text)
        return None
