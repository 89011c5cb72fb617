"""Choosing a build host for a kernel: by the host's kernel globs and architecture (pure)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from kpipe.errors import ConfigError, NotFoundError
from kpipe.settings import BuildHost


@dataclass(frozen=True)
class Refusal:
    """Why a build host cannot build a kernel."""

    host: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.host} ({'; '.join(self.reasons)})"


def refusal_reasons(host: BuildHost, release: str, arch: str) -> tuple[str, ...]:
    """Every reason host refuses (release, arch); empty when it accepts."""
    reasons = []
    if arch not in ("", "unknown") and host.arch != arch and arch not in host.cross_arches:
        reasons.append(f"arch {host.arch} != kernel arch {arch}"
                       + (f" (cross_arches {list(host.cross_arches)})" if host.cross_arches else ""))
    if not any(fnmatch.fnmatchcase(release, g) for g in host.kernels):
        reasons.append(f"kernels {list(host.kernels)} do not match {release}")
    return tuple(reasons)


def candidate_hosts(hosts: Sequence[BuildHost], release: str, arch: str, *,
                    only: str | None = None) -> tuple[list[BuildHost], list[Refusal]]:
    """The hosts that accept the kernel (in workspace order) and the refusals of the others."""
    accepted: list[BuildHost] = []
    refused: list[Refusal] = []
    for h in hosts:
        if only and h.name != only:
            continue
        reasons = refusal_reasons(h, release, arch)
        if reasons:
            refused.append(Refusal(h.name, reasons))
        else:
            accepted.append(h)
    # a native host of the kernel's arch before one that cross-builds for it (stable: workspace order otherwise)
    accepted.sort(key=lambda h: arch not in ("", "unknown") and h.arch != arch)
    return accepted, refused


def select_hosts(hosts: Sequence[BuildHost], release: str, arch: str, *, only: str | None = None,
                 where: str = "kpipe.toml") -> list[BuildHost]:
    """The build hosts that can build release/arch; NotFoundError lists every refusal when none can."""
    if not hosts:
        raise ConfigError(f"{where}: no [[build_hosts]] are configured",
                          hint="add a [[build_hosts]] entry (name = \"local\" builds on this machine)")
    if only and not any(h.name == only for h in hosts):
        raise NotFoundError(f"no build host named {only!r} in {where}",
                            hint=f"build hosts: {', '.join(h.name for h in hosts)}")
    accepted, refused = candidate_hosts(hosts, release, arch, only=only)
    if not accepted:
        listing = ", ".join(str(r) for r in refused)
        raise NotFoundError(
            f"no build host can build kernel {release} ({arch or 'unknown'} arch): {listing}",
            hint="add the kernel's release glob and arch to a [[build_hosts]] entry in " + where,
        )
    return accepted


def pick_host(hosts: Sequence[BuildHost], release: str, arch: str, *, only: str | None = None,
              load: dict[str, int] | None = None, where: str = "kpipe.toml") -> BuildHost:
    """The accepting host with the most free slots given `load` (builds already assigned per host)."""
    accepted = select_hosts(hosts, release, arch, only=only, where=where)
    load = load or {}
    # Stable: ties go to the host listed first in the workspace.
    return min(accepted, key=lambda h: (load.get(h.name, 0) / h.slots, accepted.index(h)))
