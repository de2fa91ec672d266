"""Opening a source with PyAV so that every byte comes through the allow-list.

HTTP(S) and files are read by our own code, handed to FFmpeg through PyAV's ``io_open``: FFmpeg asks
for every URL it wants (the source, an HLS playlist's segments, a redirect target), and each one is
checked by ``SourcePolicy`` and fetched from the checked address (``HttpFile``: HTTP/1.1 with range
requests for seeking, redirects re-checked, TLS verified against the host name). RTSP is read by
FFmpeg itself over TCP (``rtsp_transport=tcp``) from the URL rewritten to the checked address, with
FFmpeg's socket timeouts; FFmpeg follows an RTSP server's redirect (3xx) without asking, which the
README lists as a limitation.
"""

from __future__ import annotations

import base64
import http.client
import io
import socket
import ssl
from typing import Any
from urllib.parse import urljoin, urlsplit

import av
import av.error

from .policy import PolicyError, SourcePolicy, Target, redact

MAX_REDIRECTS = 5
BUFFER_SIZE = 64 * 1024
USER_AGENT = "vss-sources/1"
# Demuxers an HTTP or file source may use (FFmpeg's format_whitelist; HLS passes it on to its segments):
# video containers, HLS, MJPEG over HTTP and raw elementary streams. Playlist-like demuxers that open
# other files (concat, dash, ...) and the hundreds of exotic ones are left out: less parser surface.
FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,hls,mpjpeg,mjpeg,jpeg_pipe,png_pipe,"
           "h264,hevc,m4v,ivf")


