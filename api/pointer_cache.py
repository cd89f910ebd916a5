"""A process-local cache of latest-version pointers, invalidated by Redis key tracking.

Reading the ``latest`` pointer from Redis on every prediction costs a round trip. Instead,
one connection asks Redis to report every change to ``model:*`` keys (``CLIENT TRACKING …
BCAST PREFIX model:``, redirected to itself and read as pub/sub messages). A change to a
series' hash drops its cached pointer; a FLUSHALL or a lost connection drops them all.

Read-your-writes across processes: Redis queues the invalidation for this connection while
it executes the fit's write, before it answers the fitting process; the fit's HTTP answer
can only reach its client after that. Before each lookup the connection is drained without
blocking (a zero-timeout ``poll``; the socket is read only when something arrived), so a
prediction sent after the fit's answer finds the pointer invalidated. (Across
hosts this relies on the invalidation reaching this host no later than the client's next
request; ``LATEST_POINTER_TRACKING=false`` reads Redis on every request instead.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import time
from urllib.parse import unquote, urlparse

from detector.redis_keys import MODEL_PREFIX, series_of_model_key

log = logging.getLogger(__name__)

_CHANNEL = b"__redis__:invalidate"
_RECONNECT_SECONDS = 1.0


class _Incomplete(Exception):
    pass


class _ErrorReply(bytes):
    """A RESP error line (``-ERR …``)."""


def _parse(buf: bytes | bytearray, pos: int) -> tuple[object, int]:
    """One RESP2 value from ``buf`` at ``pos``: (value, next position); raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == b"-":
        return _ErrorReply(line), pos
    if kind in (b"+", b":"):
        return line, pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"unexpected RESP type {kind!r}")


def _command(*parts: str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class LatestPointerCache:
    """series_id → latest version, trusted only while the tracking connection is healthy."""

    def __init__(self, redis_url: str, *, max_entries: int = 1_000_000) -> None:
        self.redis_url = redis_url
        self.max_entries = max_entries
        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None  # readiness of _sock, without reading it
        self._buffer = bytearray()
        self._pointers: dict[str, int] = {}
        self.generation = 0  # bumped by every invalidation: guards fills racing a change
        self._next_attempt = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self._sock is not None

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._ensure_connected()
        self._task = asyncio.create_task(self._keep_draining(), name="latest-pointer-tracking")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop_connection()

    async def _keep_draining(self) -> None:
        # Drain even when no prediction comes, so Redis never buffers invalidations for us.
        while True:
            await asyncio.sleep(0.5)
            self.drain()
            if self._sock is None:
                await self._ensure_connected()

    async def _ensure_connected(self) -> None:
        if self._sock is not None or time.monotonic() < self._next_attempt:
            return
        self._next_attempt = time.monotonic() + _RECONNECT_SECONDS
        try:
            sock = await asyncio.to_thread(self._connect)
        except (OSError, ValueError) as exc:
            log.debug("pointer tracking unavailable (%s); reading Redis each time", exc)
            return
        self._pointers.clear()
        self._buffer.clear()
        self.generation += 1
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        self._sock, self._poller = sock, poller
        log.info("latest-version pointers cached in process, invalidated by Redis tracking")

    def _connect(self) -> socket.socket:
        url = urlparse(self.redis_url)
        sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), 2.0)
        try:
            reader = _BlockingReader(sock)
            if url.password:
                user = unquote(url.username) if url.username else None
                auth = (
                    ("AUTH", user, unquote(url.password))
                    if user
                    else ("AUTH", unquote(url.password))
                )
                reader.call(*auth)
            client_id = reader.call("CLIENT", "ID")
            assert isinstance(client_id, bytes)
            reader.call(
                "CLIENT",
                "TRACKING",
                "on",
                "REDIRECT",
                client_id.decode(),
                "BCAST",
                "PREFIX",
                MODEL_PREFIX,
            )
            reader.call("SUBSCRIBE", _CHANNEL.decode())
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._poller = None, None
        self._pointers.clear()
        self.generation += 1

    # -------------------------------------------------------------- the cache

    def drain(self) -> None:
        """Apply every invalidation already received, without blocking."""
        sock, poller = self._sock, self._poller
        if sock is None or poller is None:
            return
        # Nothing arrived (the common case): one poll, no recv raising BlockingIOError.
        if not poller.poll(0):
            return
        while True:
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:  # closed: Redis restarted or dropped us; trust nothing cached
                log.warning("pointer tracking connection lost; reading Redis until it is back")
                self._drop_connection()
                return
            self._buffer += chunk
        pos = 0
        try:
            while pos < len(self._buffer):
                message, pos_after = _parse(self._buffer, pos)
                pos = pos_after
                self._apply(message)
        except _Incomplete:
            pass
        del self._buffer[:pos]

    def _apply(self, message: object) -> None:
        if not (isinstance(message, list) and len(message) == 3 and message[0] == b"message"):
            return
        self.generation += 1
        keys = message[2]
        if keys is None:  # FLUSHALL / FLUSHDB
            self._pointers.clear()
            return
        for key in keys if isinstance(keys, list) else [keys]:
            series_id = series_of_model_key(key) if isinstance(key, bytes) else None
            if series_id is not None:
                self._pointers.pop(series_id, None)

    def get(self, series_id: str) -> int | None:
        self.drain()
        if self._sock is None:
            return None
        return self._pointers.get(series_id)

    def put(self, series_id: str, version: int, generation: int) -> None:
        """Remember a pointer read from Redis, unless anything changed since ``generation``
        (taken before the read): an invalidation may have raced the read."""
        self.drain()
        if self._sock is None or self.generation != generation:
            return
        if len(self._pointers) >= self.max_entries:
            self._pointers.clear()
        self._pointers[series_id] = version


class _BlockingReader:
    """Request/response on the not-yet-subscribed socket, during set-up only."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def call(self, *parts: str) -> object:
        self.sock.sendall(_command(*parts))
        while True:
            try:
                value, pos = _parse(self.buffer, 0)
                break
            except _Incomplete:
                pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("Redis closed the connection")
            self.buffer += chunk
        del self.buffer[:pos]
        if isinstance(value, _ErrorReply):
            raise OSError(value.decode())
        return value
