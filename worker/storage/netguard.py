"""Where untrusted URLs may point: public addresses only.

An image reference, each redirect it leads to, and a webhook from a request must not reach
the worker's own network (loopback, private ranges, link-local, the cloud metadata service).
The host is resolved here and every address it resolves to is checked; callers connect to the
address that was checked, so a DNS answer that changes between check and connect (rebinding)
gains nothing. Operators may allow chosen networks (an internal CDN) by CIDR.

One rule judges every address (``NetworkGuard.is_allowed``):

- An IPv6 address that embeds or maps an IPv4 address is judged by the IPv4 rules applied to
  every IPv4 address it carries: IPv4-compatible ``::a.b.c.d`` (``::/96`` but ``::`` and
  ``::1``), mapped ``::ffff:a.b.c.d``, SIIT ``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``,
  6to4 ``2002:AABB:CCDD::/48``, Teredo ``2001:0:SERVER:…:~CLIENT`` (server and client both).
  The local-use NAT64 prefix ``64:ff9b:1::/48`` (RFC 8215) may be cut at any RFC 6052 length,
  which modq cannot know, so every layout that fits in it (/48, /56, /64, /96) must give an
  allowed IPv4 address; IANA marks that prefix not globally reachable, and in practice its
  addresses pass only when the operator allows them.
- Any other IPv6 address must be global unicast (``2000::/3``), outside the special ranges
  below; deprecated site-local ``fec0::/10``, unique-local, link-local and multicast are not.
- IPv4: not private, loopback, link-local (``169.254.169.254``), CGNAT, multicast, reserved.

``MODQ_HTTP_ALLOWED_NETWORKS`` opens chosen CIDRs: an address inside one is allowed whatever
the rules say, and an embedded IPv4 address inside one is allowed as that IPv4 address would
be, so ``127.0.0.1/32`` opens ``::ffff:127.0.0.1`` too, and nothing else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence

from worker.errors import ConfigError, ForbiddenReference, StorageUnavailable

__all__ = ["NetworkGuard", "Resolver", "embedded_ipv4", "is_public"]

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
Address = IPv4 | IPv6
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Beyond is_private/is_loopback/is_link_local, which differ between Python versions.
_BLOCKED_V4 = _nets(
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, including 169.254.169.254 (metadata)
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_BLOCKED_V6 = _nets(
    "2001::/23",  # IETF protocol assignments (Teredo, inside it, is judged by its IPv4)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation (RFC 9637)
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",  # deprecated site-local: never public
    "ff00::/8",
)

_COMPATIBLE = ipaddress.IPv6Network("::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_LAST_32 = (_COMPATIBLE, _MAPPED, _SIIT, _NAT64)
# RFC 6052 section 2.2: for each prefix length, where the 32 IPv4 bits sit (counted from the
# top of the 128-bit address). Bits 64-71 (the u-octet) never carry any.
_RFC6052_LAYOUTS = {48: (48, 72), 56: (56, 72), 64: (72,), 96: (96,)}


def _bits(value: int, start: int, length: int) -> int:
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def _rfc6052(value: int, prefix_length: int) -> IPv4:
    """The IPv4 address at RFC 6052's place for ``prefix_length``, skipping the u-octet."""
    starts = _RFC6052_LAYOUTS[prefix_length]
    if len(starts) == 1:
        return IPv4(_bits(value, starts[0], 32))
    high = 64 - starts[0]  # IPv4 bits before the u-octet
    return IPv4(_bits(value, starts[0], high) << (32 - high) | _bits(value, 72, 32 - high))


def embedded_ipv4(address: IPv6) -> tuple[IPv4, ...]:
    """Every IPv4 address ``address`` embeds or maps (empty for a plain IPv6 address)."""
    value = int(address)
    if address in _COMPATIBLE:
        return () if value <= 1 else (IPv4(value & 0xFFFFFFFF),)  # :: and ::1 are IPv6's own
    if any(address in network for network in _LAST_32):
        return (IPv4(value & 0xFFFFFFFF),)
    if address in _NAT64_LOCAL:
        return tuple(dict.fromkeys(_rfc6052(value, length) for length in _RFC6052_LAYOUTS))
    if address in _SIXTOFOUR:
        return (IPv4(_bits(value, 16, 32)),)
    if address in _TEREDO:
        return (IPv4(_bits(value, 32, 32)), IPv4(~value & 0xFFFFFFFF))
    return ()


def is_public(address: Address) -> bool:
    """The rule without any operator allowance."""
    if isinstance(address, IPv4):
        return not any(address in network for network in _BLOCKED_V4) and not (
            address.is_private or address.is_loopback or address.is_link_local
        )
    carried = embedded_ipv4(address)
    if carried:
        return all(is_public(inner) for inner in carried)
    return address in _GLOBAL_UNICAST_V6 and not any(address in net for net in _BLOCKED_V6)


def _system_resolver(host: str, port: int) -> Sequence[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StorageUnavailable(f"cannot resolve {host!r}: {exc}") from exc
    return [str(info[4][0]) for info in infos]


class NetworkGuard:
    """The one judge of addresses for image fetches, their redirects and webhooks."""

    def __init__(
        self, allowed_networks: Iterable[str] = (), resolver: Resolver | None = None
    ) -> None:
        try:
            self.allowed: tuple[Network, ...] = tuple(
                ipaddress.ip_network(cidr, strict=False) for cidr in allowed_networks
            )
        except ValueError as exc:
            raise ConfigError(f"MODQ_HTTP_ALLOWED_NETWORKS: {exc}") from exc
        self.resolver = resolver or _system_resolver

    def is_allowed(self, address: Address) -> bool:
        if any(address in network for network in self.allowed):
            return True
        if isinstance(address, IPv6):
            carried = embedded_ipv4(address)
            if carried:
                return all(self.is_allowed(inner) for inner in carried)
        return is_public(address)

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to; ``ForbiddenReference`` when any address ``host``
        resolves to is not allowed (one bad answer in a round-robin set is enough)."""
        host = host.strip("[]")
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [host] if literal is not None else list(self.resolver(host, port))
        if not addresses:
            raise StorageUnavailable(f"{host!r} resolved to no address")
        for text in addresses:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError as exc:
                raise ForbiddenReference(f"{host} resolves to {text!r}, not an address") from exc
            if not self.is_allowed(address):
                raise ForbiddenReference(f"{host} resolves to {address}, which is not public")
        return addresses[0]
