"""Upstream client comparison: httpx (default transport), httpx over the aiohttp transport, aiohttp.

    python tests/perf/bench_upstream_clients.py [--requests 6000]

Each client makes the gateway's upstream call (POST a chat completion, read the whole body) to the
simulated provider in another process, at concurrency 16 and 64, from one event loop pinned to one
core, and for streams (20 chunks, read chunk by chunk) at concurrency 16. The gateway ships the
fastest that keeps streaming, cancellation and timeouts correct (see `proxy/upstream.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.demo import wait_healthy  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402

KEY = "sk-bench-openai-0001"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]}
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


async def _httpx_call(client: httpx.AsyncClient, url: str, payload: bytes, stream: bool) -> None:
    if not stream:
        (await client.post(url, content=payload, headers=HEADERS)).read()
        return
    async with client.stream("POST", url, content=payload, headers={**HEADERS, "x-sim-chunks": "20"}) as response:
        async for _ in response.aiter_raw():
            pass


async def _aiohttp_call(session: aiohttp.ClientSession, url: str, payload: bytes, stream: bool) -> None:
    headers = {**HEADERS, "x-sim-chunks": "20"} if stream else HEADERS
    async with session.post(url, data=payload, headers=headers) as response:
        if stream:
            async for _ in response.content.iter_any():
                pass
        else:
            await response.read()


async def _run(call, client, url: str, concurrency: int, requests: int, stream: bool) -> tuple[float, float]:
    payload = json.dumps({**BODY, "stream": stream}).encode()
    remaining = [requests]
    latencies: list[float] = []

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            await call(client, url, payload, stream)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=120)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(0.99 * (len(latencies) - 1))] * 1000


async def _measure(name: str, url: str, requests: int) -> list[str]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    if name == "aiohttp":
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        call = _aiohttp_call
    else:
        transport = None
        if name == "httpx + aiohttp transport":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport()
        client = httpx.AsyncClient(limits=limits, transport=transport, timeout=60)
        call = _httpx_call
    rows = []
    try:
        await _run(call, client, url, 16, 300, False)  # warm-up
        for concurrency, stream in ((16, False), (64, False), (16, True)):
            count = requests if not stream else requests // 4
            rps, p99 = await _run(call, client, url, concurrency, count, stream)
            kind = "streams" if stream else "requests"
            rows.append(f"| {name} | {'stream 20 chunks' if stream else 'non-streaming'} c={concurrency} | "
                        f"{rps:,.0f} {kind}/s | {p99:.2f} |")
    finally:
        await (client.close() if name == "aiohttp" else client.aclose())
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(port), "--no-record",
                            "--key", f"openai={KEY}"], cwd=REPO, stderr=subprocess.DEVNULL,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cores[-1]}))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_sim/health", sim, "simulator")
        os.sched_setaffinity(0, {cores[0]})
        url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
        print("| client | scenario | rate | p99 ms |\n|---|---|---|---|")
        for name in ("httpx", "httpx + aiohttp transport", "aiohttp"):
            for row in asyncio.run(_measure(name, url, args.requests)):
                print(row, flush=True)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
