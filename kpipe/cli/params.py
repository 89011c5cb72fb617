"""Parameter types for help that names what to type (ID, TARGET), never the Python type (`<str>`)."""

from __future__ import annotations

from typing import Any

import typer

if hasattr(typer, "_click"):  # Typer >= 0.26 vendors click
    from typer._click.types import StringParamType
else:  # Typer < 0.26 uses click itself
    from click.types import StringParamType  # type: ignore[assignment]


class _Word(StringParamType):
    """A string argument whose help shows only its metavar: Typer's help adds `<str>` for the type otherwise."""

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return ""


WORD = _Word()
