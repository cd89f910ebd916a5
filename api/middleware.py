"""Pure-ASGI middleware: request body guards (size limit, memory budget) and per-route
HTTP metrics."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import ApiMetrics


class ByteBudget:
    """A first-come, first-served allowance of bytes shared by concurrent requests."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int, wait_seconds: float) -> bool:
        """Take ``n`` bytes (at most the whole capacity, so a lone request always fits),
        waiting up to ``wait_seconds``; False when they did not become free in time."""
        n = min(n, self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return True
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        try:
            async with asyncio.timeout(wait_seconds):
                await granted
        except TimeoutError:
            self._wake()  # a smaller request behind this one may fit now
            return False
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(n)  # granted just as the request went away
            self._wake()
            raise
        return True

    def release(self, n: int) -> None:
        self.used -= min(n, self.capacity)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, granted = self._waiters[0]
            if granted.done():  # timed out or cancelled
                self._waiters.popleft()
                continue
            if self.used + n > self.capacity:
                return
            self._waiters.popleft()
            self.used += n
            granted.set_result(None)


class BodyTooLarge(Exception):
    pass


class BodyBudgetBusy(Exception):
    pass


class BodyGuard:
    """Request bodies, before anything parses them: a size limit and a memory budget.

    **Limit.** A body over ``max_bytes`` is answered 413, whether Content-Length says so up
    front or a chunked body grows past it; it is never held in memory beyond the limit.

    **Budget.** A request whose body is over ``free_bytes`` holds its size from a shared
    ``ByteBudget`` for its whole life (reading, parsing, fitting or scoring, answering): one
    declared by Content-Length before a byte is read, a chunked one step by step as it arrives.
    Parsing and serving a body costs a few times its size, so the process's memory for large
    bodies stays within a small multiple of the budget however many arrive at once. A request
    that cannot get its bytes within ``wait_seconds`` is answered 503 with ``Retry-After``;
    small bodies (every predict, every small fit) never wait.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        budget_bytes: int,
        wait_seconds: float,
        free_bytes: int,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = ByteBudget(budget_bytes)
        self.wait_seconds = wait_seconds
        self.free_bytes = free_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _framing(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer(send, 413, self._too_large())
            return
        if declared is not None and declared <= self.free_bytes and not chunked:
            # The server reads no more than the declared length (HTTP/1.1 framing): the body
            # can neither grow past the limit nor take from the budget, so nothing to watch.
            await self.app(scope, receive, send)
            return
        held = 0
        if declared is not None and declared > self.free_bytes:
            if not await self.budget.acquire(declared, self.wait_seconds):
                await _answer(send, 503, _BUSY, retry_after=True)
                return
            held = declared
        received = 0
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal received, held
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
                if declared is None and received > self.free_bytes and received > held:
                    step = max(received - held, self.free_bytes)
                    if not await self.budget.acquire(step, self.wait_seconds):
                        raise BodyBudgetBusy
                    held += step
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await _answer(send, 413, self._too_large())
        except BodyBudgetBusy:
            if not response_started:
                await _answer(send, 503, _BUSY, retry_after=True)
        finally:
            if held:
                self.budget.release(held)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"


_BUSY = "too many large request bodies in flight; retry in a few seconds"


async def _answer(send: Send, status: int, detail: str, *, retry_after: bool = False) -> None:
    """A JSON error answer that closes the connection (the rest of the body is not read)."""
    body = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after:
        headers.append((b"retry-after", b"2"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length (None when absent or unreadable) and whether a
    Transfer-Encoding is present (then the length is not what frames the body)."""
    declared: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
        elif name == b"transfer-encoding":
            chunked = True
    return declared, chunked


class HttpMetrics:
    """Counts and times every request by its route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Label children by their label values (a labels() lookup takes a lock and builds a
        # key each time). Bounded like the labels themselves: route templates, the methods
        # the HTTP parser knows, statuses.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = time.perf_counter() - start
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            counter = self._counters.get((template, method, status))
            if counter is None:
                counter = self.metrics.http_requests.labels(template, method, str(status))
                self._counters[template, method, status] = counter
            counter.inc()
            timer = self._timers.get((template, method))
            if timer is None:
                timer = self.metrics.http_duration.labels(template, method)
                self._timers[template, method] = timer
            timer.observe(elapsed)
