"""Module signature trailer and PKCS#7 verification, as the kernel does it (Linux 6.1).

Layout (module-format.md): [payload][PKCS#7 DER][struct module_signature][MAGIC].
`split_signature` never raises: a malformed trailer is a finding, not a crash.
Verification: asn1crypto parses the CMS; cryptography verifies RSA PKCS#1 v1.5 and
ECDSA over the pre-computed digest; SM2-with-SM3 is verified here with integer
arithmetic over cryptography's SM3 digest (no extra package).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError

MAGIC = b"~Module signature appended~\n"
SIG_INFO = struct.Struct(">BBBBB3sI")  # include/linux/module_signature.h
PKEY_ID_PKCS7 = 2

# Digests the 6.1 kernel parses in PKCS#7 (crypto/asymmetric_keys/mscode/pkcs7 parser); "sm3" 5.10-6.10.
KERNEL_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "sm3")
_OID_SM3 = "1.2.156.10197.1.401"
_OID_SM2 = "1.2.156.10197.1.301"
_OID_SM2_SM3 = "1.2.156.10197.1.501"


@dataclass(frozen=True)
class SignatureTrailer:
    """The parsed trailer: where the PKCS#7 blob is and what struct module_signature says."""

    algo: int
    hash: int
    id_type: int
    signer_len: int
    key_id_len: int
    sig_len: int
    payload_len: int
    der: bytes = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "hash": self.hash, "id_type": self.id_type, "signer_len": self.signer_len,
                "key_id_len": self.key_id_len, "sig_len": self.sig_len, "payload_len": self.payload_len}


def split_signature(data: bytes) -> tuple[SignatureTrailer | None, str, int]:
    """(trailer or None, problem or "", payload length). Never raises; mirrors kernel/module/signing.c (6.1)."""
    n = len(data)
    if n < len(MAGIC) or data[n - len(MAGIC):] != MAGIC:
        return None, "", n
    end = n - len(MAGIC)
    if end < SIG_INFO.size:
        return None, f"signature magic present but only {end} bytes precede it", n
    algo, hsh, id_type, signer_len, key_id_len, _pad, sig_len = SIG_INFO.unpack_from(data, end - SIG_INFO.size)
    body = end - SIG_INFO.size
    # mod_check_sig (kernel/module_signature.c, 6.1)
    if sig_len >= body:
        return None, f"sig_len {sig_len} is not smaller than the {body} bytes before the trailer", n
    if id_type != PKEY_ID_PKCS7:
        return None, (f"id_type {id_type} is not 2 (PKCS#7): "
                      "the kernel says 'not signed with expected PKCS#7 message'"), n
    if algo or hsh or signer_len or key_id_len or _pad != b"\0\0\0":
        return None, "struct module_signature has unexpected non-zero params", n
    payload_len = body - sig_len
    trailer = SignatureTrailer(algo, hsh, id_type, signer_len, key_id_len, sig_len, payload_len,
                               bytes(data[payload_len:body]))
    return trailer, "", payload_len


def strip_signature(data: bytes) -> bytes:
    """The payload without a well-formed trailer (unchanged if unsigned or malformed)."""
    trailer, problem, payload_len = split_signature(data)
    return data[:payload_len] if trailer is not None and not problem else data


def append_signature(payload: bytes, der: bytes) -> bytes:
    """payload + PKCS#7 + struct module_signature + magic, exactly as scripts/sign-file writes it."""
    return payload + der + SIG_INFO.pack(0, 0, PKEY_ID_PKCS7, 0, 0, b"\0\0\0", len(der)) + MAGIC


# -- PKCS#7 --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pkcs7Info:
    """What the CMS SignedData says, reduced to what the kernel looks at."""

    digest: str  # sha256, sm3, ...
    signature_algorithm: str  # rsa, ecdsa, sm2, or the dotted OID
    sid_kind: str  # issuer_serial | skid
    issuer: bytes = b""  # DER of the issuer Name
    issuer_text: str = ""
    serial: int = 0
    skid: bytes = b""
    signature: bytes = b""
    has_content: bool = False
    has_signed_attrs: bool = False
    signer_count: int = 1
    version: int = 1

    def signer_text(self) -> str:
        if self.sid_kind == "skid":
            return f"subject key id {self.skid.hex()}"
        return f"issuer '{self.issuer_text}' serial {self.serial:x}"


