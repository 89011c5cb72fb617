"""Recipes: schema, sandboxed rendering, path containment, lint, and the shipped examples."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import kenv
from kpipe import recipes
from kpipe.builder.spec import BuildSpec
from kpipe.errors import ConfigError, NotFoundError
from kpipe.workspace import load_workspace
from recipe_ws import REPO, line_of, make_workspace

KPATCH = """\
builder: kpatch-build
kernels: [5.10.0-amd64-UOS]
patches: [fix.patch]
"""


def ws_with(tmp_path: Path, recipes_: dict[str, str], **kw):
    return load_workspace(make_workspace(tmp_path, recipes_, **kw))


def errors(problems):
    return [p for p in problems if p.severity == "error"]


# --- the shipped examples --------------------------------------------------------------------------


def test_repository_examples_lint_clean():
    ws = load_workspace(REPO)
    assert errors(recipes.lint(ws)) == []
    assert {r.name for r in recipes.list_recipes(ws)} >= {"memcg-oom-fix", "cmdline-demo"}


def test_memcg_example_renders_for_uos(tmp_path):
    ws = ws_with(tmp_path, {}, examples=True)
    spec = recipes.render(ws, "memcg-oom-fix", "5.10.0-amd64-UOS")
    assert isinstance(spec, BuildSpec)
    assert spec.builder == "kpatch-build"
    assert spec.module_name == "livepatch-memcg-oom-fix"
    assert [p.name for p in spec.patches] == ["memcg-oom-fix.patch"]
    assert spec.patches[0].path == (tmp_path / "patches" / "memcg-oom-fix.patch").resolve()
    assert spec.options["jobs"] == 8 and spec.options["non_replace"] is False
    assert spec.signing == {"sign": True, "signer": "uos"}  # rendered from kernel.distro
    assert spec.rollout["soak"] == 600 and spec.rollout["waves"] == [1, "10%", "50%", "100%"]
    assert "5.10.0-amd64-UOS" in spec.rendered["description"]
    text = spec.patches[0].path.read_text()
    assert text.startswith("From ") and "--- a/mm/memcontrol.c" in text and "css_get" in text
    # the glob picks up the other UOS 5.10 kernel too
    assert recipes.kernels_for_recipe(ws, recipes.load_recipe(ws, "memcg-oom-fix")) == [
        "5.10.0-amd64-UOS", "5.10.0-arm64-UOS"]
    assert [r.name for r in recipes.recipes_for_kernel(ws, "5.10.0-arm64-UOS")] == ["memcg-oom-fix"]
    assert recipes.recipes_for_kernel(ws, "4.19.90-24.4.v2101.ky10.aarch64") == []


def test_digest_changes_with_kernel_and_patch(tmp_path):
    ws = ws_with(tmp_path, {}, examples=True)
    a = recipes.render(ws, "memcg-oom-fix", "5.10.0-amd64-UOS").inputs_digest()
    b = recipes.render(ws, "memcg-oom-fix", "5.10.0-arm64-UOS").inputs_digest()
    assert a != b
    p = tmp_path / "patches" / "memcg-oom-fix.patch"
    p.write_text(p.read_text().replace("never be freed", "never be released"))
    assert recipes.render(ws, "memcg-oom-fix", "5.10.0-amd64-UOS").inputs_digest() != a


def test_cmdline_example_compiles_against_real_headers(tmp_path, kernel_env):
    kenv.require_tool("make")
    headers, release = kernel_env.headers, kernel_env.release
    ws = ws_with(tmp_path / "ws", {}, examples=True)
    # hostile message: quotes, format specifiers, shell syntax; it must stay a C string literal
    cfg = tmp_path / "ws" / "recipes" / "cmdline-demo.yaml"
    cfg.write_text(cfg.read_text().replace('message: "kpipe live patch active\\n"',
                                           'message: "kpipe \\"%s\\" $(reboot); `id` ??= \\u4e2d\\n"'))
    spec = recipes.render(ws, "cmdline-demo", release)
    assert spec.module_name == "livepatch-cmdline-demo"
    assert [s.name for s in spec.sources] == ["livepatch-cmdline-demo.c", "Kbuild"]
    assert "obj-m := livepatch-cmdline-demo.o" in spec.sources[1].text
    assert spec.probe is not None and spec.probe.argv == ("cat", "/proc/cmdline")
    assert spec.signing == {"sign": True, "signer": "lab"}
    build = tmp_path / "build"
    build.mkdir()
    for src in spec.sources:
        (build / src.name).write_text(src.text)
    r = subprocess.run(["make", "-C", str(headers), f"M={build}", "modules"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ko = build / "livepatch-cmdline-demo.ko"
    info = subprocess.run(["modinfo", str(ko)], capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in info.splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())
    assert fields["livepatch"] == "Y"
    assert fields["license"] == "GPL"
    assert fields["name"] == "livepatch_cmdline_demo"
    assert fields["vermagic"].split()[0] == release
    # the message is in the module verbatim (compiled from the escaped literal), not interpreted
    assert 'kpipe "%s" $(reboot); `id` ??= \u4e2d\n'.encode() in ko.read_bytes()


# --- module names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("builder,name,patches,explicit,expected", [
    ("kpatch-build", "r", ["memcg-oom-fix.patch"], None, "livepatch-memcg-oom-fix"),
    ("kpatch-build", "r", ["sub/fix.v2.diff", "b.patch"], None, "livepatch-fix-v2"),
    ("kpatch-build", "r", ["a b;c.patch"], None, "livepatch-a-b-c"),
    ("kpatch-build", "r", ["x" * 80 + ".patch"], None, ("livepatch-" + "x" * 80)[:55]),
    ("kpatch-build", "r", ["fix.patch"], "my_mod", "my_mod"),
    ("kbuild", "cmdline-demo", [], None, "livepatch-cmdline-demo"),
    ("kbuild", "v1.2", [], None, "livepatch-v1-2"),
])
def test_predicts_module_name(builder, name, patches, explicit, expected):
    got = recipes.predict_module_name(builder, name, patches, explicit)
    assert got == expected and len(got) <= 55


def test_kpatch_default_module_name_from_first_patch(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH})
    assert recipes.render(ws, "r", "5.10.0-amd64-UOS").module_name == "livepatch-fix"


# --- variables -------------------------------------------------------------------------------------


def test_template_variables_and_catalog_overrides(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + """\
description: "{{ recipe }} {{ kernel.distro }} {{ kernel.arch }} {{ kernel.version[0] }}.{{ kernel.version[1] }} {{ options.message }} {{ options.keep }}"
options:
  message: from recipe
  keep: kept
