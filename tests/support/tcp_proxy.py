"""A loopback TCP proxy to Redis that can lose replies: the ambiguous failure a client retries."""

from __future__ import annotations

import socket
import threading
from types import TracebackType

# How long the upstream must stay quiet before a swallowed reply is taken to be complete: by
# then Redis has read and applied the whole request.
_QUIET_SECONDS = 0.3


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:``port`` to Redis on ``upstream_port``.

    Requests of at least ``min_request`` bytes (a batch, not the client's handshake) are
    counted across connections from 1; for those numbered in ``drop``, the request reaches
    Redis and is applied, but its reply is swallowed and the client's connection is closed,
    so the client cannot tell whether the request was applied.
    """

    def __init__(self, upstream_port: int, *, drop: set[int], min_request: int = 4096) -> None:
        self.upstream_port = upstream_port
        self.drop = set(drop)
        self.min_request = min_request
        self.large_requests = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> ReplyDroppingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            link = _Link(client, upstream)
            threading.Thread(target=self._requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._replies, args=(link,), daemon=True).start()

    def _requests(self, link: _Link) -> None:
        """Client → Redis; decides which reply to lose."""
        while True:
            try:
                data = link.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(link.upstream)
                return
            with self._lock:
                link.unanswered += len(data)
                if link.unanswered >= self.min_request and not link.counted:
                    link.counted = True
                    self.large_requests += 1
                    if self.large_requests in self.drop:
                        link.swallow = True
            try:
                link.upstream.sendall(data)
            except OSError:
                _close(link.client)
                return

    def _replies(self, link: _Link) -> None:
        """Redis → client; a swallowed reply ends the connection."""
        while True:
            try:
                data = link.upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(link.client)
                return
            with self._lock:
                swallow = link.swallow
                if not swallow:
                    link.unanswered, link.counted = 0, False
            if swallow:
                self._swallow_rest(link)
                with self._lock:
                    self.dropped += 1
                _close(link.client)
                _close(link.upstream)
                return
            try:
                link.client.sendall(data)
            except OSError:
                _close(link.upstream)
                return

    @staticmethod
    def _swallow_rest(link: _Link) -> None:
        link.upstream.settimeout(_QUIET_SECONDS)
        try:
            while link.upstream.recv(65536):
                pass
        except OSError:
            pass


class _Link:
    """One proxied connection and what its request side has seen since the last reply."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.unanswered = 0
        self.counted = False
        self.swallow = False


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
