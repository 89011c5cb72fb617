"""Checks: the real module is clean for its kernel and fails precisely for every mismatch."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from kpipe.checks import KernelFacts, expected_vermagic, report_ok, run_checks
from kpipe.elf.reader import parse_module
from kpipe.elf.symbols import MemoryIndex, parse_nm_style
from kpipe.fleet import livepatch as lp
from kpipe.validation import kernel_facts, validate_module
from kpipe.workspace import load_workspace
from test_elf_support import (
    HEADERS,
    KERNEL,
    RELEASE,
    VERMAGIC,
    kallsyms_text,
    sample_bytes,
    sample_module,
    scratch,
    synthetic_livepatch,
    this_module_blob,
)

SYMVERS = HEADERS / "Module.symvers"


def _kallsyms_file(entries: dict[str, int], modules=None) -> Path:
    p = scratch("kallsyms")
    p.write_text(kallsyms_text(entries, modules))
    return p


def _errors(report_or_findings) -> list[tuple[str, str]]:
    findings = getattr(report_or_findings, "findings", report_or_findings)
    return [(f.id, f.message) for f in findings if f.severity == "error"]


def _ids(findings, severity="error") -> set[str]:
    return {f.id for f in getattr(findings, "findings", findings) if f.severity == severity}


@pytest.fixture(scope="module")
def target_kallsyms() -> Path:
    return _kallsyms_file({"cmdline_proc_show": 1, "seq_printf": 1, "foo_helper": 1, "dup_helper": 3})


def test_real_module_validates_clean_for_its_kernel(target_kallsyms):
    r = validate_module(None, sample_module(), RELEASE, symbol_files=[str(target_kallsyms)])
    assert r.ok, _errors(r)
    assert _errors(r) == []
    assert {f.id for f in r.findings if f.severity == "warning"} <= {"sig.present"}
    got = {f.id: f.severity for f in r.findings}
    for check in ("elf.class", "elf.type", "elf.machine", "vermagic.release", "vermagic.flags", "name.match",
                  "livepatch.flag", "license.gpl", "symbols.exported", "symbols.crc", "reloc.type", "klp.syms"):
        assert got[check] == "info", (check, got.get(check))
    # Module.symvers of the installed headers was used without being asked for
    assert any("Module.symvers" in s for s in r.symbol_sources)
    assert r.facts.vermagic == VERMAGIC and r.facts.sig_hash == "sha256"


def test_facts_from_installed_headers():
    f = kernel_facts(None, RELEASE)
    assert f.arch == "x86_64" and f.vermagic == VERMAGIC and f.modversions is True and f.sig_force is False


def test_fails_for_another_release():
    other = KERNEL.uninstalled_release()
    r = validate_module(None, sample_module(), other)
    assert not r.ok
    assert _ids(r) == {"vermagic.release"}
    msg = next(m for i, m in _errors(r) if i == "vermagic.release")
    assert RELEASE in msg and other in msg


def test_fails_for_other_vermagic_flags_in_the_catalog(tmp_path):
    (tmp_path / "kpipe.toml").write_text(
        f'[[kernels]]\nrelease = "{RELEASE}"\narch = "x86_64"\nvermagic = "{RELEASE} SMP mod_unload modversions "\n')
    ws = load_workspace(tmp_path)
    r = validate_module(ws, sample_module(), RELEASE)
    assert _ids(r) == {"vermagic.flags"}
    msg = _errors(r)[0][1]
    assert "SMP preempt mod_unload modversions" in msg and "should be" in msg


def test_fails_for_other_vermagic_flags_in_the_module():
    data = sample_bytes().replace(b"preempt mod_unload", b"preempt mod_unlXad", 1)
    p = scratch("flags.ko")
    p.write_bytes(data)
    r = validate_module(None, p, RELEASE)
    assert _ids(r) == {"vermagic.flags"}
    assert "mod_unlXad" in _errors(r)[0][1]


def test_fails_for_another_arch():
    data = bytearray(sample_bytes())
    struct.pack_into("<H", data, 18, 183)  # e_machine = EM_AARCH64
    p = scratch("arm.ko")
    p.write_bytes(bytes(data))
    r = validate_module(None, p, RELEASE)
    assert _ids(r) == {"elf.machine"}
    msg = _errors(r)[0][1]
    assert "183" in msg and "aarch64" in msg and "x86_64" in msg


def test_fails_for_a_symvers_with_one_crc_changed():
    lines = SYMVERS.read_text().splitlines()
    out = []
    for line in lines:
        cols = line.split("\t")
        if cols[1] == "seq_printf":
            cols[0] = f"0x{(int(cols[0], 16) ^ 1):08x}"
        out.append("\t".join(cols))
    p = scratch("Module.symvers")
    p.write_text("\n".join(out) + "\n")
    r = validate_module(None, sample_module(), RELEASE, symbol_files=[str(p)])
    assert _ids(r) == {"symbols.crc"}
    msg = _errors(r)[0][1]
    assert "disagrees about version of symbol seq_printf" in msg
    assert "module_layout" not in msg


def test_unknown_symbol_and_namespace():
    text = SYMVERS.read_text()
    missing = "\n".join(line for line in text.splitlines() if "\tseq_printf\t" not in line) + "\n"
    p = scratch("Module.symvers")
    p.write_text(missing)
    r = validate_module(None, sample_module(), RELEASE, symbol_files=[str(p)])
    assert ("symbols.exported" in _ids(r)) and "seq_printf" in dict(_errors(r))["symbols.exported"]
    ns = "\n".join((line.rstrip("\t") + "\tSOME_NS") if "\tseq_printf\t" in line else line
                   for line in text.splitlines())
    p.write_text(ns + "\n")
    r = validate_module(None, sample_module(), RELEASE, symbol_files=[str(p)])
    assert _ids(r) == {"symbols.namespace"}
    assert "SOME_NS" in _errors(r)[0][1]


def test_symvers_skipped_without_data_and_strict_fails():
    info = parse_module(sample_bytes(), "m.ko")
    facts = KernelFacts(release=RELEASE, arch="x86_64", vermagic=VERMAGIC)
    findings = run_checks(info, facts, None)
    assert "symbols.exported" in _ids(findings, "skipped")
    skip = next(f for f in findings if f.id == "symbols.exported")
    assert "kpipe kernels symbols fetch" in skip.hint
    assert report_ok(findings) and not report_ok(findings, strict=True)


def test_this_module_size_against_stock():
    info = parse_module(sample_bytes(), "m.ko")
    good = run_checks(info, KernelFacts(RELEASE, "x86_64", this_module_size=896, this_module_source="stock.ko"))
    assert next(f for f in good if f.id == "this_module.size").severity == "info"
    bad = run_checks(info, KernelFacts(RELEASE, "x86_64", this_module_size=960, this_module_source="stock.ko"))
    f = next(f for f in bad if f.id == "this_module.size")
    assert f.severity == "error" and "896" in f.message and "960" in f.message


def test_this_module_size_from_a_stock_module(tmp_path):
    # a "stock module" of the kernel, found in the catalog's options
    (tmp_path / "kpipe.toml").write_text(
        f'[[kernels]]\nrelease = "{RELEASE}"\noptions = {{ stock_module = "{sample_module()}" }}\n')
    f = kernel_facts(load_workspace(tmp_path), RELEASE)
    assert f.this_module_size == 896 and str(sample_module()) in f.this_module_source


# -- generated modules: one finding each ---------------------------------------------------------------------------

def _facts() -> KernelFacts:
    return KernelFacts(release=RELEASE, arch="x86_64", vermagic=VERMAGIC, modversions=True, sig_hash="sha256",
                       this_module_size=896, this_module_source="stock")


def _index(kallsyms: dict[str, int], modules=None) -> MemoryIndex:
    return MemoryIndex([parse_nm_style(kallsyms_text(kallsyms, modules), "kallsyms", "k")])


def _check(data: bytes, index=None, **kw):
    return run_checks(parse_module(data, "synth.ko"), _facts(), index, **kw)


def test_synthetic_livepatch_is_clean_when_symbols_resolve():
    fs = _check(synthetic_livepatch(), _index({"foo_helper": 1}))
    assert _errors(fs) == []


@pytest.mark.parametrize("kallsyms,sym,finding", [
    ({"other": 1}, ".klp.sym.vmlinux.foo_helper,0", "klp.syms"),
    ({"foo_helper": 2}, ".klp.sym.vmlinux.foo_helper,0", "klp.sym.sympos"),
    ({"foo_helper": 2}, ".klp.sym.vmlinux.foo_helper,3", "klp.sym.sympos"),
    ({"foo_helper": 2}, ".klp.sym.vmlinux.foo_helper,2", None),
    ({"foo_helper": 1}, ".klp.sym.vmlinux.foo_helper", "klp.sym.name"),
])
def test_klp_symbol_resolution(kallsyms, sym, finding):
    fs = _check(synthetic_livepatch(klp_syms=(sym,)), _index(kallsyms))
    assert _ids(fs) == ({finding} if finding else set())


def test_klp_symbol_in_a_module_object():
    data = synthetic_livepatch(klp_syms=(".klp.sym.ext4.ext4_helper,0",))
    assert _ids(_check(data, _index({}, {("ext4", "ext4_helper"): 1}))) == set()
    assert _ids(_check(data, _index({}, {("ext4", "other"): 1}))) == {"klp.syms"}
    # the object is not in the index: skipped, with how to provide it
    fs = _check(data, _index({"x": 1}))
    assert any(f.id == "klp.syms" and f.severity == "skipped" and "ext4" in f.message for f in fs)


def test_klp_symbols_skipped_without_kallsyms():
    fs = _check(synthetic_livepatch(), None)
    f = next(f for f in fs if f.id == "klp.syms")
    assert f.severity == "skipped" and "--symbols" in f.hint


def test_klp_symbol_without_shn_livepatch():
    assert _ids(_check(synthetic_livepatch(klp_shndx=0), _index({"foo_helper": 1}))) == {"klp.sym.name"}


def test_klp_rela_section_problems():
    fs = _check(synthetic_livepatch(klp_rela_flags=0x2), _index({"foo_helper": 1}))
    assert "klp.rela.name" in _ids(fs)
    fs = _check(synthetic_livepatch(klp_rela_name=".klp.rela.vmlinux"), _index({"foo_helper": 1}))
    assert "klp.rela.name" in _ids(fs)


def test_patched_function_missing_in_target():
    data = synthetic_livepatch(kpatch_funcs=(("cmdline_proc_show", "vmlinux", 0),))
    assert _ids(_check(data, _index({"foo_helper": 1, "cmdline_proc_show": 1}))) == set()
    fs = _check(data, _index({"foo_helper": 1}))
    assert _ids(fs) == {"klp.funcs"} and "cmdline_proc_show" in _errors(fs)[0][1]
    fs = _check(data, _index({"foo_helper": 1, "cmdline_proc_show": 2}))
    assert _ids(fs) == {"klp.func.sympos"}


def test_livepatch_flag_and_license():
    assert _ids(_check(synthetic_livepatch(livepatch=False), _index({"foo_helper": 1}))) == {"livepatch.flag"}
    fs = _check(synthetic_livepatch(license="Proprietary"), _index({"foo_helper": 1}))
    assert _ids(fs) == {"license.gpl"} and "Proprietary" in _errors(fs)[0][1]


def test_foreign_machine_and_type():
    assert _ids(_check(synthetic_livepatch(machine=258), _index({"foo_helper": 1}))) == {"elf.machine"}


def test_relocation_type_the_loader_rejects():
    # R_X86_64_GOTPCREL (9) is not accepted by the 6.1 x86_64 module loader
    fs = _check(synthetic_livepatch(reloc_type=9), _index({"foo_helper": 1}))
    assert _ids(fs) == {"reloc.type"} and "9 (x1)" in _errors(fs)[0][1]
    # ...in the words the kernel's loader would log (arch/x86/kernel/module.c), which kpipe.fleet.livepatch
    # also recognises as a refusal line
    words = _errors(fs)[0][1].split('(the kernel: "', 1)[1].rstrip('")')
    assert words.endswith(": Unknown rela relocation: 9")
    assert lp.failure_lines([words]) == [words]


def test_name_checks():
    assert _ids(_check(synthetic_livepatch(modinfo_name="other_name"), _index({"foo_helper": 1}))) == {"name.match"}
    long = "a" * 60
    fs = _check(synthetic_livepatch(name=long, modinfo_name=long), _index({"foo_helper": 1}))
    assert "name.length" in _ids(fs)
    fs = _check(synthetic_livepatch(name="bad.name", modinfo_name="bad.name"), _index({"foo_helper": 1}))
    assert _ids(fs) == {"name.chars"}


def test_this_module_missing():
    b_data = synthetic_livepatch(this_module=this_module_blob("lp_synth", 960))
    fs = _check(b_data, _index({"foo_helper": 1}))
    assert _ids(fs) == {"this_module.size"}


@pytest.mark.parametrize("config,arch,want", [
    ({"CONFIG_SMP": "y", "CONFIG_PREEMPT_BUILD": "y", "CONFIG_MODULE_UNLOAD": "y", "CONFIG_MODVERSIONS": "y"},
     "x86_64", "R SMP preempt mod_unload modversions "),
    ({"CONFIG_SMP": "y", "CONFIG_MODULE_UNLOAD": "y", "CONFIG_MODVERSIONS": "y"}, "aarch64",
     "R SMP mod_unload modversions aarch64"),
    ({"CONFIG_SMP": "y", "CONFIG_PREEMPT_RT": "y", "CONFIG_MODULE_UNLOAD": "y"}, "x86_64",
     "R SMP preempt_rt mod_unload "),
    ({"CONFIG_PREEMPT": "y", "CONFIG_MODULE_UNLOAD": "y"}, "x86_64", "R preempt mod_unload "),
    ({"CONFIG_SMP": "y", "CONFIG_MODULE_UNLOAD": "y", "CONFIG_MODVERSIONS": "y"}, "loongarch64",
     "R SMP mod_unload modversions LOONGARCH 64BIT "),
    ({}, "x86_64", "R "),
])
def test_expected_vermagic(config, arch, want):
    assert expected_vermagic("R", config, arch) == want


def test_cli_validate_exit_codes_and_json(tmp_path, target_kallsyms):
    ok = subprocess.run(["kpipe", "validate", str(sample_module()), "--kernel", RELEASE, "--symbols",
                         str(target_kallsyms), "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["kernel"] == RELEASE and len(doc["findings"]) > 10
    bad = subprocess.run(["kpipe", "validate", str(sample_module()), "--kernel", KERNEL.uninstalled_release()],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 3
    assert "vermagic.release" in bad.stdout and "INVALID" in bad.stdout
    strict = subprocess.run(["kpipe", "validate", str(sample_module()), "--kernel", RELEASE, "--strict"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert strict.returncode == 3  # this_module.size and klp symbols are skipped here


def test_cli_prints_paths_literally(tmp_path):
    from test_elf_support import make_signing_cert

    key, cert = make_signing_cert("rsa")
    odd = tmp_path / "[bold]odd[red].ko"
    odd.write_bytes(sample_bytes())
    r = subprocess.run(["kpipe", "sign", str(odd), "--key", str(key), "--cert", str(cert)], capture_output=True,
                       text=True, cwd=tmp_path, env={**__import__("os").environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    assert "[bold]odd[red].ko" in r.stdout  # Rich markup in a file name is printed, not interpreted
    r = subprocess.run(["kpipe", "validate", str(odd), "--kernel", RELEASE, "--cert", str(cert)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workspace_strict_setting_rejects_artifacts_with_skips(tmp_path):
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.validation import validate_and_record

    (tmp_path / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n[validation]\nstrict = true\n')
    ws = load_workspace(tmp_path)
    art = add_artifact(ws.store, sample_module(), kernel=RELEASE)
    report = validate_and_record(ws, art)  # this_module.size and the klp symbols lack reference data here
    assert report.strict and not report.ok and not report.errors
    assert get_artifact(ws.store, art.id).status == "rejected"
    assert validate_and_record(ws, art, strict=False).ok  # a trial: it passes, but is not the own validation
    assert get_artifact(ws.store, art.id).status == "rejected"
