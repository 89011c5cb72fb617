"""The Jinja2 sandbox recipes render in: StrictUndefined, a loader confined to the workspace, and bounds.

Every bound is enforced inside the template while it runs, before a value is built: a recipe cannot make
kpipe build a huge string or spin forever. The limits (see `_Budget`) are far above what a recipe needs.
"""

from __future__ import annotations

import re
import time
import types
from collections.abc import Callable, Generator, ItemsView, Iterable, Iterator, KeysView, ValuesView
from functools import update_wrapper
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, UndefinedError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateRuntimeError
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg, pass_context
from jinja2.visitor import NodeTransformer
from markupsafe import EscapeFormatter, Markup

from kpipe.errors import ConfigError
from kpipe.recipes.paths import resolve_template_path
from kpipe.recipes.schema import MAX_RENDERED_CHARS, MAX_TEMPLATE_BYTES

if TYPE_CHECKING:
    from kpipe.workspace import Workspace

# One render of one template (a recipe value or a template file) may take at most this many steps (loop
# iterations, calls, filters and operators) and seconds, and build at most this many characters in all
# (intermediate strings included). A real recipe takes a few hundred steps and milliseconds.
MAX_RENDER_STEPS = 1_000_000
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_WORK_CHARS = 64 * MAX_RENDERED_CHARS
# Integers stay printable: Python refuses str() of ints over 4300 digits (about 14300 bits) anyway.
MAX_INT_BITS = 1 << 14


class RenderLimit(TemplateRuntimeError):
    """A template went past a render bound; raised inside the template, so the error has its line."""


class _Budget:
    """What one render may still spend: steps, time, characters built."""

    def __init__(self) -> None:
        self.steps = 0
        self.work = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_RENDER_STEPS:
            raise RenderLimit(f"more than {MAX_RENDER_STEPS} steps (loop iterations, calls, filters, operators)")
        self.tick()

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"rendering took more than {MAX_RENDER_SECONDS:g} s")

    def allow(self, chars: int, what: str) -> None:
        """Refuse, before it is built, a value of about `chars` characters (or elements)."""
        if chars > MAX_RENDERED_CHARS:
            raise RenderLimit(f"{what} would build about {chars} characters (at most {MAX_RENDERED_CHARS})")
        if self.work + chars > MAX_RENDER_WORK_CHARS:
            raise RenderLimit(f"the template builds more than {MAX_RENDER_WORK_CHARS} characters in all")

    def charge(self, value: Any, what: str) -> None:
        """Account a value just built: strings by characters, containers by elements."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            self.allow(len(value), what)
            self.work += len(value)


def _weight(value: Any, cap: int = MAX_RENDERED_CHARS) -> int:
    """About how many characters str(value) has, counted only until past `cap` (cheap on huge values)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= cap:
        v = stack.pop()
        if isinstance(v, Namespace):  # its str() shows its attributes
            v = object.__getattribute__(v, "_Namespace__attrs")
        if isinstance(v, (str, bytes)):
            total += len(v) + 4  # quotes and separator inside a container
        elif isinstance(v, (dict, ItemsView)):
            items = v.items() if isinstance(v, dict) else v
            total += 2 + 4 * len(items)
            if total <= cap:
                for key, val in items:
                    stack.extend((key, val))
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView)):
            total += 2 + 2 * len(v)
            if total <= cap:
                stack.extend(v)
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        else:  # numbers, undefined, macros, ranges, generators: short reprs
            total += 32
    return total


def _int(value: Any) -> int:
    """An int argument as given, 0 for anything else (the real call then reports the type error)."""
    return value if isinstance(value, int) else 0


