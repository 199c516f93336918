"""The pipelined Redis connection of the limit store (`proxy.stores.redis_pipe`), against a private
`redis-server`: replies matched to their commands under concurrency, batched writes, a cancelled
waiter's reply read and discarded, late replies and a killed server failing every waiter promptly,
recovery on its own, scripts loaded when Redis forgot them, and nothing queued lost on close."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from proxy.errors import LimitStoreUnavailable
from proxy.limits import Amounts, Check, Reservation, Scope
from tests.helpers import free_port

redis = pytest.importorskip("redis")
pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

from proxy.stores.redis_pipe import AutoPipeline, RedisReplyError, RedisUnavailable, Script  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


@pytest.fixture
async def pipe(redis_server):
    connection = AutoPipeline(redis_server.url, reply_timeout=1.0)
    yield connection
    await connection.close()


async def test_replies_reach_their_own_callers_under_concurrency_in_few_writes(pipe, redis_server):
    values = [f"v{i}-{uuid.uuid4().hex}" for i in range(2000)]
    replies = await asyncio.gather(*(pipe.execute("ECHO", v) for v in values))
    assert replies == [v.encode() for v in values]
    assert pipe.writes <= 5, f"{pipe.writes} writes for 2,000 commands issued in one turn of the loop"
    counts = await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(500)))
    assert sorted(counts) == list(range(1, 501)) and counts == sorted(counts), "answered in the order sent"
    assert int(redis_server.client().get("n")) == 500


async def test_a_cancelled_waiter_does_not_shift_the_replies_of_the_others(pipe, redis_server):
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", "nothing", "0.3"))  # holds the connection's replies back
    first = asyncio.ensure_future(pipe.execute("ECHO", "first"))
    second = asyncio.ensure_future(pipe.execute("ECHO", "second"))
    third = asyncio.ensure_future(pipe.execute("ECHO", "third"))
    await asyncio.sleep(0.1)  # written; Redis is blocking on BLPOP
    assert not second.done()
    blocked.cancel()
    second.cancel()
    assert await first == b"first"
    assert await third == b"third", "the cancelled waiter's reply was read and dropped, not handed on"
    assert await pipe.execute("ECHO", "after") == b"after"
    assert pipe.in_flight == 0


async def test_a_reply_error_goes_to_its_caller_only(pipe, redis_server):
    redis_server.client().set("text", "x")
    wrong, right = await asyncio.gather(pipe.execute("INCR", "text"), pipe.execute("ECHO", "fine"),
                                        return_exceptions=True)
    assert isinstance(wrong, RedisReplyError) and right == b"fine"


async def test_a_late_reply_fails_every_waiter_promptly_and_the_next_command_reconnects(redis_server):
    pipe = AutoPipeline(redis_server.url, reply_timeout=0.3)
    try:
        assert await pipe.execute("PING") == b"PONG"
        started = time.monotonic()
        results = await asyncio.gather(pipe.execute("BLPOP", "nothing", "5"),
                                       *(pipe.execute("ECHO", str(i)) for i in range(10)), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert time.monotonic() - started < 1.0
        assert await pipe.execute("ECHO", "again") == b"again", "a new connection, not the stuck one"
    finally:
        await pipe.close()


async def test_redis_killed_mid_batch_fails_every_waiter_then_recovers_after_restart(pipe, redis_server):
    assert await pipe.execute("SET", "k", "1") == b"OK"
    waiting = [asyncio.ensure_future(pipe.execute("BLPOP", "nothing", "5"))]
    waiting += [asyncio.ensure_future(pipe.execute("INCR", "k")) for _ in range(200)]
    await asyncio.sleep(0.1)  # written; every reply is queued behind BLPOP
    started = time.monotonic()
    redis_server.proc.kill()
    redis_server.proc.wait()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RedisUnavailable) for r in results), {type(r) for r in results}
    assert time.monotonic() - started < 0.5, "every waiter learns at once, none waits for its timeout"
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await pipe.execute("PING")
    assert time.monotonic() - started < 1.0, "while Redis is down, a command fails fast"
    redis_server.start()
    assert await pipe.execute("PING") == b"PONG", "recovers by itself once Redis answers"
    assert await asyncio.gather(*(pipe.execute("ECHO", str(i)) for i in range(50))) == [
        str(i).encode() for i in range(50)]


async def test_an_unreachable_redis_fails_fast():
    pipe = AutoPipeline(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(pipe.execute("PING") for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results)
        assert time.monotonic() - started < 1.0
    finally:
        await pipe.close()


async def test_a_script_is_loaded_again_when_redis_forgot_it(pipe, redis_server):
    script = Script(pipe, "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script(["s"], [2]) == 2
    redis_server.client().script_flush()
    assert await asyncio.gather(*(script(["s"], [1]) for _ in range(10))) == list(range(3, 13))


async def test_close_sends_what_is_queued_and_waits_for_it(redis_server):
    pipe = AutoPipeline(redis_server.url)
    for _ in range(100):
        pipe.send("INCR", "queued")  # nobody awaits these (as a settle nobody needs the answer of)
    await pipe.close()
    assert int(redis_server.client().get("queued")) == 100
    with pytest.raises(RedisUnavailable):
        await pipe.execute("PING")


async def test_the_database_and_password_of_the_url_are_used(tmp_path):
    server = RedisServer(tmp_path / "auth")
    server.start()
    try:
        server.client().config_set("requirepass", "s3cret")
        pipe = AutoPipeline(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        wrong = AutoPipeline(f"redis://:nope@127.0.0.1:{server.port}/0")
        try:
            assert await pipe.execute("SET", "in-db-3", "yes") == b"OK"
            check = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
            assert check.get("in-db-3") == b"yes"
            with pytest.raises((RedisUnavailable, RedisReplyError)):
                await wrong.execute("PING")
        finally:
            await pipe.close()
            await wrong.close()
    finally:
        server.stop()


async def test_a_password_in_the_redis_url_never_reaches_readyz_or_the_log(tmp_path, caplog):
    from proxy.stores.redis_limits import RedisLimitStore

    store = RedisLimitStore(f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        reason = await store.check()
        assert "unreachable" in reason and "redis://:***@127.0.0.1" in reason and "s3cret-pw" not in reason
        budget = [Check(Scope("acme", None), "requests", "day", 10)]
        with pytest.raises(LimitStoreUnavailable):
            await store.reserve(budget, (Scope("acme", None), Scope("acme", uuid.uuid4())), Amounts(1, 0, Decimal(0)),
                                datetime.now(UTC))
        assert "s3cret-pw" not in caplog.text
    finally:
        await store.close()


async def test_the_store_over_the_pipe_fails_closed_while_redis_is_killed_and_recovers(redis_server):
    from proxy.stores.redis_limits import RedisLimitStore

    store = RedisLimitStore(redis_server.url)
    tenant, user = Scope("acme", None), Scope("acme", uuid.uuid4())
    budget = [Check(tenant, "requests", "day", 1_000_000)]
    try:
        held = await store.reserve(budget, (tenant, user), Amounts(1, 10, Decimal("0.01")), datetime.now(UTC))
        assert isinstance(held, Reservation)
        redis_server.proc.kill()
        redis_server.proc.wait()
        started = time.monotonic()
        results = await asyncio.gather(*(store.reserve(budget, (tenant, user), Amounts(1, 0, Decimal(0)),
                                                       datetime.now(UTC)) for _ in range(50)),
                                       return_exceptions=True)
        assert all(isinstance(r, LimitStoreUnavailable) for r in results)
        assert time.monotonic() - started < 1.5
        assert (await store.check()).startswith("redis ")
        redis_server.start()  # back empty: the store re-seeds (nothing attached: an empty seed) and goes on
        again = await store.reserve(budget, (tenant, user), Amounts(1, 0, Decimal(0)), datetime.now(UTC))
        assert isinstance(again, Reservation) and await store.check() == "ok"
        await store.settle(again, Amounts(1, 5, Decimal("0.000000007")))
        assert await store.spent(tenant, "usd", "day", again.at) == Decimal("0.000000007")
    finally:
        await store.close()


async def test_tls_with_the_urls_ca_and_client_certificate_and_refused_without_them(tmp_path):
    """`rediss://` with the query parameters redis-py reads too: the server's certificate checked against
    `ssl_ca_certs`, a client certificate shown from `ssl_certfile`/`ssl_keyfile` when the server asks;
    without the CA the certificate is refused, without the client certificate the server refuses."""
    server = RedisServer(tmp_path / "redis", tls=True, client_certs=True).start()
    tls = server.tls
    trusted = f"{server.url}?ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
    try:
        pipe = AutoPipeline(trusted)
        assert await pipe.execute("PING") == b"PONG"
        assert await Script(pipe, "return ARGV[1]")([], ["over tls"]) == b"over tls"
        await pipe.close()

        for url, reason in ((f"{server.url}?ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}",
                             "CERTIFICATE_VERIFY_FAILED"),  # the system's CAs do not know ours
                            (f"{server.url}?ssl_ca_certs={tls.ca}", "")):  # no client certificate
            pipe = AutoPipeline(url, reply_timeout=1.0)
            with pytest.raises(RedisUnavailable) as refused:
                await pipe.execute("PING")
            assert reason in str(refused.value), refused.value
            await pipe.close()

        unchecked = AutoPipeline(f"{server.url}?ssl_cert_reqs=none&ssl_certfile={tls.client_cert}"
                                 f"&ssl_keyfile={tls.client_key}")
        assert await unchecked.execute("PING") == b"PONG", "ssl_cert_reqs=none: encrypted, not verified"
        await unchecked.close()
        with pytest.raises(ValueError, match="TLS files"):
            AutoPipeline(f"{server.url}?ssl_ca_certs={tmp_path / 'missing.pem'}")
    finally:
        server.stop()


async def test_behind_sentinel_the_pipe_asks_for_the_master_and_leaves_a_server_that_is_a_replica(tmp_path):
    """`redis+sentinel://`: Sentinel names the master, the pipe writes there. A connection open to a server
    that is (or became, in a failover) a replica gets READONLY for a write: that caller gets
    RedisUnavailable (503 upstream) and the connection is dropped, so the next command connects afresh
    (asking Sentinel again). The failover itself, under a gateway: test_redis_limits.py."""
    from tests.redis_server import SentinelSet

    redis_set = SentinelSet(tmp_path / "sentinel").start()
    write = "return redis.call('INCR', KEYS[1])"
    try:
        pipe = AutoPipeline(redis_set.url)
        assert await Script(pipe, write)(["n"], []) == 1
        assert redis_set.master.client().get("n") == b"1", "written on the master Sentinel named"
        await pipe.close()

        replica = AutoPipeline(f"redis://127.0.0.1:{redis_set.replica.port}/0")
        assert await replica.execute("PING") == b"PONG"
        server = redis_set.replica.client()
        connections = server.info("stats")["total_connections_received"]
        with pytest.raises(RedisUnavailable, match="replica now"):
            await Script(replica, write)(["n"], [])
        assert await replica.execute("PING") == b"PONG"
        assert server.info("stats")["total_connections_received"] == connections + 1, "dropped, connected again"
        await replica.close()

        for url, message in (("redis+sentinel://127.0.0.1/tw", "is not HOST:PORT"),
                             ("redis+sentinel://127.0.0.1:26379", "names no service")):
            with pytest.raises(ValueError, match=message):
                AutoPipeline(url)
        lost = AutoPipeline(f"redis+sentinel://127.0.0.1:{free_port()}/tw")
        with pytest.raises(RedisUnavailable, match="no Sentinel named the master"):
            await lost.execute("PING")
        await lost.close()
    finally:
        redis_set.stop()
