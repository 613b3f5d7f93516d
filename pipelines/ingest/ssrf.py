"""SSRF guard for URL lists: refuse URLs whose host resolves to an internal address.

By default a URL is refused when its scheme is not http/https or when ANY address its host resolves to is
loopback, private, link-local (169.254.0.0/16 holds the cloud metadata endpoints), multicast, reserved,
unspecified or otherwise not globally routable. IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged
as the IPv4 address they carry. Hosts named in ``UrlPolicy.allow_hosts`` skip resolution; addresses inside
``UrlPolicy.allow_networks`` are accepted (tests on 127.0.0.1, intranets).

``check_urls`` refuses a list's bad URLs before any download; ``check_host`` is the same judgement at connect
time, and gives the checked addresses to connect to: ``pipelines.ingest.fetch`` applies it to every hop,
redirects included, and pins the connection to those addresses (no DNS rebinding). Pure Python, no Ray.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# AWS/GCP/Azure/OpenStack use 169.254.169.254 (link-local); AWS also serves IMDS on fd00:ec2::254 (IPv6 ULA).
_METADATA_V6 = ipaddress.ip_address("fd00:ec2::254")


@dataclass(frozen=True, kw_only=True)
class UrlPolicy:
    """Which URLs may be fetched.

    Attributes:
        allow_hosts: host names (or literal IPs) always allowed, compared case-insensitively; no DNS lookup.
        allow_networks: CIDR networks (``"127.0.0.0/8"``, ``"10.1.0.0/16"``, ``"::1/128"``) whose addresses
            are allowed even though they are internal.
        allowed_schemes: URL schemes that may be fetched.
    """

    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = ("http", "https")

    def __post_init__(self) -> None:
        for name in ("allow_hosts", "allow_networks", "allowed_schemes"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}={value!r} must be a tuple of strings")
            object.__setattr__(self, name, tuple(value))
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(f"allow_networks entry {cidr!r} is not a CIDR network: {err}") from None
        object.__setattr__(self, "allow_hosts", tuple(_normalise_host(h) for h in self.allow_hosts))
        object.__setattr__(self, "allowed_schemes", tuple(s.lower() for s in self.allowed_schemes))

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow_networks)


def check_url(url: str, policy: UrlPolicy) -> str | None:
    """Why ``url`` must not be fetched under ``policy``, or None when it may be.

    Every address the host resolves to (``socket.getaddrinfo``) must be acceptable, not just the first.
    """
    host, refusal = split_url(url, policy)
    if refusal is not None or host is None:
        return refusal
    return _check_host(host, policy)


def check_urls(urls: Sequence[str | None], policy: UrlPolicy, *, threads: int = 32) -> list[str | None]:
    """``check_url`` for many URLs: each distinct host is resolved once, ``threads`` lookups at a time."""
    parsed = [split_url(url, policy) for url in urls]
    hosts = sorted({host for host, refusal in parsed if refusal is None and host is not None})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(hosts) or 1))) as pool:
        verdicts = dict(zip(hosts, pool.map(lambda h: _check_host(h, policy), hosts), strict=True))
    return [refusal if refusal is not None or host is None else verdicts[host] for host, refusal in parsed]


def classify_address(address: IpAddress) -> str | None:
    """The kind of internal address ``address`` is ("loopback", "private", ...), or None when public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "non-global"
    return None


def split_url(url: str | None, policy: UrlPolicy) -> tuple[str | None, str | None]:
    """(normalised host, None) for a URL worth resolving, else (None, refusal reason)."""
    if not isinstance(url, str) or not url.strip():
        return None, "missing url"
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError as err:
        return None, f"invalid url: {err}"
    if parts.scheme.lower() not in policy.allowed_schemes:
        return None, f"scheme not allowed: {parts.scheme or '(none)'!r}"
    if not parts.hostname:
        return None, "missing host"
    return _normalise_host(parts.hostname), None


def _normalise_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _check_host(host: str, policy: UrlPolicy) -> str | None:
    return None if host in policy.allow_hosts else check_host(host, policy)[1]


def check_host(host: str, policy: UrlPolicy) -> tuple[list[str], str | None]:
    """(the addresses of ``host`` to connect to, None), or ([], why it is refused).

    The host is resolved once; every address must be acceptable. A host in ``allow_hosts`` is resolved too
    (a connection needs an address) but its addresses are not judged.
    """
    addresses = _resolve(host)
    if not addresses:
        return [], f"unresolvable host {host!r}"
    if host not in policy.allow_hosts:
        networks = policy.networks
        for address in addresses:
            kind = classify_address(address)
            if kind is None or any(address in net for net in networks if net.version == address.version):
                continue
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            if mapped is not None and any(mapped in net for net in networks if net.version == 4):
                continue
            shown = f"::ffff:{mapped}" if mapped is not None else str(address)
            suffix = " (cloud metadata)" if _is_metadata_range(address) else ""
            return [], f"host resolves to {kind} address {shown}{suffix}"
    return [str(a) for a in addresses], None


def _is_metadata_range(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address == _METADATA_V6:
            return True
        address = address.ipv4_mapped or address
    return address.version == 4 and address in ipaddress.ip_network("169.254.0.0/16")


def _resolve(host: str) -> list[IpAddress]:
    """All addresses of ``host``; a literal IP is its own answer. Empty when the name does not resolve."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return _unique(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos)


def _unique(addresses: Iterable[IpAddress]) -> list[IpAddress]:
    return list(dict.fromkeys(addresses))
