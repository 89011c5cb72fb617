"""kpipe lab forge / buildhost: the pure pieces (source parsing, fragment merging, cache keys, argv)."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from kpipe.errors import ConfigError
from kpipe.lab import buildhost, chroot, forge


@pytest.mark.parametrize("text, suite, version", [
    ("debian:trixie/6.12", "trixie", "6.12"),
    ("debian:bullseye/5.10", "bullseye", "5.10"),
    (" debian:bookworm/6.1 ", "bookworm", "6.1"),
])
def test_source_names_a_suite_and_a_linux_source_version(text, suite, version):
    s = forge.parse_source(text)
    assert (s.suite, s.version, s.package) == (suite, version, f"linux-source-{version}")


@pytest.mark.parametrize("text", ["trixie/6.12", "debian:trixie", "debian:trixie/6", "debian:trixie/6.12.1",
                                  "ubuntu:noble/6.8", "debian:../x/6.12", "debian:Trixie/6.12", ""])
def test_bad_sources_are_refused_with_an_example(text):
    with pytest.raises(ConfigError) as e:
        forge.parse_source(text)
    assert "debian:trixie/6.12" in (e.value.hint or "")


def test_config_parsing_reads_values_and_unset_markers():
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="x y"\n# comment\nCONFIG_N=64\n'
    assert forge.parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_S": '"x y"', "CONFIG_N": "64"}


@pytest.mark.parametrize("base, frag, expected", [
    # an unset option becomes set in place
    ("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n", {"CONFIG_B": "y"},
     "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n"),
    # a set option is unset in place (a choice member, like UNWINDER_GUESS)
    ("CONFIG_A=y\nCONFIG_G=y\n", {"CONFIG_G": "n"}, "CONFIG_A=y\n# CONFIG_G is not set\n"),
    # new options are appended in the fragment's order
    ("CONFIG_A=y\n", {"CONFIG_Z": "y", "CONFIG_M": '"s"'}, 'CONFIG_A=y\nCONFIG_Z=y\nCONFIG_M="s"\n'),
    # a value is replaced, comments kept
    ("# head\nCONFIG_LOCALVERSION=\"\"\n", {"CONFIG_LOCALVERSION": '"-x"'}, '# head\nCONFIG_LOCALVERSION="-x"\n'),
])
def test_fragment_merge_overrides_like_merge_config(base, frag, expected):
    assert forge.merge_config(base, frag) == expected


@pytest.mark.parametrize("final, frag, dropped", [
    ({"CONFIG_A": "y"}, {"CONFIG_A": "y"}, []),
    ({"CONFIG_A": "n"}, {"CONFIG_A": "y"}, ["CONFIG_A=y (got n)"]),
    ({}, {"CONFIG_A": "y"}, ["CONFIG_A=y (got unset)"]),
    ({}, {"CONFIG_A": "n"}, []),  # an invisible option is off: what was asked
    ({"CONFIG_S": '"a"'}, {"CONFIG_S": '"b"'}, ['CONFIG_S="b" (got "a")']),
])
def test_options_olddefconfig_dropped_are_named(final, frag, dropped):
    assert forge.dropped_options(final, frag) == dropped


def test_a_fragment_line_that_is_not_config_is_refused_with_its_line_number():
    with pytest.raises(ConfigError) as e:
        forge.check_fragment("CONFIG_A=y\n\nLIVEPATCH=y\n", "frag.config")
    assert e.value.message.startswith("frag.config:3:")


def test_the_default_fragment_has_what_boots_and_live_patches():
    text = resources.files("kpipe").joinpath("lab_assets", forge.DEFAULT_FRAGMENT).read_text()
    frag = forge.check_fragment(text, "default")
    for name in ("LIVEPATCH", "FTRACE", "DYNAMIC_FTRACE", "KALLSYMS_ALL", "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT",
                 "PVH", "UNWINDER_ORC", "MODULES", "MODULE_UNLOAD", "MODULE_SIG", "VIRTIO_PCI", "VIRTIO_NET",
                 "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "DEVTMPFS", "64BIT"):
        assert frag.get(f"CONFIG_{name}") == "y", name
    assert frag["CONFIG_UNWINDER_GUESS"] == "n"  # else tinyconfig's choice wins over ORC
    # the forge sets these itself (the key's prefix, the lab certificate)
    assert "CONFIG_LOCALVERSION" not in frag and "CONFIG_SYSTEM_TRUSTED_KEYS" not in frag


def test_cache_keys_change_with_every_input_and_not_with_order():
    base = {"suite": "trixie", "version": "6.12", "package_version": "6.12.117-1", "fragment_sha256": "a",
            "cert_sha256": "b"}
    key = forge.forge_key(base)
    assert forge.forge_key(dict(reversed(list(base.items())))) == key
    for field in base:
        assert forge.forge_key({**base, field: base[field] + "x"}) != key, field
    c1 = forge.chroot_inputs("trixie", forge.DEFAULT_MIRROR, ("a", "b"))
    assert forge.forge_key(c1) == forge.forge_key(forge.chroot_inputs("trixie", forge.DEFAULT_MIRROR, ("b", "a", "a")))
    assert forge.forge_key(c1) != forge.forge_key(forge.chroot_inputs("bookworm", forge.DEFAULT_MIRROR, ("a", "b")))


def test_localversion_names_the_input_set():
    assert forge.localversion("0123456789abcdef") == "-kforge-01234567"


def test_mmdebstrap_argv_is_lean_and_forces_kpatch_build_in_a_hook():
    argv = forge.mmdebstrap_argv("trixie", Path("/c/root"), "http://m/debian", ("build-essential", "bc"))
    assert argv[:3] == ["mmdebstrap", "--variant=apt", "--components=main"]
    assert "--include=build-essential,bc" in argv
    hook = [a for a in argv if a.startswith("--customize-hook=")]
    assert len(hook) == 1 and "apt-get download kpatch-build" in hook[0] and "dpkg --force-depends -i" in hook[0]
    assert argv[-3:] == ["trixie", "/c/root", "http://m/debian"]


def test_a_forced_package_name_cannot_carry_shell_text():
    with pytest.raises(ConfigError):
        forge.mmdebstrap_argv("trixie", Path("/r"), "http://m", ("bc",), forced=("x; rm -rf /",))


def test_make_argv_builds_x86_64_with_jobs():
    assert forge.make_argv(["vmlinux", "bzImage"], 2, src=Path("/k/src")) == \
        ["make", "-C", "/k/src", "ARCH=x86_64", "-j2", "vmlinux", "bzImage"]
    assert forge.make_argv(["modules_install"], 0, src=Path("/s"), extra=("INSTALL_MOD_PATH=/m",))[3:] == \
        ["ARCH=x86_64", "-j1", "INSTALL_MOD_PATH=/m", "modules_install"]


def test_forge_cache_honours_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KPIPE_FORGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert forge.default_cache_dir() == tmp_path / "xdg" / "kpipe" / "forge"
    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "f"))
    assert forge.default_cache_dir() == tmp_path / "f"


def test_an_unfinished_forge_folder_is_not_a_kernel(tmp_path):
    (tmp_path / "kernels" / "6.12-x").mkdir(parents=True)
    (tmp_path / "kernels" / "6.12-x" / "forge.json").write_text('{"release": "6.12.1-kforge-1", "complete": false}')
    (tmp_path / "kernels" / "6.12-y").mkdir()
    assert forge.forged_kernels(tmp_path) == []
    assert forge.find_forged_kernel("6.12.1-kforge-1", tmp_path) is None


def test_forged_kernels_become_catalog_entries_with_their_paths(tmp_path):
    folder = tmp_path / "kernels" / "6.12-k"
    folder.mkdir(parents=True)
    (folder / "vmlinux").write_bytes(b"\x7fELF")
    (folder / "forge.json").write_text('{"release": "6.12.9-kforge-ab", "source": "debian:trixie/6.12", '
                                       '"package_version": "6.12.9-1", "key": "ab", "complete": true}')
    [entry] = forge.forged_kernel_entries(tmp_path)
    assert entry.release == "6.12.9-kforge-ab" and entry.arch == "x86_64" and entry.builder == "kpatch-build"
    assert (entry.source, entry.vmlinux, entry.config) == (str(folder / "src"), str(folder / "vmlinux"),
                                                           str(folder / "config"))
    assert entry.symbols == (str(folder / "vmlinux"),)
    image = forge.find_forged_kernel("6.12.9-kforge-ab", tmp_path)
    assert image.vmlinuz == folder / "bzImage"
    assert image.modules_dir == folder / "modroot" / "lib" / "modules" / "6.12.9-kforge-ab"


def test_a_cert_file_must_be_a_certificate_without_a_key(tmp_path):
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "x.pem").write_text("hello")
    for name in ("k.pem", "x.pem", "missing.pem"):
        with pytest.raises(ConfigError):
            forge._cert_pem(tmp_path / name)


@pytest.mark.parametrize("args, parsed", [
    (["/r", "--", "make", "-j2"], ("/r", [], ["make", "-j2"])),
    (["/r", "--bind", "/a", "--bind", "/b c", "--", "sshd", "-D"], ("/r", ["/a", "/b c"], ["sshd", "-D"])),
])
def test_chroot_helper_args(args, parsed):
    root, binds, argv = chroot.parse_args(args)
    assert (str(root), [str(b) for b in binds], argv) == parsed


@pytest.mark.parametrize("args", [[], ["/r"], ["--", "x"], ["/r", "--", ], ["/r", "--oops", "--", "x"]])
def test_chroot_helper_refuses_bad_args(args):
    with pytest.raises(ValueError):
        chroot.parse_args(args)


def test_chroot_enter_argv_uses_a_private_mount_namespace():
    argv = chroot.enter_argv(Path("/r"), ["sshd", "-D"], (Path("/s"),), nice=10)
    assert argv[:7] == ["nice", "-n", "10", "unshare", "--mount", "--propagation", "private"]
    assert argv[argv.index("kpipe.lab.chroot") + 1:] == ["/r", "--bind", "/s", "--", "sshd", "-D"]


def test_sshd_config_is_loopback_key_only(tmp_path):
    text = buildhost.sshd_config(tmp_path, 2222)
    lines = set(text.splitlines())
    for want in ("Port 2222", "ListenAddress 127.0.0.1", "PasswordAuthentication no",
                 "PermitRootLogin prohibit-password", f"AuthorizedKeysFile {tmp_path}/authorized_keys",
                 f"HostKey {tmp_path}/ssh_host_ed25519_key"):
        assert want in lines
    with pytest.raises(ConfigError):
        buildhost.sshd_config(Path("/a b"), 22)
    with pytest.raises(ConfigError):
        buildhost.sshd_config(tmp_path, 0)


def test_known_hosts_and_build_host_entry(tmp_path):
    assert (buildhost.known_hosts_line(2200, "ssh-ed25519 AAAAC3 comment here")
            == "[127.0.0.1]:2200 ssh-ed25519 AAAAC3\n")
    text = buildhost.build_host_toml("forge-trixie", 2200, tmp_path / 'id "x"')
    [h] = tomllib.loads(text)["build_hosts"]
    assert h == {"name": "forge-trixie", "address": "127.0.0.1", "port": 2200, "user": "root", "arch": "x86_64",
                 "kernels": ["*-kforge-*"], "identity_file": str(tmp_path / 'id "x"')}


@pytest.mark.parametrize("text, release", [
    ("6.12.117-kforge-0123abcd\n", "6.12.117-kforge-0123abcd"),
    ("6.12.117\n", "6.12.117"),
    ("", None),
    ("6.12 with spaces\n", None),
    (None, None),  # no file: the tree was never built
])
def test_the_release_is_read_from_the_built_tree(tmp_path, text, release):
    if text is not None:
        (tmp_path / "include" / "config").mkdir(parents=True)
        (tmp_path / "include" / "config" / "kernel.release").write_text(text)
    assert forge.release_of(tmp_path) == release


def _fake_forged(cache: Path, release: str) -> Path:
    folder = cache / "kernels" / "6.12-fake"
    (folder / "modroot" / "lib" / "modules" / release).mkdir(parents=True)
    (folder / "bzImage").write_bytes(b"not really a kernel")
    (folder / "forge.json").write_text(f'{{"release": "{release}", "source": "debian:trixie/6.12", '
                                       '"package_version": "6.12.9-1", "key": "fe", "complete": true}')
    return folder


def test_the_workspace_catalog_and_the_lab_lookup_find_forged_kernels(monkeypatch, tmp_path):
    from kpipe.lab.kernel import fetch_debian_kernel
    from kpipe.workspace import load_workspace

    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge"))
    folder = _fake_forged(tmp_path / "forge", "6.12.9-kforge-fe")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "kpipe.toml").write_text("[workspace]\n")
    entry = load_workspace(tmp_path / "ws").kernels["6.12.9-kforge-fe"]
    assert entry.source == str(folder / "src") and entry.builder == "kpatch-build"
    # no apt-get download: the forged kernel answers the release
    image = fetch_debian_kernel("6.12.9-kforge-fe", tmp_path / "labcache")
    assert (image.vmlinuz, image.source) == (folder / "bzImage", "forge")
    assert not (tmp_path / "labcache").exists()


def test_a_declared_kernel_wins_over_a_forged_one_of_the_same_release(monkeypatch, tmp_path):
    from kpipe.workspace import load_workspace

    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge"))
    _fake_forged(tmp_path / "forge", "6.12.9-kforge-fe")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "kpipe.toml").write_text('[[kernels]]\nrelease = "6.12.9-kforge-fe"\nsource = "/srv/k"\n')
    assert load_workspace(tmp_path / "ws").kernels["6.12.9-kforge-fe"].source == "/srv/k"


def test_forge_steps_stream_into_the_log_and_fail_with_its_tail(tmp_path):
    from kpipe.errors import KpipeError

    log = tmp_path / "forge.log"
    assert forge._run(["sh", "-c", "echo one; echo two >&2"], log=log) == "one\ntwo\n"
    with pytest.raises(KpipeError) as e:
        forge._run(["sh", "-c", "echo compiling; echo 'error: boom' >&2; exit 2"], log=log, what="forge build")
    assert e.value.message == "forge build failed (exit 2): compiling | error: boom"
    assert str(log) in (e.value.hint or "")
    text = log.read_text()
    assert "one\ntwo\n[exit 0]" in text and "error: boom\n[exit 2]" in text


@pytest.mark.parametrize("record", ['{"complete": true}', '[1, 2]', '{"complete": true, "release": "6.12.1-x", '
                                    '"source": "s", "package_version": "p", "key": "k", "created_at": "soon"}',
                                    "not json"])
def test_a_damaged_forge_record_is_ignored_not_fatal(tmp_path, record):
    (tmp_path / "kernels" / "6.12-d").mkdir(parents=True)
    (tmp_path / "kernels" / "6.12-d" / "forge.json").write_text(record)
    assert forge.forged_kernels(tmp_path) == [] and forge.forged_kernel_entries(tmp_path) == []
