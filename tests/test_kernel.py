"""Kernel release parsing: a table of real `uname -r` strings, plus hostile input."""

from __future__ import annotations

import dataclasses

import pytest

from kpipe.errors import ConfigError
from kpipe.kernel import KernelRelease, normalize_arch, parse_release

U = "unknown"

# release, version, distro, distro_release, abi, flavour, arch
CASES = [
    # UOS (UnionTech, Debian-based desktop/server, and the RPM server editions)
    ("4.19.0-amd64-desktop", (4, 19, 0), "uos", "", "", "desktop", "x86_64"),
    ("5.10.0-amd64-UOS", (5, 10, 0), "uos", "", "", "UOS", "x86_64"),
    ("4.19.0-arm64-desktop", (4, 19, 0), "uos", "", "", "desktop", "aarch64"),
    ("5.10.0-arm64-UOS", (5, 10, 0), "uos", "", "", "UOS", "aarch64"),
    ("5.10.0-loongarch64-UOS", (5, 10, 0), "uos", "", "", "UOS", "loongarch64"),
    ("4.19.0-loongson-3-desktop", (4, 19, 0), "uos", "", "", "desktop", "loongarch64"),
    ("6.6.7-amd64-desktop-rolling", (6, 6, 7), "uos", "", "", "desktop-rolling", "x86_64"),
    ("4.19.90-2305.1.0.0199.56.uel20.x86_64", (4, 19, 90), "uos", "uel20", "2305.1.0.0199.56", "", "x86_64"),
    # Kylin server (RPM) and desktop (Ubuntu-based, real sublevel)
    ("4.19.90-24.4.v2101.ky10.aarch64", (4, 19, 90), "kylin", "ky10.v2101", "24.4", "", "aarch64"),
    ("4.19.90-52.22.v2207.ky10.x86_64", (4, 19, 90), "kylin", "ky10.v2207", "52.22", "", "x86_64"),
    ("4.19.90-89.11.v2401.ky10.aarch64", (4, 19, 90), "kylin", "ky10.v2401", "89.11", "", "aarch64"),
    ("4.19.190-7.4.v2101.ky10.loongarch64", (4, 19, 190), "kylin", "ky10.v2101", "7.4", "", "loongarch64"),
    ("5.4.18-53-generic", (5, 4, 18), "kylin", "", "53", "generic", U),
    ("5.4.18-110-generic", (5, 4, 18), "kylin", "", "110", "generic", U),
    # openEuler
    ("5.10.0-136.12.0.86.oe2203sp1.x86_64", (5, 10, 0), "openeuler", "oe2203sp1", "136.12.0.86", "", "x86_64"),
    ("4.19.90-2003.4.0.0036.oe1.aarch64", (4, 19, 90), "openeuler", "oe1", "2003.4.0.0036", "", "aarch64"),
    ("6.6.0-28.0.0.34.oe2403.x86_64", (6, 6, 0), "openeuler", "oe2403", "28.0.0.34", "", "x86_64"),
    ("5.10.0-60.18.0.50.oe2203.aarch64", (5, 10, 0), "openeuler", "oe2203", "60.18.0.50", "", "aarch64"),
    ("5.10.0-60.18.0.rt62.52.oe2203.x86_64", (5, 10, 0), "openeuler", "oe2203", "60.18.0.rt62.52", "rt",
     "x86_64"),
    ("6.6.0-72.0.0.76.oe2403sp1.loongarch64", (6, 6, 0), "openeuler", "oe2403sp1", "72.0.0.76", "",
     "loongarch64"),
    # Anolis
    ("5.10.134-16.3.an8.x86_64", (5, 10, 134), "anolis", "an8", "16.3", "", "x86_64"),
    ("4.18.0-477.13.1.0.1.an8.aarch64", (4, 18, 0), "anolis", "an8", "477.13.1.0.1", "", "aarch64"),
    ("6.6.25-1.2.an23.x86_64", (6, 6, 25), "anolis", "an23", "1.2", "", "x86_64"),
    ("5.10.134-16.2.an8.loongarch64", (5, 10, 134), "anolis", "an8", "16.2", "", "loongarch64"),
    # Debian
    ("6.1.0-56-amd64", (6, 1, 0), "debian", "", "56", "amd64", "x86_64"),
    ("6.1.0-56-rt-amd64", (6, 1, 0), "debian", "", "56", "rt", "x86_64"),
    ("6.1.0-56-cloud-amd64", (6, 1, 0), "debian", "", "56", "cloud", "x86_64"),
    ("5.10.0-30-arm64", (5, 10, 0), "debian", "", "30", "arm64", "aarch64"),
    ("6.1.0-56-loong64", (6, 1, 0), "debian", "", "56", "loong64", "loongarch64"),
    ("4.19.0-26-amd64", (4, 19, 0), "debian", "", "26", "amd64", "x86_64"),
    ("6.1.0-56-rt-arm64", (6, 1, 0), "debian", "", "56", "rt", "aarch64"),
    ("5.10.0-0.deb10.16-amd64", (5, 10, 0), "debian", "deb10", "0.deb10.16", "amd64", "x86_64"),
    ("6.12.38+deb13-amd64", (6, 12, 38), "debian", "deb13", "", "amd64", "x86_64"),
    ("6.12.38+deb13-cloud-arm64", (6, 12, 38), "debian", "deb13", "", "cloud", "aarch64"),
    ("6.1.0-56-686-pae", (6, 1, 0), "debian", "", "56", "686-pae", "i686"),
    # Ubuntu (X.Y.0-ABI-flavour; no arch in the string except 64k flavours)
    ("5.15.0-91-generic", (5, 15, 0), "ubuntu", "", "91", "generic", U),
    ("5.15.0-91-lowlatency", (5, 15, 0), "ubuntu", "", "91", "lowlatency", U),
    ("5.15.0-1051-aws", (5, 15, 0), "ubuntu", "", "1051", "aws", U),
    ("5.15.0-1054-azure", (5, 15, 0), "ubuntu", "", "1054", "azure", U),
    ("5.15.0-1048-gcp", (5, 15, 0), "ubuntu", "", "1048", "gcp", U),
    ("5.15.0-1047-kvm", (5, 15, 0), "ubuntu", "", "1047", "kvm", U),
    ("6.8.0-45-generic-64k", (6, 8, 0), "ubuntu", "", "45", "generic-64k", "aarch64"),
    ("6.8.0-1012-raspi", (6, 8, 0), "ubuntu", "", "1012", "raspi", U),
    ("6.5.6-060506-generic", (6, 5, 6), "ubuntu", "mainline", "060506", "generic", U),
    # RHEL and RHEL-likes (Rocky, Alma, CentOS share the el tags), Oracle UEK
    ("4.18.0-513.5.1.el8_9.x86_64", (4, 18, 0), "rhel", "el8_9", "513.5.1", "", "x86_64"),
    ("5.14.0-362.8.1.el9_3.aarch64", (5, 14, 0), "rhel", "el9_3", "362.8.1", "", "aarch64"),
    ("3.10.0-1160.119.1.el7.x86_64", (3, 10, 0), "rhel", "el7", "1160.119.1", "", "x86_64"),
    ("5.14.0-427.13.1.el9_4.x86_64+rt", (5, 14, 0), "rhel", "el9_4", "427.13.1", "rt", "x86_64"),
    ("5.14.0-362.8.1.el9_3.aarch64+64k", (5, 14, 0), "rhel", "el9_3", "362.8.1", "64k", "aarch64"),
    ("4.18.0-513.5.1.rt7.307.el8_9.x86_64", (4, 18, 0), "rhel", "el8_9", "513.5.1.rt7.307", "rt", "x86_64"),
    ("5.15.0-200.131.27.el9uek.x86_64", (5, 15, 0), "oracle", "el9", "200.131.27", "uek", "x86_64"),
    ("5.4.17-2136.300.7.el8uek.aarch64", (5, 4, 17), "oracle", "el8", "2136.300.7", "uek", "aarch64"),
    # Fedora, Amazon, SUSE, Alibaba, Arch
    ("6.5.6-300.fc39.x86_64", (6, 5, 6), "fedora", "fc39", "300", "", "x86_64"),
    ("6.11.4-301.fc41.aarch64", (6, 11, 4), "fedora", "fc41", "301", "", "aarch64"),
    ("5.10.210-201.852.amzn2.x86_64", (5, 10, 210), "amazon", "amzn2", "201.852", "", "x86_64"),
    ("6.1.79-99.167.amzn2023.aarch64", (6, 1, 79), "amazon", "amzn2023", "99.167", "", "aarch64"),
    ("5.14.21-150500.55.39-default", (5, 14, 21), "suse", "", "150500.55.39", "default", U),
    ("5.10.134-16.al8.x86_64", (5, 10, 134), "alinux", "al8", "16", "", "x86_64"),
    ("6.6.1-arch1-1", (6, 6, 1), "archlinux", "", "arch1-1", "", U),
    # Unknown schemes keep what they can
    ("6.6.0", (6, 6, 0), U, "", "", "", U),
    ("6.8.0-rc1+", (6, 8, 0), U, "", "", "rc1+", U),
    ("5.10.0-kpipe-arm64", (5, 10, 0), U, "", "", "kpipe-arm64", "aarch64"),
    ("2.6.32.71", (2, 6, 32, 71), U, "", "", "", U),
]


