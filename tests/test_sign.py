"""Signing and signature verification against the kernel's own sign-file and OpenSSL."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import kenv
from kpipe.checks import KernelFacts, run_checks
from kpipe.elf.reader import parse_module
from kpipe.elf.sign import build_pkcs7, expand_argv, load_private_key, run_command_signer, sign_bytes, sign_file
from kpipe.elf.signature import (
    MAGIC,
    SIG_INFO,
    append_signature,
    digest_bytes,
    load_certificates,
    parse_pkcs7,
    split_signature,
    strip_signature,
    verify_module,
)
from kpipe.errors import ConfigError
from kpipe.workspace import SignerConfig, load_workspace
from test_elf_support import (
    KERNEL,
    RELEASE,
    SIGN_FILE,
    VERMAGIC,
    make_signing_cert,
    sample_bytes,
    sample_module,
    scratch,
    stripped_module,
)


def _sign_file(hash_name: str, key: Path, cert: Path, module: Path, keyid: bool = False) -> bytes:
    out = scratch("sf.ko")
    argv = [str(SIGN_FILE), *(["-k"] if keyid else []), hash_name, str(key), str(cert), str(module), str(out)]
    subprocess.run(argv, check=True, capture_output=True)
    return out.read_bytes()


def _facts(**kw) -> KernelFacts:
    return KernelFacts(release=RELEASE, arch="x86_64", vermagic=VERMAGIC, sig_hash="sha256", **kw)


def _sig_findings(data: bytes, certs) -> dict[str, str]:
    info = parse_module(data, "m.ko")
    fs = run_checks(info, _facts(), None, certs, payload=memoryview(data)[:info.payload_size])
    return {f.id: f.severity for f in fs if f.id.startswith("sig.")}


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("keyid", [False, True])
def test_rsa_signature_is_byte_identical_to_sign_file(hash_name, keyid):
    key, cert = make_signing_cert("rsa")
    ours = sign_bytes(sample_bytes(), key, cert, hash_name, keyid=keyid)
    theirs = _sign_file(hash_name, key, cert, sample_module(), keyid)
    assert ours == theirs
    certs = load_certificates(cert)
    assert verify_module(ours, certs).status == "valid"
    p7 = parse_pkcs7(split_signature(ours)[0].der)
    assert p7.sid_kind == ("skid" if keyid else "issuer_serial") and p7.version == (3 if keyid else 1)
    assert p7.digest == hash_name and not p7.has_signed_attrs and not p7.has_content


@pytest.mark.parametrize("kind,hash_name", [("p384", "sha384"), ("p256", "sha256"), ("p384", "sha512")])
@pytest.mark.parametrize("keyid", [False, True])
def test_ecdsa_signatures_of_both_tools_verify(kind, hash_name, keyid):
    from asn1crypto import cms

    key, cert = make_signing_cert(kind)
    certs = load_certificates(cert)
    ours = sign_bytes(sample_bytes(), key, cert, hash_name, keyid=keyid)
    theirs = _sign_file(hash_name, key, cert, sample_module(), keyid)
    assert verify_module(ours, certs).status == "valid"
    assert verify_module(theirs, certs).status == "valid"

    # ECDSA is randomised: identical except for the signature value itself
    def shape(data: bytes) -> bytes:
        ci = cms.ContentInfo.load(split_signature(data)[0].der)
        si = ci["content"]["signer_infos"][0]
        si["signature"] = b""
        return ci.dump(force=True)

    assert shape(ours) == shape(theirs)
    assert ours[:len(sample_bytes())] == theirs[:len(sample_bytes())]


@pytest.mark.parametrize("kind,keyid", [("rsa", False), ("rsa", True), ("p384", False)])
def test_openssl_cms_verifies_our_detached_signature(kind, keyid, tmp_path):
    key, cert = make_signing_cert(kind)
    signed = sign_bytes(sample_bytes(), key, cert, "sha256", keyid=keyid)
    trailer, problem, payload_len = split_signature(signed)
    (tmp_path / "payload").write_bytes(signed[:payload_len])
    (tmp_path / "sig.p7").write_bytes(trailer.der)
    argv = ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "sig.p7"),
            "-content", str(tmp_path / "payload"), "-certfile", str(cert), "-nointern", "-noverify",
            "-out", "/dev/null"]
    ok = subprocess.run(argv, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Verification successful" in ok.stderr
    # and OpenSSL rejects it once one payload bit flips
    bad = bytearray(signed[:payload_len])
    bad[len(bad) // 2] ^= 0x01
    (tmp_path / "payload").write_bytes(bytes(bad))
    assert subprocess.run(argv, capture_output=True).returncode != 0


@pytest.mark.slow
@pytest.mark.parametrize("kind,keyid", [("rsa", False), ("rsa", True), ("p384", False)])
def test_one_bit_flips_anywhere_are_rejected(kind, keyid):
    key, cert = make_signing_cert(kind)
    certs = load_certificates(cert)
    signed = sign_bytes(stripped_module(), key, cert, "sha256" if kind == "rsa" else "sha384", keyid=keyid)
    assert verify_module(signed, certs).status == "valid"
    payload_len = split_signature(signed)[2]
    flips = [(pos, bit) for pos in range(payload_len, len(signed)) for bit in range(8)]  # the whole trailer
    flips += [(pos, bit) for pos in range(0, payload_len, max(1, payload_len // 400)) for bit in (0, 3, 7)]
    flips += [(pos, 0) for pos in range(0, 64)]  # the whole ELF header
    accepted = []
    for pos, bit in flips:
        data = bytearray(signed)
        data[pos] ^= 1 << bit
        if verify_module(bytes(data), certs).status == "valid":
            accepted.append((pos, bit))
    assert accepted == []


def test_flip_in_real_module_payload_fails_the_sig_check():
    key, cert = make_signing_cert("rsa")
    signed = bytearray(sign_bytes(sample_bytes(), key, cert, "sha256"))
    signed[1000] ^= 0x40
    assert _sig_findings(bytes(signed), load_certificates(cert))["sig.verify"] == "error"


def test_signature_checks():
    key, cert = make_signing_cert("rsa")
    certs = load_certificates(cert)
    good = sign_bytes(stripped_module(), key, cert, "sha256")
    got = _sig_findings(good, certs)
    assert got == {"sig.present": "info", "sig.hash": "info", "sig.verify": "info"}
    # without certificates: verification skipped, with how to provide one
    assert _sig_findings(good, [])["sig.verify"] == "skipped"
    # unsigned: a warning, or an error once certificates are required
    assert _sig_findings(stripped_module(), [])["sig.present"] == "warning"
    assert _sig_findings(stripped_module(), certs)["sig.present"] == "error"
    # another key
    _k2, cert2 = make_signing_cert("p384")
    assert _sig_findings(good, load_certificates(cert2))["sig.signer"] == "error"
    # a digest other than CONFIG_MODULE_SIG_HASH
    assert _sig_findings(sign_bytes(stripped_module(), key, cert, "sha512"), certs)["sig.hash"] == "warning"


def _pkcs7_with(options_names: list[str]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    key, cert = make_signing_cert("rsa")
    k = load_private_key(key)
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    opts = [getattr(pkcs7.PKCS7Options, n) for n in options_names]
    payload = stripped_module()
    der = (pkcs7.PKCS7SignatureBuilder().set_data(payload).add_signer(c, k, hashes.SHA256())
           .sign(serialization.Encoding.DER, opts))
    return append_signature(payload, der)


def test_signed_attributes_are_refused():
    data = _pkcs7_with(["DetachedSignature", "Binary", "NoCerts"])
    _k, cert = make_signing_cert("rsa")
    got = _sig_findings(data, load_certificates(cert))
    assert got["sig.authattrs"] == "error"


def test_embedded_content_is_refused():
    data = _pkcs7_with(["Binary", "NoAttributes", "NoCerts"])
    _k, cert = make_signing_cert("rsa")
    got = _sig_findings(data, load_certificates(cert))
    assert got["sig.content"] == "error"


@pytest.mark.parametrize("mutate,expect", [
    (lambda info: info[:2] + bytes([1]) + info[3:], "id_type"),  # not PKCS#7
    (lambda info: bytes([1]) + info[1:], "non-zero"),  # algo set
    (lambda info: info[:8] + struct.pack(">I", 0xFFFFFF00), "sig_len"),  # longer than the file
])
def test_malformed_trailers(mutate, expect):
    key, cert = make_signing_cert("rsa")
    signed = sign_bytes(stripped_module(), key, cert, "sha256")
    end = len(signed) - len(MAGIC)
    info = signed[end - SIG_INFO.size:end]
    data = signed[:end - SIG_INFO.size] + mutate(info) + MAGIC
    trailer, problem, _ = split_signature(data)
    assert trailer is None and expect in problem
    m = parse_module(data, "m.ko")
    assert expect in m.signature_problem
    assert _sig_findings(data, load_certificates(cert)) == {"sig.format": "error"}


def test_garbage_pkcs7_is_malformed():
    data = append_signature(stripped_module(), b"\x30\x03\x02\x01\x01" + b"junk")
    assert _sig_findings(data, []) == {"sig.format": "error"}
    assert verify_module(data, []).status == "malformed"


def test_strip_and_resign_replaces_the_signature():
    key, cert = make_signing_cert("rsa")
    once = sign_bytes(stripped_module(), key, cert, "sha256")
    twice = sign_bytes(once, key, cert, "sha256")
    assert once == twice and strip_signature(once) == stripped_module()


def test_key_and_certificate_must_match():
    key, _ = make_signing_cert("rsa")
    _, other = make_signing_cert("p384")
    with pytest.raises(ConfigError):
        sign_bytes(stripped_module(), key, other, "sha256")


def test_certificates_as_pem_or_der(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    _k, cert = make_signing_cert("rsa")
    der = tmp_path / "c.der"
    der.write_bytes(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER))
    assert load_certificates(der)[0].serial == load_certificates(cert)[0].serial
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    with pytest.raises(ConfigError):
        load_certificates(bad)


# -- SM2 with SM3 -----------------------------------------------------------------------------------------------

def _sm2_cert(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "sm2.key", tmp_path / "sm2.crt"
    r = subprocess.run(["openssl", "genpkey", "-algorithm", "SM2", "-out", str(key)], capture_output=True)
    if r.returncode != 0:
        kenv.require_or_skip(f"this OpenSSL has no SM2: {r.stderr.decode(errors='replace').strip()}")
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-sm3", "-sigopt", "distid:1234567812345678",
                    "-days", "30", "-subj", "/CN=kpipe sm2 test", "-out", str(cert)], check=True, capture_output=True)
    return key, cert


def _sm2_signed_module(tmp_path: Path, key: Path, cert: Path, user_id: str | None) -> bytes:
    """A module signed by OpenSSL's SM2 (an independent implementation), wrapped as the kernel's PKCS#7."""
    from asn1crypto import algos, cms
    from asn1crypto import x509 as ax509

    payload = stripped_module()
    (tmp_path / "payload").write_bytes(payload)
    sig = tmp_path / "sig.der"
    if user_id is None:  # sign e = SM3(M) directly: no Z_A
        (tmp_path / "e").write_bytes(digest_bytes("sm3", payload))
        subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-in", str(tmp_path / "e"),
                        "-out", str(sig)], check=True, capture_output=True)
    else:
        subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-digest", "sm3",
                        "-pkeyopt", f"distid:{user_id}", "-in", str(tmp_path / "payload"), "-out", str(sig)],
                       check=True, capture_output=True)
    c = ax509.Certificate.load(load_certificates(cert)[0].der)
    dig = algos.DigestAlgorithm({"algorithm": "1.2.156.10197.1.401"})
    si = cms.SignerInfo({"version": "v1", "sid": cms.SignerIdentifier({"issuer_and_serial_number": {
        "issuer": c.issuer, "serial_number": c.serial_number}}), "digest_algorithm": dig,
        "signature_algorithm": {"algorithm": "1.2.156.10197.1.501"}, "signature": sig.read_bytes()})
    sd = cms.SignedData({"version": "v1", "digest_algorithms": [dig], "encap_content_info": {"content_type": "data"},
                         "signer_infos": [si]})
    return append_signature(payload, cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump())