class Pkcs7Error(ValueError):
    """The PKCS#7 blob is unparseable or has a shape the kernel refuses."""


def parse_pkcs7(der: bytes) -> Pkcs7Info:
    """Parse the trailer's PKCS#7 (strict DER); Pkcs7Error says what is wrong."""
    from asn1crypto import cms

    try:
        ci = cms.ContentInfo.load(der, strict=True)
        # asn1crypto tolerates some wrong universal tags (a SEQUENCE where a SET belongs) that the
        # kernel's ASN.1 decoder refuses; a DER blob must re-encode to itself.
        if cms.ContentInfo.load(der).dump(force=True) != der:
            raise Pkcs7Error("not in canonical DER (a tag or length differs from what the kernel's parser expects)")
        if ci["content_type"].native != "signed_data":
            raise Pkcs7Error(f"content type is {ci['content_type'].native}, not signedData")
        sd = ci["content"]
        encap = sd["encap_content_info"]
        if encap["content_type"].native != "data":
            raise Pkcs7Error(f"eContentType is {encap['content_type'].native}, not data")
        has_content = encap["content"].native is not None
        signers = sd["signer_infos"]
        if len(signers) != 1:
            raise Pkcs7Error(f"{len(signers)} signer infos; the kernel module loader expects exactly one")
        si = signers[0]
        sid = si["sid"]
        # crypto/asymmetric_keys/pkcs7_parser.c (6.1): SignedData v1 (PKCS#7) or v3 (CMS); a v1 signer
        # names issuer+serial inside v1 data, a v3 signer names a subject key id inside v3 data.
        sd_version, si_version = sd["version"].native, si["version"].native
        if sd_version not in ("v1", "v3"):
            raise Pkcs7Error(f"unsupported SignedData version {sd_version}")
        want = {"v1": ("v1", "issuer_and_serial_number"), "v3": ("v3", "subject_key_identifier")}.get(si_version)
        if want is None or want[0] != sd_version or want[1] != sid.name:
            raise Pkcs7Error(f"SignerInfo {si_version} with {sid.name} does not fit SignedData {sd_version}")
        info: dict[str, Any] = {}
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            info.update(sid_kind="issuer_serial", issuer=ias["issuer"].dump(), issuer_text=ias["issuer"].human_friendly,
                        serial=ias["serial_number"].native)
        else:
            info.update(sid_kind="skid", skid=bytes(sid.chosen.native))
        digest_oid = si["digest_algorithm"]["algorithm"].dotted
        digest = "sm3" if digest_oid == _OID_SM3 else si["digest_algorithm"]["algorithm"].native
        listed = {a["algorithm"].dotted for a in sd["digest_algorithms"]}
        if digest_oid not in listed:
            raise Pkcs7Error(f"the signer's digest {digest} is not among the SignedData digestAlgorithms")
        sig_oid = si["signature_algorithm"]["algorithm"].dotted
        sig_alg = _signature_kind(sig_oid, si["signature_algorithm"]["algorithm"].native)
        _check_signature_algorithm(sig_oid, sig_alg, digest, si["signature_algorithm"]["parameters"])
        has_attrs = bool(si["signed_attrs"].native) if si["signed_attrs"].native is not None else False
        return Pkcs7Info(digest=str(digest), signature_algorithm=sig_alg, signature=bytes(si["signature"].native),
                         has_content=has_content, has_signed_attrs=has_attrs, signer_count=len(signers),
                         version=int(sd["version"].native[1:]) if str(sd["version"].native).startswith("v") else 0,
                         **info)
    except Pkcs7Error:
        raise
    except Exception as e:  # asn1crypto raises ValueError/TypeError/KeyError on bad DER
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise Pkcs7Error(f"not a valid PKCS#7 SignedData ({type(e).__name__}: {first})") from None


# crypto/asymmetric_keys/pkcs7_parser.c pkcs7_sig_note_pkey_algo (6.1): rsaEncryption, ecdsa-with-SHA*,
# SM2-with-SM3; anything else is "Unsupported pkey algo".
_RSA_OID = "1.2.840.113549.1.1.1"
_ECDSA_OIDS = {"1.2.840.10045.4.1": "sha1", "1.2.840.10045.4.3.1": "sha224", "1.2.840.10045.4.3.2": "sha256",
               "1.2.840.10045.4.3.3": "sha384", "1.2.840.10045.4.3.4": "sha512"}


