"""Gateway benchmark: the simulated provider called directly versus through one Tollway process.

    python tests/perf/bench_gateway.py [--quick]

Starts the simulated provider and `tollway serve` (the gateway pinned to core 0, the simulator and
this load generator to core 1), then prints, in the same run: added p50/p99 at concurrency 1;
requests/s and p50/p99 at concurrency 16 and 64 (non-streaming); the gateway's CPU time per
request; streaming time-to-first-byte and streams/s at concurrency 16 (20 chunks); RSS after
warm-up; the event writer's sustained rows/s; and, in process, what metering a request costs (the
price lookup through the overrides and the price book, and the exact cost). Every loop is bounded
in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.demo import wait_healthy  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402
from tests.perf.loadgen import build_request, run_load  # noqa: E402

SIM_KEY = "sk-bench-openai-0001"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pinned(core: int):
    cores = os.sched_getaffinity(0)
    target = {core} if core in cores and len(cores) > 1 else cores
    return lambda: os.sched_setaffinity(0, target)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup_deployment(root: Path, sim_port: int, gw_port: int) -> str:
    from proxy.cli import main as cli_main
    from proxy.control import ControlStore
    from proxy.crypto import Keyring, load_master_key

    cli_main(["init", str(root)])
    (root / "tollway.toml").write_text(
        f'[server]\nport = {gw_port}\n[providers.openai]\nbase_url = "http://127.0.0.1:{sim_port}/openai"\n')
    (root / "policy" / "routes.csv").write_text("p, *, openai/*, operator-openai\n")  # the one key added below
    # the full pipeline runs limit checks too: generous limits that apply to every request, never refuse
    (root / "policy" / "limits.csv").write_text(
        "tenant,subject,metric,window,limit\nacme,tenant,usd,month,1000000\nacme,*,requests,minute,100000000\n"
        "*,*,tokens,minute,100000000000\n")
    store = ControlStore(root / "control.db", Keyring(load_master_key(root)))
    store.add_key("operator-openai", "openai", SIM_KEY, None)
    _, token = store.create_token("acme", "bench@acme.com", [], None)
    store.close()
    return token


def bench_event_writer(rows: int = 200_000) -> float:
    """Rows/s the recorder sustains into a fresh DuckDB file (batches as in production)."""
    import uuid
    from datetime import UTC, datetime
    from decimal import Decimal

    from proxy.events import Event
    from proxy.recorder import EventRecorder, open_events_db

    with tempfile.TemporaryDirectory() as tmp:
        con = open_events_db(Path(tmp) / "events.duckdb")
        recorder = EventRecorder(con, flush_interval_ms=100)
        now = datetime.now(UTC)
        started = time.perf_counter()
        for i in range(rows):
            recorder.record(Event(event_id=uuid.uuid4(), ts=now, tenant="acme", provider="openai",
                                  model="openai/gpt-4o-mini", endpoint="chat/completions", status_code=200,
                                  input_tokens=i % 500, output_tokens=20, usage_source="reported",
                                  cost_usd=Decimal("0.000012345"), latency_ms=1.0, attempts=1))
        recorder.close()
        elapsed = time.perf_counter() - started
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == rows
        con.close()
    return rows / elapsed


def bench_price_lookup(requests: int = 20_000) -> dict:
    """µs per request for metering: resolving the model to a price (overrides, then the book, cached per
    model) and the exact cost, as the gateway does twice per request (admission and settlement)."""
    import statistics
    from datetime import UTC, datetime

    from proxy.metering import load_prices
    from proxy.providers.base import Usage

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pricing.csv").write_text("provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,"
                                               "cached_input_usd_per_mtok,cache_write_usd_per_mtok\n"
                                               "openai,my-house-model-*,2025-01-01,1,2,,\n")
        prices, _ = load_prices(Path(tmp) / "pricing.csv")
    models = [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5-20250929"), ("google", "gemini-2.5-pro"),
              ("openai", "my-house-model-7")]
    usage = Usage(input_tokens=1200, output_tokens=300, cached_input_tokens=800, service_tier="default")
    started = time.perf_counter()
    for provider, model in models:  # the first request of each model resolves it through the book
        prices.cost(provider, model, provider, datetime.now(UTC), usage)
    first_ms = (time.perf_counter() - started) * 1000 / len(models)
    samples = []
    for i in range(requests):
        provider, model = models[i % len(models)]
        at = datetime.now(UTC)
        begin = time.perf_counter()
        prices.price(provider, model, provider, at, None)
        prices.cost(provider, model, provider, at, usage)
        samples.append((time.perf_counter() - begin) * 1e6)
    samples.sort()
    return {"first_lookup_ms": round(first_ms, 2), "p50_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(len(samples) * 0.99)], 1)}


async def scenario(port: int, path: str, body: bytes, headers: dict, concurrency: int, requests: int,
                   seconds: float):
    request = build_request("127.0.0.1", port, path, body, headers)
    await run_load("127.0.0.1", port, request, concurrency=concurrency, requests=min(200, requests), max_seconds=5)
    return await run_load("127.0.0.1", port, request, concurrency=concurrency, requests=requests, max_seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    pinned(1)()  # this load generator shares core 1 with the simulator

    sim_port, gw_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        token = setup_deployment(Path(tmp) / "deploy", sim_port, gw_port)
        sim = subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(sim_port), "--no-record",
                                "--key", f"openai={SIM_KEY}"], cwd=REPO, preexec_fn=pinned(1),
                               stderr=subprocess.DEVNULL)
        gw = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(Path(tmp) / "deploy"), "serve"],
                              cwd=REPO, preexec_fn=pinned(0), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", sim, "simulator")
            wait_healthy(f"http://127.0.0.1:{gw_port}/healthz", gw, "gateway")
            report = asyncio.run(run_all(sim_port, gw_port, token, gw.pid, scale))
        finally:
            for proc in (gw, sim):
                proc.terminate()
                proc.wait(timeout=30)
    report["event_writer_rows_per_s"] = round(bench_event_writer(int(200_000 * scale)))
    report["price_lookup"] = bench_price_lookup(int(20_000 * scale))
    print_report(report)
    return 0


async def run_all(sim_port: int, gw_port: int, token: str, gw_pid: int, scale: float) -> dict:
    path = "/openai/v1/chat/completions"
    plain = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]}).encode()
    stream = json.dumps({"model": "gpt-4o-mini", "stream": True,
                         "messages": [{"role": "user", "content": "Hello, benchmark!"}]}).encode()
    targets = {"direct": (sim_port, {"Authorization": f"Bearer {SIM_KEY}"}),
               "tollway": (gw_port, {"Authorization": f"Bearer {token}"})}
    report: dict = {"rows": []}
    for concurrency, requests in ((1, int(3000 * scale)), (16, int(20000 * scale)), (64, int(20000 * scale))):
        row = {"scenario": f"non-streaming c={concurrency}"}
        for name, (port, headers) in targets.items():
            cpu_before = cpu_seconds(gw_pid)
            result = await scenario(port, path, plain, headers, concurrency, requests, 20)
            row[name] = result.summary()
            if name == "tollway":
                row["tollway_cpu_ms_per_request"] = round(
                    (cpu_seconds(gw_pid) - cpu_before) * 1000 / max(1, len(result.latencies)), 3)
        report["rows"].append(row)
    for concurrency, requests in ((1, int(1500 * scale)), (16, int(4000 * scale))):
        row = {"scenario": f"streaming c={concurrency}, 20 chunks"}
        for name, (port, headers) in targets.items():
            result = await scenario(port, path, stream, {**headers, "x-sim-chunks": "20"}, concurrency, requests, 20)
            row[name] = result.summary()
        report["rows"].append(row)
    report["tollway_rss_mib"] = round(rss_mib(gw_pid), 1)
    return report


def print_report(report: dict) -> None:
    print("\n| scenario | direct rps | Tollway rps | direct p50 / p99 ms | Tollway p50 / p99 ms | added p50 / p99 ms |"
          " Tollway CPU ms/req |")
    print("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        d, t = row["direct"], row["tollway"]
        print(f"| {row['scenario']} | {d['rps']:,} | {t['rps']:,} | {d['p50_ms']} / {d['p99_ms']} | "
              f"{t['p50_ms']} / {t['p99_ms']} | {t['p50_ms'] - d['p50_ms']:.3f} / {t['p99_ms'] - d['p99_ms']:.3f} | "
              f"{row.get('tollway_cpu_ms_per_request', '-')} |")
        if d.get("errors") or t.get("errors") or set(d["statuses"]) != {200} or set(t["statuses"]) != {200}:
            print(f"|   NOT ALL 200: direct {d['statuses']} errors {d['errors']}, "
                  f"Tollway {t['statuses']} errors {t['errors']} | | | | | | |")
    for streaming in report["rows"][-2:]:
        print(f"\n{streaming['scenario']}: TTFB p50 direct {streaming['direct']['ttfb_p50_ms']} ms, "
              f"Tollway {streaming['tollway']['ttfb_p50_ms']} ms "
              f"(added {streaming['tollway']['ttfb_p50_ms'] - streaming['direct']['ttfb_p50_ms']:.3f} ms)")
    print(f"Tollway RSS after warm-up: {report['tollway_rss_mib']} MiB")
    print(f"event writer: {report['event_writer_rows_per_s']:,} events/s into DuckDB")
    lookup = report["price_lookup"]
    print(f"metering a request (price lookup at admission and settlement + exact cost): {lookup['p50_us']} µs p50, "
          f"{lookup['p99_us']} µs p99; a model's first lookup through the price book: {lookup['first_lookup_ms']} ms")


if __name__ == "__main__":
    sys.exit(main())
