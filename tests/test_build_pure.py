"""Pure parts of the build: host selection, kpatch-build/kbuild plans, module names, failure classification."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from doubles.buildkit import DEBIAN_RELEASE, kbuild_spec, kpatch_spec, memcg_patch, write_workspace  # noqa: E402
from kpipe.builder.base import get_builder, parse_version_output  # noqa: E402
from kpipe.builder.classify import CATEGORIES, classify  # noqa: E402
from kpipe.builder.hosts import pick_host, refusal_reasons, select_hosts  # noqa: E402
from kpipe.builder.kpatch import module_name_string, predict_module_name  # noqa: E402
from kpipe.errors import ConfigError, NotFoundError  # noqa: E402
from kpipe.workspace import BuildHost  # noqa: E402

UOS = "5.10.0-amd64-UOS"
KYLIN = "4.19.90-24.4.v2101.ky10.aarch64"
HOSTS = [
    BuildHost("uos-x86", address="u", arch="x86_64", kernels=("5.10.0-*-UOS",), slots=2),
    BuildHost("kylin-arm", address="k", arch="aarch64", kernels=("4.19.90-*.ky10.aarch64",)),
    BuildHost("debian", address="d", arch="x86_64", kernels=("6.1.*-amd64",), slots=1),
]


# -- host selection ---------------------------------------------------------------

@pytest.mark.parametrize("release,arch,expected", [
    (UOS, "x86_64", ["uos-x86"]),
    (KYLIN, "aarch64", ["kylin-arm"]),
    (DEBIAN_RELEASE, "x86_64", ["debian"]),
    (DEBIAN_RELEASE, "unknown", ["debian"]),  # the release does not say: any arch accepted
])
def test_select_hosts_by_glob_and_arch(release, arch, expected):
    assert [h.name for h in select_hosts(HOSTS, release, arch)] == expected


def test_no_fitting_host_lists_every_candidate_and_why():
    with pytest.raises(NotFoundError) as e:
        select_hosts(HOSTS, "5.10.0-arm64-UOS", "aarch64")
    msg = e.value.message
    assert "uos-x86 (arch x86_64 != kernel arch aarch64)" in msg
    assert "kylin-arm (kernels ['4.19.90-*.ky10.aarch64'] do not match 5.10.0-arm64-UOS)" in msg
    assert "debian (arch x86_64 != kernel arch aarch64; kernels ['6.1.*-amd64'] do not match" in msg
    assert e.value.hint and "[[build_hosts]]" in e.value.hint
    assert e.value.exit_code == 5


def test_unknown_host_and_no_hosts_are_clear_errors():
    with pytest.raises(NotFoundError, match="no build host named 'nope'"):
        select_hosts(HOSTS, UOS, "x86_64", only="nope")
    with pytest.raises(NotFoundError, match=r"kylin-arm \(arch aarch64 != kernel arch x86_64"):
        select_hosts(HOSTS, UOS, "x86_64", only="kylin-arm")
    with pytest.raises(ConfigError, match="no \\[\\[build_hosts\\]\\]"):
        select_hosts([], UOS, "x86_64")


def test_refusal_reasons_empty_when_accepted():
    assert refusal_reasons(HOSTS[0], UOS, "x86_64") == ()


def test_pick_host_balances_by_free_slots():
    a = BuildHost("a", kernels=("*",), slots=2)
    b = BuildHost("b", kernels=("*",), slots=1)
    load: dict[str, int] = {}
    order = []
    for _ in range(6):
        h = pick_host([a, b], UOS, "x86_64", load=load)
        load[h.name] = load.get(h.name, 0) + 1
        order.append(h.name)
    assert order.count("a") == 4 and order.count("b") == 2
    assert order[0] == "a"  # ties go to the first listed host


# -- module names -------------------------------------------------------------------

@pytest.mark.parametrize("patches,name,expected", [
    (["memcg-oom-fix.patch"], "", "livepatch-memcg-oom-fix"),
    (["sub/dir/fix.diff"], "", "livepatch-fix"),
    (["fix.txt"], "", "livepatch-fix-txt"),
    (["a.patch", "b.patch"], "", "livepatch-patch"),
    (["fix; rm -rf $(id).patch"], "", "livepatch-fix--rm--rf---id-"),
    (["x" * 80 + ".patch"], "", ("livepatch-" + "x" * 80)[:55]),
    (["a.patch"], "my mod!", "my-mod-"),
    (["a.patch"], "n" * 70, "n" * 55),
])
def test_predicted_module_name_follows_kpatch_build(patches, name, expected):
    got = predict_module_name(patches, name)
    assert got == expected
    assert len(got) <= 55


def test_module_name_string_keeps_allowed_characters():
    assert module_name_string("Live_patch-01") == "Live_patch-01"
    assert module_name_string("ü.") == "--"


# -- kpatch-build command line ------------------------------------------------------

@pytest.fixture
def ws(tmp_path):
    return write_workspace(tmp_path / "ws", [{"name": "local", "workdir": str(tmp_path / "work")}], [
        {"release": UOS, "arch": "x86_64", "source": "/usr/src/linux-5.10", "config": "/boot/config-uos",
         "vmlinux": "/usr/lib/debug/vmlinux-uos"},
        {"release": DEBIAN_RELEASE, "arch": "x86_64"},
    ])


def test_kpatch_argv_has_every_option_in_place(ws):
    spec = kpatch_spec(ws, memcg_patch(), release=UOS, options={
        "jobs": 8, "non_replace": True, "targets": ["vmlinux", "modules"], "skip_compiler_check": True,
        "module_name": "livepatch-memcg"})
    host = BuildHost("b", tools={"kpatch-build": "/opt/kpatch/bin/kpatch-build"})
    plan = get_builder("kpatch-build").plan(spec, host, "/w/abc")
    assert plan.argv[:4] == ("env", "-u", "ARCH", "/opt/kpatch/bin/kpatch-build")
    argv = list(plan.argv[4:])
    assert argv == ["-s", "/usr/src/linux-5.10", "-c", "/boot/config-uos", "-v", "/usr/lib/debug/vmlinux-uos",
                    "-a", UOS, "-j", "8", "-t", "vmlinux", "-t", "modules", "-n", "livepatch-memcg",
                    "-o", "/w/abc/out", "-R", "--skip-compiler-check", "/w/abc/patches/00/memcg-fix.patch"]
    assert "--skip-cleanup" not in plan.argv
    assert plan.module_path == "/w/abc/out/livepatch-memcg.ko"
    assert plan.cachedir_log
    staged = {f.name: f.data for f in plan.files}
    assert staged["patches/00/memcg-fix.patch"] == memcg_patch().encode()
    assert "out/.keep" in staged


def test_kpatch_defaults_and_jobs_override(ws):
    spec = kpatch_spec(ws, memcg_patch(), release=UOS)
    plan = get_builder("kpatch-build").plan(spec, BuildHost("b"), "/w/x", jobs=3)
    assert plan.argv[3] == "kpatch-build"
    assert list(plan.argv[plan.argv.index("-j"):plan.argv.index("-j") + 2]) == ["-j", "3"]
    assert "-R" not in plan.argv and "-n" not in plan.argv and "-t" not in plan.argv
    assert plan.module_name == "livepatch-memcg-fix"


def test_kpatch_rejects_bad_jobs(ws):
    spec = kpatch_spec(ws, memcg_patch(), release=UOS, options={"jobs": "8; reboot"})
    with pytest.raises(ConfigError, match="jobs"):
        get_builder("kpatch-build").plan(spec, BuildHost("b"), "/w/x")


def test_unknown_builder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown builder 'klp-magic'"):
        get_builder("klp-magic")


# -- kbuild plan --------------------------------------------------------------------

def test_kbuild_plan_makes_against_default_headers(ws):
    spec = kbuild_spec(ws)
    plan = get_builder("kbuild").plan(spec, BuildHost("b"), "/w/k")
    assert plan.argv == ("env", "-u", "ARCH", "make", "-C", f"/lib/modules/{DEBIAN_RELEASE}/build", "M=/w/k/src",
                         "modules")
    files = {f.name: f.data.decode() for f in plan.files}
    assert files["src/Kbuild"] == "obj-m += livepatch_cmdline.o\n"
    assert "klp_enable_patch" in files["src/livepatch_cmdline.c"]
    assert plan.module_path == "/w/k/src/livepatch_cmdline.ko"


def test_kbuild_refuses_module_names_that_would_inject_into_make(ws):
    spec = kbuild_spec(ws, module="x $(shell reboot)")
    with pytest.raises(ConfigError, match="not a valid kernel module name"):
        get_builder("kbuild").plan(spec, BuildHost("b"), "/w/k")


def test_followed_log_is_reused_only_when_lossless():
    from kpipe.builder.runner import _lossless

    assert _lossless("h\u00e9llo\n", "7") == "h\u00e9llo\n".encode()
    assert _lossless("bad \ufffd byte", "12") is None  # a replaced byte: fetch the real one
    assert _lossless("short", "99") is None  # incomplete


def test_version_output_is_stable():
    out = "workdir=/w\ngcc=gcc 12\nmake=GNU Make 4.3\nnoise line\n"
    assert parse_version_output(out) == "gcc=gcc 12; make=GNU Make 4.3"


# -- failure classification (messages of kernel-facts.md) ---------------------------

CASES = [
    ("environment", "ERROR: Unsupported distribution."),
    ("environment", "ERROR: can't find vmlinux. Check /root/.kpatch/build.log for more details."),
    ("environment", "ERROR: can't find config file."),
    ("environment", "ERROR: kernel-debuginfo-5.10.0-136.12.0.86.oe2203sp1.x86_64 not installed."),
    ("environment", "ERROR: linux-image-5.4.18-53-generic-dbgsym not installed."),
    ("environment", "ERROR: source dir '/usr/src/linux' not found."),
    ("environment", "make: *** /lib/modules/6.1.0-999-amd64/build: No such file or directory.  Stop."),
    ("kernel-config", "ERROR: kernel doesn't have 'CONFIG_DEBUG_INFO' enabled."),
    ("kernel-config", "ERROR: kernel option 'CONFIG_X86_KERNEL_IBT' not supported."),
    ("kernel-config", "ERROR: The kernel doesn't support klp replace. Check /x/build.log for more details."),
    ("environment", "ERROR: can't find special struct alt_instr size."),  # a stripped vmlinux (real log)
    ("compiler", "ERROR: gcc/kernel version mismatch"),
    ("compiler", "ERROR: clang/kernel version mismatch"),
    ("patch", "ERROR: /w/p/00/fix.patch file failed to apply. Check /root/.kpatch/build.log for more details."),
    ("patch", "ERROR: fix.patch: unsupported patch to lib/: lib/string.c"),
    ("patch", "ERROR: fix.patch: unsupported patch to assembly: arch/x86/entry/entry_64.S"),
    ("patch", "ERROR: no changed objects found."),
    ("patch", "ERROR: no functional changes found."),
    ("diff", "create-diff-object: ERROR: memcontrol.o: kpatch_verify_patchability: 1851: changed section "
             ".data..read_mostly not selected for inclusion"),
    ("diff", "create-diff-object: ERROR: init.o: kpatch_verify_patchability: 1851: changed section .init.text "
             "not selected for inclusion"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_verify_patchability: 1870: data section .data.foo selected "
             "for inclusion"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_check_fentry_calls: 2121: function f doesn't have "
             "patchable function entry, unable to patch"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_check_fentry_calls: 1800: function f has no fentry/mcount "
             "call, unable to patch"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_correlate_static_local_variables: 1207: reference to static "
             "local variable count.1 in f was removed"),
    ("diff", "create-diff-object: ERROR: x.o: find_local_syms: 207: couldn't find matching x.c local symbols in "
             "vmlinux symbol table"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_regenerate_special_section: unsupported jump label"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_regenerate_special_section: unsupported static call"),
    ("diff", "create-diff-object: ERROR: x.o: kpatch_compare_correlated_section: 1212: .text.f section header "
             "details differ: unreconcilable difference"),
    ("symbols", "ERROR: Undefined symbols: mem_cgroup_oom_synchronize_locked ."),
    ("symbols", "ERROR: Patch module referencing altered exported kernel symbols cannot be loaded."),
    ("crash", "ERROR: create-diff-object SIGSEGV"),
    ("source", "/w/k/src/lp.c:9:9: error: implicit declaration of function 'seq_printff'"),
    ("source", "/w/k/src/lp.c:3:10: fatal error: linux/nope.h: No such file or directory"),
    ("source", "<command-line>: fatal error: nonexistent.h: No such file or directory"),
]


@pytest.mark.parametrize("category,line", CASES)
def test_classify_each_message(category, line):
    log = "\n".join(["kpipe: build slot 0, CACHEDIR=/w/cache/slot-0", "Using source directory at /usr/src/x",
                     "Testing patch file(s)", "make -j8 vmlinux modules", line,
                     "kpipe: builder exited with status 1"])
    c = classify(log)
    assert c.category == category
    assert line.strip() in c.lines
    assert c.matched == line.strip()
    assert c.hint


def test_every_category_has_a_case():
    assert {c for c, _ in CASES} | {"unknown"} == set(CATEGORIES)


def test_classify_unknown_keeps_the_tail():
    log = "\n".join(f"line {i}" for i in range(40))
    c = classify(log)
    assert c.category == "unknown"
    assert c.lines[-1] == "line 39" and len(c.lines) == 12


def test_classify_unknown_prefers_the_tools_error_lines():
    log = "Building patch module: x.ko\nERROR: something new broke. Check build.log\nkpipe: builder exited with 1\n"
    c = classify(log)
    assert c.category == "unknown"
    assert c.lines == ("ERROR: something new broke. Check build.log",)
    assert c.matched == c.lines[0]


def test_classify_takes_the_first_cause_and_the_error_summary():
    log = ("Extracting new and modified ELF sections\n"
           "create-diff-object: ERROR: memcontrol.o: kpatch_verify_patchability: 1851: changed section "
           ".data..read_mostly not selected for inclusion\n"
           "ERROR: 1 error(s) encountered. Check /root/.kpatch/build.log for more details.\n")
    c = classify(log)
    assert c.category == "diff"
    assert c.lines[-1].startswith("ERROR: 1 error(s) encountered")
