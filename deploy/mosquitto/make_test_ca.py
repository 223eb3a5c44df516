#!/usr/bin/env python3
"""Generate a throw-away certificate authority, a broker certificate and client certificates.

For tests, the HIL rig and trying the TLS listener before real certificates exist. Production
brokers should use certificates from the organisation's CA (or Let's Encrypt for a public name);
the file names written here match what deploy/mosquitto/mosquitto.conf expects in
/etc/mosquitto/certs/. Keys are ECDSA P-256: small, fast on a Pi, accepted by every TLS stack.

    python deploy/mosquitto/make_test_ca.py OUT_DIR --host broker.example --ip 10.0.0.5 --client pi-01
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOGGER = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    """PKCS#8 PEM, owner-readable only: a private key never lands world-readable, even briefly."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeGuide test CA"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Back-date by an hour so a device whose clock lags slightly still accepts the certificate.
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=days)


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    name = _name("EdgeGuide test root")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *,
           sans: Sequence[x509.GeneralName], server: bool, days: int) -> tuple[ec.EllipticCurvePrivateKey,
                                                                              x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_test_ca(out_dir: Path, *, hosts: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",),
                 clients: Sequence[str] = (), days: int = 30) -> dict[str, Path]:
    """Write ca.crt/ca.key, server.crt/server.key and client-<name>.crt/.key into `out_dir`.

    The broker certificate names every host and IP a client may dial (TLS checks the name, so a
    device connecting by IP needs that IP here). A client certificate's CN is its device id, which
    a listener with `use_identity_as_username true` uses as the MQTT username for the ACL.
    Returns the written paths keyed by role ("ca", "ca_key", "server", "server_key", "client:<name>", ...).
    """
    if not hosts and not ips:
        raise ValueError("the broker certificate needs at least one host name or IP address")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(days)
    paths = {"ca": out_dir / CA_CERT, "ca_key": out_dir / CA_KEY,
             "server": out_dir / SERVER_CERT, "server_key": out_dir / SERVER_KEY}
    _write_cert(ca_cert, paths["ca"])
    _write_key(ca_key, paths["ca_key"])
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server_key, server_cert = _issue(ca_key, ca_cert, hosts[0] if hosts else ips[0], sans=sans, server=True,
                                     days=days)
    _write_cert(server_cert, paths["server"])
    _write_key(server_key, paths["server_key"])
    for name in clients:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"client name {name!r} cannot be used in a file name")
        key, cert = _issue(ca_key, ca_cert, name, sans=(), server=False, days=days)
        paths[f"client:{name}"] = out_dir / f"client-{name}.crt"
        paths[f"client_key:{name}"] = out_dir / f"client-{name}.key"
        _write_cert(cert, paths[f"client:{name}"])
        _write_key(key, paths[f"client_key:{name}"])
    _LOGGER.info("test CA written to %s (%d client certificates)", out_dir, len(clients))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: make_test_ca.py OUT_DIR [--host H]... [--ip A]... [--client NAME]... [--days N]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--host", action="append", default=None, help="DNS name in the broker cert (repeatable)")
    parser.add_argument("--ip", action="append", default=None, help="IP address in the broker cert (repeatable)")
    parser.add_argument("--client", action="append", default=[], help="client certificate CN (repeatable)")
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    paths = make_test_ca(args.out_dir, hosts=args.host or ["localhost"], ips=args.ip or ["127.0.0.1"],
                         clients=args.client, days=args.days)
    for role, path in paths.items():
        print(f"{role}\t{path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    raise SystemExit(main())
