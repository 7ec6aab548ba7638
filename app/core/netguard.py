"""Outbound requests a user can aim (webhooks, MLflow tracking URIs) must not reach the studio's own network.

A URL is allowed when every address its host resolves to is a public (globally routable, unicast) address,
or when the admin allow-listed the host (``PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS``: names, addresses or CIDR
networks). Refused: loopback, private (RFC 1918, IPv6 ULA), link-local, CGNAT (100.64/10), multicast,
unspecified, reserved and documentation ranges, cloud metadata addresses (169.254.169.254, fd00:ec2::254), and
IPv4 hidden inside IPv6 (``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). The check runs on
the *resolved* addresses, so ``localhost``, ``2130706433``, ``0x7f.1`` or a public name pointing at
127.0.0.1 are all caught, and :func:`pinned_request` then connects to the very address that was checked (the
URL's host is replaced by the address; ``Host`` and TLS SNI/certificate checks keep the name), so a DNS answer
that changes between the check and the connection (rebinding) gains nothing.

Written here rather than taken from a library: the maintained SSRF filters for Python wrap ``requests``, not
httpx, and the check itself is the standard library's ``ipaddress`` classification plus a few ranges.
"""

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httpx

from app.core.errors import InvalidSpec
from app.core.settings import get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_REDIRECTS = 3


class BlockedAddress(Exception):
    """The URL's host is (or resolves to) an address outbound requests may not reach."""


class Unresolvable(Exception):
    """The URL's host does not resolve (now)."""


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# Tests replace this to make a name resolve to an address of their choice.
resolve: Callable[[str, int], list[str]] = _system_resolve


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why an address may not be reached (e.g. "a loopback address"), or None when it is public."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        problem = address_problem(inner)
        return f"{problem} (inside an IPv6 address)" if problem else None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private-network address"),
        (address in ipaddress.ip_network("100.64.0.0/10"), "a carrier-grade NAT address"),
        (not address.is_global, "an address that is not publicly routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


@lru_cache(maxsize=8)
def _allow_list(raw: str) -> tuple[frozenset[str], tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    names: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in (part.strip().strip("[]").lower().rstrip(".") for part in raw.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry)
    return frozenset(names), tuple(networks)


def host_allow_listed(host: str, address: IPAddress | None = None) -> bool:
    """Whether the admin allow-listed this host name, or a network holding ``address``."""
    names, networks = _allow_list(get_settings().outbound_allowed_hosts)
    if host.lower().rstrip(".") in names:
        return True
    return address is not None and any(address in network for network in networks)


@dataclass(frozen=True)
class Target:
    """A checked URL: its host, port, and the address to connect to."""

    url: str
    host: str
    port: int
    address: str


def check_url(url: str, schemes: tuple[str, ...] = ("http", "https")) -> Target:
    """Resolve the URL's host and check every address; raises BlockedAddress or Unresolvable."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:  # e.g. an unclosed or invalid [IPv6] host
        raise BlockedAddress(f"{url!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in schemes or not host:
        raise BlockedAddress(f"{url!r} is not an {'/'.join(schemes)} URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise BlockedAddress(f"{url!r} has an invalid port") from exc
    try:
        resolved = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"the host {host!r} does not resolve") from exc
    if not resolved:
        raise Unresolvable(f"the host {host!r} does not resolve")
    for address in resolved:
        problem = address_problem(address)
        if problem and not host_allow_listed(host, address):
            shown = "" if host.strip("[]") == str(address) else f" resolves to {address}, which"
            raise BlockedAddress(
                f"the host {host!r}{shown} is {problem}; the studio does not send requests into its own "
                "network unless the admin allow-lists the host (PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS)"
            )
    return Target(url=url, host=host, port=port, address=str(resolved[0]))


def check_user_url(url: str, field: str, what: str) -> None:
    """For a URL a user submits: InvalidSpec (a 422 naming ``field``) when it points into a refused range.

    A host that does not resolve now is accepted (it may be a name not yet published); every request checks
    it again.
    """
    try:
        check_url(url)
    except BlockedAddress as exc:
        raise InvalidSpec(f"The {what} {url!r} is not allowed: {exc}.", field=field) from exc
    except Unresolvable:
        return


def pinned_request(
    client: httpx.Client, method: str, url: str, follow_redirects: int = MAX_REDIRECTS, **kwargs: object
) -> httpx.Response:
    """Send a request to the checked address of ``url``'s host; follow 307/308 redirects, checking each.

    Raises BlockedAddress / Unresolvable before any connection is made to a refused address.
    """
    for _ in range(follow_redirects + 1):
        target = check_url(url)
        request_url = httpx.URL(url)
        pinned = request_url.copy_with(host=target.address)
        headers = dict(kwargs.pop("headers", None) or {})  # type: ignore[call-overload]
        headers["Host"] = request_url.netloc.decode("ascii")
        extensions = {"sni_hostname": target.host} if request_url.scheme == "https" else {}
        kwargs["headers"] = headers
        response = client.request(method, pinned, extensions=extensions, **kwargs)  # type: ignore[arg-type]
        if response.status_code not in (307, 308) or "location" not in response.headers:
            return response
        url = str(request_url.join(response.headers["location"]))
    return response


MLFLOW_FIELD = "tracking.mlflow_tracking_uri"


def mlflow_uri_problem(uri: str, local_allowed: bool) -> str | None:
    """Why a job may not use this MLflow tracking URI, or None.

    http(s) servers must resolve to allowed addresses (for everyone: the admin allow-lists an internal
    server); anything else (``file://``, ``sqlite://``, a database URL, a bare path) reads or writes the
    worker's own disk or network, so only the admin's jobs may use it.
    """
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:
        return f"it is not a valid URI ({exc})"
    if scheme in ("http", "https"):
        try:
            check_url(uri)
        except BlockedAddress as exc:
            return str(exc)
        except Unresolvable:
            return None  # MLflow itself reports an unreachable server; nothing internal is reached
        return None
    if local_allowed:
        return None
    return (
        "only an http(s) MLflow server may be named by a non-admin user; local stores (file://, sqlite://, "
        "database URLs, paths) are for the admin (leave it empty for the studio's own store)"
    )


def check_mlflow_uri(uri: str | None, local_allowed: bool) -> None:
    """InvalidSpec naming ``tracking.mlflow_tracking_uri`` when a job may not use this URI."""
    if not uri:
        return
    problem = mlflow_uri_problem(uri.strip(), local_allowed)
    if problem:
        raise InvalidSpec(
            f"tracking.mlflow_tracking_uri {uri!r} is not allowed: {problem}.", field=MLFLOW_FIELD
        )
