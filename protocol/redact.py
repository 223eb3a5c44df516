"""Secrets out of everything printed: URLs lose their password before they reach a log or an error.

One helper for both ends. `redact_url` keeps the user name (useful when a login fails) and
replaces the password by `***`; `redact_text` does the same to every URL inside a longer text
(an exception message, a config dump), so a secret never reaches a log, a report or --help.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@ ; the password runs to the last '@' before the host (it may hold '@' itself
# only percent-encoded, but a careless one must not leak either: stop at whitespace, quotes or '/').
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):(?P<secret>[^\s/'\"]*)@")


def redact_url(url: str) -> str:
    """`url` with its password replaced by *** (`mqtt://u:***@host:1883`); unchanged without one."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` inside `text` with the password masked."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('head')}:{MASK}@", str(text))
