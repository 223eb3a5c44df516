"""Which Host headers name this server: the guard against DNS rebinding of the local HTTP API.

A browser page on the device can resolve its own name to 127.0.0.1 and then talk to our API as a
"same-origin" site; only the Host header still names the attacker's domain, so every request must
carry the bound address, localhost, or a name the operator allowed.
"""

from __future__ import annotations

import ipaddress


def allowed_hosts(host: str) -> frozenset[str]:
    """Host header values (without port, lower case) a request to this server may carry."""
    names = {"localhost", host.lower().strip("[]")}
    try:
        bound = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return frozenset(names)
    if bound.is_loopback:
        names |= {"127.0.0.1", "::1"}
    return frozenset(names)


def host_problem(header: str | None, allowed: frozenset[str], port: int, wildcard: bool) -> str | None:
    """Why a Host header does not name this server (DNS rebinding), or None when it does."""
    if header is None:
        return "the Host header is required"
    host, port_text = header.strip().lower(), ""
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
    if port_text and port_text != str(port):
        return f"Host {header!r:.100} names another port than {port}"
    if host in allowed:
        return None
    if wildcard:  # bound to every address: any IP literal is ours; only names can be rebound
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
    return (f"Host {header!r:.100} is not this server's address; use http://{sorted(allowed)[0]}:{port} "
            "(names other than localhost are refused against DNS rebinding)")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (an API bound there is not reachable from the network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
