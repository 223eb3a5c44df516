"""Ed25519 keys and signatures for manifests, verdicts and commands.

The server holds the private key; each agent pins the server's public key from a file, so only
our server can make a device accept a model or a verdict.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import SignatureError
from protocol.files import atomic_write


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh signing key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as PKCS#8 PEM readable by its owner only."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (what agents pin)."""
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the server's signing key, failing clearly on the wrong kind of key."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load the pinned server public key."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def ensure_keypair(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Load the server key pair, creating it on first run.

    Safe when several processes start on a fresh data dir at once (`serve` and a CLI command):
    the private key appears complete or not at all (written aside, then hard-linked, which fails
    if another process won), everyone loads the winner's key, and the public file is rewritten
    whenever it does not match it. A check-then-create here once left a public key that did not
    match the signing key, and every device refused the server.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if not private_path.exists():
        tmp = private_path.with_name(f".{private_path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        save_private_key(generate_private_key(), tmp)
        try:
            os.link(tmp, private_path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    key = load_private_key(private_path)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not public_path.exists() or public_path.read_bytes() != pem:
        atomic_write(public_path, pem)
    return key


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`SHA256:<hex>` of the raw public key: short enough to compare by eye on the server and a device."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:32]


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Base64 Ed25519 signature of `data`."""
    return base64.b64encode(key.sign(data)).decode("ascii")


def verify(key: Ed25519PublicKey, data: bytes, signature: str | None) -> None:
    """Raise SignatureError unless `signature` is a valid signature of `data` by `key`."""
    if not signature:
        raise SignatureError("message is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise SignatureError(f"signature is not base64: {exc}") from exc
    if len(raw) != 64:
        raise SignatureError(f"signature has {len(raw)} bytes, Ed25519 needs 64")
    try:
        key.verify(raw, data)
    except InvalidSignature as exc:
        raise SignatureError(f"signature does not match the pinned server key {fingerprint(key)}") from exc