@pytest.mark.parametrize("release,version,distro,distro_release,abi,flavour,arch", CASES,
                         ids=[c[0] for c in CASES])
def test_parses_real_release(release, version, distro, distro_release, abi, flavour, arch):
    k = parse_release(release)
    assert (k.release, k.version, k.distro, k.distro_release, k.abi, k.flavour, k.arch) == (
        release, version, distro, distro_release, abi, flavour, arch)


def test_table_is_large_enough():
    assert len({c[0] for c in CASES}) >= 40


def test_to_dict_is_plain_json_data():
    d = parse_release("4.19.90-24.4.v2101.ky10.aarch64").to_dict()
    assert d["version"] == [4, 19, 90]
    assert d["distro"] == "kylin" and d["arch"] == "aarch64" and d["upstream"] == "4.19.90"
    assert d["family"] == "rpm"


def test_release_is_frozen_and_hashable():
    k = parse_release("6.1.0-56-amd64")
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.arch = "aarch64"  # type: ignore[misc]
    assert k == parse_release("6.1.0-56-amd64") and hash(k) == hash(parse_release("6.1.0-56-amd64"))
    assert isinstance(k, KernelRelease) and k.major_minor == (6, 1)


@pytest.mark.parametrize("name,canonical", [
    ("amd64", "x86_64"), ("X86_64", "x86_64"), ("arm64", "aarch64"), ("aarch64", "aarch64"),
    ("loong64", "loongarch64"), ("loongson", "loongarch64"), ("LoongArch64", "loongarch64"),
    (" ppc64el ", "ppc64le"), ("mystery", "mystery"),
])
def test_normalize_arch(name, canonical):
    assert normalize_arch(name) == canonical


