"""One Redis connection shared by every request of a process, pipelined automatically.

The limit check is two short scripts per request. Through a client with a connection pool each call
checks a connection out, writes one command, parses one reply and checks the connection back in,
and at 64 requests in flight that bookkeeping costs the gateway more CPU than the rest of the
request. Here every command issued in one turn of the event loop is packed (hiredis, in C) and
written in one `write`, and replies are read as they come, parsed by hiredis, and handed to the
waiting futures in order (Redis answers the commands of a connection in the order it received them).

Failure behaviour, as the limit store needs it:
- a broken connection (Redis stopped, restarted, unreachable) fails every waiting command at once with
  `RedisUnavailable`, and the next command connects again (so service resumes by itself);
- no command waits forever: connecting is bounded by `connect_timeout`, and a reply that has not come
  `reply_timeout` after its command was written drops the connection and fails everything waiting
  on it (replies are in order: when the oldest is late, every later one is too);
- a caller that gives up (its task cancelled) leaves its future in the queue: its reply is still read,
  and discarded, so the replies of the others stay matched to their commands.
A command that was written is never sent again (a script that may have run must not run twice).
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
import time

import hiredis
from redis.asyncio.connection import parse_url

from proxy.stores.redis_sentinel import SCHEME as SENTINEL_SCHEME
from proxy.stores.redis_sentinel import SentinelUrl, master_address, parse_sentinel_url


def tls_context(options: dict) -> ssl_module.SSLContext:
    """TLS for a `rediss://` URL, from the query parameters redis-py reads too: `ssl_ca_certs` (a CA file to
    trust, else the system's), `ssl_cert_reqs=none` (no verification), `ssl_certfile` and `ssl_keyfile`
    (a client certificate, for a server that asks for one). A file that cannot be read raises ValueError."""
    try:
        context = ssl_module.create_default_context(cafile=options.get("ssl_ca_certs"))
        if options.get("ssl_certfile"):
            context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    except (OSError, ssl_module.SSLError) as exc:
        raise ValueError(f"the TLS files the URL names cannot be used: {exc}") from exc
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
        context.check_hostname, context.verify_mode = False, ssl_module.CERT_NONE
    return context


class RedisUnavailable(Exception):
    """Redis could not be reached, or did not answer in time; the command may or may not have run."""


class RedisReplyError(Exception):
    """Redis answered with an error (a script error, NOSCRIPT, a wrong type)."""


class _Protocol(asyncio.Protocol):
    __slots__ = ("pipe",)

    def __init__(self, pipe: AutoPipeline) -> None:
        self.pipe = pipe

    def data_received(self, data: bytes) -> None:
        self.pipe._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe._lost(self, exc)


class AutoPipeline:
    def __init__(self, url: str, connect_timeout: float = 0.5, reply_timeout: float = 1.0) -> None:
        self._sentinel: SentinelUrl | None = None
        if url.startswith(SENTINEL_SCHEME):  # the master's address is asked of Sentinel at each connect
            self._sentinel = parse_sentinel_url(url)
            options = {"db": self._sentinel.db, "username": self._sentinel.username,
                       "password": self._sentinel.password, "host": "", "port": 0}
        else:
            options = parse_url(url)
        self.url = url
        self._path: str | None = options.get("path")
        self._host, self._port = options.get("host", "localhost"), int(options.get("port", 6379))
        self._ssl = tls_context(options) if url.startswith("rediss://") else None
        self._hello: list[tuple] = []
        if options.get("password"):
            user = options.get("username")
            self._hello.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db", 0) or 0):
            self._hello.append(("SELECT", int(options["db"])))
        self.connect_timeout, self.reply_timeout = connect_timeout, reply_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._reader: hiredis.Reader | None = None
        self._connecting: asyncio.Task | None = None
        self._outbox: list[bytes] = []  # packed commands not written yet
        self._outbox_futures: list[asyncio.Future] = []
        self._pending: collections.deque[asyncio.Future] = collections.deque()  # written, reply not read yet
        self._sent_at: collections.deque[tuple[int, float]] = collections.deque()  # (commands, time) per write
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self.writes = 0  # writes made (one per batch), for tests and benchmarks

    # --- issuing commands ---------------------------------------------------------------------------
    def send(self, *args) -> asyncio.Future:
        """Queue one command; the future gets its reply (or RedisUnavailable / RedisReplyError)."""
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            loop = self._adopt_loop()
        future = loop.create_future()
        if self._closed:
            future.set_exception(RedisUnavailable("the Redis connection is closed"))
            return future
        self._outbox.append(hiredis.pack_command(args))
        self._outbox_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args):
        return await self.send(*args)

    def _adopt_loop(self) -> asyncio.AbstractEventLoop:
        """First use, or use from another event loop (tests): start afresh on the running one."""
        if self._loop is not None:
            self._connecting = None
            self._drop(RedisUnavailable("event loop changed"))
            self._fail(self._outbox_futures, RedisUnavailable("event loop changed"))
            self._outbox, self._outbox_futures, self._flush_scheduled = [], [], False
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        if self._transport is None:
            if self._connecting is None:
                self._connecting = self._loop.create_task(self._connect())
            return  # written once connected (or failed if that fails)
        self._write(self._outbox, self._outbox_futures)
        self._outbox, self._outbox_futures = [], []

    def _write(self, packed: list[bytes], futures: list[asyncio.Future]) -> None:
        self._transport.write(packed[0] if len(packed) == 1 else b"".join(packed))
        self.writes += 1
        self._pending.extend(futures)
        self._sent_at.append((len(futures), time.monotonic()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self.reply_timeout, self._check_late)

    # --- connection ---------------------------------------------------------------------------------
    async def _connect(self) -> None:
        loop = self._loop
        protocol = _Protocol(self)
        try:
            if self._sentinel is not None:
                self._host, self._port = await master_address(self._sentinel, self.connect_timeout)
            async with asyncio.timeout(self.connect_timeout):
                if self._path:
                    transport, _ = await loop.create_unix_connection(lambda: protocol, self._path)
                else:
                    transport, _ = await loop.create_connection(lambda: protocol, self._host, self._port,
                                                                ssl=self._ssl)
        except (OSError, TimeoutError) as exc:  # ConnectionError (no Sentinel named a master) included
            self._connecting = None
            self._fail(self._outbox_futures, RedisUnavailable(f"cannot connect to {self._where()}: {exc!r}"))
            self._outbox, self._outbox_futures = [], []
            return
        except BaseException:
            self._connecting = None
            raise
        self._protocol, self._transport = protocol, transport
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._connecting = None
        if self._hello:  # AUTH / SELECT go first, on this connection's stream like any other command
            futures = [loop.create_future() for _ in self._hello]
            self._write([hiredis.pack_command(c) for c in self._hello], futures)
            for future in futures:
                future.add_done_callback(self._hello_answered)
        if self._outbox:
            self._flush()

    def _hello_answered(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None and self._transport is not None:
            self._drop(RedisUnavailable(f"Redis refused the connection's set-up: {future.exception()}"))

    def _where(self) -> str:
        if self._sentinel is not None:
            master = f"the master of {self._sentinel.service!r}"
            return f"{master} named by Sentinel" if not self._port else f"{self._host}:{self._port}, {master}"
        return self._path or f"{self._host}:{self._port}"

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        reader, pending = self._reader, self._pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._drop(RedisUnavailable(f"unreadable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self._drop(RedisUnavailable("a reply from Redis that no command asked for"))
                return
            future = pending.popleft()
            self._answered_one()
            replica = isinstance(reply, RedisReplyError) and str(reply).startswith("READONLY")
            if not future.done():  # (else its caller gave up; the reply is read all the same)
                if replica:
                    future.set_exception(RedisUnavailable(f"{self._where()} is a replica now: {reply}"))
                elif isinstance(reply, RedisReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            if replica:  # a failover demoted the server we reached: connect again (Sentinel names the master)
                self._drop(RedisUnavailable(f"{self._where()} is a replica now"))
                return

    def _answered_one(self) -> None:
        count, at = self._sent_at[0]
        if count == 1:
            self._sent_at.popleft()
        else:
            self._sent_at[0] = (count - 1, at)

    def _check_late(self) -> None:
        self._watchdog = None
        if not self._sent_at:
            return
        late = time.monotonic() - self._sent_at[0][1]
        if late >= self.reply_timeout:
            self._drop(RedisUnavailable(f"Redis at {self._where()} did not answer within {self.reply_timeout} s"))
        else:
            self._watchdog = self._loop.call_later(self.reply_timeout - late, self._check_late)

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._drop(RedisUnavailable(f"connection to Redis at {self._where()} lost: {exc!r}"))

    def _drop(self, error: RedisUnavailable) -> None:
        """Forget the connection; everything written on it fails (its replies will never be read)."""
        transport = self._transport
        self._protocol = self._transport = self._reader = None
        if transport is not None:
            transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, collections.deque()
        self._sent_at.clear()
        self._fail(pending, error)

    @staticmethod
    def _fail(futures, error: Exception) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a future nobody awaits any more logs nothing

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._outbox_futures)

    async def close(self, drain_timeout: float = 2.0) -> None:
        """Write what is queued and wait (bounded) for its replies, then close the connection."""
        if self._loop is not None and self._loop is asyncio.get_running_loop():
            waiting = [f for f in (*self._outbox_futures, *self._pending) if not f.done()]
            if self._outbox:
                self._flush()
            if waiting:
                await asyncio.wait(waiting, timeout=drain_timeout)
            if self._connecting is not None:
                self._connecting.cancel()
        self._closed = True
        self._drop(RedisUnavailable("the Redis connection is closed"))
        self._fail(self._outbox_futures, RedisUnavailable("the Redis connection is closed"))
        self._outbox, self._outbox_futures = [], []


class Script:
    """A Lua script run by EVALSHA, loaded (by EVAL) when Redis does not know it (first use, restart)."""

    __slots__ = ("pipe", "source", "sha")

    def __init__(self, pipe: AutoPipeline, source: str) -> None:
        import hashlib

        self.pipe, self.source = pipe, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list, args: list):
        try:
            return await self.pipe.send("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.pipe.send("EVAL", self.source, len(keys), *keys, *args)
