#!/usr/bin/env python3
"""Render the broker ACL from acl.template and add device/server accounts to the password file.

Runs on the broker host, which may have mosquitto and Python but not EdgeGuide: standard library
only. A device's MQTT username IS its device id (the ACL's `%u` patterns depend on it), so names are
checked against the same rule as protocol.names.DEVICE_ID_RE (a test keeps the two equal).

    python deploy/mosquitto/broker_users.py acl --prefix edgeguide --server-user edgeguide-server \
        --out /etc/mosquitto/edgeguide.acl
    python deploy/mosquitto/broker_users.py add --passwd /etc/mosquitto/passwd --user pi-01   # prints a password
    python deploy/mosquitto/broker_users.py add --passwd /etc/mosquitto/passwd --user pi-02 --password-stdin
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ACL_TEMPLATE = HERE / "acl.template"
DEFAULT_PREFIX = "edgeguide"
DEFAULT_SERVER_USER = "edgeguide-server"
# Same rule as protocol.names.DEVICE_ID_RE: no '+', '#', '/', spaces or control characters, so a
# username can never widen a `%u` pattern into a wildcard or another device's subtree.
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_PREFIX_LEVEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_username(name: str) -> str:
    """Return `name` if it is a valid device id / account name, else raise ValueError naming it."""
    if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
        raise ValueError(f"invalid MQTT username {name!r}: must match {USERNAME_RE.pattern} (it is the device id)")
    return name


def check_prefix(prefix: str) -> str:
    """Return `prefix` if every level is plain text (no wildcards, '$' or empty levels)."""
    levels = prefix.split("/") if isinstance(prefix, str) else [""]
    if not all(_PREFIX_LEVEL_RE.fullmatch(level) for level in levels):
        raise ValueError(f"invalid topic prefix {prefix!r}: levels must match {_PREFIX_LEVEL_RE.pattern}")
    return prefix


def render_acl(prefix: str = DEFAULT_PREFIX, server_user: str = DEFAULT_SERVER_USER,
               template: str | None = None) -> str:
    """The ACL text for one topic prefix and one server account."""
    text = ACL_TEMPLATE.read_text(encoding="utf-8") if template is None else template
    for placeholder in ("@PREFIX@", "@SERVER_USER@"):
        if placeholder not in text:
            raise ValueError(f"ACL template lacks the {placeholder} placeholder")
    text = text.replace("@PREFIX@", check_prefix(prefix)).replace("@SERVER_USER@", check_username(server_user))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"ACL template has unknown placeholders {sorted(set(leftover))}")
    return text


def mosquitto_passwd_binary() -> str:
    """Path of mosquitto_passwd (package mosquitto on Debian)."""
    found = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")
    if not found:
        raise FileNotFoundError("mosquitto_passwd not found: apt-get install -y mosquitto")
    return found


def add_user(passwd_file: Path, username: str, password: str | None = None, *,
             server_user: str = DEFAULT_SERVER_USER, role: str = "device") -> str:
    """Add or update one account in a mosquitto password file (hashed by mosquitto_passwd); return the password.

    A device may not take the server account's name: it would inherit the server's rights.
    An empty `password` is refused; None generates a random one (printed once by the CLI).
    """
    check_username(username)
    if role not in {"device", "server"}:
        raise ValueError(f"role must be 'device' or 'server', got {role!r}")
    if role == "device" and username == server_user:
        raise ValueError(f"device id {username!r} equals the server account; pick another device id")
    if password is None:
        password = secrets.token_urlsafe(24)
    if not password or any(c in password for c in "\r\n:"):
        raise ValueError("password must be non-empty and contain no ':' or line breaks")
    passwd_file = Path(passwd_file)
    cmd = [mosquitto_passwd_binary(), "-b"]
    if not passwd_file.exists():
        passwd_file.parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only first; mosquitto_passwd keeps the mode when it rewrites the file.
        os.close(os.open(passwd_file, os.O_WRONLY | os.O_CREAT, 0o600))
    cmd += [str(passwd_file), username, password]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd failed for {username!r} in {passwd_file} "
                           f"(exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    _LOGGER.info("account %s (%s) written to %s", username, role, passwd_file)
    return password


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `acl` renders the ACL, `add` adds an account."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    acl = sub.add_parser("acl", help="render acl.template")
    acl.add_argument("--prefix", default=DEFAULT_PREFIX)
    acl.add_argument("--server-user", default=DEFAULT_SERVER_USER)
    acl.add_argument("--out", type=Path, help="file to write (default: stdout)")
    add = sub.add_parser("add", help="add or update an account with mosquitto_passwd -b")
    add.add_argument("--passwd", type=Path, required=True, help="mosquitto password file")
    add.add_argument("--user", required=True, help="device id, or the server account name with --server")
    add.add_argument("--server", action="store_true", help="this is the server account")
    add.add_argument("--server-user", default=DEFAULT_SERVER_USER)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "acl":
            text = render_acl(args.prefix, args.server_user)
            if args.out:
                args.out.write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
            return 0
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
        generated = add_user(args.passwd, args.user, password, server_user=args.server_user,
                             role="server" if args.server else "device")
        if password is None:
            print(generated)
        return 0
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    raise SystemExit(main())
