"""kpipe recipe render/list for humans and for tools: --output writes the plain rendered files and the
builder's exact argv (the catalog's -s/-c/-v for kpatch-build, make for kbuild); piped output has no boxes
or padding and shows units; the listing never shows raw Jinja."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kpipe.cli.recipe import plain_description
from recipe_ws import make_workspace

BOX = set("╭╮╰╯│─┃━┏┓┗┛┡┩└┘┌┐├┤╇╋")
UOS = "5.10.0-amd64-UOS"


def kpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The real CLI with stdout a pipe (not a TTY), as a tool would run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_WORKSPACE", "KPIPE_DEBUG")}
    env["COLUMNS"] = "200"
    r = subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = make_workspace(tmp_path / "ws", examples=True)
    toml = root / "kpipe.toml"
    # the catalog gives kpatch-build all three of its inputs for this kernel
    toml.write_text(toml.read_text().replace(
        'source = "/usr/src/linux-5.10.0-amd64-UOS"\n',
        'source = "/usr/src/linux-5.10.0-amd64-UOS"\nconfig = "/boot/config-5.10.0-amd64-UOS"\n'
        'vmlinux = "/usr/lib/debug/vmlinux-5.10.0-amd64-UOS"\n', 1))
    return root


def test_render_output_writes_the_plain_files_and_the_exact_kpatch_build_argv(ws, tmp_path):
    out = tmp_path / "rendered"
    r = kpipe(ws, "recipe", "render", "memcg-oom-fix", "--kernel", UOS, "--output", str(out), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    argv = shlex.split((out / "builder.argv").read_text())
    assert argv == d["builder_argv"]
    i = argv.index("kpatch-build")
    assert argv[i + 1:i + 7] == ["-s", "/usr/src/linux-5.10.0-amd64-UOS", "-c", "/boot/config-5.10.0-amd64-UOS",
                                 "-v", "/usr/lib/debug/vmlinux-5.10.0-amd64-UOS"]
    # the patch the argv names is in DIR, byte for byte the workspace's
    patch = Path(argv[-1])
    assert patch.is_relative_to(out.resolve()) and patch.name == "memcg-oom-fix.patch"
    assert patch.read_bytes() == (ws / "patches" / "memcg-oom-fix.patch").read_bytes()
    assert argv[argv.index("-o") + 1] == str(out.resolve() / "out") and (out / "out").is_dir()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["name"] == "memcg-oom-fix" and recipe["rollout"]["soak"] == 600
    assert "{{" not in recipe["description"] and UOS in recipe["description"]


def test_render_output_of_a_kbuild_recipe_has_the_sources_and_the_make_argv(ws, tmp_path, kernel_env):
    out = tmp_path / "kb"
    r = kpipe(ws, "recipe", "render", "cmdline-demo", "--kernel", kernel_env.release, "-o", str(out))
    assert r.returncode == 0, r.stderr
    argv = shlex.split((out / "builder.argv").read_text())
    i = argv.index("make")
    assert argv[i:] == ["make", "-C", f"/usr/src/linux-headers-{kernel_env.release}", f"M={out.resolve()}/src",
                        "modules"]
    source = (out / "src" / "livepatch-cmdline-demo.c").read_text()
    assert "klp_enable_patch" in source and "{{" not in source
    assert "obj-m := livepatch-cmdline-demo.o" in (out / "src" / "Kbuild").read_text()


def test_piped_render_has_no_boxes_or_padding_and_shows_units_argv_and_options(ws, kernel_env):
    r = kpipe(ws, "recipe", "render", "cmdline-demo", "--kernel", kernel_env.release)
    assert r.returncode == 0, r.stderr
    assert not BOX & set(r.stdout), r.stdout
    lines = r.stdout.splitlines()
    head = lines[:lines.index("--- livepatch-cmdline-demo.c")]
    assert all(ln == ln.rstrip() and not ln.startswith(" ") for ln in head), head
    fields = dict(ln.split(": ", 1) for ln in head if ": " in ln)
    assert "soak 30 s" in fields["rollout"]
    assert fields["argv"].split("  (")[0].endswith("modules") and " make -C " in fields["argv"]
    assert fields["recipe options"] == 'message="kpipe live patch active\\n"'
    assert "klp_enable_patch" in r.stdout  # the source follows verbatim, without line numbers
    assert any(ln.startswith("static int livepatch_cmdline_proc_show(") for ln in lines)


def test_recipe_list_shows_descriptions_rendered_or_plain_never_jinja(ws):
    (ws / "recipes" / "orphan.yaml").write_text(
        (ws / "recipes" / "cmdline-demo.yaml").read_text().replace("6.1.*-amd64", "9.9.*-none")
        .replace("name: cmdline-demo", "name: orphan"))
    r = kpipe(ws, "recipe", "list")
    assert r.returncode == 0, r.stderr
    assert "{{" not in r.stdout and "{%" not in r.stdout and not BOX & set(r.stdout)
    rows = {ln.split("\t")[0]: ln.split("\t") for ln in r.stdout.splitlines()}
    assert rows["memcg-oom-fix"][4] == ("mm: memcg: fix css reference leak on a repeated OOM in one fault "
                                        f"({UOS})")
    assert rows["orphan"][3] == "none"
    assert rows["orphan"][4] == "Demo live patch: /proc/cmdline prints MESSAGE on RELEASE"
    d = {x["name"]: x for x in json.loads(kpipe(ws, "recipe", "list", "--json").stdout)}
    assert "{{" not in d["orphan"]["description"]


def test_plain_description_drops_jinja():
    assert plain_description("x {{ options.message | trim }} on {{kernel.release}}{% if a %}!{% endif %}") == \
        "x MESSAGE on RELEASE!"
    assert plain_description("no template") == "no template"


def test_render_output_into_a_file_is_one_clear_line(ws, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = kpipe(ws, "recipe", "render", "memcg-oom-fix", "--kernel", UOS, "--output", str(f / "sub"))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "--output" in r.stderr and "cannot write" in r.stderr