kpatch:
  non_replace: "{{ kernel.version >= [5, 1] }}"
"""})  # noqa: E501  (one long YAML line: the description under test)
    spec = recipes.render(ws, "r", "5.10.0-amd64-UOS")
    assert spec.rendered["description"] == "r uos x86_64 5.10 catalog says hi kept"
    assert spec.options["non_replace"] is True  # rendered string coerced back to a boolean
    assert spec.options["jobs"] == 3  # builder default from the catalog entry


def test_catalog_arch_fills_in_unknown(tmp_path):
    ws = ws_with(tmp_path, {"r": """\
    builder: kpatch-build
    kernels: ["5.15.0-*-generic"]
    patches: [fix.patch]
    description: "{{ kernel.arch }}/{{ kernel.distro }}"
    """})
    spec = recipes.render(ws, "r", "5.15.0-91-generic")
    assert spec.rendered["description"] == "x86_64/ubuntu"
    assert spec.kernel.arch == "x86_64"


# --- bad input: every one a ConfigError naming file:line -------------------------------------------


def _render_error(ws, name="r", kernel="5.10.0-amd64-UOS", exc=ConfigError):
    with pytest.raises(exc) as e:
        recipes.render(ws, name, kernel)
    return e.value


def test_sandbox_escape_in_field(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + "description: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n"})
    err = _render_error(ws)
    line = line_of(tmp_path, "r", "description")
    assert f"recipes/r.yaml:{line}:" in str(err)
    assert "sandbox" in str(err) and err.hint
    lint = errors(recipes.lint(ws))
    assert [(p.file, p.line) for p in lint] == [("recipes/r.yaml", line)]
    assert "sandbox" in lint[0].message


@pytest.mark.parametrize("expr", [
    "{{ cycler.__init__.__globals__ }}",
    "{{ options.items.__self__ }}",
    "{{ recipe.__class__ }}",
    "{{ kernel|attr('__class__') }}",
    "{{ '{0.__class__}'.format(recipe) }}",
    "{{ range(10**9) | list }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000 }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
])
def test_sandbox_blocks_escapes_and_bombs(tmp_path, expr):
    ws = ws_with(tmp_path, {"r": KPATCH + "options: {}\ndescription: '" + expr.replace("'", "''") + "'\n"})
    err = _render_error(ws)
    assert f"recipes/r.yaml:{line_of(tmp_path, 'r', 'description')}:" in str(err)


def test_sandbox_escape_in_c_template_names_template_line(tmp_path):
    ws = ws_with(tmp_path, {"k": """\
    builder: kbuild
    kernels: [5.10.0-amd64-UOS]
    kbuild:
      sources:
        - template: templates/m.c.j2
          name: m.c
    """}, templates={"m.c.j2": "int a;\nint b;\n{{ recipe.__class__.__mro__ }}\n"})
    err = _render_error(ws, "k")
    assert "recipes/templates/m.c.j2:3:" in str(err) and "sandbox" in str(err)
    assert "recipes/k.yaml:5" in str(err)  # and which recipe line used the template


def test_undefined_variable(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + "options: {a: 1}\nrollout:\n  soak: \"{{ options.soak_time }}\"\n"})
    err = _render_error(ws)
    assert f"recipes/r.yaml:{line_of(tmp_path, 'r', 'soak:')}:" in str(err)
    assert "undefined" in str(err) and "soak_time" in str(err)


def test_undefined_variable_in_template_file(tmp_path):
    ws = ws_with(tmp_path, {"k": """\
    builder: kbuild
    kernels: [5.10.0-amd64-UOS]
    kbuild:
      sources: [{template: templates/m.c.j2, name: m.c}]
    """}, templates={"m.c.j2": "int a;\n\n\nint {{ kernel.nope }};\n"})
    err = _render_error(ws, "k")
    assert "recipes/templates/m.c.j2:4:" in str(err) and "undefined" in str(err)


def test_error_inside_block_scalar_points_at_its_line(tmp_path):
    ws = ws_with(tmp_path,
                 {"r": KPATCH + "description: |\n  first line {{ recipe }}\n  second\n  third {{ kernel.nope }}\n"})
    err = _render_error(ws)
    assert f"recipes/r.yaml:{line_of(tmp_path, 'r', 'third')}:" in str(err)


def test_template_syntax_error(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + "description: '{{ kernel.release '\n"})
    err = _render_error(ws)
    assert f"recipes/r.yaml:{line_of(tmp_path, 'r', 'description')}:" in str(err) and "syntax" in str(err)


@pytest.mark.parametrize("path,words", [
    ("../../etc/passwd", "climbs out"),
    ("/etc/passwd", "absolute"),
    ("~root/.bashrc", "absolute"),
    ("sub/../../kpipe.toml", "climbs out"),
    ("missing.patch", "does not exist"),
    ("link-out.patch", "outside"),
])
def test_patch_paths_must_stay_in_patches(tmp_path, path, words):
    ws = ws_with(tmp_path, {"r": f"""\
    builder: kpatch-build
    kernels: [5.10.0-amd64-UOS]
    patches:
      - fix.patch
      - "{path}"
    """})
    (tmp_path / "patches" / "link-out.patch").symlink_to("/etc/passwd")
    err = _render_error(ws)
    assert f"recipes/r.yaml:{line_of(tmp_path, 'r', path)}:" in str(err)
    assert words in str(err)


def test_template_path_cannot_escape(tmp_path):
    ws = ws_with(tmp_path, {"k": """\
    builder: kbuild
    kernels: [5.10.0-amd64-UOS]
    kbuild:
      sources: [{template: ../kpipe.toml, name: m.c}]
    """})
    err = _render_error(ws, "k")
    assert "recipes/k.yaml:4:" in str(err) and "climbs out" in str(err)


def test_template_include_cannot_escape(tmp_path):
    ws = ws_with(tmp_path, {"k": """\
    builder: kbuild
    kernels: [5.10.0-amd64-UOS]
    kbuild:
      sources: [{template: templates/m.c.j2, name: m.c}]
    """}, templates={"m.c.j2": "{% include '../../kpipe.toml' %}\n", "ok.h.j2": "x"})
    err = _render_error(ws, "k")
    assert "m.c.j2:1:" in str(err) and "not found" in str(err)


@pytest.mark.parametrize("text,line,words", [
    ("builder: kbuild\nkernels: [a\n", 3, "broken YAML"),
    ("builder: kbuild\n  kernels: x\n", 2, "broken YAML"),
    ("builder: kbuild\nkernels: [x]\nbuilder: kbuild\n", 3, "duplicate key"),
    ("- just\n- a list\n", 1, "mapping"),
    ("", 1, "empty"),
    ("builder: !!python/object/apply:os.system [id]\n", 1, "unsupported YAML tag"),
    ("builder: !!python/name:os.system\n", 1, "unsupported YAML value"),
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", 5, "too large"),
    ("builder: kbuild\n<<: {kernels: [x]}\n", 2, "merge keys"),
    ("builder: kbuild\nkernels: [x]\nwhen: 2026-11-29\n", 3, "unsupported YAML value"),
])
def test_broken_yaml(tmp_path, text, line, words):
    root = make_workspace(tmp_path)
    (root / "recipes" / "r.yaml").write_text(text)
    ws = load_workspace(root)
    with pytest.raises(ConfigError) as e:
        recipes.load_recipe(ws, "r")
    assert str(e.value).startswith(f"recipes/r.yaml:{line}:") and words in str(e.value)
    assert any(p.line == line and words in p.message for p in recipes.lint(ws))


def test_unknown_kernel(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH})
    err = _render_error(ws, kernel="9.9.9-amd64-UOS", exc=NotFoundError)
    assert "not in the catalog" in str(err)
    err = _render_error(ws, kernel="4.19.90-24.4.v2101.ky10.aarch64", exc=NotFoundError)
    assert "does not target" in str(err) and "5.10.0-amd64-UOS" in err.hint
    with pytest.raises(ConfigError):
        recipes.render(ws, "r", "5.10.0;reboot")
    with pytest.raises(NotFoundError) as e:
        recipes.render(ws, "rr", "5.10.0-amd64-UOS")
    assert "did you mean 'r'" in e.value.hint


def test_unknown_keys_get_did_you_mean(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + "kernal: [x]\nkpatch:\n  non-replace: true\n  jobz: 2\n"})
    probs = errors(recipes.lint(ws))
    by_line = {p.line: p for p in probs}
    assert "did you mean 'kernels'" in by_line[line_of(tmp_path, "r", "kernal")].hint
    assert "did you mean 'non_replace'" in by_line[line_of(tmp_path, "r", "non-replace")].hint
    assert "did you mean 'jobs'" in by_line[line_of(tmp_path, "r", "jobz")].hint


def test_lint_reports_every_problem(tmp_path):
    ws = ws_with(tmp_path, {
        "a": """\
        builder: kpatchbuild
        kernels: ["5.10.0-amd64-UOS", "6.6.*-nothing"]
        kpatch:
          jobs: many
          non_replace: maybe
          module_name: "bad name!"
        signing: {sign: yes please, signer: "nobody"}
        rollout:
          waves: [0, "150%"]
          soak: forever
          rollback: everything
          probe: {argv: [], expect: "(unclosed"}
        """,
        "b": KPATCH + "description: '{{ nope }}'\n",
        "c": "name: other\nbuilder: kbuild\nkernels: [x]\n",
    })
    probs = recipes.lint(ws)
    errs = errors(probs)
    a = [p for p in errs if p.file == "recipes/a.yaml"]
    lines = {p.line for p in a}
    for needle in ("kpatchbuild", "jobs", "non_replace", "module_name", "signing", "waves", "soak", "rollback",
                   "probe"):
        assert line_of(tmp_path, "a", needle) in lines, needle
    assert any("builder 'kpatchbuild'" in p.message and "did you mean 'kpatch-build'" in p.hint for p in a)
    assert any(p.file == "recipes/b.yaml" and "undefined" in p.message for p in errs)
    assert any(p.file == "recipes/c.yaml" and "differs from the file name" in p.message for p in errs)
    assert any(p.severity == "warning" and "'6.6.*-nothing' matches no kernel" in p.message for p in probs)
    for p in probs:
        assert p.line >= 1 and p.message and isinstance(p.hint, str)


def test_builder_sections_must_match(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH + "kbuild: {sources: []}\n",
                            "k": "builder: kbuild\nkernels: [5.10.0-amd64-UOS]\nkpatch: {jobs: 1}\n"})
    msgs = [str(p) for p in errors(recipes.lint(ws))]
    assert any("recipes/r.yaml:4:" in m and "builder is kpatch-build" in m for m in msgs)
    assert any("recipes/k.yaml:3:" in m and "builder is kbuild" in m for m in msgs)
    assert any("recipes/k.yaml" in m and "needs `kbuild:`" in m for m in msgs)


def test_make_args_and_source_names_are_checked(tmp_path):
    ws = ws_with(tmp_path, {"k": """\
    builder: kbuild
    kernels: [5.10.0-amd64-UOS]
    kbuild:
      sources:
        - {template: templates/m.c.j2, name: ../evil.c}
        - {template: templates/m.c.j2, name: Kbuild}
      make_args: ["M=/etc", "--eval=$(shell id)", "KCFLAGS=-O2"]
    """}, templates={"m.c.j2": "int x;\n"})
    msgs = [str(p) for p in errors(recipes.lint(ws))]
    assert any("recipes/k.yaml:5:" in m and "plain file name" in m for m in msgs)
    assert any("recipes/k.yaml:6:" in m and "reserved" in m for m in msgs)
    assert any("recipes/k.yaml:7:" in m and "M= is set by kpipe" in m for m in msgs)
    assert any("recipes/k.yaml:7:" in m and "--eval" in m for m in msgs)
    assert not any("KCFLAGS" in m for m in msgs)


SHELLY = "$(touch /tmp/kpipe-pwned); `id`; a && b || c > /dev/null < x | y & ' \" \\ * ? ~ # !"


def test_shell_metacharacters_are_data_in_every_field(tmp_path):
    # Every free-text field keeps the text verbatim; nothing is run, nothing expands.
    q = SHELLY.replace("'", "''")
    rx = re.escape(SHELLY).replace("'", "''")
    text = (
        "builder: kbuild\n"
        "kernels: [5.10.0-amd64-UOS]\n"
        f"description: '{q}'\n"
        "options:\n"
        f"  msg: '{q}'\n"
        "kbuild:\n"
        "  sources:\n"
        "    - {template: templates/m.c.j2, name: m.c}\n"
        f"  make_args: ['KCFLAGS={q}']\n"
        "rollout:\n"
        "  probe:\n"
        f"    argv: ['sh', '-c', '{q}']\n"
        f"    expect: '{rx}'\n"
    )
    ws = ws_with(tmp_path, {"k": text}, templates={"m.c.j2": "const char *m = {{ options.msg | c_string }};\n"})
    assert not Path("/tmp/kpipe-pwned").exists()
    spec = recipes.render(ws, "k", "5.10.0-amd64-UOS")
    assert spec.rendered["description"] == SHELLY
    assert spec.options["make_args"] == [f"KCFLAGS={SHELLY}"]
    assert spec.probe.argv == ("sh", "-c", SHELLY)  # an argv element, for Command(argv=...) only
    assert re.search(spec.probe.expect, SHELLY)
    assert "$(touch" in spec.sources[0].text and '\\"' in spec.sources[0].text
    assert not Path("/tmp/kpipe-pwned").exists()


@pytest.mark.parametrize("field,yaml_value", [
    ("name", "'r;id'"),
    ("builder", "'kbuild; id'"),
    ("kernels", "['5.10.0-amd64-UOS; reboot']"),
    ("patches", "['$(id).patch']"),
    ("signing", "{signer: 'lab; rm -rf /'}"),
    ("kpatch", "{module_name: 'x$(id)'}"),
    ("kpatch", "{targets: ['vmlinux; id']}"),
    ("rollout", "{rollback: 'wave && reboot'}"),
])
def test_shell_metacharacters_in_structured_fields_are_refused(tmp_path, field, yaml_value):
    base = {"builder": "kpatch-build", "kernels": "[5.10.0-amd64-UOS]", "patches": "[fix.patch]"}
    base[field] = yaml_value
    ws = ws_with(tmp_path, {"r": "".join(f"{k}: {v}\n" for k, v in base.items())})
    probs = errors(recipes.lint(ws))
    assert probs, field
    assert all(p.file == "recipes/r.yaml" and p.line >= 1 and p.hint is not None for p in probs)
    assert any(p.line == line_of(tmp_path, "r", f"{field}:") for p in probs)
    with pytest.raises((ConfigError, NotFoundError)):
        recipes.render(ws, "r", "5.10.0-amd64-UOS")


def test_patch_file_names_with_metacharacters_are_only_data(tmp_path):
    ws = ws_with(tmp_path, {"r": """\
    builder: kpatch-build
    kernels: [5.10.0-amd64-UOS]
    patches: ['fix;$(id) `x`.patch']
    """}, patches={"fix;$(id) `x`.patch": (REPO / "patches" / "memcg-oom-fix.patch").read_text()})
    spec = recipes.render(ws, "r", "5.10.0-amd64-UOS")
    assert spec.patches[0].name == "fix;$(id) `x`.patch"
    assert spec.module_name == "livepatch-fix---id---x-"


def test_not_a_diff_is_refused(tmp_path):
    ws = ws_with(tmp_path, {"r": KPATCH}, patches={"fix.patch": "hello\n"})
    err = _render_error(ws)
    assert "recipes/r.yaml:3:" in str(err) and "unified diff" in str(err)


def test_lint_renders_unmatched_literal_kernels_too(tmp_path):
    ws = ws_with(tmp_path, {"r": """\
    builder: kpatch-build
    kernels: [6.6.0-28.0.0.34.oe2403.x86_64]
    patches: [fix.patch]
    description: "{{ kernel.nope }}"
    """})
    probs = recipes.lint(ws)
    assert any(p.severity == "warning" and "matches no kernel" in p.message for p in probs)
    assert any(p.severity == "error" and "undefined" in p.message and p.line == 4 for p in probs)


def test_recipe_symlink_out_of_recipes_is_refused(tmp_path):
    root = make_workspace(tmp_path / "ws")
    outside = tmp_path / "outside.yaml"
    outside.write_text("builder: kbuild\nkernels: [x]\n")
    (root / "recipes" / "evil.yaml").symlink_to(outside)
    ws = load_workspace(root)
    with pytest.raises(ConfigError) as e:
        recipes.load_recipe(ws, "evil")
    assert "outside recipes/" in str(e.value)


def test_parse_duration():
    assert recipes.parse_duration("1h30m") == 5400
    assert recipes.parse_duration("45s") == 45 and recipes.parse_duration(7) == 7
    assert recipes.parse_duration("soon") is None and recipes.parse_duration(-1) is None


def test_no_shell_anywhere_in_recipes_module():
    src = "".join(p.read_text() for p in (REPO / "kpipe" / "recipes").glob("*.py"))
    for forbidden in ("subprocess", "os.system", "shell=True", "Popen"):
        assert forbidden not in src
    assert os.path.exists(REPO / "recipes" / "templates" / "livepatch-cmdline.c.j2")
