"""Segment ingest and worker throughput (not part of the suite).

    python tests/perf/ingest.py [--quick] [--no-workers]

1. Ingest: sealed segments of `batch_size` (5,000) events each, as gateways write them, ingested
   into an `events.duckdb` that already holds a history (the `event_id` check reads it), in the
   pipeline's transactions of 256 segments; then the same segments again under new names (every
   event a duplicate, skipped). Prints events/s for both.
2. Throughput of `tollway serve --workers 2` against `--workers 1` (segment sink, Redis limit store,
   both in the same run) when redis-server and the Redis store are available: non-streaming chat
   completions at concurrency 64 from the raw load generator, against the simulated provider.
   Every process shares this machine's cores; the line printed says how many there are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import duckdb  # noqa: E402

from proxy.events import CREATE_TABLE  # noqa: E402
from proxy.pipeline.ingest import ingest  # noqa: E402
from proxy.recorder import open_events_db  # noqa: E402

SEGMENT_EVENTS = 5_000
SIM_KEY = "sk-bench-openai-0001"
#: One synthetic event per row of range(): the schema's types, values as the gateway writes them.
SYNTHETIC = """SELECT uuid() AS event_id, now() - to_microseconds(i * 1000) AS ts, 'acme' AS tenant,
    uuid() AS user_pseudonym, 'token' AS auth_method, 'openai' AS provider, 'openai/gpt-4o-mini' AS model,
    'chat/completions' AS endpoint, false AS streamed, 200 AS status_code, 'ok' AS outcome,
    'operator-openai' AS key_id, 'unified' AS billing_mode, (i % 900)::BIGINT AS input_tokens,
    20::BIGINT AS output_tokens, 0::BIGINT AS cached_input_tokens, 0::BIGINT AS cache_write_tokens,
    0::BIGINT AS reasoning_tokens, 'reported' AS usage_source, 0.000012345::DECIMAL(18,9) AS cost_usd,
    1.5 AS latency_ms, 1.0 AS ttfb_ms, 1.2 AS upstream_ms, 1 AS attempts, false AS demo,
    NULL AS cache_write_1h_tokens, NULL AS input_audio_tokens, NULL AS output_audio_tokens,
    NULL AS web_search_calls, 'default' AS service_tier, 'gpt-4o-mini' AS priced_model,
    'genai-prices' AS price_source, NULL AS identity_source FROM range({start}, {stop}) t(i)"""


def write_segments(directory: Path, events: int) -> None:
    directory.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(CREATE_TABLE)
    for number, start in enumerate(range(0, events, SEGMENT_EVENTS)):
        con.execute("DELETE FROM events")
        con.execute("INSERT INTO events " + SYNTHETIC.format(start=start, stop=min(events, start + SEGMENT_EVENTS)))
        con.execute(f"COPY events TO '{directory}/20260101T000000000000-bench-1-{number:08d}.parquet' "
                    "(FORMAT parquet, COMPRESSION zstd)")
    con.close()


def bench_ingest(events: int, history: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db = open_events_db(root / "events.duckdb")
        db.execute("INSERT INTO events " + SYNTHETIC.format(start=events, stop=events + history))
        db.execute("CHECKPOINT")
        write_segments(root / "segments", events)
        started = time.perf_counter()
        first = ingest(db, root / "segments")
        first_s = time.perf_counter() - started
        for path in (root / "segments" / "ingested").iterdir():
            shutil.copyfile(path, root / "segments" / f"again-{path.name}")
        started = time.perf_counter()
        again = ingest(db, root / "segments")
        again_s = time.perf_counter() - started
        total, distinct = db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        db.close()
    assert first.inserted == events and again.inserted == 0 and total == distinct == events + history
    return {"events": events, "segments": first.segments, "history_events": history,
            "ingest_events_per_s": round(events / first_s), "ingest_seconds": round(first_s, 2),
            "duplicates_events_per_s": round(events / again_s), "duplicates_seconds": round(again_s, 2)}


def workers_unavailable() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    from proxy.errors import StartupError
    from proxy.factory import limit_store_for
    from proxy.settings import LimitSettings

    try:
        limit_store_for(LimitSettings(store="redis://127.0.0.1:1/0"))
    except (StartupError, ImportError) as exc:
        return f"the Redis limit store is not in this build ({exc})"
    return None


def setup(root: Path, sim_port: int, gw_port: int, redis_port: int) -> str:
    from proxy.cli import main as cli_main
    from proxy.control import ControlStore
    from proxy.crypto import Keyring, load_master_key

    cli_main(["init", str(root)])
    (root / "tollway.toml").write_text(
        f'[server]\nport = {gw_port}\n[providers.openai]\nbase_url = "http://127.0.0.1:{sim_port}/openai"\n'
        f'[events]\nsink = "segments"\n[limits]\nstore = "redis://127.0.0.1:{redis_port}/0"\n')
    (root / "policy" / "routes.csv").write_text("p, *, openai/*, operator-openai\n")
    (root / "policy" / "limits.csv").write_text(
        "tenant,subject,metric,window,limit\nacme,tenant,usd,month,1000000\nacme,*,requests,minute,100000000\n")
    store = ControlStore(root / "control.db", Keyring(load_master_key(root)))
    store.add_key("operator-openai", "openai", SIM_KEY, None)
    _, token = store.create_token("acme", "bench@acme.com", [], None)
    store.close()
    return token


def bench_workers(requests: int) -> dict:
    from proxy.demo import wait_healthy
    from tests.helpers import REPO, free_port

    sim_port, gw_port, redis_port = free_port(), free_port(), free_port()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]})
    out = {"cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        token = setup(Path(tmp) / "deploy", sim_port, gw_port, redis_port)
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        sim = subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(sim_port), "--no-record",
                                "--key", f"openai={SIM_KEY}"], cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", sim, "simulator")
            for workers in (1, 2):
                out[f"workers_{workers}"] = run_gateway(Path(tmp) / "deploy", workers, gw_port, token, body, requests)
        finally:
            for proc in (sim, redis):
                proc.terminate()
                proc.wait(timeout=30)
    return out


def run_gateway(root: Path, workers: int, port: int, token: str, body: str, requests: int) -> dict:
    from proxy.demo import wait_healthy
    from tests.helpers import REPO
    from tests.perf.loadgen import build_request, run_load

    gw = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(root), "serve", "--workers",
                           str(workers)], cwd=REPO, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", gw, "gateway")
        time.sleep(2 if workers > 1 else 0.5)  # every worker listening
        request = build_request("127.0.0.1", port, "/openai/v1/chat/completions", body.encode(),
                                {"Authorization": f"Bearer {token}"})
        asyncio.run(run_load("127.0.0.1", port, request, concurrency=64, requests=min(500, requests), max_seconds=5))
        result = asyncio.run(run_load("127.0.0.1", port, request, concurrency=64, requests=requests, max_seconds=30))
    finally:
        gw.terminate()
        gw.wait(timeout=90)
    summary = result.summary()
    return {key: summary[key] for key in ("requests", "errors", "statuses", "rps", "p50_ms", "p99_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and requests (a smoke run)")
    parser.add_argument("--no-workers", action="store_true", help="only the ingest")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    report = {"ingest": bench_ingest(int(1_000_000 * scale), int(2_000_000 * scale))}
    why_not = workers_unavailable()
    if args.no_workers or why_not:
        report["workers"] = f"skipped: {why_not or '--no-workers'}"
    else:
        report["workers"] = bench_workers(int(10_000 * scale))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
