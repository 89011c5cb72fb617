"""The Jinja2 sandbox recipes render in: StrictUndefined, size limits, a loader confined to the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from kpipe.errors import ConfigError
from kpipe.recipes.paths import resolve_template_path
from kpipe.recipes.schema import MAX_RENDERED_CHARS, MAX_TEMPLATE_BYTES


def _sandbox(loader: Any) -> Any:
    """A SandboxedEnvironment with StrictUndefined, no autoescape, and size limits on * and **."""
    limit = MAX_RENDERED_CHARS

    class _Sandbox(SandboxedEnvironment):
        # Intercepted so that "{{ 'x' * 10**9 }}" fails fast instead of eating the machine's memory.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large in template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                        raise SecurityError("repetition too large in template")
            return super().call_binop(context, operator, left, right)

    env = _Sandbox(loader=loader, undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                   auto_reload=False)
    env.filters["c_string"] = c_string
    return env


def c_string(value: Any) -> str:
    """A C string literal (with quotes) holding `value`: templates use `{{ x | c_string }}` in C sources."""
    out = ['"']
    for byte in str(value).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?':  # '?' too: no trigraphs
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(ch)
        else:  # control characters and UTF-8 bytes: octal escapes are exact and never run on
            out.append(f"\\{byte:03o}")
    out.append('"')
    return "".join(out)


def _template_line(exc: BaseException, filename: str) -> int | None:
    """The template line a runtime error happened on (Jinja rewrites tracebacks to template lines)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _jinja_error(exc: BaseException) -> tuple[str, str]:
    """(message, hint) for an exception raised while compiling or rendering a template."""
    if isinstance(exc, SecurityError):
        return (f"template sandbox violation: {exc}",
                "templates may only read `kernel`, `options`, `recipe` (and `module` in file templates); "
                "attributes starting with '_' and unsafe methods are blocked")
    if isinstance(exc, UndefinedError):
        return (f"undefined template variable: {exc.message or exc}",
                "available: kernel.{release,version,distro,distro_release,abi,flavour,arch,upstream,family}, "
                "options.<key from `options:`>, recipe; add missing keys under `options:`")
    if isinstance(exc, TemplateSyntaxError):
        return f"template syntax error: {exc.message}", "check {{ }} / {% %} pairs and filter names"
    if isinstance(exc, TemplateNotFound):
        return f"template include not found: {exc.name}", "include only files under recipes/ or patches/"
    return f"template error: {type(exc).__name__}: {exc}", "check the expression in the template"


class _WorkspaceLoader(BaseLoader):
    """Serves the recipe's own strings, and files under recipes/ or patches/ only (no '..', no symlink escapes)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.sources: dict[str, tuple[str, str]] = {}  # template name -> (text, filename shown in errors)

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
        if template in self.sources:
            text, filename = self.sources[template]
            return text, filename, lambda: True
        try:
            path = resolve_template_path(self.ws, template)
            text = _read_text(path, MAX_TEMPLATE_BYTES)
        except ConfigError:
            raise TemplateNotFound(template) from None
        return text, str(path), lambda: True


def _read_text(path: Path, limit: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{path} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
