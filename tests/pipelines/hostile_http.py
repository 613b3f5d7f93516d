"""Loopback HTTP servers that answer like hostile web hosts: redirects anywhere, loops, endless, slow, bomb
and oversized bodies. Each ``Site`` binds its own 127.0.0.x address, so a URL policy can allow one and refuse
another, and it counts every request it gets (the refused site's count must stay 0).

    with Site("127.0.0.2") as public, Site("127.0.0.3") as internal:
        public.route("/a.jpg", redirect(internal.url("/latest/meta-data/iam.jpg")))
"""

from __future__ import annotations

import contextlib
import gzip
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.pipelines.http_server import photos

Answer = Callable[[BaseHTTPRequestHandler], None]


class Site:
    """A threaded HTTP server on ``host`` (a free port) whose paths answer as routed; unknown paths 404."""

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Answer] = {}
        self.requests: Counter[str] = Counter()
        self.hosts: list[str] = []  # the Host header of each request
        self.sent: Counter[str] = Counter()  # body bytes written per path
        self.stop = threading.Event()
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with site._lock:
                    site.requests[self.path] += 1
                    site.hosts.append(self.headers.get("Host", ""))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
                    site.routes.get(self.path, not_found)(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def route(self, path: str, answer: Answer) -> str:
        self.routes[path] = answer
        return self.url(path)

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def not_found(handler: BaseHTTPRequestHandler) -> None:
    handler.send_error(404, "Not Found")


def body(data: bytes, content_type: str = "image/jpeg", **headers: str) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def photo(index: int = 0) -> Answer:
    return body(photos()[index])


def redirect(location: str, code: int = 302) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def endless(
    site: Site, chunk: bytes = b"\xff" * 65536, *, delay_s: float = 0.0, limit: int = 1 << 30
) -> Answer:
    """A JPEG-typed body with no Content-Length that never ends (until ``limit`` bytes or the client leaves);
    ``delay_s`` between chunks makes a slow drip."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8")
        while site.sent[handler.path] < limit and not site.stop.is_set():
            handler.wfile.write(chunk)
            handler.wfile.flush()
            site.sent[handler.path] += len(chunk)
            if delay_s:
                time.sleep(delay_s)

    return answer


@cache
def gzip_bomb(inflated: int = 256 << 20) -> bytes:
    """``inflated`` zero bytes, gzip-compressed (about a thousandth of the size)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(out.compress(zeros) for _ in range(inflated >> 20)), out.flush()])


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


@cache
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a pixel bomb; its data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
