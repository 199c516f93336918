"""A/B: the gateway's CPU per request in this checkout against another one (e.g. the previous main).

    git worktree add /tmp/previous origin/main
    python tests/perf/ab_gateway.py --base /tmp/previous [--runs 4] [--stream]
    python tests/perf/ab_gateway.py --bare [--runs 4] [--stream]

Each run starts the simulated provider (from this checkout) and `tollway serve` from one checkout,
pinned as in `bench_gateway.py`, sends the same load (20,000 requests at concurrency 16, or 12,000
streams of 20 chunks), and reads the gateway's CPU time from /proc. Runs alternate base and this
checkout, so drifting machine load hits both alike. Each deployment uses its own checkout's sample
`pricing.csv`, so both meter the same requests (a base that cannot price the model would do less).
Report schedules are pushed out of the measured window. Every loop is bounded in count and time.

`--bare` compares with the yardstick instead: a bare Litestar + aiohttp passthrough
(`bare_passthrough.py`, same server settings, same load), so the ratio is what the whole pipeline
(token, policy, limits, metering, metrics, event) costs on top of serving HTTP and calling the provider.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.demo import wait_healthy  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402
from tests.perf.bench_gateway import SIM_KEY, cpu_seconds, pinned, scenario, setup_deployment  # noqa: E402


def run_once(checkout: Path | None, stream: bool) -> float:
    """µs of gateway CPU per request for one run of `checkout`'s gateway (None: the bare passthrough)."""
    sim_port, gw_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "deploy"
        token = setup_deployment(deploy, sim_port, gw_port)
        shutil.copy((checkout or REPO) / "data" / "pricing.csv", deploy / "pricing.csv")
        toml = deploy / "tollway.toml"
        toml.write_text(toml.read_text() + "\n[pipeline]\nreport_interval_s = 3600\n")
        sim = subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(sim_port), "--no-record",
                                "--key", f"openai={SIM_KEY}"], cwd=REPO, preexec_fn=pinned(1),
                               stderr=subprocess.DEVNULL)
        command = ([sys.executable, "-m", "proxy.cli", "--data-dir", str(deploy), "serve"] if checkout else
                   [sys.executable, str(Path(__file__).with_name("bare_passthrough.py")), "--port", str(gw_port),
                    "--upstream", f"http://127.0.0.1:{sim_port}/openai", "--key", SIM_KEY])
        gw = subprocess.Popen(command, cwd=checkout or REPO, preexec_fn=pinned(0), stderr=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", sim, "simulator")
            wait_healthy(f"http://127.0.0.1:{gw_port}/healthz", gw, "gateway")
            body: dict = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]}
            headers = {"Authorization": f"Bearer {token}"}
            if stream:
                body["stream"], headers["x-sim-chunks"] = True, "20"
            requests = 12_000 if stream else 20_000
            before = cpu_seconds(gw.pid)
            result = asyncio.run(scenario(gw_port, "/openai/v1/chat/completions", json.dumps(body).encode(), headers,
                                          16, requests, 30))
            return (cpu_seconds(gw.pid) - before) * 1e6 / (len(result.latencies) + min(200, requests))
        finally:
            for proc in (gw, sim):
                proc.terminate()
                proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--base", type=Path, help="the checkout to compare against")
    choice.add_argument("--bare", action="store_true", help="compare against a bare Litestar + aiohttp passthrough")
    parser.add_argument("--runs", type=int, default=4, help="runs of each checkout (alternating)")
    parser.add_argument("--stream", action="store_true", help="streamed responses instead of JSON")
    args = parser.parse_args()
    pinned(1)()  # this load generator shares core 1 with the simulator
    results: dict[str, list[float]] = {"base": [], "this": []}
    for run in range(args.runs):
        for name, checkout in (("base", None if args.bare else args.base.resolve()), ("this", REPO)):
            results[name].append(run_once(checkout, args.stream))
            print(f"run {run + 1} {name}: {results[name][-1]:.1f} µs CPU per request", flush=True)
    base, this = statistics.median(results["base"]), statistics.median(results["this"])
    label = "bare passthrough" if args.bare else "base"
    print(f"median: {label} {base:.1f} µs, this {this:.1f} µs per request ({this / base:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
