"""Sign modules: a built-in signer writing exactly scripts/sign-file's format, and external signers.

sign-file (Linux 6.1, CMS_NOCERTS | CMS_NOATTR | CMS_BINARY | CMS_DETACHED) makes a
CMS SignedData with no eContent, no certificates and no signed attributes; the signer
is named by issuer + serial (v1) or by subject key identifier (v3, `-k`). RSA PKCS#1
v1.5 is deterministic, so for RSA keys our bytes equal sign-file's exactly.
External signers (kpipe.toml `[signing.signers.NAME] type = "command"`) are argv
templates run without a shell. Key material never appears in messages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.elf.signature import append_signature, digest_bytes, load_certificates, split_signature, strip_signature
from kpipe.errors import ConfigError, KpipeError

if TYPE_CHECKING:  # only for annotations: cryptography is imported when a module is signed
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from kpipe.settings import SignerConfig

HASHES = ("sha224", "sha256", "sha384", "sha512")
PLACEHOLDERS = ("{module}", "{output}", "{key}", "{cert}", "{hash}")


class SigningError(KpipeError):
    """A signer ran and failed, or produced something that is not a signed module."""


def load_private_key(path: Path | str) -> PrivateKeyTypes:
    """A PEM or DER private key; KBUILD_SIGN_PIN unlocks an encrypted one (as sign-file does)."""
    from cryptography.hazmat.primitives import serialization

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read signing key: {e.strerror}") from None
    pin = os.environ.get("KBUILD_SIGN_PIN")
    password = pin.encode() if pin else None
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            return loader(raw, password=password)
        except TypeError:
            raise ConfigError(f"{p}: the signing key is encrypted", hint="set KBUILD_SIGN_PIN") from None
        except ValueError:
            continue
        except Exception:  # unsupported key types raise UnsupportedAlgorithm
            continue
    raise ConfigError(f"{p}: not a readable PEM/DER private key (or wrong KBUILD_SIGN_PIN)",
                      hint="give the module-signing key, e.g. certs/signing_key.pem")


def build_pkcs7(payload: bytes, key: Any, cert_der: bytes, hash_name: str = "sha256", *, keyid: bool = False) -> bytes:
    """The DER PKCS#7 sign-file would append for payload (RSA or ECDSA key)."""
    from asn1crypto import algos, cms, core
    from asn1crypto import x509 as ax509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    if hash_name not in HASHES:
        raise ConfigError(f"hash {hash_name!r} is not supported for signing", hint=f"use one of {', '.join(HASHES)}")
    # the key type first: an Ed25519/Ed448 key has no public numbers to compare with the certificate's
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"key type {type(key).__name__} cannot sign modules here", hint="use an RSA or ECDSA key")
    cert = ax509.Certificate.load(cert_der)
    if key.public_key().public_numbers() != _public_numbers(cert_der):
        raise ConfigError("the signing key does not belong to the certificate",
                          hint="pass the key and certificate generated together")
    algo = {"sha224": hashes.SHA224(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512()}[hash_name]
    digest = digest_bytes(hash_name, payload)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algo))
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(digest, ec.ECDSA(utils.Prehashed(algo)))
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_ecdsa"})
    if keyid:
        skid = cert.key_identifier
        if not skid:
            raise ConfigError("the certificate has no subjectKeyIdentifier; cannot sign with --keyid")
        sid = cms.SignerIdentifier({"subject_key_identifier": skid})
        version = "v3"
    else:
        sid = cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": cert.issuer, "serial_number": cert.serial_number}})
        version = "v1"
    # sign-file's OpenSSL omits the parameters of SHA-2 AlgorithmIdentifiers; asn1crypto would add
    # NULL, so the DER is written by hand and loaded (asn1crypto re-emits loaded bytes unchanged).
    oid = algos.DigestAlgorithmId(hash_name).dump()
    digest_alg = algos.DigestAlgorithm.load(b"\x30" + bytes([len(oid)]) + oid)
    signer = cms.SignerInfo({"version": version, "sid": sid, "digest_algorithm": digest_alg,
                             "signature_algorithm": sig_alg, "signature": signature})
    signed = cms.SignedData({"version": version, "digest_algorithms": [digest_alg],
                             "encap_content_info": {"content_type": "data"}, "signer_infos": [signer]})
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
    return der