def test_sm2_with_sm3_verifies_with_an_explicit_user_id_convention(tmp_path):
    key, cert = _sm2_cert(tmp_path)
    certs = load_certificates(cert)
    assert certs[0].key_type == "sm2"
    no_za = _sm2_signed_module(tmp_path, key, cert, None)
    assert verify_module(no_za, certs, sm2_user_id=None).status == "valid"
    assert verify_module(no_za, certs, sm2_user_id="1234567812345678").status == "invalid"
    with_id = _sm2_signed_module(tmp_path, key, cert, "1234567812345678")
    assert verify_module(with_id, certs, sm2_user_id="1234567812345678").status == "valid"
    assert verify_module(with_id, certs, sm2_user_id=None).status == "invalid"
    flipped = bytearray(no_za)
    flipped[100] ^= 1
    assert verify_module(bytes(flipped), certs, sm2_user_id=None).status == "invalid"
    assert parse_pkcs7(split_signature(no_za)[0].der).digest == "sm3"


# -- external signers, workspace signers, artifacts -----------------------------------------------------------------

def test_expand_argv_substitutes_per_element_only():
    argv = expand_argv(["tool", "--in={module}", "{output}", "{key}", "x{hash}y", "{other}"],
                       {"module": "/a b/$(rm -rf x).ko", "output": "/o", "key": "/k", "hash": "sha256"})
    assert argv == ["tool", "--in=/a b/$(rm -rf x).ko", "/o", "/k", "xsha256y", "{other}"]


