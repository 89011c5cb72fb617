"""The kbuild builder: rendered livepatch C source built against the kernel's headers.

Like the kernel's samples/livepatch and SUSE's source-based live patches:
the recipe's templates become files in the build folder, then
`make -C <headers> M=<folder> modules`.
"""

from __future__ import annotations

import re

from kpipe.builder.base import Builder, BuildPlan, Milestone, StagedFile, safe_relpath
from kpipe.builder.spec import BuildSpec
from kpipe.errors import ConfigError
from kpipe.settings import BuildHost

_NAME_RX = re.compile(r"[A-Za-z0-9_-]{1,55}")
_FILE_RX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")

_MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("entering", re.compile(r"make(\[\d+\])?: Entering directory")),
    ("compiling", re.compile(r"^\s*CC \[M\]\s")),
    ("modpost", re.compile(r"^\s*MODPOST\b")),
    ("linking", re.compile(r"^\s*LD \[M\]\s")),
    ("done", re.compile(r"make(\[\d+\])?: Leaving directory")),
)


def default_headers(release: str) -> str:
    """Where a distro installs a kernel's build headers (the `build` link of its modules folder)."""
    return f"/lib/modules/{release}/build"


def cross_make_args(target_arch: str, host_arch: str) -> list[str]:
    """ARCH= and CROSS_COMPILE= make arguments when the build host is another arch than the kernel; else none.

    They go on make's command line (never into the environment, where kpatch-build's own make would see them).
    """
    from kpipe.kernel import normalize_arch
    from kpipe.lab.arch import ARCHES, lab_arch

    target = normalize_arch(target_arch) if target_arch else ""
    if target in ("", "unknown") or target == normalize_arch(host_arch) or target not in ARCHES:
        return []
    return lab_arch(target).make_vars(host_arch)


def kbuild_file(module: str, c_files: list[str]) -> str:
    """A Kbuild file building module from the given C files."""
    objs = [f[:-2] + ".o" for f in c_files]
    text = f"obj-m += {module}.o\n"
    if objs != [f"{module}.o"]:
        text += f"{module}-y := {' '.join(objs)}\n"
    return text


class KbuildBuilder(Builder):
    """make -C <headers> M=<dir> modules on a build host holding the target's headers."""

    name = "kbuild"
    version_script = r"""
mk=$1; cc=$2
echo "make=$("$mk" --version 2>/dev/null | head -n 1)"
echo "gcc=$("$cc" --version 2>/dev/null | head -n 1)"
"""

    def version_args(self, host: BuildHost) -> tuple[str, ...]:
        return (host.tool("make"), host.tool("gcc"))

    def plan(self, spec: BuildSpec, host: BuildHost, build_dir: str, *, jobs: int | None = None) -> BuildPlan:
        module = spec.module_name
        # The name lands in a Kbuild (make) file: only the kernel's module-name characters are safe there.
        if not _NAME_RX.fullmatch(module or ""):
            raise ConfigError(f"{spec.recipe_file}: module name {module!r} is not a valid kernel module name",
                              hint="use 1-55 characters from [A-Za-z0-9_-]")
        if not spec.sources:
            raise ConfigError(f"{spec.recipe_file}: recipe {spec.recipe!r} renders no source files",
                              hint="a kbuild recipe needs at least one C source template")
        files: list[StagedFile] = []
        names = []
        for s in spec.sources:
            if not _FILE_RX.fullmatch(s.name):
                raise ConfigError(f"{spec.recipe_file}: source file name {s.name!r} is not a plain file name",
                                  hint="use letters, digits and _ . + - only")
            names.append(s.name)
            files.append(StagedFile(safe_relpath(f"src/{s.name}"), s.text.encode()))
        if not any(n in ("Kbuild", "Makefile") for n in names):
            c_files = [n for n in names if n.endswith(".c")]
            if not c_files:
                raise ConfigError(f"{spec.recipe_file}: recipe {spec.recipe!r} renders no .c file")
            files.append(StagedFile("src/Kbuild", kbuild_file(module, c_files).encode()))
        headers = spec.kernel_entry.headers or default_headers(spec.kernel.release)
        src = f"{build_dir}/src"
        argv: list[str] = ["env", "-u", "ARCH", host.tool("make"), "-C", headers, f"M={src}",
                           *cross_make_args(spec.kernel_entry.arch or spec.kernel.arch, host.arch)]
        njobs = jobs if jobs is not None else (spec.options or {}).get("jobs")
        if njobs:
            argv.append(f"-j{int(njobs)}")
        extra = (spec.options or {}).get("make_args") or []
        if isinstance(extra, str):
            extra = [extra]
        argv += [str(a) for a in extra]  # argv elements: make sees them as words, no shell in between
        argv.append("modules")
        return BuildPlan(
            builder=self.name, build_dir=build_dir, argv=tuple(argv), module_name=module,
            module_path=f"{src}/{module}.ko", output_dir=src, files=tuple(files),
            summary={"module": module, "headers": headers},
        )

    def milestone(self, line: str) -> Milestone | None:
        text = line.strip()
        for step, rx in _MILESTONES:
            if rx.search(text):
                return Milestone(step, text)
        return None
