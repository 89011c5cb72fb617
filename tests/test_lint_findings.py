"""Defects that the type checker and the linter found (tests/test_linters.py), each pinned by a test."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from kpipe.elf.sign import sign_bytes
from kpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"\x7fELF" + bytes(252)  # sign_bytes signs bytes; the key checks come first


def _pair(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed (key.pem, cert.pem) of kind ed25519 | rsa."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.x509.oid import NameOID

    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if kind == "ed25519":
        key, algorithm = ed25519.Ed25519PrivateKey.generate(), None  # Ed25519 signs without a separate hash
    else:
        key, algorithm = rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kpipe test {kind}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, algorithm))
    kp, cp = tmp_path / f"{kind}.key", tmp_path / f"{kind}.crt"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


def test_an_ed25519_signing_key_is_refused_in_one_line(tmp_path: Path) -> None:
    # mypy: Ed25519 keys have no public_numbers(); this was an AttributeError (a traceback in `kpipe sign`)
    key, cert = _pair(tmp_path, "ed25519")
    with pytest.raises(ConfigError, match="key type Ed25519PrivateKey cannot sign modules here") as e:
        sign_bytes(PAYLOAD, key, cert)
    assert e.value.hint == "use an RSA or ECDSA key"


def test_an_rsa_key_with_an_ed25519_certificate_is_a_mismatch(tmp_path: Path) -> None:
    key, _ = _pair(tmp_path, "rsa")
    _, cert = _pair(tmp_path, "ed25519")
    with pytest.raises(ConfigError, match="the signing key does not belong to the certificate"):
        sign_bytes(PAYLOAD, key, cert)


@pytest.mark.parametrize("folder", ["kpipe", "tests", "bench"])
def test_every_python_file_compiles(folder: str) -> None:
    """Run on the oldest supported Python (3.11, CI's): bench/lab.py once reused f-string quotes (3.12 syntax)."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        try:
            compile(path.read_text(), str(path), "exec", dont_inherit=True)
        except SyntaxError as e:
            bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert not bad, "\n".join(bad)
