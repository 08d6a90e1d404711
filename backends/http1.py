"""A streaming HTTP/1.1 client built for timing, under OpenAIClient's requests.

Each connection is an asyncio Protocol: `data_received` stamps the bytes the moment the event loop hands them over
and feeds them to h11 (the HTTP/1.1 state machine httpx itself uses); nothing else happens there. The response is
parsed once it has ended. A request is written in one call, stamped just before. Connections are kept alive in a
pool without a cap (a request waiting for a connection would count that wait as the server's time) and opened ahead
of the load by `open`. httpx builds each request in ~1 ms and passes every chunk through several async layers; this
does neither.

Every read re-arms TCP_QUICKACK (Linux), so what arrived is acknowledged at once. A server that does not set
TCP_NODELAY (Python's http.server and other simple ones) holds its next small write under Nagle's algorithm until
the previous one is acknowledged; on a kept-alive connection in request/response rhythm Linux delays that ACK by up
to 40 ms, and the first token then waited for it: +36 ms of TTFT and the rest of the stream in one burst, measured at
40 req/s and above (issue 27). Linux leaves quick-ACK mode by itself, hence once per read, not once per connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from harness.core.events import now

# Absent outside Linux, where delayed ACKs are left as they are.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class ConnectionLost(ConnectionError):
    """The server closed the connection before the response ended."""


@dataclass
class Exchange:
    """One request and its response as it arrived: the status, and the body's pieces, each with its arrival time."""
    future: asyncio.Future
    t_sent: float = 0.0
    status: int | None = None
    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    received: bool = False  # any byte of the response came


class _ClientConnection(asyncio.Protocol):
    def __init__(self, pool: HTTP1Pool):
        self.pool = pool
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self.sock = None  # the TCP socket, while TCP_QUICKACK can be set on it

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if _QUICKACK is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock = sock

    def data_received(self, data: bytes) -> None:
        t = now()
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:  # not a TCP socket after all: nothing to acknowledge sooner
                self.sock = None
        ex = self.exchange
        if ex is None:  # bytes on an idle connection: nothing sane to do with it
            self.close()
            return
        ex.received = True
        try:
            self.h11.receive_data(data)
            while (event := self.h11.next_event()) is not h11.NEED_DATA:
                if type(event) is h11.Data:
                    ex.pieces.append((t, bytes(event.data)))
                elif type(event) is h11.Response:
                    ex.status = event.status_code
                elif type(event) is h11.EndOfMessage:
                    self._finish(ex)
                    return
                elif event is h11.PAUSED or type(event) is h11.ConnectionClosed:
                    break
        except h11.RemoteProtocolError as e:
            self._fail(ConnectionLost(f"the server broke HTTP/1.1: {e}"))

    def eof_received(self) -> bool:
        if self.exchange is not None and not self.exchange.received:
            # A kept-alive connection the server closed (as some do after N requests) just as a request left on it.
            self._fail(ConnectionLost("the server closed the connection before answering"))
        elif self.exchange is not None:  # a body that ends when the connection does
            self.data_received(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self._fail(ConnectionLost(f"the server closed the connection mid-response{f': {exc}' if exc else ''}"))

    def _finish(self, ex: Exchange) -> None:
        self.exchange = None
        if not ex.future.done():
            ex.future.set_result(None)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, error: Exception) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None and not ex.future.done():
            ex.future.set_exception(error)
        self.close()

    def send(self, ex: Exchange, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.exchange = ex
        data = b"".join([self.h11.send(h11.Request(method=method, target=target, headers=headers)),
                         self.h11.send(h11.Data(data=body)), self.h11.send(h11.EndOfMessage())])
        ex.t_sent = now()
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HTTP1Pool:
    """Kept-alive HTTP/1.1 connections to one server (`base_url`: http or https)."""

    def __init__(self, base_url: str, headers: dict[str, str], keepalive_s: float, connect_timeout_s: float = 10.0):
        u = urlsplit(base_url)
        self.host, self.path = u.hostname or "127.0.0.1", u.path.rstrip("/")
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        host_header = u.netloc.rpartition("@")[2]
        self.headers = [("Host", host_header), ("User-Agent", "llmbench"), ("Accept", "text/event-stream"),
                        ("Content-Type", "application/json"), *headers.items()]
        self.keepalive_s, self.connect_timeout_s = keepalive_s, connect_timeout_s
        self.idle: deque[_ClientConnection] = deque()
        self.opened = 0  # connections opened so far

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await loop.create_connection(lambda: _ClientConnection(self), self.host, self.port, ssl=self.ssl,
                                                   server_hostname=self.host if self.ssl else None)
        self.opened += 1
        return conn

    def _take(self) -> _ClientConnection | None:
        """The most recently used idle connection still open and younger than keepalive_s (the server may close
        older ones any moment); older ones are closed."""
        t = now()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and t - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def release(self, conn: _ClientConnection) -> None:
        conn.idle_since = now()
        self.idle.append(conn)

    async def open(self, n: int) -> None:
        """Have at least n connections open and idle."""
        t = now()
        alive = sum(1 for c in self.idle if not c.closed and t - c.idle_since < self.keepalive_s)
        for conn in await asyncio.gather(*(self._connect() for _ in range(n - alive))):
            self.release(conn)

    async def post(self, path: str, body: bytes, timeout_s: float) -> Exchange:
        """POST body to base path + path; returns once the response has ended. A kept-alive connection the server
        closed while idle is retried once on a new one, before any byte of the answer came."""
        loop = asyncio.get_running_loop()
        headers = [*self.headers, ("Content-Length", str(len(body)))]
        for attempt in (0, 1):
            # The retry on a new connection: the other idle ones may be closing too (a server that closes after N)
            conn = (None if attempt else self._take()) or await self._connect()
            ex = Exchange(loop.create_future())
            conn.send(ex, "POST", self.path + path, headers, body)
            try:
                async with asyncio.timeout(timeout_s):
                    await ex.future
                return ex
            except ConnectionLost:
                if attempt or ex.received:
                    raise
            except BaseException:  # a timeout or a cancellation: the connection's state is unknown
                conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
