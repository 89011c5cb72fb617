"""kpipe keys generate: a module-signing key pair in the kernel's certificate format."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from kpipe.elf.signature import load_certificates
from kpipe.errors import ConfigError
from kpipe.keys import generate_signing_key


def _kpipe(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_the_certificate_has_what_the_kernel_keyring_requires(tmp_path, key_type):
    made = generate_signing_key(tmp_path / "k.pem", tmp_path / "c.pem", key_type=key_type, bits=2048)
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    assert cert.version == x509.Version.v3
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest.hex() == made.subject_key_id
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600
    assert load_certificates(made.cert)  # kpipe's own verifier reads it


def test_an_existing_key_is_never_overwritten_without_force(tmp_path):
    first = generate_signing_key(tmp_path / "k.pem", tmp_path / "c.pem", bits=2048)
    before = first.key.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_signing_key(tmp_path / "k.pem", tmp_path / "c.pem", bits=2048)
    assert first.key.read_bytes() == before
    again = generate_signing_key(tmp_path / "k.pem", tmp_path / "c.pem", bits=2048, force=True)
    assert again.key.read_bytes() != before


@pytest.mark.parametrize("kw, message", [
    ({"key_type": "dsa"}, "unknown key type"),
    ({"bits": 1024}, "RSA key size 1024"),
    ({"days": 0}, "at least one day"),
])
def test_bad_key_parameters_are_config_errors(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        generate_signing_key(tmp_path / "k.pem", tmp_path / "c.pem", **kw)
    assert not (tmp_path / "k.pem").exists()


def test_cli_writes_the_signer_named_in_kpipe_toml(tmp_path):
    (tmp_path / "kpipe.toml").write_text('[signing]\ndefault = "lab"\n[signing.signers.lab]\ntype = "builtin"\n'
                                         'key = "keys/lab.pem"\ncert = "keys/lab.crt"\n')
    r = _kpipe("keys", "generate", "--bits", "2048", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["key"] == str(tmp_path / "keys/lab.pem") and Path(out["cert"]).is_file()
    assert "PRIVATE KEY" not in r.stdout + r.stderr  # the key is never printed
    again = _kpipe("keys", "generate", "--signer", "lab", cwd=tmp_path)
    assert again.returncode == 4 and again.stderr.startswith("kpipe: error: ") and "--force" in again.stderr


def test_cli_key_paths_are_relative_to_the_current_folder_without_a_workspace(tmp_path):
    r = _kpipe("keys", "generate", "--key", "k.pem", "--cert", "c.pem", "--bits", "2048", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.pem").is_file() and (tmp_path / "c.pem").is_file()
