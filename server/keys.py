"""The server's Ed25519 signing key, kept in the data dir, and the public key agents pin.

Created on first use; the private key never leaves the data dir (mode 0600). `export_public_key`
writes the PEM an agent is started with (`--server-key`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import signing

_LOGGER = logging.getLogger(__name__)

KEYS_DIR = "keys"
PRIVATE_FILE = "server_ed25519.pem"
PUBLIC_FILE = "server_ed25519.pub.pem"


def key_paths(data_dir: Path) -> tuple[Path, Path]:
    """(private, public) key paths under `data_dir`."""
    base = Path(data_dir) / KEYS_DIR
    return base / PRIVATE_FILE, base / PUBLIC_FILE


def server_key(data_dir: Path) -> Ed25519PrivateKey:
    """Load the signing key, creating the pair on first run."""
    private, public = key_paths(data_dir)
    created = not private.exists()
    key = signing.ensure_keypair(private, public)
    if created:
        _LOGGER.info("created server signing key %s (agents pin %s)", private, public)
    return key


def export_public_key(data_dir: Path, out: Path) -> Path:
    """Copy the server's public key to `out` (creating the key pair if needed)."""
    server_key(data_dir)
    _, public = key_paths(data_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public, out)
    return out
