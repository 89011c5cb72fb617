"""YAML composed into plain data plus the line of every key and value (PyYAML's node tree)."""

from __future__ import annotations

from typing import Any

import yaml

from kpipe.recipes.problems import _field
from kpipe.recipes.schema import MAX_YAML_NODES


class _YamlFail(Exception):
    def __init__(self, line: int, message: str, hint: str = ""):
        super().__init__(message)
        self.line, self.message, self.hint = line, message, hint


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _compose_yaml(text: str) -> tuple[Any, dict[tuple, int], dict[tuple, int]]:
    """YAML text -> (plain data, value lines, key lines); lines are 1-based, keyed by path tuples.

    A block scalar (`|` or `>`) is recorded at the line after its indicator, where its text starts.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        raise _YamlFail(mark.line + 1 if mark else 1, f"broken YAML: {problem}",
                        "check indentation, quoting and that `key: value` pairs line up") from None
    except yaml.YAMLError as e:
        raise _YamlFail(1, f"broken YAML: {e}", "check the file's syntax") from None
    if root is None:
        raise _YamlFail(1, "the recipe is empty", "a recipe needs at least `builder:` and `kernels:`")

    constructor = yaml.constructor.SafeConstructor()
    lines: dict[tuple, int] = {}
    key_lines: dict[tuple, int] = {}
    budget = [MAX_YAML_NODES]

    def convert(node: Any, path: tuple, depth: int) -> Any:
        budget[0] -= 1
        line = node.start_mark.line + 1
        if budget[0] < 0 or depth > 32:
            # an alias points back at its anchor's line; name the top-level key being expanded instead
            where = key_lines.get(path[:1], line)
            raise _YamlFail(where, "the YAML is too large or too deeply nested (alias expansion?)",
                            "a recipe is a small document; do not nest anchors and aliases")
        lines[path] = line
        if node.tag not in _PLAIN_TAGS and not isinstance(node, yaml.ScalarNode):
            raise _YamlFail(line, f"unsupported YAML tag {node.tag!r} in {_field(path)}",
                            "use plain strings, numbers, booleans, lists and mappings")
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in node.value:
                kline = k.start_mark.line + 1
                if k.tag == "tag:yaml.org,2002:merge":
                    raise _YamlFail(kline, "YAML merge keys (<<) are not supported in recipes",
                                    "write the keys out")
                if not isinstance(k, yaml.ScalarNode):
                    raise _YamlFail(kline, "a mapping key must be a plain string", "write `key: value`")
                key = constructor.construct_object(k)
                if not isinstance(key, str):
                    raise _YamlFail(kline, f"mapping key {key!r} must be a string", "quote it")
                if key in out:
                    raise _YamlFail(kline, f"duplicate key {key!r} in {_field(path)}",
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
            raise _YamlFail(line, f"unsupported YAML value: {getattr(e, 'problem', e)}",
                            "use plain strings, numbers, booleans, lists and mappings") from None
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _YamlFail(line, f"unsupported YAML value of type {type(value).__name__} in {_field(path)}",
                            "quote it to make it a string")
        return value

    try:
        data = convert(root, (), 0)
    except RecursionError:
        raise _YamlFail(1, "the YAML nests too deeply", "a recipe is a small, flat document") from None
    return data, lines, key_lines
