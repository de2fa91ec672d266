"""Which URLs a server-side source may open: the ``VSS_SOURCES_*`` allow-list, checked before any fetch.

A source makes the server open a URL of the client's choosing, so nothing is fetched unless:

- the scheme is in ``sources_allowed_schemes`` (rtsp, http, https, file are understood);
- a network host is listed in ``sources_allowed_hosts`` by name (exact, or ``*.suffix``), or EVERY
  address it resolves to lies in a listed address or CIDR network; whatever the list says, link-local
  addresses (169.254.0.0/16, fe80::/10), cloud-metadata endpoints (169.254.169.254, fd00:ec2::254,
  100.100.100.200, ``metadata.google.internal``, ...) and the unspecified addresses are refused;
- a ``file://`` path, with every symbolic link resolved, lies inside ``sources_file_dir``.

``check`` returns a ``Target`` naming the checked address; the fetchers connect to that address (not
to the name again), so a DNS answer that changes between the check and the connection cannot redirect
a source (no DNS rebinding). Refusals raise ``Refused`` (HTTP 403, with the reason), malformed URLs
and names that do not resolve raise ``Malformed`` / ``Unresolvable`` (HTTP 422).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

SUPPORTED_SCHEMES = ("rtsp", "http", "https", "file")
DEFAULT_PORTS = {"rtsp": 554, "http": 80, "https": 443}
MAX_URL_LENGTH = 2048
# Refused whatever the allow-list says: link-local (where the metadata services live), the AWS IPv6 and
# Alibaba metadata endpoints, and "this host" addresses that some stacks route to loopback.
ALWAYS_REFUSED = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32", "0.0.0.0/8", "::/128"))
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com", "metadata.tencentyun.com"})
_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class PolicyError(Exception):
    """A URL the policy will not open; ``status``/``code`` are the HTTP answer."""

    status, code = 403, "source_refused"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(PolicyError):
    """Well-formed, but the allow-list does not permit it (403)."""


class Malformed(PolicyError):
    """Not a URL a source can be made of (422)."""

    status, code = 422, "invalid_source_url"


class Unresolvable(Malformed):
    """The host name does not resolve (422 when creating a source; a retryable error when reconnecting)."""


@dataclass(frozen=True)
class Target:
    """A checked URL: ``address`` is what a network fetcher connects to, ``path`` the resolved file."""

    url: str
    scheme: str
    host: str | None = None  # lower-case host name or address literal (network schemes)
    port: int | None = None
    address: str | None = None  # the checked IP address (network schemes)
    path: Path | None = None  # the resolved file (file://)

    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (user info, port and path kept)."""
        if self.address is None:
            return self.url
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"[{self.address}]" if ":" in self.address else self.address
        netloc = (f"{userinfo}@" if userinfo else "") + f"{host}:{self.port}"
        return parts._replace(netloc=netloc).geturl()


