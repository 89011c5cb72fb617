"""Helpers for the build tests: a workspace with build hosts, and BuildSpecs made directly.

BuildSpecs are built here by hand (not through kpipe.recipes) so that the
build tests pin the builder contract on their own.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import kenv
from kpipe.builder.spec import BuildSpec, PatchFile, SourceFile
from kpipe.kernel import parse_release
from kpipe.workspace import load_workspace

# The installed headers (tests/kenv.py), never a hard-coded Debian ABI.
KERNEL = kenv.kernel_env(module_level=True)
DEBIAN_RELEASE = KERNEL.release
DEBIAN_HEADERS = str(KERNEL.headers)
DOUBLE = Path(__file__).with_name("kpatch-build")

LIVEPATCH_C = r"""// {comment}
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{{
	seq_printf(m, "%s\n", "{message}");
	return 0;
}}

static struct klp_func funcs[] = {{
	{{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show, }}, {{ }}
}};
static struct klp_object objs[] = {{ {{ .funcs = funcs, }}, {{ }} }};
static struct klp_patch patch = {{ .mod = THIS_MODULE, .objs = objs, }};

static int livepatch_init(void) {{ return klp_enable_patch(&patch); }}
static void livepatch_exit(void) {{ }}
module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
"""


def toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_workspace(root: Path, hosts: list[dict], kernels: list[dict], ssh: dict | None = None):
    """Write kpipe.toml with the given build hosts and kernels; return the loaded Workspace."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipes").mkdir(exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    lines = ["[workspace]", 'store = ".kpipe"', ""]
    if ssh:
        lines.append("[ssh]")
        for k, v in ssh.items():
            lines.append(f"{k} = {toml_str(v) if isinstance(v, str) else str(v).lower()}")
        lines.append("")
    for h in hosts:
        lines.append("[[build_hosts]]")
        for k, v in h.items():
            if isinstance(v, str):
                lines.append(f"{k} = {toml_str(v)}")
            elif isinstance(v, bool):
                lines.append(f"{k} = {str(v).lower()}")
            elif isinstance(v, int):
                lines.append(f"{k} = {v}")
            elif isinstance(v, (list, tuple)):
                lines.append(f"{k} = [{', '.join(toml_str(x) for x in v)}]")
            elif isinstance(v, dict):
                lines.append(f"{k} = {{ {', '.join(f'{toml_str(a)} = {toml_str(b)}' for a, b in v.items())} }}")
        lines.append("")
    for k in kernels:
        lines.append("[[kernels]]")
        for key, v in k.items():
            lines.append(f"{key} = {toml_str(v)}")
        lines.append("")
    (root / "kpipe.toml").write_text("\n".join(lines))
    return load_workspace(root)


def ssh_host(server, name: str = "b1", *, workdir: str, slots: int = 1, kernels=("*",), arch: str = "x86_64",
             tools: dict | None = None) -> dict:
    """A [[build_hosts]] table for a test sshd server."""
    d = {"name": name, "address": server.address, "port": server.port, "user": server.user, "arch": arch,
         "kernels": list(kernels), "workdir": workdir, "slots": slots, "identity_file": str(server.client_key)}
    if tools:
        d["tools"] = tools
    return d


def kbuild_spec(ws, *, release: str = DEBIAN_RELEASE, recipe: str = "cmdline-lp", module: str = "livepatch_cmdline",
                message: str = "this has been live patched", comment: str = "kpipe test") -> BuildSpec:
    """A kbuild BuildSpec for the cmdline_proc_show livepatch (lab.md)."""
    src = LIVEPATCH_C.format(message=message, comment=comment)
    entry = ws.kernel(release)
    return BuildSpec(recipe=recipe, recipe_file=ws.recipes_dir / f"{recipe}.yaml", kernel=parse_release(release),
                     kernel_entry=entry, builder="kbuild", module_name=module,
                     sources=(SourceFile(f"{module}.c", src),),
                     rendered={"name": recipe, "builder": "kbuild", "message": message, "comment": comment})


def kpatch_spec(ws, patch_text: str, *, release: str, recipe: str = "memcg-fix", patch_name: str = "memcg-fix.patch",
                options: dict | None = None, signing: dict | None = None) -> BuildSpec:
    """A kpatch-build BuildSpec over one patch file written into the workspace's patches/."""
    path = ws.patches_dir / patch_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(patch_text)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    from kpipe.builder.kpatch import predict_module_name

    return BuildSpec(recipe=recipe, recipe_file=ws.recipes_dir / f"{recipe}.yaml", kernel=parse_release(release),
                     kernel_entry=ws.kernel(release), builder="kpatch-build",
                     module_name=predict_module_name([patch_name], (options or {}).get("module_name", "")),
                     patches=(PatchFile(patch_name, path, sha),), options=dict(options or {}),
                     signing=dict(signing or {}),
                     rendered={"name": recipe, "builder": "kpatch-build", "patches": [patch_name],
                               "options": dict(options or {})})


def kpipe_env(ws_root: Path) -> dict:
    """Environment for running `python -m kpipe` in a subprocess against a test workspace."""
    env = dict(os.environ)
    env["KPIPE_WORKSPACE"] = str(ws_root)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


MEMCONTROL_C = """// SPDX-License-Identifier: GPL-2.0-or-later
/* memcontrol.c - Memory Controller (a fake excerpt for the kpatch-build test double) */
#include <linux/memcontrol.h>

static bool mem_cgroup_out_of_memory(struct mem_cgroup *memcg, gfp_t gfp_mask, int order)
{
	struct oom_control oc = {
		.zonelist = NULL,
		.nodemask = NULL,
		.memcg = memcg,
		.gfp_mask = gfp_mask,
		.order = order,
	};
	bool ret = true;

	if (mutex_lock_killable(&oom_lock))
		return true;
	ret = should_force_charge() || out_of_memory(&oc);
	mutex_unlock(&oom_lock);
	return ret;
}
"""

MEMCG_PATCH = """From 3c1f7a2b Mon Sep 17 00:00:00 2001
Subject: [PATCH] mm: memcg: do not report an OOM kill when the charge can be forced

---
 mm/memcontrol.c | 5 ++++-
 1 file changed, 4 insertions(+), 1 deletion(-)

diff --git a/mm/memcontrol.c b/mm/memcontrol.c
--- a/mm/memcontrol.c
+++ b/mm/memcontrol.c
@@ -15,7 +15,10 @@ static bool mem_cgroup_out_of_memory(struct mem_cgroup *memcg, gfp_t gfp_mask, int order)
 
 	if (mutex_lock_killable(&oom_lock))
 		return true;
-	ret = should_force_charge() || out_of_memory(&oc);
+	if (should_force_charge())
+		ret = true;
+	else
+		ret = out_of_memory(&oc);
 	mutex_unlock(&oom_lock);
 	return ret;
 }
{extra}"""


def gcc_comment() -> str:
    """The GCC .comment string this machine's gcc writes (what a matching vmlinux carries)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["gcc", "-x", "c", "-c", "-o", f"{d}/t.o", "-"], input=b"void main(void) {}", check=True)
        out = subprocess.run(["readelf", "-p", ".comment", f"{d}/t.o"], capture_output=True, text=True).stdout
    return out[out.index("GCC:"):].splitlines()[0].strip()


def fake_kernel_tree(root: Path, release: str, *, gcc: str | None = None, debug_info: bool = True) -> dict:
    """A kernel 'source tree', .config and vmlinux the test double accepts; returns a [[kernels]] table."""
    src = root / f"linux-{release}"
    (src / "mm").mkdir(parents=True, exist_ok=True)
    (src / "mm" / "memcontrol.c").write_text(MEMCONTROL_C)
    config = root / f"config-{release}"
    debug = "CONFIG_DEBUG_INFO=y\n" if debug_info else "# CONFIG_DEBUG_INFO is not set\n"
    config.write_text("CONFIG_LIVEPATCH=y\n" + debug)
    vmlinux = root / f"vmlinux-{release}"
    comment = gcc or gcc_comment()
    banner = f"Linux version {release} (builder@example) ({comment.replace('GCC: ', 'gcc ')}, GNU ld) #1 SMP\n"
    vmlinux.write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56 + banner.encode() + b"\x00" +
                        comment.encode() + b"\x00")
    return {"release": release, "arch": "x86_64", "source": str(src), "config": str(config), "vmlinux": str(vmlinux)}


def memcg_patch(extra: str = "") -> str:
    """The memcg patch; `extra` lines (e.g. test-double markers) go after the diff, as patch(1) ignores them."""
    return MEMCG_PATCH.replace("{extra}", extra)