def _check_signature_algorithm(oid: str, kind: str, digest: str, params: Any) -> None:
    present = params.native is not None if hasattr(params, "native") else params is not None
    if oid == _RSA_OID:
        if present and params.dump() != b"\x05\x00":
            raise Pkcs7Error("rsaEncryption with parameters other than NULL")
        return
    if oid in _ECDSA_OIDS:
        if _ECDSA_OIDS[oid] != digest:
            raise Pkcs7Error(f"signature algorithm ecdsa-with-{_ECDSA_OIDS[oid]} does not match digest {digest}")
    elif oid in (_OID_SM2_SM3, _OID_SM2):
        if digest != "sm3":
            raise Pkcs7Error(f"SM2 signature with digest {digest}; SM2 module signatures use SM3")
    else:
        raise Pkcs7Error(f"unsupported signature algorithm {kind} ({oid}); the kernel accepts rsaEncryption, "
                         "ecdsa-with-SHA* and SM2-with-SM3")
    if present:
        raise Pkcs7Error(f"signature algorithm {kind} carries unexpected parameters")


def _signature_kind(oid: str, native: str) -> str:
    if oid in (_OID_SM2, _OID_SM2_SM3):
        return "sm2"
    if native in ("rsa", "rsassa_pkcs1v15") or native.endswith("_rsa") or oid == "1.2.840.113549.1.1.1":
        return "rsa"
    if native.startswith("sha") and native.endswith("_ecdsa") or native in ("ecdsa", "ec"):
        return "ecdsa"
    return native or oid


# -- certificates ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificate:
    """A signing certificate: how a PKCS#7 signer names it, and its public key."""

    path: str
    subject: str
    issuer: bytes  # DER
    serial: int
    skid: bytes
    key_type: str  # rsa | ecdsa | sm2 | other
    der: bytes = field(repr=False)

    def matches(self, p7: Pkcs7Info) -> bool:
        if p7.sid_kind == "skid":
            return bool(self.skid) and self.skid == p7.skid
        return self.serial == p7.serial and _norm_name(self.issuer) == _norm_name(p7.issuer)


def _norm_name(der: bytes) -> Any:
    from asn1crypto import x509 as ax509

    try:
        return ax509.Name.load(der).native
    except Exception:
        return der


def load_certificates(path: Path | str) -> list[Certificate]:
    """Certificates from a PEM (one or more) or DER file; ConfigError if none can be read."""
    from asn1crypto import pem
    from asn1crypto import x509 as ax509

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read certificate: {e.strerror}") from None
    ders: list[bytes] = []
    try:
        if pem.detect(raw):
            ders = [der for typ, _h, der in pem.unarmor(raw, multiple=True) if typ == "CERTIFICATE"]
        else:
            ders = [raw]
        certs = [_certificate(str(p), ax509.Certificate.load(d, strict=True)) for d in ders]
    except Exception as e:
        raise ConfigError(f"{p}: not a PEM or DER X.509 certificate ({type(e).__name__})",
                          hint="give the module-signing certificate (e.g. certs/signing_key.x509)") from None
    if not certs:
        raise ConfigError(f"{p}: holds no certificate")
    return certs


def _certificate(path: str, c: Any) -> Certificate:
    spki = c["tbs_certificate"]["subject_public_key_info"]
    algo = spki["algorithm"]["algorithm"].native
    key_type = {"rsa": "rsa", "rsassa_pss": "rsa", "ec": "ecdsa"}.get(algo, "other")
    if algo == "ec":
        params = spki["algorithm"]["parameters"]
        if params.name == "named" and params.chosen.dotted == _OID_SM2:
            key_type = "sm2"
    skid = c.key_identifier or b""
    return Certificate(path=path, subject=c.subject.human_friendly, issuer=c.issuer.dump(),
                       serial=c.serial_number, skid=bytes(skid), key_type=key_type, der=c.dump())


# -- verification --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verification:
    """status: valid | invalid | signer_unknown | unsupported | unsigned | malformed."""

    status: str
    message: str
    signer: str = ""
    digest: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "valid"


_HASHLIB = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
            "sm3": "sm3"}


def digest_bytes(name: str, data: bytes | memoryview) -> bytes:
    """H(data) for a kernel signature digest name."""
    if name == "sm3":
        from cryptography.hazmat.primitives import hashes

        h = hashes.Hash(hashes.SM3())
        h.update(bytes(data))
        return h.finalize()
    return hashlib.new(_HASHLIB[name], data).digest()


