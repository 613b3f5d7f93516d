"""A TCP proxy on loopback whose ``outage`` drops every connection and refuses new ones for a while: an S3
server restart as clients see it (the objects behind it survive, as on a real server)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = self._free_port()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.dropped = 0
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _listen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by an outage or close()
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def outage(self, seconds: float) -> None:
        """Refuse and reset everything for ``seconds`` (live requests die mid-transfer), then serve again."""
        with self.lock:
            self.server.close()
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
                # close() alone does not wake a pump blocked in recv() on this socket, and the socket stays open
                # until that recv returns: a client then waits out its read timeout (60 s per try) instead of
                # seeing the server go away. shutdown() wakes the pumps at once.
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.dropped += len(conns) // 2
        time.sleep(seconds)
        self._listen()

    def close(self) -> None:
        with self.lock:
            self.server.close()
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.close()
