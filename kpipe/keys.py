"""Module-signing keys in the kernel's format: what certs/Makefile's x509.genkey makes.

The kernel accepts a module signature only from a certificate in its system
keyring (CONFIG_SYSTEM_TRUSTED_KEYS, or the MOK/platform keyrings); it wants
an X.509 v3 certificate with CA:FALSE, digitalSignature and a subject key
identifier (certs/default_x509.genkey, Linux 6.1). The private key is written
0600 and never leaves this machine: kpipe sends only signed modules to hosts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import ConfigError

KEY_TYPES = ("rsa", "ecdsa")


@dataclass(frozen=True)
class GeneratedKey:
    """Where a generated key pair was written and the certificate's identity."""

    key: Path
    cert: Path
    subject: str
    serial: int
    subject_key_id: str  # hex, as `sign-file -k` and /proc/keys name it

    def to_dict(self) -> dict[str, str | int]:
        return {"key": str(self.key), "cert": str(self.cert), "subject": self.subject, "serial": self.serial,
                "subject_key_id": self.subject_key_id}


def generate_signing_key(key_path: Path, cert_path: Path, *, common_name: str = "kpipe module signing key",
                         organization: str = "kpipe", key_type: str = "rsa", bits: int = 3072,
                         days: int = 3650, force: bool = False) -> GeneratedKey:
    """Write a private key (PEM, 0600) and its self-signed certificate (PEM); refuse to overwrite unless force."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r}", hint=f"one of: {', '.join(KEY_TYPES)}")
    if key_type == "rsa" and bits not in (2048, 3072, 4096):
        raise ConfigError(f"RSA key size {bits} is not one the kernel's signing tools use",
                          hint="2048, 3072 or 4096")
    if days < 1:
        raise ConfigError(f"certificate validity must be at least one day, not {days}")
    existing = [p for p in (key_path, cert_path) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists", hint="pass --force to replace the key pair")

    private = (rsa.generate_private_key(public_exponent=65537, key_size=bits) if key_type == "rsa"
               else ec.generate_private_key(ec.SECP384R1()))
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(private.public_key())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a guest clock a little behind
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(private, hashes.SHA256()))

    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _write_private(key_path, key_pem)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return GeneratedKey(key_path, cert_path, name.rfc4514_string(), cert.serial_number, ski.digest.hex())


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: a key must never be readable, even for an instant.
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.kpipe-new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