class SourceError(Exception):
    """Reading a source failed; ``permanent`` errors end the source (failed), others are retried."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.message, self.permanent = message, permanent


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to a checked address; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedTLSConnection(_PinnedConnection):
    """HTTPS to a checked address, the certificate verified against the host name (SNI too)."""

    _context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class HttpFile(io.RawIOBase):
    """A read-only file over HTTP(S): sequential reads, seeks by range requests when the server has them."""

    def __init__(self, target: Target, policy: SourcePolicy, timeout_s: float) -> None:
        super().__init__()
        self.target, self.policy, self.timeout_s = target, policy, timeout_s
        self._pos = 0
        self._conn: _PinnedConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._length: int | None = None
        self._ranges = False
        self._open(0)

    def _open(self, start: int) -> None:
        """Request the body from byte ``start``, following (re-checked) redirects."""
        self._drop()
        target = self.target
        for _ in range(MAX_REDIRECTS + 1):
            assert target.host is not None and target.port is not None and target.address is not None
            kind = _PinnedTLSConnection if target.scheme == "https" else _PinnedConnection
            conn = kind(target.host, target.port, target.address, self.timeout_s)
            parts = urlsplit(target.url)
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-"
            if parts.username is not None:
                token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            try:
                conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                             headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise SourceError(f"{redact(target.url)}: {_describe(e)}") from e
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                location = urljoin(target.url, resp.getheader("Location", ""))
                conn.close()
                target = self._recheck(location)
                continue
            if resp.status == 416 and start:  # asked for bytes past the end: an empty read
                self._conn, self._resp, self._pos = conn, None, start
                conn.close()
                return
            if resp.status not in (200, 206) or (start and resp.status != 206):
                conn.close()
                retry = resp.status >= 500 or resp.status in (408, 429)
                raise SourceError(f"{redact(target.url)}: HTTP {resp.status} {resp.reason}", permanent=not retry)
            self.target, self._conn, self._resp, self._pos = target, conn, resp, start
            if resp.status == 200:
                self._ranges = resp.getheader("Accept-Ranges", "").lower() == "bytes"
                length = resp.getheader("Content-Length")
                self._length = int(length) if length and length.isdigit() else None
            return
        raise SourceError(f"{redact(self.target.url)}: more than {MAX_REDIRECTS} redirects", permanent=True)

    def _recheck(self, url: str) -> Target:
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise SourceError(f"a redirect to {redact(url)} leaves HTTP", permanent=True)
        try:
            return self.policy.check(url)
        except PolicyError as e:
            raise SourceError(f"redirect refused: {e.message}", permanent=True) from e

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    # --- the file interface PyAV uses -----------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._ranges and self._length is not None

    def read(self, size: int = -1) -> bytes:
        if self._resp is None:
            if self._length is not None and self._pos >= self._length:
                return b""
            self._open(self._pos)
            if self._resp is None:
                return b""
        try:
            data = self._resp.read(size if size >= 0 else None)
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"{redact(self.target.url)}: {_describe(e)}") from e
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}.get(whence)
        if base is None:
            raise OSError("cannot seek from the end of a stream of unknown length")
        position = base + offset
        if position != self._pos:
            self._drop()
            self._pos = position
        return position

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def io_opener(target: Target, policy: SourcePolicy, timeout_s: float) -> Any:
    """PyAV's ``io_open``: every URL FFmpeg opens for an HTTP or file source passes the policy (the source's
    own URL was checked as ``target`` just before: it is fetched from that checked address)."""

    def io_open(url: str, flags: int, options: dict[str, str]) -> Any:
        if flags & 2:  # AVIO_FLAG_WRITE
            raise SourceError("a source is read-only", permanent=True)
        scheme = urlsplit(url).scheme.lower()
        try:
            if scheme in ("http", "https"):
                return HttpFile(target if url == target.url else policy.check(url), policy, timeout_s)
            if scheme in ("", "file"):
                path = url[len("file:"):] if scheme == "file" else url
                path = path[len("//"):] if path.startswith("//") else path
                return open(policy.check_file(path), "rb")  # noqa: SIM115 - PyAV closes it
        except PolicyError as e:
            raise SourceError(f"refused inside the source: {e.message}", permanent=True) from e
        raise SourceError(f"a source may not open {scheme}: URLs ({redact(url)})", permanent=True)

    return io_open


def open_container(target: Target, policy: SourcePolicy, connect_s: float, read_s: float) -> Any:
    """Open ``target`` with PyAV (the caller closes it); raises ``SourceError``."""
    micro = str(int(read_s * 1_000_000))
    try:
        if target.scheme == "rtsp":
            options = {"rtsp_transport": "tcp", "timeout": micro, "rw_timeout": micro,
                       "allowed_media_types": "video", "protocol_whitelist": "rtsp,tcp,rtp",
                       "analyzeduration": "1000000"}  # probe 1 s of a live stream, not FFmpeg's 5
            return av.open(target.pinned_url(), options=options, timeout=(connect_s, read_s))
        name = str(target.path) if target.path is not None else target.url
        # http_persistent=0: the HLS demuxer's keep-alive path needs FFmpeg's own HTTP context.
        options = {"http_persistent": "0", "format_whitelist": FORMATS}
        return av.open(name, options=options, io_open=io_opener(target, policy, read_s),
                       buffer_size=BUFFER_SIZE, timeout=(connect_s, read_s))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises FFmpeg errors and re-raises io_open's
        raise classify(e, live=target.scheme == "rtsp") from e


def classify(e: BaseException, live: bool = False) -> SourceError:
    """An exception met while opening or reading a source as a ``SourceError``. From a ``live`` (RTSP)
    source, invalid data is retried: FFmpeg reports a camera that accepted the connection but never
    answered (or answered garbage while rebooting) that way."""
    if isinstance(e, SourceError):
        return e
    if live and isinstance(e, av.error.InvalidDataError):
        return SourceError(f"no valid RTSP answer or stream data ({_describe(e)})")
    if isinstance(e, av.error.InvalidDataError | av.error.DecoderNotFoundError | av.error.DemuxerNotFoundError):
        return SourceError(f"not a video FFmpeg can read ({_describe(e)})", permanent=True)
    if not live and isinstance(e, av.error.ArgumentError):  # what FFmpeg says of a format not in FORMATS
        return SourceError(f"not a video format sources read ({_describe(e)}; formats: {FORMATS})", permanent=True)
    if isinstance(e, av.error.HTTPClientError):
        return SourceError(f"the server refused the request ({_describe(e)})", permanent=True)
    return SourceError(_describe(e))
