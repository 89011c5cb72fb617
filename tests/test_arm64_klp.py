"""klp relocations on aarch64, real (markers `forge` and `vm`): the arm64 live patch cross-built by kbuild is
turned into one with a livepatch relocation section by tests/klp_convert.py (its calls to the exported
seq_printf() go through `.klp.rela.vmlinux.text` and `.klp.sym.vmlinux.seq_printf,0`), then

- kpipe's validation accepts it for the forged arm64 7.2 kernel (the klp symbol is found in the forged vmlinux,
  R_AARCH64_CALL26 is a type arm64's apply_relocate_add takes) and gives a finding for the wrong variants
  (a klp symbol the kernel lacks, an x86_64 relocation type in the arm64 klp section);
- in a VM of that kernel with module.sig_enforce=1 the signed module loads, and the probe reads the patched
  cmdline_proc_show()'s message, which only the kernel's livepatch core can have made possible: it resolved the
  klp symbol in kallsyms and applied the relocation (klp_apply_section_relocs); then it is disabled and unloaded;
- the signed variant whose klp symbol does not exist is refused by the kernel and kpipe's preflight reports
  livepatch's own reason ("symbol '...' not found in symbol table").

The same load and refusal on the forged x86_64 6.12 kernel (the converter's format is not arm64's alone), and,
without the forge, a klp section in Debian's real arm64 virtio_net.ko judged by arm64's relocation table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import (  # noqa: E402, F401  (fixtures)
    MESSAGE,
    MODULE,
    RECIPE,
    TIMINGS,
    arm64_buildhost,
    arm64_built,
    arm64_workspace,
    arm64_ws,
    artifact,
    forged_arm64,
    kp,
    need_qemu_aarch64,
    recipe_yaml,
)
from forge_support import forge_buildhost, forged  # noqa: E402, F401  (fixtures)
from klp_convert import KLP_FLAGS, SHF_RELA_LIVEPATCH, SHN_LIVEPATCH, klp_convert  # noqa: E402
from kpipe.elf.reader import load_module_bytes, read_module  # noqa: E402
from kpipe.errors import ExitCode  # noqa: E402
from kpipe.forged import ForgedKernel  # noqa: E402

pytestmark = [pytest.mark.timeout(7200)]

SYMBOL = "seq_printf"  # exported; the new cmdline_proc_show() calls it (R_AARCH64_CALL26)
MISSING = "kpipe_no_such_function"
R_X86_64_PLT32 = 4
R_AARCH64_CALL26 = 283
VARIANTS: dict[str, dict] = {"good": {}, "missing": {"target": MISSING}, "x86": {"reloc_type": R_X86_64_PLT32},
                             "sympos": {"sympos": 2}, "noflag": {"flags": KLP_FLAGS & ~SHF_RELA_LIVEPATCH},
                             "unmarked": {"shndx": 0}}
KLP_RECIPE = "cmdline-arm64-klp"  # the same probe, a recipe of its own: these artifacts never stand for RECIPE's


def _findings(report: dict) -> dict[str, dict]:
    return {f["id"]: f for f in report["findings"]}


@pytest.fixture(scope="module")
def klp_artifacts(arm64_ws: Path, arm64_built: dict, forged_arm64: ForgedKernel, tmp_path_factory) -> dict[str, dict]:
    """The converted modules as artifacts of the arm64 workspace: good, missing (a klp symbol the kernel lacks),
    x86 (an x86_64 relocation type in the klp section) and the other shapes the checks cover: a sympos past the
    symbol's count, a klp section without SHF_RELA_LIVEPATCH, a klp symbol not marked SHN_LIVEPATCH.
    {variant: {"id", "path", "klp_symbol", "sections"}}."""
    from kpipe.artifacts import add_artifact
    from kpipe.workspace import load_workspace

    (arm64_ws / "recipes" / f"{KLP_RECIPE}.yaml").write_text(recipe_yaml(name=KLP_RECIPE))
    unsigned = Path(artifact(arm64_ws, arm64_built["artifact_id"])["path"]).read_bytes()
    ws = load_workspace(arm64_ws)
    out: dict[str, dict] = {}
    for variant, kw in VARIANTS.items():
        res = klp_convert(unsigned, SYMBOL, **kw)
        ko = tmp_path_factory.mktemp(f"klp-{variant}") / f"{MODULE}.ko"
        ko.write_bytes(res.data)
        art = add_artifact(ws.store, ko, kernel=forged_arm64.release, module_name=MODULE, recipe=KLP_RECIPE,
                           arch="aarch64", builder="kbuild+klp_convert", meta={"klp_convert": variant})
        out[variant] = {"id": art.id, "path": ko, "klp_symbol": res.klp_symbol, "sections": res.sections}
    return out


@pytest.mark.forge
def test_the_converted_arm64_module_has_a_klp_section_of_arm64_call26_relocations(klp_artifacts: dict):
    good = klp_artifacts["good"]
    info = read_module(good["path"])
    assert info.header.machine == 183
    [sec] = info.klp_relocations
    assert (sec.name, sec.objname, sec.section, sec.problem) == (".klp.rela.vmlinux.text", "vmlinux", "text", "")
    assert sec.count >= 1
    [sym] = info.klp_symbols
    assert (sym.name, sym.objname, sym.symbol, sym.sympos, sym.problem) == \
        (f".klp.sym.vmlinux.{SYMBOL},0", "vmlinux", SYMBOL, 0, "")
    assert SYMBOL not in {u.name for u in info.undefined}  # the module loader no longer resolves it
    # the types in the klp section are the arm64 call's (read with pyelftools, not kpipe's reader)
    import io

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(good["path"].read_bytes()))
    klp = elf.get_section_by_name(".klp.rela.vmlinux.text")
    symtab = elf.get_section(klp["sh_link"])
    types = {r["r_info_type"] for r in klp.iter_relocations()}
    assert types <= {R_AARCH64_CALL26, 282}, types  # CALL26 (bl) or JUMP26 (a tail call)
    assert {symtab.get_symbol(r["r_info_sym"])["st_shndx"] for r in klp.iter_relocations()} == {SHN_LIVEPATCH}


@pytest.mark.forge
def test_kpipe_validates_the_klp_module_for_the_arm64_kernel(klp_artifacts: dict, arm64_ws: Path,
                                                            forged_arm64: ForgedKernel):
    report = json.loads(kp(arm64_ws, "validate", klp_artifacts["good"]["id"], "--kernel", forged_arm64.release,
                           "--symbols", str(forged_arm64.vmlinux), "--json").stdout)
    assert report["ok"] is True, [f for f in report["findings"] if f["severity"] == "error"]
    f = _findings(report)
    assert f["klp.syms"]["severity"] == "info" and "resolve in the target" in f["klp.syms"]["message"]
    assert f["reloc.type"]["severity"] == "info"
    assert f["elf.machine"]["severity"] == "info" and report["facts"]["arch"] == "aarch64"
    assert "klp.rela.name" not in f and "klp.sym.name" not in f


@pytest.mark.forge
def test_kpipe_refuses_a_klp_symbol_the_arm64_kernel_lacks(klp_artifacts: dict, arm64_ws: Path,
                                                          forged_arm64: ForgedKernel):
    r = kp(arm64_ws, "validate", klp_artifacts["missing"]["id"], "--kernel", forged_arm64.release,
           "--symbols", str(forged_arm64.vmlinux), "--json", ok=(int(ExitCode.INVALID),))
    f = _findings(json.loads(r.stdout))
    assert f["klp.syms"]["severity"] == "error"
    assert f"symbol '{MISSING}' not found in symbol table" in f["klp.syms"]["message"]
    assert f["reloc.type"]["severity"] == "info"


@pytest.mark.forge
def test_kpipe_refuses_an_x86_64_relocation_type_in_the_arm64_klp_section(klp_artifacts: dict, arm64_ws: Path,
                                                                         forged_arm64: ForgedKernel):
    r = kp(arm64_ws, "validate", klp_artifacts["x86"]["id"], "--kernel", forged_arm64.release,
           "--symbols", str(forged_arm64.vmlinux), "--json", ok=(int(ExitCode.INVALID),))
    f = _findings(json.loads(r.stdout))
    assert f["reloc.type"]["severity"] == "error"
    assert f"{R_X86_64_PLT32} (x" in f["reloc.type"]["message"] and "aarch64" in f["reloc.type"]["message"]
    assert f["klp.syms"]["severity"] == "info"  # the symbol itself is fine


@pytest.mark.parametrize("variant, finding, words", [
    ("sympos", "klp.sym.sympos", f"sympos 2 but vmlinux has only 1 symbol(s) named '{SYMBOL}'"),
    ("noflag", "klp.rela.name", "flag SHF_RELA_LIVEPATCH (0x00100000) is missing"),
    ("unmarked", "klp.sym.name", "not SHN_LIVEPATCH"),
])
@pytest.mark.forge
def test_kpipe_refuses_the_other_wrong_klp_shapes_on_arm64(klp_artifacts: dict, arm64_ws: Path,
                                                          forged_arm64: ForgedKernel, variant: str, finding: str,
                                                          words: str):
    r = kp(arm64_ws, "validate", klp_artifacts[variant]["id"], "--kernel", forged_arm64.release,
           "--symbols", str(forged_arm64.vmlinux), "--json", ok=(int(ExitCode.INVALID),))
    f = _findings(json.loads(r.stdout))
    assert f[finding]["severity"] == "error" and words in f[finding]["message"], f.get(finding)


@pytest.fixture(scope="module")
def signed_klp(klp_artifacts: dict, arm64_ws: Path) -> dict[str, str]:
    """`kpipe sign` of the good and the missing-symbol variants with the lab key (the forged kernel trusts it).
    The missing one is signed before any validation could reject it (the kernel is to judge it); the signed
    artifact's own validation (the catalog's symbols: the forged vmlinux) rejects it already."""
    out = {}
    for variant, status in (("good", "valid"), ("missing", "rejected")):
        res = json.loads(kp(arm64_ws, "sign", klp_artifacts[variant]["id"], "--signer", "lab", "--json").stdout)
        assert res["signed"] is True and res["status"] == status, res
        out[variant] = res["id"]
    return out


@pytest.mark.forge
@pytest.mark.vm
def test_the_signed_klp_module_loads_patches_and_unloads_under_sig_enforce(signed_klp: dict, arm64_ws: Path):
    need_qemu_aarch64()
    t = time.monotonic()
    res = json.loads(kp(arm64_ws, "preflight", signed_klp["good"], "--sig-enforce", "--no-progress", "--json",
                        timeout=1800).stdout)
    TIMINGS["arm64_klp_preflight"] = time.monotonic() - t
    assert res["status"] == "passed", res
    assert res["sig_enforce"] is True
    steps = {s["step"]: s for s in res["steps"]}
    for name in ("boot", "load", "wait", "verify", "disable", "unload", "verify-removed"):
        assert steps[name]["ok"], steps[name]
    # seq_printf() was reached through the klp relocation the kernel applied: the message is its output
    assert MESSAGE in steps["verify"]["probe_output"], steps["verify"]


@pytest.mark.forge
@pytest.mark.vm
def test_the_arm64_kernel_refuses_the_missing_klp_symbol_and_kpipe_reports_why(signed_klp: dict, arm64_ws: Path):
    need_qemu_aarch64()
    r = kp(arm64_ws, "preflight", signed_klp["missing"], "--sig-enforce", "--no-progress", "--json",
           ok=(int(ExitCode.PREFLIGHT_FAILED),), timeout=1800)
    res = json.loads(r.stdout)
    assert res["status"] == "failed", res
    steps = {s["step"]: s for s in res["steps"]}
    assert steps["load"]["ok"] is False
    words = f"symbol '{MISSING}' not found in symbol table"
    assert any(words in line for line in res["kernel_lines"]), res["kernel_lines"]
    assert any(words in p for p in res["problems"]), res["problems"]  # the kernel's reason leads the report


# -- without the forge: a real arm64 module of Debian's own arm64 kernel ----------------------------------------

@pytest.mark.slow
def test_a_klp_section_in_a_debian_arm64_module_is_judged_by_arm64s_relocation_table(tmp_path: Path):
    """Debian's arm64 virtio_net.ko (kbuild, gcc, signed by Debian; its signature dropped), its calls to the
    exported napi_complete_done() turned into klp relocations: R_AARCH64_CALL26 passes arm64's table, an x86_64
    type in the same klp section does not. (Debian's System.map is a placeholder and its 6.1 arm64 kernel cannot
    live-patch: the symbol and load checks are the forged kernel's tests above.)"""
    from kpipe.elf.signature import split_signature
    from kpipe.lab import resolve_kernel
    from kpipe.validation import validate_module

    image = resolve_kernel("debian", None, None, arch="aarch64")  # downloaded once, cached (test_arm64_lab too)
    [ko] = sorted(image.modules_dir.rglob("virtio_net.ko*"))
    data, _ = load_module_bytes(ko)
    _sig, _problem, payload = split_signature(data)
    found: dict[str, dict[str, object]] = {}
    for variant, kw in (("good", {}), ("x86", {"reloc_type": R_X86_64_PLT32})):
        res = klp_convert(data[:payload], "napi_complete_done", **kw)
        assert res.sections == (".klp.rela.vmlinux.text",) and res.moved >= 1
        out = tmp_path / f"{variant}.ko"
        out.write_bytes(res.data)
        info = read_module(out)
        assert info.header.machine == 183 and [s.problem for s in info.klp_relocations] == [""]
        report = validate_module(None, out, image.release)
        assert report.facts.arch == "aarch64"
        found[variant] = {f.id: f for f in report.findings}
    assert found["good"]["reloc.type"].severity == "info"
    bad = found["x86"]["reloc.type"]
    assert bad.severity == "error" and "aarch64 loader rejects: 4 (x" in bad.message
    assert found["good"]["klp.syms"].severity == "skipped"  # no symbols for Debian's arm64 kernel here


# -- the same converter output on the forged x86_64 kernel (its format is not arm64's alone) --------------------

@pytest.mark.forge
@pytest.mark.vm
def test_the_converted_x86_64_module_loads_on_the_forged_x86_64_kernel_and_the_missing_one_is_refused(
        tmp_path_factory, forged: ForgedKernel, forge_buildhost: dict):
    from kpipe.artifacts import add_artifact
    from kpipe.workspace import load_workspace

    ws = arm64_workspace(tmp_path_factory.mktemp("klp-x86") / "ws", forge_buildhost, name="forge-trixie")
    (ws / "recipes" / f"{KLP_RECIPE}.yaml").write_text(recipe_yaml(name=KLP_RECIPE))
    [built] = json.loads(kp(ws, "build", "--recipe", RECIPE, "--kernel", forged.release, "--json",
                            timeout=1800).stdout)
    unsigned = Path(artifact(ws, built["artifact_id"])["path"]).read_bytes()
    store = load_workspace(ws).store
    results = {}
    for variant, kw in (("good", {}), ("missing", {"target": MISSING})):
        ko = tmp_path_factory.mktemp(f"klp-x86-{variant}") / f"{MODULE}.ko"
        ko.write_bytes(klp_convert(unsigned, SYMBOL, **kw).data)
        art = add_artifact(store, ko, kernel=forged.release, module_name=MODULE, recipe=KLP_RECIPE, arch="x86_64")
        signed = json.loads(kp(ws, "sign", art.id, "--signer", "lab", "--json").stdout)["id"]
        r = kp(ws, "preflight", signed, "--sig-enforce", "--no-progress", "--json",
               ok=(0, int(ExitCode.PREFLIGHT_FAILED)), timeout=1800)
        results[variant] = json.loads(r.stdout)
    good, missing = results["good"], results["missing"]
    assert good["status"] == "passed", good
    assert MESSAGE in {s["step"]: s for s in good["steps"]}["verify"]["probe_output"]
    assert missing["status"] == "failed"
    assert missing["problems"][0] == f"kernel: livepatch: symbol '{MISSING}' not found in symbol table"
