"""Report benchmark: build every report from 1 million and 10 million synthetic events.

    python tests/perf/bench_reports.py [--events 1000000 10000000]

Fills a fresh `events.duckdb` with synthetic events in SQL (50 tenants, 5,000 users, 8 models, two
months, a mix of outcomes, unpriced and BYOK usage), then times `build_reports` (all reports plus
statements and budget status) in a child process and reports its peak memory (max RSS).
Target on this 2-core machine: 10 million events in under 20 s and under 4 GiB.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.recorder import open_events_db  # noqa: E402

FILL = """
INSERT INTO events
SELECT uuid(), TIMESTAMPTZ '2026-09-01 00:00:00+00' + to_microseconds(CAST(i * (5184000000000 // {n}) AS BIGINT)),
       't' || lpad(CAST(i % 50 AS VARCHAR), 2, '0'),
       CAST(md5('u' || CAST(i % 5000 AS VARCHAR)) AS UUID), 'token',
       ['openai', 'anthropic', 'gemini'][i % 3 + 1],
       ['openai/gpt-4o-mini', 'anthropic/claude-sonnet-4-5', 'gemini/gemini-2.5-flash', 'openai/gpt-4.1',
        'anthropic/claude-haiku-4-5', 'gemini/gemini-2.5-pro', 'openai/o3', 'groq/llama'][i % 8 + 1],
       'chat/completions', i % 4 = 0, CASE WHEN i % 97 = 0 THEN 403 ELSE 200 END,
       CASE WHEN i % 97 = 0 THEN 'denied' WHEN i % 89 = 0 THEN 'upstream_error' ELSE 'ok' END,
       'k', CASE WHEN i % 5 = 0 THEN 'byok' ELSE 'unified' END,
       100 + i % 900, 20 + i % 300, i % 50, 0, 0,
       CASE WHEN i % 97 = 0 THEN 'none' ELSE 'reported' END,
       CASE WHEN i % 97 = 0 OR i % 8 = 7 THEN NULL ELSE CAST((i % 1000) * 0.000001234 AS DECIMAL(18, 9)) END,
       1.0 + i % 500, 0.5 + i % 100, 1.0 + i % 400, 1, false
FROM range({n}) t(i)
"""


def fill(path: Path, n: int) -> float:
    started = time.perf_counter()
    con = open_events_db(path)
    con.execute(FILL.format(n=n)).fetchall()
    con.close()
    return time.perf_counter() - started


def build_in_child(data_dir: Path) -> None:
    """Run in a child process so its peak RSS is the report build's alone."""
    import duckdb

    from analytics.jobs import BillingInputs, build_reports
    from policy.files import LimitRule, Tenant

    tenants = {f"t{i:02d}": Tenant(f"t{i:02d}", f"Tenant {i}", __import__("decimal").Decimal(10),
                                   __import__("decimal").Decimal(2)) for i in range(50)}
    limits = [LimitRule(1, "*", "tenant", "usd", "month", __import__("decimal").Decimal(1000)),
              LimitRule(2, "*", "*", "usd", "day", __import__("decimal").Decimal(5))]
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    started = time.perf_counter()
    manifest = build_reports(con, data_dir / "reports", BillingInputs(tenants, [], limits))
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = ", ".join(f"{k} {v['rows']:,}" for k, v in manifest["reports"].items())
    print(f"{manifest['source_rows']:>12,} events: built in {elapsed:6.1f} s, peak RSS {peak:,.0f} MiB ({rows})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        build_in_child(Path(args.child))
        return 0
    for n in args.events:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = fill(Path(tmp) / "events.duckdb", n)
            print(f"{n:>12,} events: generated in {seconds:6.1f} s", flush=True)
            subprocess.run([sys.executable, __file__, "--child", tmp], check=True, timeout=900)
    return 0


if __name__ == "__main__":
    sys.exit(main())
