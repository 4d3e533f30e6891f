"""Address safety: which IPs the crawler refuses, and resolution through the real resolver."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from dataprep.crawl.addresses import (
    BlockedAddressError,
    ResolveError,
    address_problem,
    checked_addresses,
)


@pytest.mark.parametrize("ip, problem", [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata endpoint
    ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("100.64.0.1", "not globally routable"),  # carrier-grade NAT space
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 is judged by its IPv4 address
    ("::ffff:10.0.0.1", "private"),
])
def test_non_public_addresses_are_named(ip: str, problem: str) -> None:
    assert address_problem(ipaddress.ip_address(ip)) == problem


@pytest.mark.parametrize("ip", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip: str) -> None:
    assert address_problem(ipaddress.ip_address(ip)) is None


def test_loopback_names_are_refused_unless_private_allowed() -> None:
    with pytest.raises(BlockedAddressError, match="loopback address; pass --allow-private"):
        checked_addresses("127.0.0.1", 80, allow_private=False)
    with pytest.raises(BlockedAddressError, match="localhost resolves to"):
        checked_addresses("localhost", 80, allow_private=False)
    assert ipaddress.ip_address("127.0.0.1") in checked_addresses("localhost", 80, True)


def _answers(*ips: str):
    def getaddrinfo(host, port, type=0):  # the resolver's signature, for a name we do not own
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port)) for ip in ips]
    return getaddrinfo


def test_one_private_answer_among_public_ones_refuses_the_host() -> None:
    # A name that mixes public and internal answers is the DNS-rebinding set-up.
    with pytest.raises(BlockedAddressError, match="10.0.0.5, a private address"):
        checked_addresses("rebind.example", 80, False, _answers("93.184.215.14", "10.0.0.5"))
    assert [str(ip) for ip in checked_addresses(
        "public.example", 80, False, _answers("93.184.215.14", "93.184.215.14"))] == [
        "93.184.215.14"]


def test_unresolvable_host_is_a_resolve_error() -> None:
    with pytest.raises(ResolveError, match="cannot resolve"):
        checked_addresses("no-such-host.invalid", 80, True)
