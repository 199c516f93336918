"""Redis limit store: limit-check latency at concurrency 64, and CPU per request, memory vs Redis, same run.

    python tests/perf/redis_limits.py [--checks 20000] [--requests 10000] [--runs 2]

1. In process (this process on core 0, redis-server on core 1): `Limiter.reserve` (the limit check: one
   EVALSHA of the reserve script), a simulated upstream call, then `settle`, from 64 concurrent
   requests, four limits applying to each (a tenant budget per month, tenant tokens per day, user
   requests per minute, a user budget per day), 100 users rotating. Reports the reserve latency seen by
   the caller (p50/p99) for the memory store and for Redis in three shapes of load:
   - an upstream call of 10 to 30 ms (uniformly drawn, mean 20 ms: provider latency varies), 64 requests
     in flight as a gateway at c=64 has them, their starts spread over one call: the figure the plan's
     target is about;
   - a fixed 20 ms call: the 64 callers fall into lock-step (a batch of replies resumes together, sleeps
     the same 20 ms and checks again in the same turn of the event loop), so every check waits behind
     up to 63 others, as in a burst of 64 requests arriving at once;
   - no upstream call (saturated: only limit checks, so the figure is mostly queueing behind the other 63);
   with Redis's own time per script call and the Redis commands the scripts run per request (INFO
   commandstats), and the caller's CPU per reserve + settle.
2. Processes: `tollway serve` with `[limits] store = "memory"`, with the Redis URL, and with the Redis URL
   plus `[events] sink = "segments"` (the scale-out pair the plan compares with the defaults), the simulated
   provider and the same load (JSON chat completions at concurrency 16); the gateway's CPU per
   request and redis-server's, read from /proc. Runs alternate the two stores. The gateway is pinned
   to core 0; simulator, load generator and redis-server share core 1 (as in bench_gateway.py).

Not part of the test suite. A private redis-server on a free loopback port; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.files import LimitRule  # noqa: E402
from proxy.demo import wait_healthy  # noqa: E402
from proxy.events import Event  # noqa: E402
from proxy.limiter import Limiter  # noqa: E402
from proxy.limits import Amounts, AppliedLimit, Scope  # noqa: E402
from proxy.stores.memory import MemoryLimitStore  # noqa: E402
from proxy.stores.redis_limits import RedisLimitStore  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402
from tests.perf.bench_gateway import SIM_KEY, cpu_seconds, pinned, scenario, setup_deployment  # noqa: E402

CONCURRENCY = 64
RULES = (("tenant", "usd", "month", "1000000"), ("tenant", "tokens", "day", "100000000000"),
         ("*", "requests", "minute", "100000000"), ("*", "usd", "day", "1000000"))


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], preexec_fn=pinned(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def _plan(pseudonym: uuid.UUID) -> list[AppliedLimit]:
    return [AppliedLimit(LimitRule(i + 2, "acme", subject, metric, window, Decimal(limit)),
                         Scope("acme", pseudonym if subject == "*" else None))
            for i, (subject, metric, window, limit) in enumerate(RULES)]


async def check_latency(store, checks: int, upstream_s: float, jitter: float = 0.0) -> list[float]:
    """µs per `Limiter.reserve` at CONCURRENCY in flight; each reservation is settled after an upstream call
    of `upstream_s` (times a uniform draw from 1 - `jitter` to 1 + `jitter`)."""
    limiter = Limiter(store, 4096, lambda alert: None, lambda refusal: None)
    users = [uuid.uuid4() for _ in range(100)]
    plans = {u: _plan(u) for u in users}
    amounts = Amounts(1, 4196, Decimal("0.002472"))
    samples: list[float] = []
    per_worker = checks // CONCURRENCY
    draw = random.Random(7)

    async def worker(w: int) -> None:
        if upstream_s:
            await asyncio.sleep(upstream_s * w / CONCURRENCY)
        for i in range(per_worker):
            user = users[(w * per_worker + i) % len(users)]
            at = datetime.now(UTC)
            started = time.perf_counter()
            reservation = await limiter.reserve(plans[user], "acme", user, amounts, at)
            samples.append((time.perf_counter() - started) * 1e6)
            if upstream_s:
                await asyncio.sleep(upstream_s * draw.uniform(1 - jitter, 1 + jitter))
            event = Event(event_id=uuid.uuid4(), ts=at, tenant="acme", user_pseudonym=user, input_tokens=100,
                          output_tokens=12, cost_usd=Decimal("0.0000222"))
            await limiter.settle(reservation, plans[user], event)

    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return samples


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def part_one(url: str, checks: int) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for upstream_s, jitter, checks_run in ((0.02, 0.5, min(checks, 12_800)), (0.02, 0.0, min(checks, 12_800)),
                                           (0.0, 0.0, checks)):
        for name, make in (("memory", MemoryLimitStore), ("redis", lambda: RedisLimitStore(url, prefix="bench"))):
            store = make()
            await check_latency(store, CONCURRENCY * 20, 0.0)  # warm-up: scripts loaded, connections open
            client.config_resetstat()
            cpu = time.process_time()
            samples = sorted(await check_latency(store, checks_run, upstream_s, jitter))
            cpu = (time.process_time() - cpu) * 1e6 / len(samples)
            server = ""
            if name == "redis":
                stats = client.info("commandstats")
                scripts = stats.get("cmdstat_evalsha", {})
                inner = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha", "cmdstat_eval"))
                if scripts:
                    server = (f"; Redis per script call {scripts['usec_per_call']:.1f} µs, "
                              f"{inner / len(samples):.0f} commands per request")
            shape = (f"upstream {upstream_s * (1 - jitter) * 1000:.0f}-{upstream_s * (1 + jitter) * 1000:.0f} ms"
                     if jitter else f"upstream {upstream_s * 1000:2.0f} ms")
            print(f"limit check ({name:6}) c={CONCURRENCY}, {shape}: "
                  f"p50 {_pct(samples, 0.5):7.1f} µs  p99 {_pct(samples, 0.99):7.1f} µs  max {samples[-1]:8.1f} µs; "
                  f"caller CPU {cpu:5.1f} µs per reserve + settle{server}", flush=True)
            await store.close()


def gateway_run(store_url: str | None, requests: int, redis_pid: int, segments: bool = False) -> tuple[float, float]:
    """(gateway µs CPU per request, redis-server µs CPU per request) for one run; `segments`: the segment
    sink (with its spool) instead of events.duckdb."""
    sim_port, gw_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "deploy"
        token = setup_deployment(deploy, sim_port, gw_port)
        toml = deploy / "tollway.toml"
        extra = f'\n[limits]\nstore = "{store_url}"\n' if store_url else ""
        extra += '\n[events]\nsink = "segments"\n' if segments else ""
        toml.write_text(toml.read_text() + extra + "\n[pipeline]\nreport_interval_s = 3600\n")
        sim = subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(sim_port), "--no-record",
                                "--key", f"openai={SIM_KEY}"], cwd=REPO, preexec_fn=pinned(1),
                               stderr=subprocess.DEVNULL)
        gw = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(deploy), "serve"], cwd=REPO,
                              preexec_fn=pinned(0), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", sim, "simulator")
            wait_healthy(f"http://127.0.0.1:{gw_port}/healthz", gw, "gateway")
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]}
            before, redis_before = cpu_seconds(gw.pid), cpu_seconds(redis_pid)
            result = asyncio.run(scenario(gw_port, "/openai/v1/chat/completions", json.dumps(body).encode(),
                                          {"Authorization": f"Bearer {token}"}, 16, requests, 60))
            done = len(result.latencies) + min(200, requests)
            return ((cpu_seconds(gw.pid) - before) * 1e6 / done, (cpu_seconds(redis_pid) - redis_before) * 1e6 / done)
        finally:
            for proc in (gw, sim):
                proc.terminate()
                proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20_000, help="limit checks in part 1")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per gateway run in part 2")
    parser.add_argument("--runs", type=int, default=2, help="runs of each store (alternating)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            pinned(0)()  # part 1: the gateway's side on core 0, redis-server on core 1
            asyncio.run(part_one(url, args.checks))
            pinned(1)()  # part 2's load generator shares core 1 with the simulator and redis-server
            results: dict[str, list[tuple[float, float]]] = {"memory": [], "redis": [], "redis+segments": []}
            for run in range(args.runs):
                for name, store, segments in (("memory", None, False), ("redis", url, False),
                                              ("redis+segments", url, True)):
                    results[name].append(gateway_run(store, args.requests, proc.pid, segments))
                    gw_us, redis_us = results[name][-1]
                    print(f"run {run + 1} {name:14}: gateway {gw_us:6.1f} µs CPU per request, "
                          f"redis-server {redis_us:5.1f} µs", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    memory = statistics.median(g for g, _ in results["memory"])
    redis_gw = statistics.median(g for g, _ in results["redis"])
    redis_srv = statistics.median(r for _, r in results["redis"])
    print(f"median gateway CPU per request: memory {memory:.1f} µs, redis {redis_gw:.1f} µs ({redis_gw / memory:.2f}x); "
          f"with redis-server's own {redis_srv:.1f} µs: {(redis_gw + redis_srv) / memory:.2f}x")
    both = statistics.median(g for g, _ in results["redis+segments"])
    print(f"redis store + segment sink (spool on): {both:.1f} µs ({both / memory:.2f}x of memory + events.duckdb)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