def _num(digits: str) -> int:
    # a width or precision written in a format: anything past 9 digits is over every limit anyway
    return MAX_RENDERED_CHARS + 1 if len(digits) > 9 else int(digits)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def _percent_size(fmt: str, args: Any) -> int:
    """About how long `fmt % args` is, from its widths and precisions and the size of the arguments."""
    size = len(fmt) + _weight(args)
    for m in _PERCENT_SPEC.finditer(fmt):
        width, precision, conversion = m.groups()
        if conversion == "%":
            continue
        for num in (width, precision):
            if num == "*":  # the width is an argument: count every integer argument
                values = args if isinstance(args, tuple) else (args,)
                size += sum(abs(a) for a in values if isinstance(a, int))
            elif num:
                size += _num(num)
    return size


def _spec_size(spec: str) -> int:
    """Upper bound on what a str.format spec adds: its width and precision (every number in it)."""
    return sum(_num(d) for d in re.findall(r"\d+", spec))


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(s, (str, bytes)) or not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return _weight(s)
    if isinstance(s, str) and isinstance(old, str):  # noqa: SIM114  (one branch per type: mypy narrows each)
        found = len(s) + 1 if not old else s.count(old)
    elif isinstance(s, bytes) and isinstance(old, bytes):
        found = len(s) + 1 if not old else s.count(old)
    else:  # str and bytes mixed: the real call says so
        return len(s)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(s) + found * max(len(new) - len(old), 0)


def _translate_size(s: Any, table: Any, *_: Any) -> int:
    longest = 1
    if isinstance(table, dict):
        longest = max([len(v) for v in table.values() if isinstance(v, (str, bytes))] + [1])
    return _weight(s) * longest


def _expandtabs_size(s: Any, tabsize: Any = 8) -> int:
    tab = "\t" if isinstance(s, str) else b"\t"
    return len(s) + int(s.count(tab)) * max(_int(tabsize), 0)


def _join_size(sep: Any, items: list[Any]) -> int:
    return _weight(sep) * max(len(items) - 1, 0) + sum(_weight(x) for x in items)


# str/bytes methods whose result can be much larger than their inputs: the size estimate of each call
_STR_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, width, *_: max(len(s), _int(width)),
    "ljust": lambda s, width, *_: max(len(s), _int(width)),
    "rjust": lambda s, width, *_: max(len(s), _int(width)),
    "zfill": lambda s, width: max(len(s), _int(width)),
    "expandtabs": _expandtabs_size,
    "replace": _replace_size,
    "translate": _translate_size,
}

# filters whose result can be much larger than their inputs: the size estimate of each use
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: max(_weight(value), _int(width)),
    "indent": lambda s, width=4, first=False, blank=False: _weight(s) + (str(s).count("\n") + 1) * (
        len(width) if isinstance(width, str) else max(_int(width), 0)),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True: (
        _weight(s) * (1 + len(wrapstring if isinstance(wrapstring, str) else "\n")) + 1),
    "replace": lambda s, old, new, count=None: _replace_size(s if isinstance(s, str) else str(s), old, new,
                                                              -1 if count is None else count),
    "format": lambda value, *args, **kwargs: _percent_size(str(value), kwargs or args),
    "join": lambda items, d="", attribute=None: _join_size(d, items),
    "slice": lambda value, slices, fill_with=None: _int(slices),
}

# filters that never turn their input into one string: they take large containers as they are
_KEEPS_VALUE = frozenset({
    "length", "count", "first", "last", "random", "list", "batch", "sort", "unique", "reverse", "map", "select",
    "reject", "selectattr", "rejectattr", "groupby", "dictsort", "items", "min", "max", "sum", "default", "d",
    "attr", "abs", "int", "float", "round", "join", "slice",
})