def verify_module(data: bytes, certs: list[Certificate], *, sm2_user_id: str | None = None) -> Verification:
    """Verify a signed module file's bytes against certificates, the way the kernel would."""
    trailer, problem, payload_len = split_signature(data)
    if problem:
        return Verification("malformed", problem)
    if trailer is None:
        return Verification("unsigned", "the module has no signature")
    try:
        p7 = parse_pkcs7(trailer.der)
    except Pkcs7Error as e:
        return Verification("malformed", str(e))
    return verify_pkcs7(memoryview(data)[:payload_len], p7, certs, sm2_user_id=sm2_user_id)


def verify_pkcs7(payload: bytes | memoryview, p7: Pkcs7Info, certs: list[Certificate], *,
                 sm2_user_id: str | None = None) -> Verification:
    """Check the shape the kernel demands, find the signer's certificate, verify the signature."""
    if p7.has_content:
        return Verification("malformed", "the PKCS#7 embeds content; the kernel needs it detached", digest=p7.digest)
    if p7.has_signed_attrs:
        return Verification("malformed", "the PKCS#7 has signed attributes; the kernel refuses 'authattrs'",
                            digest=p7.digest)
    if p7.digest not in _HASHLIB:
        return Verification("unsupported", f"digest {p7.digest} is not one the kernel accepts", digest=p7.digest)
    cert = next((c for c in certs if c.matches(p7)), None)
    if cert is None:
        return Verification("signer_unknown", f"signer ({p7.signer_text()}) is not among the given certificates",
                            digest=p7.digest)
    try:
        good = _verify_signature(cert, p7, payload, sm2_user_id)
    except _Unsupported as e:
        return Verification("unsupported", str(e), signer=cert.subject, digest=p7.digest)
    if good:
        return Verification("valid", f"signature by '{cert.subject}' is valid ({p7.digest}, {p7.signature_algorithm})",
                            signer=cert.subject, digest=p7.digest)
    return Verification("invalid", f"signature does not verify with '{cert.subject}' ({cert.path})",
                        signer=cert.subject, digest=p7.digest)


class _Unsupported(Exception):
    pass