@pytest.mark.parametrize("in_place", [False, True])
def test_command_signer_runs_sign_file_without_a_shell(tmp_path, in_place):
    key, cert = make_signing_cert("rsa")
    # a module path with shell metacharacters must reach the tool as one plain argument
    weird = tmp_path / "we ird;$(touch PWNED)"
    weird.mkdir()
    module = weird / "m.ko"
    shutil.copyfile(sample_module(), module)
    argv = ((str(SIGN_FILE), "{hash}", "{key}", "{cert}", "{module}") if in_place
            else (str(SIGN_FILE), "{hash}", "{key}", "{cert}", "{module}", "{output}"))
    signer = SignerConfig(name="sf", type="command", key=str(key), cert=str(cert), hash="sha256", argv=argv)
    out = run_command_signer(signer, module, tmp_path / "out.ko", root=tmp_path)
    assert out.read_bytes() == sign_bytes(sample_bytes(), key, cert, "sha256")
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    assert module.read_bytes() == sample_bytes()  # the input is never modified


def test_command_signer_failures_are_clean(tmp_path):
    from kpipe.elf.sign import SigningError

    module = tmp_path / "m.ko"
    module.write_bytes(stripped_module())
    with pytest.raises(SigningError, match="not found"):
        run_command_signer(SignerConfig(name="x", type="command", argv=("/nonexistent/tool", "{module}")), module,
                           tmp_path / "o.ko")
    with pytest.raises(SigningError, match="exited 3"):
        run_command_signer(SignerConfig(name="x", type="command", argv=("sh", "-c", "exit 3")), module,
                           tmp_path / "o.ko")
    with pytest.raises(SigningError, match="without a valid signature"):
        run_command_signer(SignerConfig(name="x", type="command", argv=("cp", "{module}", "{output}")), module,
                           tmp_path / "o.ko")


