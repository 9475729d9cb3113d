"""Where untrusted URLs may point: public addresses only.

An image reference or a webhook from a request must not reach the worker's own network
(loopback, private ranges, link-local, the cloud metadata service). The host is resolved
here and every address it resolves to is checked; callers connect to the address that was
checked, so a DNS answer that changes between check and connect (rebinding) gains nothing.
Operators may allow chosen private networks (an internal CDN) by CIDR.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence

from worker.errors import ConfigError, ForbiddenReference, StorageUnavailable

__all__ = ["NetworkGuard", "Resolver"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

# Beyond is_private/is_loopback/is_link_local: ranges that are not "global" for a worker.
_ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "169.254.0.0/16",  # link-local, including 169.254.169.254 (metadata)
        "192.0.0.0/24",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "64:ff9b::/96",  # NAT64 can embed a private IPv4
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)


def _system_resolver(host: str, port: int) -> Sequence[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StorageUnavailable(f"cannot resolve {host!r}: {exc}") from exc
    return [str(info[4][0]) for info in infos]


class NetworkGuard:
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
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return True
        if any(address in network for network in _ALWAYS_BLOCKED):
            return False
        return address.is_global and not (
            address.is_private or address.is_loopback or address.is_link_local
        )

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to; ``ForbiddenReference`` when any address ``host``
        resolves to is not public (one bad answer in a round-robin set is enough)."""
        host = host.strip("[]")
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [host] if literal is not None else list(self.resolver(host, port))
        if not addresses:
            raise StorageUnavailable(f"{host!r} resolved to no address")
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if not self.is_allowed(address):
                raise ForbiddenReference(f"{host} resolves to {address}, which is not public")
        return addresses[0]
