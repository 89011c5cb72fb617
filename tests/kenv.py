"""The test environment: the installed kernel headers (release, tree, sign-file) and the skip-or-fail rule.

Debian's kernel ABI number moves (6.1.0-56 one week, -57 the next) and old ABIs
leave the archive, so no test names one: the release is discovered from the
headers installed here, the same way `kpipe` discovers local kernels
(kpipe.workspace.discover_local_kernels). With several installed the newest
wins; KPIPE_TEST_KERNEL=<release> pins another installed one.

KPIPE_REQUIRE_REAL=1 (set by .ci/run) turns every "environment missing" skip
into a failure naming what is missing, so CI can never pass by skipping.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REQUIRE_ENV = "KPIPE_REQUIRE_REAL"
OVERRIDE_ENV = "KPIPE_TEST_KERNEL"


def require_real() -> bool:
    """True when missing environment must fail the run (KPIPE_REQUIRE_REAL=1)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_or_skip(reason: str, *, module_level: bool = False) -> None:
    """Skip for a missing environment, or fail naming it when KPIPE_REQUIRE_REAL=1. Never returns."""
    if require_real():
        pytest.fail(f"{REQUIRE_ENV}=1 and the environment is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_tool(name: str) -> str:
    """The path of an executable on PATH; skips (or fails under KPIPE_REQUIRE_REAL=1) when it is missing."""
    path = shutil.which(name)
    if path is None:
        require_or_skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def require_module(name: str) -> ModuleType:
    """Import a test dependency; skips (or fails under KPIPE_REQUIRE_REAL=1) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing = str(e)
    require_or_skip(f"python module {name} is not installed ({missing}); pip install -e '.[test]'")
    raise AssertionError("unreachable")


HEADER_TREES = ("/usr/src/linux-headers-{r}", "/lib/modules/{r}/build", "/usr/src/kernels/{r}")


class KernelEnvMissing(Exception):
    """No usable kernel headers here (the message says what is missing and how to install it)."""


@dataclass(frozen=True)
class KernelEnv:
    """One installed kernel's headers: what the tests build, validate and sign against."""

    release: str  # e.g. the installed linux-headers-<release>
    headers: Path  # /usr/src/linux-headers-<release> (Makefile, Module.symvers)
    sign_file: Path  # <headers>/scripts/sign-file (from linux-kbuild-X.Y)

    @property
    def vermagic(self) -> str:
        """The vermagic a module built against these headers carries (Debian's amd64 config)."""
        return f"{self.release} SMP preempt mod_unload modversions "

    @property
    def symvers(self) -> Path:
        return self.headers / "Module.symvers"

    def other_release(self, delta: int = -1) -> str:
        """Another release of the same flavour: the ABI number moved by delta (57 -> 56), never this one."""
        return other_release(self.release, delta)

    def uninstalled_release(self) -> str:
        """Another release of the same flavour with no headers here (validation finds nothing for it)."""
        for delta in (-1, -2, -3, 1, 2, 3, 100):
            r = other_release(self.release, delta)
            if not any(Path(t.format(r=r)).exists() for t in HEADER_TREES):
                return r
        raise AssertionError(f"every release near {self.release} has headers installed")

    def abi_glob(self, release: str | None = None) -> str:
        """A `kernels` pattern matching exactly the releases of this ABI: '6.1.0-57-*'."""
        from kpipe.kernel import parse_release

        r = release or self.release
        abi = parse_release(r).abi
        return r[:r.index(f"-{abi}-") + len(abi) + 2] + "*"


def other_release(release: str, delta: int = -1) -> str:
    """`release` with its ABI number moved by delta; a step the other way when it would not stay positive."""
    from kpipe.kernel import parse_release

    abi = parse_release(release).abi
    if not abi.isdigit() or f"-{abi}-" not in release:
        raise ValueError(f"{release!r} has no numeric ABI to derive another release from")
    n = int(abi) + delta
    if n < 1:
        n = int(abi) - delta
    return release.replace(f"-{abi}-", f"-{n}-", 1)


def _sort_key(release: str) -> tuple:
    """Newest upstream version, then highest ABI (numerically: 10 > 9), then the plain flavour (amd64 over rt)."""
    from kpipe.kernel import normalize_arch, parse_release

    p = parse_release(release)
    abi = tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.-]", p.abi)) if p.abi else ()
    plain = normalize_arch(p.flavour) == p.arch
    return (p.version, abi, plain, release)


@functools.cache
def discover(override: str | None = None, roots: tuple[Path, ...] | None = None) -> KernelEnv:
    """The installed kernel headers to test against: the newest, or `override` (KPIPE_TEST_KERNEL) when set.

    `roots` replaces /usr/src (kpipe.workspace.HEADERS_GLOB_ROOTS) for the tests of this function.
    """
    from kpipe.workspace import discover_local_kernels

    if override is None:
        override = os.environ.get(OVERRIDE_ENV) or None
    usable: dict[str, KernelEnv] = {}
    broken: list[str] = []
    for entry in discover_local_kernels(roots):
        headers = Path(entry.headers)
        sign_file = headers / "scripts" / "sign-file"
        if not (headers / "Makefile").is_file():
            broken.append(f"{headers} has no Makefile")
        elif not sign_file.is_file():
            broken.append(f"{sign_file} is missing (linux-kbuild not installed)")
        else:
            usable[entry.release] = KernelEnv(entry.release, headers, sign_file.resolve())
    if override:
        if override not in usable:
            installed = ", ".join(sorted(usable)) or "none"
            raise KernelEnvMissing(f"{OVERRIDE_ENV}={override} but linux-headers-{override} is not installed "
                                   f"with Module.symvers and sign-file (installed: {installed})")
        return usable[override]
    if not usable:
        detail = f" ({'; '.join(broken)})" if broken else ""
        where = ", ".join(str(r) for r in roots) if roots else "/usr/src"
        raise KernelEnvMissing(f"no kernel headers with Module.symvers and sign-file under {where}{detail}; "
                               "install linux-headers-amd64 (scripts/setup.sh does)")
    return usable[max(usable, key=_sort_key)]


def kernel_env(*, module_level: bool = False) -> KernelEnv:
    """The discovered headers, or skip (fail under KPIPE_REQUIRE_REAL=1) naming what is missing."""
    try:
        return discover()
    except KernelEnvMissing as e:
        require_or_skip(str(e), module_level=module_level)
    raise AssertionError("unreachable")
