"""Listing commands, `kpipe fleet facts` and `kpipe build` run straight from argv, without Typer.

Importing Typer (and its vendored click) and turning a command's signature into click parameters is
~50-60 ms of CPU: more than half of what `kpipe artifacts list` costs beyond a bare interpreter
(bench/startup.py), and a part of `kpipe build`'s overhead over running make by hand (bench/build_overhead.py).
Scripts run these often, so a plain argv of one of the commands in FAST (root
options --workspace/-W and --debug, the command's own options and arguments, spelled exactly as below) is
parsed here and runs the same body the Typer command runs (kpipe.cli.listings). Anything else -- --help, a
prefix, an unknown or misspelt option, a missing value, `--`, completion -- returns None from parse() and
goes to Typer, which gives its own help and usage errors. tests/test_startup_budget.py checks that every
spec here equals the Typer command's parameters and that both ways give the same output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple


class Number(NamedTuple):
    """An option taking a number in a closed range, as click's IntRange / FloatRange (min/max) accepts it."""

    name: str  # the parameter
    kind: type[int] | type[float]
    low: float | None
    high: float | None

    def convert(self, text: str) -> int | float | None:
        """The value, or None for anything but plain decimal digits within the range: Typer then reports it
        (click would also take `+5`, `1_000`, ` 7`, `inf` or `nan`; none of those is left to a guess here)."""
        whole, dot, fraction = text.partition(".")
        if not whole.isascii() or not whole.isdigit() or (dot and (self.kind is int or not fraction.isascii()
                                                                   or not fraction.isdigit())):
            return None
        value = self.kind(text)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return None
        return value


class FastCommand(NamedTuple):
    """A command kpipe.cli.fast runs without Typer: its path and what its click command accepts."""

    path: tuple[str, ...]  # ("artifacts", "list"), ("build",)
    options: dict[str, str]  # option that takes a text value -> parameter name
    flags: dict[str, str]  # boolean flag -> parameter name
    arguments: tuple[tuple[str, str | None], ...]  # positional (name, default; None: required)
    typer_only: dict[str, str] = {}  # options this parser leaves to Typer (given: Typer runs), e.g. a list
    numbers: dict[str, Number] = {}  # option that takes a number -> its parameter and range


_FORKS = Number("forks", int, 1, 1000)
FAST: dict[tuple[str, ...], FastCommand] = {c.path: c for c in (
    FastCommand(("artifacts", "list"), {"--kernel": "kernel", "-k": "kernel", "--recipe": "recipe", "-r": "recipe",
                                        "--status": "status"}, {"--json": "json_out"}, ()),
    FastCommand(("rollout", "status"), {}, {"--json": "json_out"}, (("rollout_id", "last"),)),
    FastCommand(("kernels", "parse"), {}, {"--json": "json_out"}, (("release", None),)),
    FastCommand(("build",), {"--kernel": "kernel", "-k": "kernel", "--recipe": "recipe", "-r": "recipe",
                             "--host": "host", "--fleet": "fleet"},
                {"--all-kernels": "all_kernels", "--force": "force", "--verbose": "verbose", "-v": "verbose",
                 "--json": "json_out"}, (), typer_only={"--jobs": "jobs", "-j": "jobs"}),
    FastCommand(("fleet", "facts"), {"--limit": "limit", "-l": "limit"}, {"--json": "as_json", "--strict": "strict"},
                (), typer_only={"--inventory": "inventory", "-i": "inventory"},
                numbers={"--forks": _FORKS, "-f": _FORKS, "--timeout": Number("timeout", float, 1.0, None),
                         "--workers": Number("workers", int, 1, 256)}),
)}

# Values of KPIPE_DEBUG whose meaning is plain (click's boolean words); any other value goes to Typer,
# which reports it.
_DEBUG_WORDS = {"": False, "0": False, "false": False, "no": False, "off": False, "f": False, "n": False,
                "1": True, "true": True, "yes": True, "on": True, "t": True, "y": True}


