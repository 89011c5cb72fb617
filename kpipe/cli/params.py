"""Parameter types for help that names what to type (ID, TARGET), never the Python type (`<str>`)."""

from __future__ import annotations

from typing import Any

try:  # Typer >= 0.26 vendors click; older releases use click itself
    from typer._click.types import StringParamType
except ImportError:  # Typer < 0.26
    from click.types import StringParamType  # type: ignore[assignment]


class _Word(StringParamType):
    """A string argument whose help shows only its metavar: Typer's help adds `<str>` for the type otherwise."""

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return ""


WORD = _Word()
