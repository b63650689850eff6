"""Bundle trust from a key, not from the bundle: Ed25519 signatures over ``guard.json``.

``guard.json`` lists the SHA-256 of every file of the bundle (model, clean
pool, k-NN reference, Mahalanobis statistics, the forensic report's files)
and the bundle's creation time, so one signature over its exact bytes covers
the whole bundle; loading refuses a file it does not list. The signature
lives beside it in ``guard.json.sig``, a small JSON document naming the key
that made it::

    {"algorithm": "ed25519", "key_id": "<first 16 hex of SHA-256 of the raw public key>",
     "signature": "<base64 of the 64-byte signature>"}

Checksums catch accidents; the signature catches people: whoever can write
the bundle volume can regenerate checksums, not forge a signature by a key
the guard trusts. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo
public), as ``openssl genpkey -algorithm ed25519`` writes them too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.errors import BundleError

__all__ = ["MANIFEST", "SIGNATURE", "SignatureError", "Signed", "key_id", "keygen", "load_private_key",
           "load_public_key", "sign", "signer", "trusted_keys", "verify"]
MANIFEST = "guard.json"  # the bundle's manifest: what a signature covers (guard.bundle reads it)
SIGNATURE = "guard.json.sig"
PRIVATE_KEY = "bundle-signing.key"
PUBLIC_KEY = "bundle-signing.pub"


class SignatureError(BundleError):
    """A key or signature that cannot be used, with the file and the reason."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable, unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def keygen(out: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into ``out``: the private key readable by its owner only."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_KEY, out / PUBLIC_KEY
    if private.exists():
        raise SignatureError(f"{private}: exists; refusing to overwrite a signing key (move it away first)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The contents of ``guard.json.sig`` for these exact ``guard.json`` bytes."""
    return json.dumps({"algorithm": "ed25519", "key_id": key_id(key.public_key()),
                       "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}).encode() + b"\n"


@dataclass(frozen=True)
class Signed:
    key_id: str
    key_file: str  # the trusted key that verified it


def signer(root: str | Path) -> str | None:
    """The key id a bundle's signature names, unverified; None when unsigned or unreadable."""
    try:
        return str(json.loads((Path(root) / SIGNATURE).read_bytes())["key_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(root: str | Path, trusted: dict[str, tuple[Ed25519PublicKey, str]],
           manifest_bytes: bytes | None = None) -> Signed:
    """Check ``guard.json.sig`` of the bundle at ``root`` against the trusted keys.

    ``trusted`` maps key ids to (key, file) as :func:`trusted_keys` builds it;
    ``manifest_bytes``: the guard.json bytes the caller parsed (default: read).
    Raises :class:`SignatureError` naming the reason: no signature, an
    unreadable one, a key not trusted, or a signature that does not verify.
    """
    root = Path(root)
    sig_path, manifest_path = root / SIGNATURE, root / MANIFEST
    if not sig_path.is_file():
        raise SignatureError(f"{sig_path}: missing; the bundle is unsigned (sign it with 'trojan-forensics sign "
                             f"BUNDLE --signing-key KEY')")
    try:
        doc = json.loads(sig_path.read_bytes())
        if not isinstance(doc, dict) or doc.get("algorithm") != "ed25519":
            raise ValueError("not an ed25519 signature document")
        signature = base64.b64decode(str(doc["signature"]), validate=True)
        kid = str(doc["key_id"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise SignatureError(f"{sig_path}: unreadable signature ({exc})") from exc
    if len(signature) != 64:
        raise SignatureError(f"{sig_path}: the signature is {len(signature)} bytes, an Ed25519 signature is 64 "
                             f"(truncated?)")
    if kid not in trusted:
        raise SignatureError(f"{sig_path}: signed by key {kid}, which is not among the trusted keys "
                             f"({', '.join(sorted(trusted)) or 'none'})")
    key, key_file = trusted[kid]
    try:
        key.verify(signature, manifest_path.read_bytes() if manifest_bytes is None else manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"{sig_path}: the signature by key {kid} does not match guard.json (changed after "
                             f"signing)") from None
    except OSError as exc:
        raise SignatureError(f"{manifest_path}: unreadable ({exc})") from exc
    return Signed(kid, key_file)


def trusted_keys(paths: list[Path] | tuple[Path, ...]) -> dict[str, tuple[Ed25519PublicKey, str]]:
    """Key id -> (public key, file) for the ``--trusted-key`` files."""
    out = {}
    for path in paths:
        key = load_public_key(path)
        out[key_id(key)] = (key, str(path))
    return out
