"""A local HTTP server on 127.0.0.1 that serves real photos under arbitrary URL paths, for ingest tests.

Photos are scikit-image's bundled samples (astronaut, chelsea, coffee, rocket) encoded as JPEG in memory, so
tests work in a plain clone without network. Paths can also answer 404, answer HTML with status 200, or hang
past a client's timeout (bounded: a hanging handler gives up after ``hang_s`` or when the server stops).

    with PhotoServer() as server:
        urls = server.serve_urls(laion_urls, not_found={3}, html={5}, hang={7})
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HTML = b"<!doctype html><html><head><title>Not an image</title></head><body><p>hello</p></body></html>"


@dataclass(frozen=True)
class Response:
    """What a path answers: ``kind`` is "image", "html", "not_found" or "hang"."""

    kind: str
    body: bytes = b""
    content_type: str = "image/jpeg"


@cache
def photos() -> tuple[bytes, ...]:
    """Four real photos from scikit-image as JPEG bytes (quality 90)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return tuple(out)


def local_url(original: str, base_url: str) -> str:
    """``http://host[:port]/path?query`` -> ``{base_url}/host[:port]/path?query`` (fragment dropped)."""
    parts = urlsplit(original)
    host = parts.netloc.rsplit("@", 1)[-1]
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    return f"{base_url}/{host}{path}" + (f"?{parts.query}" if parts.query else "")


def request_target(url: str) -> str:
    """The request target (path and query) a client sends for ``url``."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class PhotoServer:
    """Threaded HTTP server on 127.0.0.1 with a free port; use as a context manager.

    Attributes:
        base_url: ``http://127.0.0.1:PORT``.
        requests: how often each request target was asked for.
    """

    def __init__(self, *, hang_s: float = 5.0) -> None:
        self.hang_s = hang_s
        self.routes: dict[str, Response] = {}
        self.requests: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _handler_class(self))
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> PhotoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def add(self, url: str, response: Response) -> None:
        self.routes[request_target(url)] = response

    def serve_urls(
        self,
        originals: Sequence[str],
        *,
        not_found: Iterable[int] = (),
        html: Iterable[int] = (),
        hang: Iterable[int] = (),
    ) -> list[str]:
        """Rewrite ``originals`` to this server and route them; the given row numbers misbehave, every other
        row serves photo ``row % 4``. Returns the local URLs."""
        special = {i: "not_found" for i in not_found} | {i: "html" for i in html} | {i: "hang" for i in hang}
        urls = [local_url(url, self.base_url) for url in originals]
        for i, url in enumerate(urls):
            kind = special.get(i, "image")
            body = {"image": photos()[i % len(photos())], "html": HTML}.get(kind, b"")
            self.add(url, Response(kind, body, "text/html" if kind == "html" else "image/jpeg"))
        return urls

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests[handler.path] += 1
        response = self.routes.get(handler.path, Response("not_found"))
        if response.kind == "hang":
            self._stop.wait(self.hang_s)  # bounded: the client times out first, the thread still exits
            response = Response("not_found")
        if response.kind == "not_found":
            handler.send_error(404, "Not Found")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", response.content_type)
        handler.send_header("Content-Length", str(len(response.body)))
        handler.end_headers()
        handler.wfile.write(response.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops SYNs under 16+ parallel clients: 1 s stalls


def _handler_class(server: PhotoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                server.answer(self)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    return Handler
