"""A urllib opener that checks every hop of a download at connect time (pure Python; no Ray).

img2dataset downloads with ``urllib.request.urlopen``, which uses the process's installed opener. Inside
``checked_downloads(policy)`` that opener is ``checked_opener(policy)``:

* **Every hop is checked and pinned.** The connection resolves its host once, refuses it unless every address
  passes the URL policy (``pipelines.ingest.ssrf``: loopback, private, link-local, multicast, reserved and
  IPv4-mapped forms; ``allow_hosts`` / ``allow_networks`` open exceptions), and connects to the address it
  checked. A DNS answer that changes after the check (DNS rebinding) is never used. The Host header and TLS
  SNI / certificate check keep the URL's host name. Environment proxies are ignored (a proxy would resolve
  the host itself, out of reach of the check).
* **Redirects:** each target's scheme is checked before it is followed, loops and chains longer than
  ``max_redirects`` are refused, and the target's host is checked and pinned like the first hop. A refused
  hop fails with the reason "redirect to a refused address" and the chain in the detail.
* **The body** is read up to ``max_bytes`` (a ``Content-Length`` over the cap is refused before reading),
  within a total ``deadline_s`` per URL, redirects included: every read and write of the connection times out
  at the time left, so a slow-drip server cannot hold a thread (a socket timeout alone bounds only each read). A ``Content-Type``
  other than ``image/*`` or a generic binary type is refused; a gzip or deflate ``Content-Encoding`` is
  inflated up to the cap (a gzip bomb stops there), other encodings are refused. An image whose header
  claims more than ``max_pixels`` is refused before anything decodes it.

Every refusal raises :class:`FetchRefused`; img2dataset stores ``str(error)``, which ``short_reason`` turns
back into the reason (``parse_refusal``).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
import time
import urllib.error
import urllib.request
import urllib.response
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

from pipelines.core.images import PILLOW_MAX_PIXELS, ImageError, probe_image
from pipelines.ingest.ssrf import UrlPolicy, check_host, split_url

MARKER = "[refused] "
REDIRECT_REFUSED = "redirect to a refused address"
ADDRESS_REFUSED = "refused address at connect time"
REDIRECT_LOOP = "redirect loop"
TOO_MANY_REDIRECTS = "too many redirects"
TOO_LARGE = "response larger than the byte cap"
TOO_MANY_PIXELS = "image larger than max_pixels"
DEADLINE = "download deadline exceeded"
WRONG_TYPE = "wrong content type"
BAD_ENCODING = "unsupported content encoding"
REASONS = (REDIRECT_REFUSED, ADDRESS_REFUSED, REDIRECT_LOOP, TOO_MANY_REDIRECTS, TOO_LARGE, TOO_MANY_PIXELS,
           DEADLINE, WRONG_TYPE, BAD_ENCODING)  # fmt: skip
BINARY_TYPES = ("application/octet-stream", "binary/octet-stream")
_CHUNK = 1 << 16


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """What a download may do (picklable: it travels to every downloader process).

    Attributes:
        urls: which hosts and schemes may be contacted, on every hop.
        max_redirects: redirects followed per URL.
        max_bytes: body bytes read per URL (after inflating a gzip or deflate encoding).
        max_pixels: refuse an image whose header claims more pixels.
        deadline_s: total time per URL from the first connection to the last byte, redirects included.
    """

    urls: UrlPolicy = field(default_factory=UrlPolicy)
    max_redirects: int = 5
    max_bytes: int = 32 * 2**20
    max_pixels: int = PILLOW_MAX_PIXELS
    deadline_s: float = 60.0


class FetchRefused(Exception):
    """A download refused by the policy; ``str()`` is ``"[refused] <reason> | <detail>"``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{MARKER}{self.reason} | {self.detail}"


def parse_refusal(message: str) -> str | None:
    """The reason of a ``FetchRefused`` message (as img2dataset stored it), or None for other errors."""
    start = message.find(MARKER)
    if start < 0:
        return None
    reason = message[start + len(MARKER) :].split(" | ", 1)[0]
    return reason if reason in REASONS else None