def _workspace(tmp_path: Path) -> Path:
    key, cert = make_signing_cert("rsa")
    (tmp_path / "kpipe.toml").write_text(f"""
[workspace]
store = ".kpipe"

[signing]
default = "team"

[signing.signers.team]
type = "builtin"
key = "{key}"
cert = "{cert}"
hash = "sha256"

[signing.signers.sf]
type = "command"
key = "{key}"
cert = "{cert}"
argv = ["{SIGN_FILE}", "{{hash}}", "{{key}}", "{{cert}}", "{{module}}", "{{output}}"]
""")
    return tmp_path


def test_validate_and_sign_artifacts(tmp_path):
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.validation import sign_artifact, validate_and_record

    ws = load_workspace(_workspace(tmp_path))
    art = add_artifact(ws.store, sample_module(), kernel=RELEASE, filename="livepatch-sample.ko")
    report = validate_and_record(ws, art)
    assert report.ok
    art = get_artifact(ws.store, art.id)
    assert art.status == "valid" and art.validation["ok"] is True
    signed = sign_artifact(ws, art, None)
    assert signed.id != art.id and signed.parent_id == art.id and signed.signed
    assert signed.status == "valid" and signed.meta["signer"] == "team"
    sig = {f["id"]: f["severity"] for f in signed.validation["findings"] if f["id"].startswith("sig.")}
    assert sig["sig.verify"] == "info"  # verified against the signer's certificate
    via_cmd = sign_artifact(ws, art, "sf")
    assert via_cmd.sha256 == signed.sha256  # sign-file and the builtin signer agree byte for byte

    # a module for another kernel is recorded as rejected and cannot be signed
    other = add_artifact(ws.store, Path(_copy_with_suffix(sample_module(), b"x")), kernel=KERNEL.uninstalled_release())
    assert not validate_and_record(ws, other).ok
    assert get_artifact(ws.store, other.id).status == "rejected"
    from kpipe.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        sign_artifact(ws, get_artifact(ws.store, other.id), None)


