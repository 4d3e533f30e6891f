"""Address safety: resolve a host and refuse private, loopback, link-local and other non-public IPs.

The crawler connects to the very address checked here (never re-resolving), so a DNS answer that
changes between check and connect cannot steer it onto an internal network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddressError(Exception):
    """The host resolves to an address the crawler must not contact."""


class ResolveError(Exception):
    """The host name did not resolve."""


def address_problem(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address (None when it is)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_problem(ip.ipv4_mapped)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        # Catches the remaining special-purpose ranges (100.64.0.0/10 shared space, 6to4 relays...).
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def resolve(host: str, port: int,
            getaddrinfo: Callable[..., list] = socket.getaddrinfo) -> list[IPAddress]:
    """All addresses `host` resolves to, in resolver order, without repeats."""
    try:
        infos = getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveError(f"cannot resolve {host}: {exc}") from None
    out: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        out.setdefault(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
    if not out:
        raise ResolveError(f"cannot resolve {host}: no addresses")
    return list(out)


def checked_addresses(host: str, port: int, allow_private: bool,
                      getaddrinfo: Callable[..., list] = socket.getaddrinfo) -> list[IPAddress]:
    """Resolve `host`; refuse it if ANY of its addresses is non-public (unless `allow_private`).

    Refusing on any rather than skipping the bad ones: a name that mixes public and internal
    addresses is the classic DNS-rebinding set-up, and nothing legitimate needs it.
    """
    addresses = resolve(host, port, getaddrinfo)
    if not allow_private:
        for ip in addresses:
            problem = address_problem(ip)
            if problem:
                raise BlockedAddressError(
                    f"{host} resolves to {ip}, a {problem} address; "
                    "pass --allow-private to crawl private networks")
    return addresses
