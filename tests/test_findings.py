"""One Finding type (kpipe.findings) for module checks, recipe lint and the audit, and one line-keeping
YAML loader (kpipe.yamlnodes) for recipes and desired-state files. The JSON each producer prints keeps
its keys."""

from __future__ import annotations

import pytest

from kpipe import checks
from kpipe.findings import Finding, Severity
from kpipe.recipes import Problem
from kpipe.recipes import problems as recipe_problems
from kpipe.yamlnodes import LineDict, YamlError, compose_yaml, field_name, load_yaml


def test_checks_recipes_and_audit_share_one_type() -> None:
    from kpipe import audit

    assert checks.Finding is Finding and Problem is Finding and recipe_problems.Problem is Finding
    assert isinstance(audit.PatchStatus("h", "p", audit.MISSING).finding(), Finding)


SHAPES = [
    # a module check: id, severity, message, hint (kpipe validate --json)
    (Finding("sig.present", Severity.WARNING, "not signed", "sign it"),
     {"id": "sig.present", "severity": "warning", "message": "not signed", "hint": "sign it"}, "not signed"),
    # a recipe problem: file, line, message, hint, severity (kpipe recipe lint --json)
    (Problem.at("recipes/a.yml", 3, "bad builder", "use kbuild"),
     {"file": "recipes/a.yml", "line": 3, "message": "bad builder", "hint": "use kbuild", "severity": "error"},
     "recipes/a.yml:3: bad builder"),
    (Problem.at("a.yml", 1, "odd", severity="warning"),
     {"file": "a.yml", "line": 1, "message": "odd", "hint": "", "severity": "warning"}, "a.yml:1: odd"),
    # an audit verdict: at a host
    (Finding("audit.missing", Severity.ERROR, "lp: not loaded", host="web1"),
     {"id": "audit.missing", "severity": "error", "message": "lp: not loaded", "hint": "", "host": "web1"},
     "web1: lp: not loaded"),
]


@pytest.mark.parametrize("finding,shape,text", SHAPES)
def test_json_shape_and_text_per_producer(finding: Finding, shape: dict, text: str) -> None:
    assert finding.to_dict() == shape and list(finding.to_dict()) == list(shape)
    assert str(finding) == text
    assert type(finding.to_dict()["severity"]) is str


def test_severity_is_a_strenum_and_unknown_ones_are_refused() -> None:
    assert Finding("x", "error", "m").severity is Severity.ERROR  # type: ignore[arg-type]
    assert Severity.ERROR == "error" and checks.SEVERITIES == ("error", "warning", "info", "skipped")
    with pytest.raises(ValueError):
        Finding("x", "fatal", "m")  # type: ignore[arg-type]
    assert checks.report_ok([Finding("a", Severity.SKIPPED, "m")])
    assert not checks.report_ok([Finding("a", Severity.SKIPPED, "m")], strict=True)


def test_the_recipe_collector_makes_findings() -> None:
    probs = recipe_problems._Problems("r.yml", {("kernels",): 4})
    probs.error(("kernels", 0), "no such kernel", "pick one")
    probs.warning((), "style")
    assert [(p.location, p.severity) for p in probs.items] == [("r.yml:4", "error"), ("r.yml:1", "warning")]
    assert probs.errors == probs.items[:1]


# -- the one line-keeping YAML loader -------------------------------------------------------------------------------

def test_mappings_know_their_line_and_values_their_path() -> None:
    data, lines, key_lines = compose_yaml("a: 1\nb:\n  - c: x\n    d: |\n      text\n")
    assert isinstance(data, LineDict) and data.line == 1
    assert isinstance(data["b"][0], LineDict) and data["b"][0].line == 3
    assert lines[("b", 0, "c")] == 3 and key_lines[("b", 0, "d")] == 4 and lines[("b", 0, "d")] == 5
    assert data == {"a": 1, "b": [{"c": "x", "d": "text\n"}]}


YAML_ERRORS = [
    ("a: 1\na: 2\n", 2, "duplicate key 'a' in document"),
    ("a: !!python/name:os.system\n", 1, "unsupported YAML value"),
    ("a: [1\n", 2, "broken YAML"),
    ("x: &a [1]\n<<: {b: 1}\n", 2, "merge keys (<<) are not supported in a document"),
    ("when: 2026-11-29\n", 1, "unsupported YAML value of type date in when"),
]


@pytest.mark.parametrize("text,line,message", YAML_ERRORS)
def test_yaml_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(YamlError) as e:
        load_yaml(text)
    assert e.value.line == line and message in e.value.message and e.value.hint


def test_empty_documents_and_alias_bombs() -> None:
    assert load_yaml("") is None
    with pytest.raises(YamlError, match="the recipe is empty"):
        compose_yaml("# nothing\n", what="recipe")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True))
    with pytest.raises(YamlError, match="too large"):
        load_yaml(bomb, max_nodes=1000)


def test_field_names() -> None:
    assert field_name(("hosts", 0, "match")) == "hosts[0].match"
    assert field_name((), "recipe") == "recipe"