@contextlib.contextmanager
def checked_downloads(policy: FetchPolicy) -> Iterator[None]:
    """Make ``urllib.request.urlopen`` in this process use ``checked_opener(policy)``, then restore it."""
    previous = urllib.request._opener  # urllib keeps the installed opener only here
    urllib.request.install_opener(checked_opener(policy))
    try:
        yield
    finally:
        urllib.request.install_opener(previous)


def checked_opener(
    policy: FetchPolicy, context: ssl.SSLContext | None = None
) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, checking and pinning every hop and capping every body (see module doc);
    ``context`` verifies TLS (default: the system's CAs)."""
    guard = _Guard(policy)
    handlers = [urllib.request.ProxyHandler({}), _HTTPHandler(guard), _HTTPSHandler(guard, context),
                _RedirectHandler(guard), _BodyProcessor(guard), urllib.request.HTTPErrorProcessor(),
                urllib.request.HTTPDefaultErrorHandler(), urllib.request.UnknownHandler()]  # fmt: skip
    opener = urllib.request.OpenerDirector()
    for handler in handlers:
        opener.add_handler(handler)
    return opener


class _Guard:
    """The policy's checks, shared by the handlers of one opener; per-download state lives on the Request."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy

    def pin(self, host: str) -> list[str]:
        """The checked addresses to connect to for ``host`` (FetchRefused when any address is refused)."""
        addresses, refusal = check_host(host, self.policy.urls)
        if refusal is not None:
            raise FetchRefused(ADDRESS_REFUSED, refusal)
        return addresses

    def deadline(self, req: urllib.request.Request) -> float:
        if not hasattr(req, "cascade_deadline"):
            req.cascade_deadline = time.monotonic() + self.policy.deadline_s
            req.cascade_chain = [req.full_url]
        return req.cascade_deadline

    def open(self, handler: Any, connection_class: type, req: urllib.request.Request, **kwargs: Any) -> Any:
        """``handler.do_open`` with a pinned connection; refusals come out as FetchRefused with the chain."""
        deadline = self.deadline(req)

        def connection(*args: Any, **kw: Any) -> _PinnedConnection:
            conn = connection_class(*args, **kw)
            conn.guard, conn.deadline = self, deadline
            return conn

        try:
            return handler.do_open(connection, req, **kwargs)
        except FetchRefused as err:  # from connect(): do_open wraps only OSErrors
            raise self.refused(req, err) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None)
            if isinstance(reason, FetchRefused):
                raise self.refused(req, reason) from None
            if time.monotonic() >= deadline:
                raise FetchRefused(DEADLINE, f"no answer within {self.policy.deadline_s:g} s") from None
            raise

    def refused(self, req: urllib.request.Request, refusal: FetchRefused) -> FetchRefused:
        chain = req.cascade_chain
        if len(chain) < 2:
            return refusal
        return FetchRefused(REDIRECT_REFUSED, f"{refusal.detail}; chain: {' -> '.join(chain)}")


class _PinnedConnection(http.client.HTTPConnection):
    """Connects to the address ``guard.pin`` checked; every read and write ends by the download's deadline."""

    guard: _Guard
    deadline: float

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.guard.pin(
            self.host
        ):  # each one checked; never the name, which may now resolve anew
            try:
                self.sock = socket.create_connection(
                    (address, self.port), self._remaining(), self.source_address
                )
                break
            except OSError as err:
                error = err
        else:
            raise error or OSError(f"cannot connect to {self.host}")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("download deadline exceeded")
        return min(self.timeout, remaining) if isinstance(self.timeout, int | float) else remaining


class _PinnedHTTPConnection(_PinnedConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._remaining)


class _PinnedHTTPSConnection(http.client.HTTPSConnection, _PinnedConnection):
    """TLS over the pinned socket: ``HTTPSConnection.connect`` wraps it with SNI and the URL's host name."""

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._remaining)