def _bounded_filter(env: _BoundedSandbox, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` counted as a step, refused before it builds too large a value, and its result accounted."""
    pass_arg = _PassArg.from_obj(func)
    size = _FILTER_SIZES.get(name)
    what = f"|{name}"

    # pass_context also keeps Jinja from running the filter at compile time (constant folding), where no
    # budget applies
    @pass_context
    def bounded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = env.budget
        budget.step()
        if name == "join" and not isinstance(value, (str, list)):
            value = list(value)
        if name not in _KEEPS_VALUE and not isinstance(value, (str, bytes)):
            budget.allow(_weight(value), what)
        if size is not None:
            budget.allow(size(value, *args, **kwargs), what)
        if pass_arg is _PassArg.context:
            rv = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            rv = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            rv = func(env, value, *args, **kwargs)
        else:
            rv = func(value, *args, **kwargs)
        budget.charge(rv, what)
        return rv

    bounded.__name__ = getattr(func, "__name__", name)
    return bounded


class _BoundedFormatter(SandboxedFormatter):
    """str.format for templates: each field is refused before it is built past the limit."""

    def __init__(self, env: _BoundedSandbox, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.budget = env.budget
        self.size = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self.size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            self.budget.allow(self.size + _weight(value), "str.format")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self.budget.allow(self.size + _weight(value) + _spec_size(format_spec), "str.format")
        rv = super().format_field(value, format_spec)
        self.size += len(rv)
        return rv


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


class _Instrument(NodeTransformer):
    """Routes `a ~ b` and the iterable of every {% for %} through the environment's bounded helpers."""

    def __init__(self, env: _BoundedSandbox):
        self.env = env

    def _call(self, helper: str, args: list[nodes.Node], lineno: int) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(helper), args, [], None, None)
        call.set_lineno(lineno).set_environment(self.env)
        return call

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        # also keeps Jinja from joining constant parts at compile time, where no budget applies
        self.generic_visit(node)
        return self._call("kpipe_join", list(node.nodes), node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._call("kpipe_loop", [node.iter], node.lineno)
        return node


class _BoundedCodeGenerator(CodeGenerator):
    """Output that macros, {% set %} blocks and {% filter %} blocks collect goes to a bounded buffer."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.kpipe_buffer()")


class _Buffer(list[Any]):
    """A block's collected output, refused once past the limit."""

    def __init__(self, budget: _Budget):
        super().__init__()
        self.budget = budget
        self.size = 0

    def _grow(self, n: int) -> None:
        self.size += n
        if self.size > MAX_RENDERED_CHARS:
            raise RenderLimit(f"a macro or block renders to more than {MAX_RENDERED_CHARS} characters")
        self.budget.tick()

    def append(self, item: Any) -> None:
        self._grow(len(item) if isinstance(item, str) else 0)
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        items = tuple(items)
        self._grow(sum(len(i) for i in items if isinstance(i, str)))
        super().extend(items)


class _BoundedSandbox(SandboxedEnvironment):
    """A SandboxedEnvironment with StrictUndefined, no autoescape, and a budget on every render."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, loader: Any):
        super().__init__(loader=loader, undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                         auto_reload=False, finalize=self._finalize)
        self.budget = _Budget()
        del self.globals["lipsum"]  # builds unbounded text; recipes have no use for it
        self.filters["c_string"] = c_string
        self.filters = {name: _bounded_filter(self, name, f) for name, f in self.filters.items()}

    def render_bounded(self, name: str, variables: dict[str, Any]) -> str:
        """Render template `name` within the budget; RenderLimit (raised inside the template) past it."""
        self.budget = _Budget()
        # generate() is a generator function (throw/close below) though annotated as an Iterator
        stream = cast("Generator[str, None, None]", self.get_template(name).generate(variables))
        chunks: list[str] = []
        size = 0
        try:
            for chunk in stream:
                size += len(chunk)
                if size > MAX_RENDERED_CHARS:
                    # thrown in at the template's own yield, so that the error names the template line
                    stream.throw(RenderLimit(f"the output is longer than {MAX_RENDERED_CHARS} characters"))
                if time.monotonic() > self.budget.deadline:
                    stream.throw(RenderLimit(f"rendering took more than {MAX_RENDER_SECONDS:g} s"))
                chunks.append(chunk)
        finally:
            stream.close()
        return "".join(chunks)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree: nodes.Template = _Instrument(self).visit(super()._parse(source, name, filename))
        return tree

    def _finalize(self, value: Any) -> Any:
        # `{{ value }}`: refused before str() builds it
        self.budget.step()
        self.budget.allow(_weight(value), "{{ }}")
        return value

    def kpipe_join(self, *parts: Any) -> str:
        """`a ~ b ~ ...`: str() of each part, joined; refused before it is built past the limit."""
        self.budget.allow(sum(_weight(p) for p in parts), "'~'")
        return "".join(map(str, parts))

    def kpipe_loop(self, iterable: Any) -> Iterator[Any]:
        """The iterable of a {% for %}: each iteration is a step."""
        for item in iterable:
            self.budget.step()
            yield item

    def kpipe_buffer(self) -> _Buffer:
        """A bounded list for a block's output (see _BoundedCodeGenerator)."""
        return _Buffer(self.budget)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.budget.step()
        what = f"'{operator}'"
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise RenderLimit(f"{what} would build an integer of about {left.bit_length() * right} bits "
                              f"(at most {MAX_INT_BITS})")
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimit(f"{what} would build an integer of more than {MAX_INT_BITS} bits")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    self.budget.allow(len(seq) * max(n, 0), what)
        elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) and hasattr(right, "__len__"):
            self.budget.allow(len(left) + len(right), what)
        elif operator == "%" and isinstance(left, str):
            self.budget.allow(_percent_size(left, right), what)
        rv = super().call_binop(context, operator, left, right)
        self.budget.charge(rv, what)
        return rv

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call from a template: a step; the result is accounted, growing containers are capped."""
        self.budget.step()
        rv = super().call(context, obj, *args, **kwargs)
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (list, dict, set)) and len(owner) > MAX_RENDERED_CHARS:
            raise RenderLimit(f"a {type(owner).__name__} grew past {MAX_RENDERED_CHARS} elements")
        self.budget.charge(rv, getattr(obj, "__name__", "a call"))
        return rv

    def wrap_str_format(self, value: Any) -> Callable[..., Any] | None:
        """Bounded versions of str.format/format_map and of the str methods that pad, repeat or replace.

        Jinja asks this for every attribute a template reads, so no path reaches the raw methods.
        """
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)):
            return None
        owner = getattr(value, "__self__", None)
        name = value.__name__
        if isinstance(owner, str) and name in ("format", "format_map"):
            return self._bounded_format(owner, value)
        if isinstance(owner, (str, bytes)) and name == "join":
            def join(items: Iterable[Any]) -> Any:
                items = list(items)
                self.budget.allow(_join_size(owner, items), f"{type(owner).__name__}.join")
                return value(items)
            return update_wrapper(join, value)
        if isinstance(owner, (str, bytes)) and name in _STR_METHODS:
            size = _STR_METHODS[name]

            def method(*args: Any, **kwargs: Any) -> Any:
                self.budget.allow(size(owner, *args, **kwargs), f"{type(owner).__name__}.{name}")
                return value(*args, **kwargs)
            return update_wrapper(method, value)
        return None

    def _bounded_format(self, owner: str, value: Any) -> Callable[..., str]:
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            formatter: _BoundedFormatter
            if isinstance(owner, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
            else:
                formatter = _BoundedFormatter(self)
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                kwargs, args = args[0], ()
            return type(owner)(formatter.vformat(owner, args, kwargs))
        return update_wrapper(wrapper, value)


def _sandbox(loader: Any) -> _BoundedSandbox:
    """The environment recipes render in (see _BoundedSandbox)."""
    return _BoundedSandbox(loader)


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
    if isinstance(exc, RenderLimit):
        return (f"render limit: {exc}",
                f"a template may take {MAX_RENDER_STEPS} steps and {MAX_RENDER_SECONDS:g} s and build values of "
                f"at most {MAX_RENDERED_CHARS} characters; compute less in the template")
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

    def __init__(self, ws: Workspace):
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