class Parsed(NamedTuple):
    """An argv kpipe.cli.fast runs: the command, its keyword arguments, the root options."""

    command: FastCommand
    kwargs: dict[str, Any]
    workspace: str | None
    debug: bool


def parse(args: list[str]) -> Parsed | None:
    """The command and its arguments when `args` is a plain call of a FAST command, else None (Typer's)."""
    env_debug = _DEBUG_WORDS.get(os.environ.get("KPIPE_DEBUG", "").strip().lower())
    if env_debug is None:
        return None
    workspace, debug, i = None, env_debug, 0
    while i < len(args):  # the root options, before the command
        a = args[i]
        if a in ("--workspace", "-W"):
            if i + 1 >= len(args) or not _plain(args[i + 1]):
                return None
            workspace, i = args[i + 1], i + 2
        elif a.startswith("--workspace=") and _plain(a[len("--workspace="):]):
            workspace, i = a[len("--workspace="):], i + 1
        elif a == "--debug":
            debug, i = True, i + 1
        else:
            break
    command = FAST.get(tuple(args[i:i + 1]))  # a command of one word (`build`), else of a group and a word
    if command is None:
        command = FAST.get(tuple(args[i:i + 2])) if i + 2 <= len(args) else None
    if command is None:
        return None
    kwargs: dict[str, Any] = {}
    positional: list[str] = []
    rest = args[i + len(command.path):]
    j = 0
    while j < len(rest):
        a = rest[j]
        name, eq, value = a.partition("=")
        if a in command.flags:
            kwargs[command.flags[a]] = True
            j += 1
        elif a in command.options:
            if j + 1 >= len(rest) or not _plain(rest[j + 1]):
                return None
            kwargs[command.options[a]] = rest[j + 1]
            j += 2
        elif eq and name.startswith("--") and name in command.options and _plain(value):
            kwargs[command.options[name]] = value
            j += 1
        elif a in command.numbers or (eq and name.startswith("--") and name in command.numbers):
            number = command.numbers[a if a in command.numbers else name]
            if a in command.numbers:
                if j + 1 >= len(rest):
                    return None
                value, j = rest[j + 1], j + 2
            else:
                j += 1
            converted = number.convert(value)
            if converted is None:
                return None
            kwargs[number.name] = converted
        elif _plain(a):
            positional.append(a)
            j += 1
        else:  # --help, -h, `--`, an unknown option, `-kVALUE`, a typer_only option: Typer decides
            return None
    if len(positional) > len(command.arguments):
        return None
    given: list[str | None] = [*positional, *[None] * (len(command.arguments) - len(positional))]
    for (param, default), arg in zip(command.arguments, given, strict=True):
        if arg is None and default is None:
            return None  # a required argument is missing: Typer's usage error
        kwargs[param] = default if arg is None else arg
    if workspace is None:
        workspace = os.environ.get("KPIPE_WORKSPACE") or None
    return Parsed(command, kwargs, workspace, debug)


def _plain(token: str) -> bool:
    """A value or argument click would take as such, with nothing to decide: not empty, not option-like."""
    return bool(token) and not token.startswith("-")


def body(command: FastCommand) -> Callable[..., None]:
    """The function that runs a FAST command (the one its Typer command calls)."""
    from kpipe.cli import listings

    match command.path:
        case ("artifacts", "list"):
            return listings.artifacts_list
        case ("rollout", "status"):
            return listings.rollout_status
        case ("kernels", "parse"):
            return listings.kernels_parse
        case ("build",):
            from kpipe.cli.building import build_command

            return build_command
        case ("fleet", "facts"):
            from kpipe.cli.fleetfacts import fleet_facts

            return fleet_facts
        case _:
            raise KeyError(f"no fast body for {' '.join(command.path)}")


def run(parsed: Parsed) -> None:
    """Set the root options as Typer's root callback does, then run the command's body."""
    from kpipe.cli.context import STATE

    STATE.workspace_arg = parsed.workspace
    STATE.debug = parsed.debug
    body(parsed.command)(**parsed.kwargs)