class _DeadlineSocket:
    """The socket as http.client uses it (``sendall``, ``makefile``, ``close``), each read and write timed out
    at ``min(socket timeout, time left)``: a slow-drip server cannot hold a download past its deadline."""

    def __init__(self, sock: socket.socket, remaining: Any) -> None:
        self.sock, self.remaining = sock, remaining

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.remaining())
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, owner: _DeadlineSocket) -> None:
        self.owner = owner
        self.raw = owner.sock.makefile("rb", buffering=0)  # closing the connection waits for this reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self.owner.sock.settimeout(self.owner.remaining())
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.guard.open(self, _PinnedHTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self.guard = guard

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.guard.open(self, _PinnedHTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks the target's scheme, loops and the redirect cap before following (its host is checked when the
    next hop connects)."""

    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self.guard = guard

    def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        target = headers.get("location") or headers.get("uri")
        if target is None:
            return None
        target = urljoin(req.full_url, target.strip())
        self.guard.deadline(req)
        chain = [*req.cascade_chain, target]
        shown = " -> ".join(chain)
        _, refusal = split_url(target, self.guard.policy.urls)
        if refusal is not None:
            raise FetchRefused(REDIRECT_REFUSED, f"{refusal}; chain: {shown}")
        if target in req.cascade_chain:
            raise FetchRefused(REDIRECT_LOOP, f"chain: {shown}")
        if len(chain) - 1 > self.guard.policy.max_redirects:
            raise FetchRefused(
                TOO_MANY_REDIRECTS, f"more than {self.guard.policy.max_redirects}; chain: {shown}"
            )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.cascade_deadline = req.cascade_deadline
            new.cascade_chain = [*req.cascade_chain, new.full_url]
        return new


class _BodyProcessor(urllib.request.BaseHandler):
    """Reads a 2xx body within the caps and hands urllib a buffered copy (before HTTPErrorProcessor)."""

    handler_order = 900

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        if not 200 <= response.status < 300:
            return response
        try:
            body = self._read(req, response)
        finally:
            response.close()
        buffered = urllib.response.addinfourl(
            io.BytesIO(body), response.headers, response.url, response.status
        )
        buffered.msg = response.reason  # HTTPErrorProcessor reads it, as on http.client's response
        return buffered

    https_response = http_response

    def _read(self, req: urllib.request.Request, response: Any) -> bytes:
        policy = self.guard.policy
        kind = (response.headers.get_content_type() or "").lower()
        if (
            response.headers.get("content-type")
            and not kind.startswith("image/")
            and kind not in BINARY_TYPES
        ):
            raise FetchRefused(WRONG_TYPE, f"Content-Type {response.headers.get('content-type')!r}")
        encoding = (response.headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise FetchRefused(BAD_ENCODING, f"Content-Encoding {encoding!r}")
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise FetchRefused(TOO_LARGE, f"Content-Length {length} > {policy.max_bytes}")
        inflate = None if encoding == "identity" else zlib.decompressobj(zlib.MAX_WBITS | 32)
        out = bytearray()
        while True:
            try:
                chunk = response.read1(_CHUNK)
            except (OSError, http.client.HTTPException):
                if time.monotonic() < req.cascade_deadline:
                    raise
                raise FetchRefused(DEADLINE, f"{len(out)} bytes after {policy.deadline_s:g} s") from None
            if not chunk:
                break
            if inflate is not None:
                chunk = _inflate(inflate, chunk, policy.max_bytes - len(out))
            out += chunk
            if len(out) > policy.max_bytes:
                raise FetchRefused(TOO_LARGE, f"more than {policy.max_bytes} bytes ({encoding})")
        try:
            probe_image(bytes(out), max_pixels=policy.max_pixels)
        except ImageError as err:
            if err.reason == "decompression bomb":
                raise FetchRefused(TOO_MANY_PIXELS, err.detail) from None
        return bytes(out)


def _inflate(inflate: Any, chunk: bytes, room: int) -> bytes:
    """Inflate ``chunk``, producing at most ``room + 1`` bytes (one past the cap is enough to refuse)."""
    try:
        return inflate.decompress(chunk, room + 1)
    except zlib.error as err:
        raise FetchRefused(BAD_ENCODING, f"the body does not inflate: {err}") from None