@pytest.mark.parametrize("bad,words", [
    ("", "empty"),
    ("   ", "whitespace"),
    ("hello", "version number"),
    ("linux-6.1", "version number"),
    ("6", "MAJOR.MINOR"),
    ("6.1.0-56-amd64\n", "control"),
    ("6.1.0\x1b[31m", "control"),
    ("6.1.0-56 amd64", "whitespace"),
    ("6.1.0/../../etc", "'/'"),
    ("6.1.0;rm-rf", "never has"),
    ("6.1.0-$(reboot)", "never has"),
    ("6.1.0-`id`", "never has"),
    ("6." + "1" * 70, "at most 64"),
    ("6.1.0-\u00e9", "never has"),
])
def test_refuses_bad_release(bad, words):
    with pytest.raises(ConfigError) as e:
        parse_release(bad)
    assert words in str(e.value)
    assert e.value.hint and "uname -r" in e.value.hint


def test_refuses_non_string():
    with pytest.raises(ConfigError):
        parse_release(None)  # type: ignore[arg-type]


def test_longest_legal_release_is_accepted():
    r = "5.10.0-" + "1" * (64 - len("5.10.0-"))
    assert len(r) == 64
    assert parse_release(r).version == (5, 10, 0)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_config_error(text):
    try:
        k = parse_release(text)
    except ConfigError as e:
        assert e.hint
        return
    assert k.release == text and len(k.version) >= 2 and k.arch and k.distro


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[1-6]\.[0-9]{1,2}\.[0-9]{1,3}-[0-9A-Za-z._+~-]{0,40}", fullmatch=True))
def test_release_shaped_text_always_parses(text):
    k = parse_release(text)
    assert tuple(int(x) for x in k.upstream.split(".")) == k.version and text.startswith(k.upstream)
