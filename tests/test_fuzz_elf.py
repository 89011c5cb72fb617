"""Fuzzing: thousands of mutated modules and trailers; the only outcomes are a result or a clean kpipe error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpipe.checks import KernelFacts, run_checks
from kpipe.elf.reader import ModuleFormatError, parse_module
from kpipe.elf.signature import Pkcs7Error, parse_pkcs7, split_signature, verify_module
from kpipe.elf.symbols import MemoryIndex, parse_nm_style, parse_symvers
from test_elf_support import RELEASE, VERMAGIC, kallsyms_text, make_signing_cert, stripped_module, synthetic_livepatch

FUZZ = settings(max_examples=2000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FACTS = KernelFacts(release=RELEASE, arch="x86_64", vermagic=VERMAGIC, modversions=True, sig_hash="sha256",
                    this_module_size=896)
INDEX = MemoryIndex([parse_nm_style(kallsyms_text({"foo_helper": 1, "cmdline_proc_show": 1}), "kallsyms", "k")])


def _hot_offsets(data: bytes) -> list[int]:
    """Offsets where a mutation matters most: ELF header, section header table, symtab, relocations."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    spots = list(range(0, 64)) + list(range(shoff, len(data)))
    info = parse_module(data, "seed")
    for s in info.sections:
        if s.name in (".symtab", ".modinfo", "__versions", ".gnu.linkonce.this_module") or s.type == 4:
            spots += list(range(s.offset, min(s.offset + s.size, s.offset + 512)))
    return sorted(set(spots))


SEEDS: dict[str, tuple[bytes, list[int]]] = {}


def _seed(name: str) -> tuple[bytes, list[int]]:
    if name not in SEEDS:
        data = stripped_module() if name == "real" else synthetic_livepatch(
            kpatch_funcs=(("cmdline_proc_show", "vmlinux", 0),))
        SEEDS[name] = (data, _hot_offsets(data))
    return SEEDS[name]


def _outcome(data: bytes) -> None:
    try:
        info = parse_module(data, "fuzzed.ko")
    except ModuleFormatError as e:
        assert "fuzzed.ko" in e.message and "\n" not in e.message
        return
    # whatever parsed must also survive every check
    findings = run_checks(info, FACTS, INDEX, payload=memoryview(data)[:info.payload_size])
    assert all(f.severity in ("error", "warning", "info", "skipped") for f in findings)


mutation = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255))


@pytest.mark.slow
@FUZZ
@given(seed=st.sampled_from(["real", "synthetic"]), hot=st.lists(mutation, min_size=1, max_size=8),
       anywhere=st.lists(mutation, max_size=4), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_modules_parse_or_fail_cleanly(seed, hot, anywhere, cut):
    data, spots = _seed(seed)
    buf = bytearray(data)
    for frac, value in hot:
        buf[spots[int(frac * len(spots))]] = value
    for frac, value in anywhere:
        buf[int(frac * len(buf))] = value
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    _outcome(bytes(buf))


@pytest.mark.slow
@FUZZ
@given(fields=st.lists(st.tuples(st.sampled_from(["e_shoff", "e_shnum", "e_shstrndx", "e_shentsize", "sh_offset",
                                                  "sh_size", "sh_link", "sh_info", "sh_type", "sh_entsize"]),
                                 st.integers(0, 40), st.integers(0, (1 << 64) - 1)), min_size=1, max_size=4))
def test_absurd_header_values(fields):
    data, _ = _seed("real")
    buf = bytearray(data)
    shoff = struct.unpack_from("<Q", buf, 0x28)[0]
    shnum = struct.unpack_from("<H", buf, 0x3C)[0]
    where = {"sh_offset": (0x18, "Q"), "sh_size": (0x20, "Q"), "sh_link": (0x28, "I"), "sh_info": (0x2C, "I"),
             "sh_type": (0x4, "I"), "sh_entsize": (0x38, "Q")}
    for name, idx, value in fields:
        if name == "e_shoff":
            struct.pack_into("<Q", buf, 0x28, value)
        elif name in ("e_shnum", "e_shstrndx", "e_shentsize"):
            struct.pack_into("<H", buf, {"e_shnum": 0x3C, "e_shstrndx": 0x3E, "e_shentsize": 0x3A}[name],
                             value & 0xFFFF)
        else:
            off, fmt = where[name]
            sec = idx % shnum
            pos = shoff + sec * 64 + off
            if pos + struct.calcsize(fmt) <= len(buf):
                struct.pack_into("<" + fmt, buf, pos, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    _outcome(bytes(buf))


@pytest.mark.slow
@FUZZ
@given(blob=st.binary(max_size=600))
def test_random_bytes(blob):
    _outcome(blob)
    _outcome(b"\x7fELF\x02\x01\x01\x00" + blob)


_SIGNED: dict[str, bytes] = {}


def _signed() -> bytes:
    if "x" not in _SIGNED:
        from kpipe.elf.sign import sign_bytes

        key, cert = make_signing_cert("rsa")
        _SIGNED["x"] = sign_bytes(stripped_module(), key, cert, "sha256")
    return _SIGNED["x"]


@pytest.mark.slow
@FUZZ
@given(muts=st.lists(st.tuples(st.integers(1, 520), st.integers(0, 255)), min_size=1, max_size=6),
       sig_len=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)), cut=st.integers(0, 3))
def test_mutated_trailers(muts, sig_len, cut):
    from kpipe.elf.signature import load_certificates

    buf = bytearray(_signed())
    for back, value in muts:
        buf[len(buf) - back] = value
    if sig_len is not None:
        struct.pack_into(">I", buf, len(buf) - 28 - 4, sig_len)
    data = bytes(buf[: len(buf) - cut * 7])
    trailer, problem, payload_len = split_signature(data)  # never raises
    assert 0 <= payload_len <= len(data)
    if trailer is not None:
        try:
            parse_pkcs7(trailer.der)
        except Pkcs7Error:
            pass
    _key, cert = make_signing_cert("rsa")
    v = verify_module(data, load_certificates(cert))
    assert v.status in ("valid", "invalid", "signer_unknown", "unsupported", "unsigned", "malformed")
    if data != _signed():
        assert v.status != "valid" or data[:payload_len] == _signed()[:payload_len]
    _outcome(data)


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(max_size=300))
def test_symbol_text_parsers_fail_cleanly(text):
    from kpipe.errors import ConfigError

    for parse in (lambda: parse_symvers(text, "f"), lambda: parse_nm_style(text, "kallsyms", "f")):
        try:
            parse()
        except ConfigError:
            pass
