"""A small raw-asyncio HTTP/1.1 load generator (keep-alive, Content-Length and chunked bodies).

httpx-based generators top out near 1,000 requests/s on this class of machine, well below what
the gateway serves, so the benchmarks speak HTTP directly: one request template, N connections,
each sending its next request as soon as the previous answer is complete.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, whole response
    ttfb: list[float] = field(default_factory=list)  # seconds, to the first body byte
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def summary(self) -> dict:
        return {"requests": len(self.latencies), "errors": self.errors, "statuses": dict(self.statuses),
                "rps": round(self.rps),
                "p50_ms": round(self.pct(self.latencies, 0.50), 3), "p99_ms": round(self.pct(self.latencies, 0.99), 3),
                "ttfb_p50_ms": round(self.pct(self.ttfb, 0.50), 3) if self.ttfb else None,
                "mean_ms": round(statistics.fmean(self.latencies) * 1000, 3) if self.latencies else None}


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader, started: float, result: Result) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    result.statuses[status] = result.statuses.get(status, 0) + 1
    lower = head.lower()
    first_byte = None
    if b"transfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            await reader.readexactly(size + 2)
            if first_byte is None:
                first_byte = time.perf_counter()
    else:
        start = lower.index(b"content-length:") + 15
        length = int(lower[start:lower.index(b"\r\n", start)])
        await reader.readexactly(length)
        first_byte = time.perf_counter()
    now = time.perf_counter()
    result.latencies.append(now - started)
    result.ttfb.append((first_byte or now) - started)


async def _worker(host: str, port: int, request, deadline: float, count: list[int], result: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and count[0] > 0:
            count[0] -= 1
            started = time.perf_counter()
            writer.write(request(count[0]) if callable(request) else request)
            try:
                await _read_response(reader, started, result)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def run_load(host: str, port: int, request, *, concurrency: int, requests: int,
                   max_seconds: float) -> Result:
    """Send `requests` requests (or stop at `max_seconds`) over `concurrency` connections. `request` is the
    bytes of one request, or a function of the request's number (counting down) giving them."""
    result = Result()
    count = [requests]
    started = time.perf_counter()
    deadline = started + max_seconds
    await asyncio.gather(*(_worker(host, port, request, deadline, count, result) for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result