def _public_numbers(cert_der: bytes) -> object:
    """The certificate key's public numbers (compared with the signing key's); None for a key type that has none."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    key = x509.load_der_x509_certificate(cert_der).public_key()
    if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, dsa.DSAPublicKey)):
        return key.public_numbers()
    return None


def sign_bytes(data: bytes, key_path: Path | str, cert_path: Path | str, hash_name: str = "sha256", *,
               keyid: bool = False) -> bytes:
    """Signed module bytes; an existing signature is replaced (signing must be the last step)."""
    payload = strip_signature(data)
    key = load_private_key(key_path)
    certs = load_certificates(cert_path)
    try:
        der = build_pkcs7(payload, key, certs[0].der, hash_name, keyid=keyid)
    except ConfigError as e:
        raise ConfigError(f"{key_path} / {cert_path}: {e.message}", hint=e.hint) from None
    return append_signature(payload, der)


def sign_file(module: Path, output: Path, key: Path | str, cert: Path | str, hash_name: str = "sha256", *,
              keyid: bool = False) -> Path:
    """Write a signed copy of module to output (atomic rename); return output."""
    from kpipe.elf.reader import load_module_bytes

    data, compression = load_module_bytes(module)
    signed = sign_bytes(data, key, cert, hash_name, keyid=keyid)
    # The signature covers the uncompressed module (modules_install signs, then compresses); an output
    # named like the compressed input is compressed again the same way.
    if compression and str(output).endswith("." + compression):
        signed = compress(signed, compression)
    _atomic_write(output, signed)
    return output


def compress(data: bytes, kind: str) -> bytes:
    """xz (CRC32 check, as the kernel's decompressor needs), gz or zst bytes of data."""
    import gzip
    import lzma

    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "gz":
        return gzip.compress(data)
    try:
        proc = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, timeout=300, check=False)
    except FileNotFoundError:
        raise SigningError("zstd is not installed: cannot write a .zst module", hint="apt-get install zstd") from None
    if proc.returncode != 0:
        raise SigningError("zstd failed to compress the signed module")
    return proc.stdout


def _umask() -> int:
    # read, not set-and-restore: os.umask() would change it for every thread for a moment
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes the file 0600: a module signed in place keeps its mode, a new one gets what open() gives
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def expand_argv(template: tuple[str, ...] | list[str], values: dict[str, str]) -> list[str]:
    """Substitute {module} {output} {key} {cert} {hash} inside each argv element (no shell, no format())."""
    out = []
    for part in template:
        for name in ("module", "output", "key", "cert", "hash"):
            part = part.replace("{" + name + "}", values.get(name, ""))
        out.append(part)
    return out


def run_command_signer(signer: SignerConfig, module: Path, output: Path, *, root: Path | None = None,
                       timeout: float = 300.0) -> Path:
    """Run an external signer (SignerConfig type=command) on module, leaving a signed module at output.

    A template without {output} is taken to sign {module} in place: it gets a private copy.
    """
    if not signer.argv:
        raise ConfigError(f"signer {signer.name!r} has type=command but no argv")
    resolve = (lambda v: str((root / v) if root and v and not os.path.isabs(os.path.expanduser(v))
                             else Path(os.path.expanduser(v)))) if root else (lambda v: os.path.expanduser(v))
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="kpipe-sign-") as tmp:
        work = Path(tmp) / module.name
        shutil.copyfile(module, work)
        in_place = not any("{output}" in part for part in signer.argv)
        target = work if in_place else Path(tmp) / ("signed-" + module.name)
        argv = expand_argv(signer.argv, {"module": str(work), "output": str(target),
                                         "key": resolve(signer.key) if signer.key else "",
                                         "cert": resolve(signer.cert) if signer.cert else "", "hash": signer.hash})
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SigningError(f"signer {signer.name!r}: program {argv[0]!r} not found",
                               hint=f"fix signing.signers.{signer.name}.argv in kpipe.toml") from None
        except subprocess.TimeoutExpired:
            raise SigningError(f"signer {signer.name!r} took more than {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()
            raise SigningError(f"signer {signer.name!r} exited {proc.returncode}: {tail[-1] if tail else ''}"[:400])
        if not target.is_file():
            raise SigningError(f"signer {signer.name!r} wrote no output file")
        data = target.read_bytes()
        trailer, problem, _ = split_signature(data)
        if trailer is None:
            raise SigningError(f"signer {signer.name!r} produced a module without a valid signature trailer"
                               + (f" ({problem})" if problem else ""))
        _atomic_write(output, data)
    return output


def sign_with_signer(signer: SignerConfig, module: Path, output: Path, *, root: Path | None = None) -> Path:
    """Sign module with a configured signer (builtin or command); return the output path."""
    if signer.type == "command":
        return run_command_signer(signer, module, output, root=root)
    if not signer.key or not signer.cert:
        raise ConfigError(f"signer {signer.name!r} needs key and cert", hint="set them in [signing.signers]")

    def res(v: str) -> Path:
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() or root is None else root / p

    return sign_file(module, output, res(signer.key), res(signer.cert), signer.hash, keyid=signer.keyid)
