"""The control store on PostgreSQL: revoke propagation, and gateway CPU per request against SQLite.

    python tests/perf/control_postgres.py [--quick]

Starts a private PostgreSQL cluster (tests/pg_server.py), the simulated provider, and two gateways in
the same run: one whose control store is control.db (SQLite), one on PostgreSQL (both pinned to core
0, the simulator and this load generator to core 1). Prints:
- revoke propagation: a token revoked (committed by another connection, as the CLI does) until the
  PostgreSQL gateway answers it 401, p50/p99 over 50 revocations (the gateway polled every 2 ms);
- gateway CPU ms per request, SQLite vs PostgreSQL, in alternating rounds (non-streaming, c=16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from proxy.demo import wait_healthy  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402
from tests.perf.bench_gateway import SIM_KEY, cpu_seconds, pinned, scenario  # noqa: E402
from tests.pg_server import PgServer, unavailable_reason  # noqa: E402


def deployment(root: Path, sim_port: int, gw_port: int, control_url: str | None) -> tuple[str, str]:
    """A deployment with one operator key and one token; (token, control target)."""
    from proxy.cli import main as cli_main
    from proxy.control import ControlStore
    from proxy.crypto import Keyring, load_master_key

    cli_main(["init", str(root)])
    control = f'[control]\nurl = "{control_url}"\n' if control_url else ""
    (root / "tollway.toml").write_text(f'[server]\nport = {gw_port}\n[providers.openai]\nbase_url = '
                                       f'"http://127.0.0.1:{sim_port}/openai"\n{control}')
    (root / "policy" / "routes.csv").write_text("p, *, openai/*, operator-openai\n")
    (root / "policy" / "limits.csv").write_text(
        "tenant,subject,metric,window,limit\nacme,tenant,usd,month,1000000\nacme,*,requests,minute,100000000\n"
        "*,*,tokens,minute,100000000000\n")
    target = control_url or str(root / "control.db")
    store = ControlStore(control_url or root / "control.db", Keyring(load_master_key(root)))
    store.add_key("operator-openai", "openai", SIM_KEY, None)
    _, token = store.create_token("acme", "bench@acme.com", [], None)
    store.close()
    return token, target


def propagation(root: Path, url: str, gw_url: str, rounds: int) -> list[float]:
    """Seconds from a revoke's commit until the gateway refuses the token, per round."""
    from proxy.control import ControlStore
    from proxy.crypto import Keyring, load_master_key

    store = ControlStore(url, Keyring(load_master_key(root)))
    delays = []
    with httpx.Client(base_url=gw_url, timeout=5) as http:
        def status(token: str) -> int:
            return http.get("/openai/v1/models", headers={"authorization": f"Bearer {token}"}).status_code

        for _ in range(rounds):
            token_row, token = store.create_token("acme", "revokee@acme.com", [], None)
            deadline = time.monotonic() + 5
            while status(token) != 200:
                assert time.monotonic() < deadline, "a new token never reached the gateway"
                time.sleep(0.002)
            store.revoke_token(token_row.token_id)
            committed = time.monotonic()
            while status(token) != 401:
                assert time.monotonic() - committed < 5, "a revoked token was still accepted after 5 s"
                time.sleep(0.002)
            delays.append(time.monotonic() - committed)
    store.close()
    return delays


async def cpu_rounds(gateways: dict[str, tuple[int, str, int]], requests: int, rounds: int) -> dict[str, list[float]]:
    path = "/openai/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, benchmark!"}]}).encode()
    out: dict[str, list[float]] = {name: [] for name in gateways}
    for _ in range(rounds):
        for name, (port, token, pid) in gateways.items():
            before = cpu_seconds(pid)
            result = await scenario(port, path, body, {"Authorization": f"Bearer {token}"}, 16, requests, 30)
            out[name].append((cpu_seconds(pid) - before) * 1000 / max(1, len(result.latencies)))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and revocations (a smoke run)")
    args = parser.parse_args()
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}")
        return 1
    pinned(1)()
    requests, rounds, revocations = (1000, 2, 10) if args.quick else (6000, 4, 50)
    pg = PgServer().start()
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sim_port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "proxy.simulator", "--port", str(sim_port),
                                           "--no-record", "--key", f"openai={SIM_KEY}"], cwd=REPO,
                                          preexec_fn=pinned(1), stderr=subprocess.DEVNULL))
            wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", procs[0], "simulator")
            gateways = {}
            for name, url in (("sqlite", None), ("postgresql", pg.create_database())):
                port, root = free_port(), Path(tmp) / name
                token, target = deployment(root, sim_port, port, url)
                gw = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(root), "serve"], cwd=REPO,
                                      preexec_fn=pinned(0), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                procs.append(gw)
                wait_healthy(f"http://127.0.0.1:{port}/healthz", gw, f"gateway ({name})")
                gateways[name] = (port, token, gw.pid, root, target)
            port, _, _, root, target = gateways["postgresql"]
            delays = propagation(root, target, f"http://127.0.0.1:{port}", revocations)
            cpu = asyncio.run(cpu_rounds({n: (g[0], g[1], g[2]) for n, g in gateways.items()}, requests, rounds))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
        pg.close()
    ms = [d * 1000 for d in delays]
    print(f"revoke propagation over {len(ms)} revocations: p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, "
          f"max {max(ms):.1f} ms")
    sqlite_ms, pg_ms = statistics.median(cpu["sqlite"]), statistics.median(cpu["postgresql"])
    print(f"gateway CPU per request (c=16, {requests} requests x {rounds} alternating rounds, median): "
          f"SQLite {sqlite_ms:.3f} ms, PostgreSQL {pg_ms:.3f} ms, ratio {pg_ms / sqlite_ms:.3f}x")
    print("rounds:", {n: [round(v, 3) for v in values] for n, values in cpu.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
