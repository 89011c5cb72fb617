"""The builder interface: a BuildSpec in, a BuildPlan (files + argv to run on a build host) out.

A builder is pure: it never touches a host. The runner (kpipe/builder/runner.py)
stages the plan's files, runs its argv detached on the host and fetches the
module; the builder only says what to write, what to run and where the
module will be.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from kpipe.builder.spec import BuildSpec
from kpipe.errors import ConfigError
from kpipe.settings import BuildHost


@dataclass(frozen=True)
class StagedFile:
    """A file the runner writes into the build folder before the build starts."""

    name: str  # path relative to the build folder, '/'-separated, no '..'
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class BuildPlan:
    """What one build runs on its host; every path is absolute on the host."""

    builder: str
    build_dir: str
    argv: tuple[str, ...]  # run inside build_dir, detached; user values are argv elements, never shell text
    module_name: str  # as the builder names the module (file stem, '-' kept)
    module_path: str  # predicted path of the module on the host
    output_dir: str  # where to look for a *.ko when the prediction misses
    files: tuple[StagedFile, ...] = ()
    cachedir_log: bool = False  # copy $CACHEDIR/build.log right after the run (the next run deletes it)
    summary: dict[str, str] = field(default_factory=dict)  # what the plan means, for `--json` and logs


@dataclass(frozen=True)
class Milestone:
    """A progress step recognised in the builder's output."""

    step: str  # a short stable name, e.g. "building-original"
    text: str  # the line as printed


class Builder(ABC):
    """One way of turning a BuildSpec into a module (kpatch-build, kbuild...)."""

    name: str = ""
    # A constant sh script printing `key=value` lines that identify the builder's
    # toolchain on a host; run with version_args() as "$1".. (see runner.PROBE_SCRIPT).
    version_script: str = ""

    @abstractmethod
    def version_args(self, host: BuildHost) -> tuple[str, ...]:
        """Positional parameters for version_script on this host (tool paths)."""

    @abstractmethod
    def plan(self, spec: BuildSpec, host: BuildHost, build_dir: str, *, jobs: int | None = None) -> BuildPlan:
        """The files and argv that build spec in build_dir on host (pure)."""

    @abstractmethod
    def milestone(self, line: str) -> Milestone | None:
        """The progress step a line of output marks, or None."""


def parse_version_output(stdout: str) -> str:
    """A builder version string from the probe's `key=value` lines (sorted, stable)."""
    pairs = []
    for line in stdout.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            key = key.strip()
            if key and key != "workdir" and re.fullmatch(r"[A-Za-z0-9_.-]+", key):
                pairs.append(f"{key}={value.strip()}")
    return "; ".join(sorted(pairs))


def safe_relpath(name: str) -> str:
    """name if it is a plain relative path inside the build folder; ConfigError otherwise."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise ConfigError(f"file name {name!r} would leave the build folder",
                          hint="source and patch names must be plain relative paths")
    return name


def get_builder(name: str) -> Builder:
    """The builder registered under name; ConfigError for an unknown one."""
    from kpipe.builder.kbuild import KbuildBuilder
    from kpipe.builder.klp import KlpBuilder
    from kpipe.builder.kpatch import KpatchBuilder

    builders: dict[str, Builder] = {"kpatch-build": KpatchBuilder(), "klp-build": KlpBuilder(),
                                    "kbuild": KbuildBuilder()}
    try:
        return builders[name]
    except KeyError:
        raise ConfigError(f"unknown builder {name!r}", hint=f"known builders: {', '.join(sorted(builders))}") from None
