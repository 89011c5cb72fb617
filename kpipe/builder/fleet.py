"""Fleet-driven builds: the releases the selected hosts actually run -> the recipe x kernel matrix to build.

`kpipe build --fleet PATTERN` asks the hosts through the one observer (`kpipe fleet facts`), groups
them by running release, and builds every recipe that targets one of those releases on the build hosts
that accept it (kpipe.builder.hosts / the BuildRunner spread the matrix over them). What cannot be built
is listed with its reason: a release no recipe targets, one outside the kernel catalog, one no build
host accepts, and hosts that could not be asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kpipe.builder.hosts import candidate_hosts

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.fleet.facts import HostFacts
    from kpipe.workspace import Workspace

NO_RECIPE = "no-recipe"  # informational: nothing to build for this release
NOT_IN_CATALOG = "not-in-catalog"
NO_BUILD_HOST = "no-build-host"
UNREACHABLE = "unreachable"
# Reasons that leave a needed build unmade (exit 1); NO_RECIPE is not one of them.
PROBLEMS = (NOT_IN_CATALOG, NO_BUILD_HOST)


@dataclass(frozen=True)
class Running:
    """One release the fleet runs, on which hosts (and their arch)."""

    release: str
    arch: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Unbuilt:
    """A release (or a host) left without a build, and why."""

    release: str
    hosts: tuple[str, ...]
    code: str  # NO_RECIPE | NOT_IN_CATALOG | NO_BUILD_HOST | UNREACHABLE
    reason: str
    arch: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "arch": self.arch, "hosts": list(self.hosts), "code": self.code,
                "reason": self.reason}


def running_releases(facts: Mapping[str, HostFacts | BaseException]) -> tuple[list[Running], list[Unbuilt]]:
    """Hosts grouped by (release, arch) in release order (pure), and the hosts that could not be asked."""
    from kpipe.fleet.facts import HostFacts

    groups: dict[tuple[str, str], list[str]] = {}
    unreachable: list[Unbuilt] = []
    for host, f in facts.items():
        if isinstance(f, HostFacts):
            groups.setdefault((f.release, f.arch), []).append(host)
        else:
            msg = getattr(f, "message", None) or str(f)
            unreachable.append(Unbuilt("", (host,), UNREACHABLE, f"could not read the running kernel: {msg}"))
    running = [Running(r, a, tuple(sorted(hs))) for (r, a), hs in sorted(groups.items())]
    return running, unreachable


def fleet_matrix(ws: Workspace, running: list[Running],
                 recipe: str | None = None) -> tuple[list[tuple[str, str]], list[Unbuilt]]:
    """(recipe, release) pairs to build for the running releases, and the releases left unbuilt with why.

    `recipe`: only that recipe. A release is matched against every recipe's kernels: (names and globs);
    it must then be in the kernel catalog and accepted by a build host."""
    from kpipe import recipes

    pairs: list[tuple[str, str]] = []
    unbuilt: list[Unbuilt] = []
    for r in running:
        found = [x.name for x in recipes.recipes_for_kernel(ws, r.release) if recipe is None or x.name == recipe]
        if not found:
            what = f"recipe {recipe!r} does not target" if recipe else "no recipe targets"
            unbuilt.append(Unbuilt(r.release, r.hosts, NO_RECIPE, f"{what} {r.release}", r.arch))
            continue
        if r.release not in ws.kernels:
            unbuilt.append(Unbuilt(r.release, r.hosts, NOT_IN_CATALOG,
                                   f"{', '.join(found)} target{'s' if len(found) == 1 else ''} {r.release}, but it is "
                                   "not in the kernel catalog: add a [[kernels]] entry (or install its headers)",
                                   r.arch))
            continue
        arch = ws.kernels[r.release].arch or r.arch
        accepted, refused = candidate_hosts(ws.build_hosts, r.release, arch)
        if not accepted:
            why = "; ".join(str(x) for x in refused) or "no [[build_hosts]] are configured"
            unbuilt.append(Unbuilt(r.release, r.hosts, NO_BUILD_HOST,
                                   f"no build host builds {r.release} ({arch}): {why}", r.arch))
            continue
        pairs += [(name, r.release) for name in found]
    return pairs, unbuilt


def fleet_exit_code(unbuilt: list[Unbuilt]) -> int:
    """After the builds succeeded: 1 when a needed build could not be made, 6 when only hosts could not be
    asked, 0 otherwise (releases no recipe targets are listed, they need no build)."""
    if any(u.code in PROBLEMS for u in unbuilt):
        return 1
    if any(u.code == UNREACHABLE for u in unbuilt):
        return 6
    return 0
