"""The one line-keeping YAML loader: plain data plus the line of every key and value.

Every YAML file kpipe reads itself and reports on with file:line (recipes, desired-state
files) goes through `compose_yaml` (or `load_yaml` for the data alone). It composes PyYAML's
node tree with the safe constructor and accepts only plain values: strings, numbers, booleans,
null, lists and mappings (no tags, no merge keys, no duplicate keys, a bounded node count so
that alias bombs stop). Mappings come back as `LineDict`, a dict that knows its line.
"""

from __future__ import annotations

from typing import Any

import yaml

# Stops alias bombs ("billion laughs") while composing; a caller may lower it.
MAX_NODES = 20_000
Path = tuple[Any, ...]  # a value's place: keys and list indexes from the root


class YamlError(Exception):
    """The text is not YAML kpipe accepts: the 1-based line, what is wrong, and a hint."""

    def __init__(self, line: int, message: str, hint: str = ""):
        super().__init__(message)
        self.line, self.message, self.hint = line, message, hint


class LineDict(dict):  # type: ignore[type-arg]
    """A mapping from YAML that remembers the 1-based line it starts on (0: not from a file)."""

    line: int = 0


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def field_name(path: Path, root: str = "document") -> str:
    """A value's path as a field name: ('hosts', 0, 'match') -> 'hosts[0].match'."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or root


def load_yaml(text: str, *, what: str = "document", max_nodes: int = MAX_NODES) -> Any:
    """YAML text -> plain data (mappings are LineDict); None for an empty document; YamlError otherwise."""
    return compose_yaml(text, what=what, max_nodes=max_nodes, allow_empty=True)[0]


def compose_yaml(text: str, *, what: str = "document", max_nodes: int = MAX_NODES, allow_empty: bool = False,
                 empty_hint: str = "") -> tuple[Any, dict[Path, int], dict[Path, int]]:
    """YAML text -> (plain data, value lines, key lines); lines are 1-based, keyed by path tuples.

    `what` names the document in messages ("recipe"). A block scalar (`|` or `>`) is recorded at the
    line after its indicator, where its text starts. An empty document is a YamlError unless `allow_empty`.
    """
    def _field(path: Path) -> str:
        return field_name(path, what)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        raise YamlError(mark.line + 1 if mark else 1, f"broken YAML: {problem}",
                        "check indentation, quoting and that `key: value` pairs line up") from None
    except yaml.YAMLError as e:
        raise YamlError(1, f"broken YAML: {e}", "check the file's syntax") from None
    if root is None:
        if allow_empty:
            return None, {}, {}
        raise YamlError(1, f"the {what} is empty", empty_hint or f"write the {what}'s keys")

    constructor = yaml.constructor.SafeConstructor()
    lines: dict[Path, int] = {}
    key_lines: dict[Path, int] = {}
    budget = [max_nodes]

    def convert(node: Any, path: Path, depth: int) -> Any:
        budget[0] -= 1
        line = node.start_mark.line + 1
        if budget[0] < 0 or depth > 32:
            # an alias points back at its anchor's line; name the top-level key being expanded instead
            where = key_lines.get(path[:1], line)
            raise YamlError(where, "the YAML is too large or too deeply nested (alias expansion?)",
                            f"a {what} is a small document; do not nest anchors and aliases")
        lines[path] = line
        if node.tag not in _PLAIN_TAGS and not isinstance(node, yaml.ScalarNode):
            raise YamlError(line, f"unsupported YAML tag {node.tag!r} in {_field(path)}",
                            "use plain strings, numbers, booleans, lists and mappings")
        if isinstance(node, yaml.MappingNode):
            out = LineDict()
            out.line = line
            for k, v in node.value:
                kline = k.start_mark.line + 1
                if k.tag == "tag:yaml.org,2002:merge":
                    raise YamlError(kline, f"YAML merge keys (<<) are not supported in a {what}",
                                    "write the keys out")
                if not isinstance(k, yaml.ScalarNode):
                    raise YamlError(kline, "a mapping key must be a plain string", "write `key: value`")
                key = constructor.construct_object(k)
                if not isinstance(key, str):
                    raise YamlError(kline, f"mapping key {key!r} must be a string", "quote it")
                if key in out:
                    raise YamlError(kline, f"duplicate key {key!r} in {_field(path)}",
                                    f"it is already set on line {key_lines[path + (key,)]}")
                key_lines[path + (key,)] = kline
                out[key] = convert(v, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [convert(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        if node.style in ("|", ">"):
            lines[path] = line + 1  # the text starts on the line after the indicator
        try:
            value = constructor.construct_object(node)
        except yaml.YAMLError as e:
            raise YamlError(line, f"unsupported YAML value: {getattr(e, 'problem', e)}",
                            "use plain strings, numbers, booleans, lists and mappings") from None
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise YamlError(line, f"unsupported YAML value of type {type(value).__name__} in {_field(path)}",
                            "quote it to make it a string")
        return value

    try:
        data = convert(root, (), 0)
    except RecursionError:
        raise YamlError(1, "the YAML nests too deeply", f"a {what} is a small, flat document") from None
    return data, lines, key_lines