def redact(url: str) -> str:
    """The URL without a password, for state reports and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed url>"
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _plain(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as the IPv4 address it reaches."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refused_reason(ip: IPAddress) -> str | None:
    """Why an address is never connected to, or None."""
    ip = _plain(ip)
    if any(ip in net for net in ALWAYS_REFUSED if net.version == ip.version):
        return f"{ip} is a link-local, cloud-metadata or unspecified address"
    return None


@dataclass(frozen=True)
class SourcePolicy:
    """The allow-list; build it with ``from_settings``. ``resolver`` is replaceable (tests)."""

    schemes: frozenset[str]
    networks: tuple[IPNetwork, ...] = ()
    names: tuple[str, ...] = ()
    file_dir: Path | None = None
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, settings: Any, resolver: Resolver = system_resolver) -> SourcePolicy:
        names, networks = parse_hosts(settings.sources_allowed_hosts)
        file_dir = settings.sources_file_dir
        return cls(frozenset(s.lower() for s in settings.sources_allowed_schemes), tuple(networks), tuple(names),
                   Path(file_dir).resolve() if file_dir is not None else None, resolver)

    def describe(self) -> dict[str, Any]:
        """The allow-list as shown by ``GET /v1/sources``."""
        return {"schemes": sorted(self.schemes), "hosts": [*self.names, *map(str, self.networks)],
                "file_dir": str(self.file_dir) if self.file_dir is not None else None}

    # --- the checks --------------------------------------------------------------------------------
    def check(self, url: str) -> Target:
        """Check a source URL (or a URL met while reading one: a redirect, an HLS segment)."""
        parts = _split(url)
        scheme = parts.scheme.lower()
        if scheme not in SUPPORTED_SCHEMES or scheme not in self.schemes:
            allowed = ", ".join(s for s in SUPPORTED_SCHEMES if s in self.schemes) or "none"
            raise Refused(f"the scheme {scheme!r} is not allowed for sources (allowed: {allowed})")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise Malformed(f"a file URL names no host (file:///path), got {parts.netloc!r}")
            if parts.query or parts.fragment:
                raise Malformed("a file URL takes no query or fragment")
            return Target(url, scheme, path=self.check_file(unquote(parts.path)))
        host, port = _host_port(parts, scheme)
        return Target(url, scheme, host, port, self.check_host(host, port))

    def check_host(self, host: str, port: int) -> str:
        """Resolve ``host`` and check every address; returns the one to connect to."""
        if host in METADATA_HOSTS:
            raise Refused(f"{host} is a cloud-metadata host")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and refused_reason(literal):
            raise Refused(str(refused_reason(literal)))
        if not self.names and not self.networks:
            raise Refused("network sources are off: list the cameras' hosts or networks in "
                          "VSS_SOURCES_ALLOWED_HOSTS")
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = self.resolver(host, port)
            except (OSError, UnicodeError) as e:
                raise Unresolvable(f"cannot resolve {host}: {getattr(e, 'strerror', None) or e}") from e
            if not addresses:
                raise Unresolvable(f"{host} resolves to no address")
        by_name = literal is None and self._name_allowed(host)
        for text in addresses:
            ip = _plain(ipaddress.ip_address(text.split("%", 1)[0]))
            reason = refused_reason(ip)
            if reason is not None:
                raise Refused(reason if literal is not None else f"{host} resolves to {reason}")
            if not by_name and not any(ip in net for net in self.networks if net.version == ip.version):
                shown = host if literal is not None else f"{host} ({ip})"
                raise Refused(f"{shown} is not in VSS_SOURCES_ALLOWED_HOSTS")
        return addresses[0]

    def check_file(self, path: str) -> Path:
        """The resolved file behind ``path`` (relative paths are inside ``file_dir``), inside ``file_dir``."""
        if self.file_dir is None or "file" not in self.schemes:
            raise Refused("file sources are off: set VSS_SOURCES_FILE_DIR to the one directory they may read")
        if not path or "\x00" in path:
            raise Malformed("a file URL needs a path")
        candidate = Path(path) if Path(path).is_absolute() else self.file_dir / path
        try:
            resolved = candidate.resolve()  # follows every symbolic link before the containment check
        except (OSError, RuntimeError) as e:
            raise Refused(f"cannot resolve {path}: {e}") from e
        if not resolved.is_relative_to(self.file_dir):
            raise Refused("the file is outside VSS_SOURCES_FILE_DIR (symbolic links are followed first)")
        if not resolved.is_file():
            raise Malformed(f"no such file in VSS_SOURCES_FILE_DIR: {resolved.relative_to(self.file_dir)}")
        return resolved

    def _name_allowed(self, host: str) -> bool:
        for name in self.names:
            if name.startswith("*."):
                if host.endswith(name[1:]) and len(host) > len(name) - 1:
                    return True
            elif host == name:
                return True
        return False


def parse_hosts(entries: list[str]) -> tuple[list[str], list[IPNetwork]]:
    """``VSS_SOURCES_ALLOWED_HOSTS`` entries as (host names, networks); raises ``ValueError`` for others."""
    names: list[str] = []
    networks: list[IPNetwork] = []
    for entry in entries:
        entry = entry.strip().lower().rstrip(".")
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            if not _HOST_NAME.fullmatch(entry):
                raise ValueError(f"VSS_SOURCES_ALLOWED_HOSTS: {entry!r} is neither a host name, an address "
                                 f"nor a CIDR network") from None
            names.append(entry)
    return names, networks


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or not url:
        raise Malformed("the source needs a URL")
    if len(url) > MAX_URL_LENGTH:
        raise Malformed(f"a source URL has at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise Malformed("a source URL contains spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise Malformed(f"not a URL: {e}") from e
    if not parts.scheme:
        raise Malformed("the URL has no scheme; use rtsp://, http://, https:// or file://")
    return parts


def _host_port(parts: SplitResult, scheme: str) -> tuple[str, int]:
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise Malformed(f"bad host or port in the URL: {e}") from e
    if not host:
        raise Malformed(f"a {scheme} URL needs a host")
    host = host.rstrip(".")
    if not _HOST_NAME.fullmatch(host) or host.startswith("*."):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise Malformed(f"{host!r} is not a host name or address") from None
    return host, port if port is not None else DEFAULT_PORTS[scheme]
