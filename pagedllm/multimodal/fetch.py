"""GET of an http(s) media URL that clients cannot turn against the server's own network (SSRF).

Host names are resolved once, inside the connection's network backend; unless the policy allows private addresses,
every answer must be a public unicast address, and the socket connects to an address that was checked (no second
lookup that a rebinding DNS server could answer differently). Redirects are followed by hand, each hop checked
like the first (scheme, allowed domains, addresses). Bodies are read under a byte cap while they stream (no
compression is asked for, so none is inflated), and the whole fetch, redirects included, runs under one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any, AsyncIterator, Iterable
from urllib.parse import SplitResult, quote, urljoin, urlsplit

import httpcore

from pagedllm.multimodal.policy import MediaError, MediaPolicy

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_KINDS = ("loopback", "unspecified", "link_local", "multicast", "reserved", "private")  # the most telling first
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64, IPv4-compatible): a route to it."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: Address) -> str | None:
    """What makes `ip` no place to fetch from; None for a public unicast address."""
    for kind in _KINDS:
        if getattr(ip, f"is_{kind}"):
            return ("an " if kind[0] in "aeiou" else "a ") + kind.replace("_", "-")
    return None if ip.is_global else "a non-public"  # e.g. 100.64/10, shared by carriers: neither private nor public


def address_error(address: str) -> str | None:
    """Why media may not be fetched from `address`; None for a public unicast address."""
    ip: Address = ipaddress.ip_address(address.split("%", 1)[0])  # a link-local IPv6 address may carry a %scope
    kind = _kind(ip)
    if kind in ("a loopback", "an unspecified", "a link-local", "a multicast"):
        return f"{ip} ({kind} address)"
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        error = address_error(str(inner))
        if error is not None:
            return f"{ip}, which carries {error}"
        if ip.ipv4_mapped is not None or ip in _NAT64:  # a route to `inner` alone, which is public
            return None
    return None if kind is None else f"{ip} ({kind} address)"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int, policy: MediaPolicy) -> list[str]:
    """The addresses to connect to for `host`, each one checked; refuses the name if any answer is not public."""
    name = host.rstrip(".").lower()
    if not policy.allow_private_ips and (name == "localhost" or name.endswith(".localhost")):
        raise MediaError(f"{host} is the server itself; media URLs must point to public addresses.")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise MediaError(f"could not resolve the host {host!r}: {error}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise MediaError(f"the host {host!r} has no address.")
    if not policy.allow_private_ips:
        for address in addresses:  # one private answer refuses the name: a mix is how rebinding hides
            error = address_error(address)
            if error is not None:
                where = f"the URL points to {error}" if _is_ip(host) else f"{host} resolves to {error}"
                raise MediaError(f"{where}; media URLs must point to public addresses.")
    return addresses


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses that `resolve` checked."""

    def __init__(self, policy: MediaPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for address in await resolve(host, port, self.policy):
            try:  # an IP literal: anyio connects to it as it is, with no lookup of its own
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise MediaError("media are not fetched over unix sockets.")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def new_pool(policy: MediaPolicy) -> httpcore.AsyncConnectionPool:
    """A connection pool (no proxies from the environment: the checked address is the one dialled)."""
    return httpcore.AsyncConnectionPool(network_backend=CheckedBackend(policy), max_connections=16, retries=0)


def check_http_url(url: str, policy: MediaPolicy) -> SplitResult:
    """`url` split, if its scheme is http(s) and its host allowed (--allowed-media-domains)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as error:
        raise MediaError(f"not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"URL scheme {parts.scheme or 'none'!r} is not fetched; use http(s) or a data: URL.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise MediaError("the URL has no host.")
    domains = policy.allowed_media_domains
    if domains is not None and host.lower() not in domains:
        raise MediaError(f"the host {host!r} is not one of --allowed-media-domains ({', '.join(sorted(domains))}).")
    return parts


def _request_target(parts: SplitResult) -> tuple[httpcore.URL, bytes]:
    """The URL httpcore is given, built from our own parse (so the host checked is the host dialled), and the
    Host header (httpcore's own would write an IPv6 host without brackets)."""
    host = (parts.hostname or "").rstrip(".")
    try:
        ascii_host = host.encode("ascii") if ":" in host else host.encode("idna")
    except UnicodeError:
        raise MediaError(f"the host {host!r} is not a valid host name.") from None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~") + (f"?{quote(parts.query, safe='/?%:@!$&()*+,;=~')}"
                                                                  if parts.query else "")
    shown = f"[{host}]" if ":" in host else ascii_host.decode()
    header = shown if parts.port is None else f"{shown}:{parts.port}"
    url = httpcore.URL(scheme=parts.scheme.encode(), host=ascii_host, port=port, target=target.encode())
    return url, header.encode()


async def _read_capped(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise MediaError(f"the image is larger than {max_bytes} bytes.")
    return bytes(body)


async def _get(url: str, policy: MediaPolicy, pool: httpcore.AsyncConnectionPool) -> bytes:
    timeouts = {"connect": policy.fetch_timeout, "read": policy.fetch_timeout, "write": policy.fetch_timeout,
                "pool": policy.fetch_timeout}
    for _ in range(policy.max_redirects + 1):
        target, host = _request_target(check_http_url(url, policy))
        headers = [(b"Host", host), (b"Accept", b"image/*"), (b"Accept-Encoding", b"identity"),
                   (b"User-Agent", b"pagedllm")]
        async with pool.stream("GET", target, headers=headers, extensions={"timeout": timeouts}) as response:
            fields = {name.lower(): value for name, value in response.headers}
            if response.status in _REDIRECTS:
                if not policy.allow_redirects:
                    raise MediaError(f"the server answered a redirect (HTTP {response.status}), and redirects are "
                                     "not followed (PAGEDLLM_MEDIA_URL_ALLOW_REDIRECTS=0).")
                if b"location" not in fields:
                    raise MediaError(f"the server answered HTTP {response.status} without a Location.")
                url = urljoin(url, fields[b"location"].decode("latin-1"))
                continue
            if response.status != 200:
                raise MediaError(f"the server answered HTTP {response.status}.")
            length = fields.get(b"content-length", b"").strip()
            if length.isdigit() and int(length) > policy.max_bytes:
                raise MediaError(f"the image is {int(length)} bytes; the limit is {policy.max_bytes}.")
            return await _read_capped(response.aiter_stream(), policy.max_bytes)
    raise MediaError(f"more than {policy.max_redirects} redirects.")


async def fetch_bytes(url: str, policy: MediaPolicy, pool: httpcore.AsyncConnectionPool) -> bytes:
    """The body of GET `url`, within the policy's deadline and size limit; any failure is a MediaError."""
    try:
        return await asyncio.wait_for(_get(url, policy, pool), policy.fetch_timeout)
    except (asyncio.TimeoutError, httpcore.TimeoutException):
        raise MediaError(f"fetching took longer than {policy.fetch_timeout:g} s.") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as error:
        raise MediaError(f"could not fetch it: {type(error).__name__} {error}".rstrip() + ".") from None