def _copy_with_suffix(src: Path, extra: bytes) -> str:
    p = scratch("copy.ko")
    p.write_bytes(src.read_bytes() + extra)
    return str(p)


def test_garbage_artifact_is_rejected_then_reported(tmp_path):
    from kpipe.artifacts import add_artifact, get_artifact
    from kpipe.elf.reader import ModuleFormatError
    from kpipe.validation import validate_and_record

    ws = load_workspace(_workspace(tmp_path))
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"garbage" * 100)
    art = add_artifact(ws.store, junk, kernel=RELEASE)
    with pytest.raises(ModuleFormatError):
        validate_and_record(ws, art)
    assert get_artifact(ws.store, art.id).status == "rejected"


@pytest.mark.slow
def test_cli_sign_file_and_artifact(tmp_path):
    from kpipe.artifacts import add_artifact

    root = _workspace(tmp_path)
    key, cert = make_signing_cert("rsa")
    module = tmp_path / "m.ko"
    module.write_bytes(sample_bytes())
    r = subprocess.run(["kpipe", "sign", str(module), "--key", str(key), "--cert", str(cert), "-o",
                        str(tmp_path / "s.ko")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.ko").read_bytes() == sign_bytes(sample_bytes(), key, cert, "sha256")
    assert "PRIVATE KEY" not in r.stdout + r.stderr and key.read_text()[40:80] not in r.stdout + r.stderr
    ws = load_workspace(root)
    art = add_artifact(ws.store, sample_module(), kernel=RELEASE)
    r = subprocess.run(["kpipe", "sign", art.id, "--json"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["parent_id"] == art.id and doc["signed"] is True and doc["status"] == "valid"
    v = subprocess.run(["kpipe", "validate", doc["id"], "--cert", str(cert)], capture_output=True, text=True,
                       cwd=root)
    assert v.returncode == 0, v.stdout + v.stderr
    # a signature by another key is refused when the expected certificate is given
    _k2, cert2 = make_signing_cert("p384")
    v = subprocess.run(["kpipe", "validate", doc["id"], "--cert", str(cert2)], capture_output=True, text=True,
                       cwd=root)
    assert v.returncode == 3 and "sig.signer" in v.stdout


def test_build_pkcs7_rejects_unknown_hash():
    key, cert = make_signing_cert("rsa")
    with pytest.raises(ConfigError):
        build_pkcs7(b"x", load_private_key(key), load_certificates(cert)[0].der, "md5")


def test_sign_file_writes_compressed_input_uncompressed(tmp_path):
    import lzma

    key, cert = make_signing_cert("rsa")
    src = tmp_path / "m.ko.xz"
    src.write_bytes(lzma.compress(stripped_module()))
    out = sign_file(src, tmp_path / "m.ko", key, cert)
    assert verify_module(out.read_bytes(), load_certificates(cert)).status == "valid"
    # in place: still xz, and the signature covers the decompressed module
    sign_file(src, src, key, cert)
    again = lzma.decompress(src.read_bytes())
    assert verify_module(again, load_certificates(cert)).status == "valid"
    assert parse_module(again, "m").signature is not None