def _verify_signature(cert: Certificate, p7: Pkcs7Info, payload: bytes | memoryview, sm2_user_id: str | None) -> bool:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    if {"rsa": "rsa", "ecdsa": "ecdsa", "sm2": "sm2"}.get(p7.signature_algorithm) != cert.key_type:
        return False  # the PKCS#7 names another algorithm than the certificate's key
    if cert.key_type == "sm2":
        if cert.key_type != "sm2":
            return False
        return sm2_verify_module(cert, p7.signature, payload, user_id=sm2_user_id)
    algo = {"sha1": hashes.SHA1(), "sha224": hashes.SHA224(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512()}.get(p7.digest)
    if algo is None:
        raise _Unsupported(f"digest {p7.digest} with a {cert.key_type} key")
    try:
        key = x509.load_der_x509_certificate(cert.der).public_key()
    except Exception as e:
        raise _Unsupported(f"cannot load the public key of {cert.path}: {e}") from None
    digest = digest_bytes(p7.digest, payload)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(p7.signature, digest, padding.PKCS1v15(), utils.Prehashed(algo))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(p7.signature, digest, ec.ECDSA(utils.Prehashed(algo)))
        else:
            raise _Unsupported(f"key type {type(key).__name__} of {cert.path}")
    except InvalidSignature:
        return False
    return True


# -- SM2 (GB/T 32918.2, curve sm2p256v1) ----------------------------------------------------------------------

_SM2_P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
_SM2_A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
_SM2_B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
_SM2_N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
_SM2_GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
_SM2_GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0


def _jac_add(p: tuple[int, int, int], q: tuple[int, int, int]) -> tuple[int, int, int]:
    P = _SM2_P
    if p[2] == 0:
        return q
    if q[2] == 0:
        return p
    x1, y1, z1 = p
    x2, y2, z2 = q
    z1z1, z2z2 = z1 * z1 % P, z2 * z2 % P
    u1, u2 = x1 * z2z2 % P, x2 * z1z1 % P
    s1, s2 = y1 * z2 * z2z2 % P, y2 * z1 * z1z1 % P
    if u1 == u2:
        return _jac_double(p) if s1 == s2 else (0, 1, 0)
    h, r = (u2 - u1) % P, (s2 - s1) % P
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    return x3, (r * (v - x3) - s1 * hhh) % P, h * z1 * z2 % P


def _jac_double(p: tuple[int, int, int]) -> tuple[int, int, int]:
    P = _SM2_P
    x, y, z = p
    if z == 0 or y == 0:
        return (0, 1, 0)
    yy = y * y % P
    s = 4 * x * yy % P
    zz = z * z % P
    m = (3 * x * x + _SM2_A * zz * zz) % P
    x3 = (m * m - 2 * s) % P
    return x3, (m * (s - x3) - 8 * yy * yy) % P, 2 * y * z % P


def _mul_add(k1: int, p1: tuple[int, int], k2: int, p2: tuple[int, int]) -> tuple[int, int] | None:
    """k1*P1 + k2*P2 in affine coordinates (Shamir's trick), None for the point at infinity."""
    a, b = (p1[0], p1[1], 1), (p2[0], p2[1], 1)
    ab = _jac_add(a, b)
    r = (0, 1, 0)
    for i in range(max(k1.bit_length(), k2.bit_length()) - 1, -1, -1):
        r = _jac_double(r)
        bits = ((k1 >> i) & 1, (k2 >> i) & 1)
        if bits == (1, 1):
            r = _jac_add(r, ab)
        elif bits == (1, 0):
            r = _jac_add(r, a)
        elif bits == (0, 1):
            r = _jac_add(r, b)
    if r[2] == 0:
        return None
    zi = pow(r[2], -1, _SM2_P)
    zi2 = zi * zi % _SM2_P
    return r[0] * zi2 % _SM2_P, r[1] * zi2 * zi % _SM2_P


def sm2_za(user_id: bytes, pub: tuple[int, int]) -> bytes:
    """Z_A = SM3(ENTL || ID || a || b || xG || yG || xA || yA) (GB/T 32918.2 5.5)."""
    parts = [(len(user_id) * 8).to_bytes(2, "big"), user_id]
    parts += [v.to_bytes(32, "big") for v in (_SM2_A, _SM2_B, _SM2_GX, _SM2_GY, pub[0], pub[1])]
    return digest_bytes("sm3", b"".join(parts))


def sm2_verify(pub: tuple[int, int], e: int, r: int, s: int) -> bool:
    """SM2 verification of digest integer e with signature (r, s) under public point pub."""
    n = _SM2_N
    if not (1 <= r < n and 1 <= s < n):
        return False
    t = (r + s) % n
    if t == 0:
        return False
    pt = _mul_add(s, (_SM2_GX, _SM2_GY), t, pub)
    if pt is None:
        return False
    return (e + pt[0]) % n == r


def sm2_public_point(cert: Certificate) -> tuple[int, int]:
    """The SM2 public key of a certificate as an affine point, checked to lie on the curve."""
    from asn1crypto import x509 as ax509

    c = ax509.Certificate.load(cert.der)
    raw = bytes(c["tbs_certificate"]["subject_public_key_info"]["public_key"].native)
    if len(raw) != 65 or raw[0] != 4:
        raise _Unsupported(f"{cert.path}: SM2 public key is not an uncompressed point")
    x, y = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
    if (y * y - (x * x * x + _SM2_A * x + _SM2_B)) % _SM2_P:
        raise _Unsupported(f"{cert.path}: SM2 public key is not on the curve")
    return x, y


def sm2_verify_module(cert: Certificate, signature_der: bytes, payload: bytes | memoryview, *,
                      user_id: str | None) -> bool:
    """SM2-with-SM3 over payload. user_id None: e = SM3(M) (the 6.1 kernel's PKCS#7 path, no Z_A);
    otherwise e = SM3(Z_A || M) with that ID (GB/T default "1234567812345678")."""
    from asn1crypto.algos import DSASignature

    try:
        sig = DSASignature.load(signature_der, strict=True).native
        r, s = int(sig["r"]), int(sig["s"])
    except Exception:
        return False
    pub = sm2_public_point(cert)
    if user_id is None:
        e = digest_bytes("sm3", payload)
    else:
        e = digest_bytes("sm3", sm2_za(user_id.encode(), pub) + bytes(payload))
    return sm2_verify(pub, int.from_bytes(e, "big"), r, s)
