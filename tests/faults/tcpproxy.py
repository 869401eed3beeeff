"""A TCP proxy for tests that can black-hole a link (bytes vanish, sockets stay open) and restore it."""

from __future__ import annotations

import socket
import threading


class Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target until cut() and again after restore()."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.closed = threading.Event()
        self.generation = 0
        self.links: list[tuple[socket.socket, socket.socket, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                gen = self.generation
                self.links.append((client, upstream, gen))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, gen), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.open.is_set() and gen == self.generation:
                try:
                    dst.sendall(data)
                except OSError:
                    break
            # else: the link is cut; the bytes vanish and nobody is told
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        """Silently drop everything: a partition, not a reset."""
        self.open.clear()

    def restore(self) -> None:
        """Forward again; links that lived through the cut are closed (their peers gave up on them)."""
        with self.lock:
            self.generation += 1
            old, self.links = self.links, []
        for a, b, _ in old:
            for s in (a, b):
                try:
                    # shutdown first: close() alone neither wakes a pump blocked in recv() on the socket nor
                    # sends the FIN until that recv() returns, so a peer with nothing more to send would
                    # never learn that the link is gone
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass
        self.open.set()

    def close(self) -> None:
        self.closed.set()
        self.restore()
        self.server.close()
