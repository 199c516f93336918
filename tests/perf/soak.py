"""Soak benchmark: minutes of mixed traffic and faults through one `tollway serve`.

    python3 tests/perf/soak.py [--duration 600] [--concurrency 16] [--kill]

Builds a temp deployment (tests.helpers.Deployment: the test keys, a few users), starts the
simulated providers in this process (as tests/conftest.py does) and the gateway as a subprocess
(tests.helpers.GatewayProcess), then runs bounded-concurrency asyncio + httpx traffic: OpenAI chat
completions (plain and streamed), Anthropic streamed messages, Gemini generateContent, and faults
steered through the simulator's `x-sim-*` headers (provider 429/500/503, slow chunks, client
disconnects mid-stream), invalid tokens, a model the policy denies and a user over a request limit.

For every response it keeps `x-tollway-request-id` and the status. The gateway's RSS (VmRSS) is
sampled after a warm-up of min(30 s, duration/6) — long enough for the gateway's report job, set to
run every 10 s here, to have run — and at the end. The gateway is then stopped with
SIGTERM and events.duckdb is matched against the ids the client saw: every response whose headers
reached the client must have exactly one event (a client that left mid-stream still has one, with
outcome `cancelled`); requests that never got headers are counted apart. Exit status 1 when an
event is missing, duplicated or unexplained, the gateway did not stop cleanly, or RSS grew > 5 %
(median of the last five samples against the median of the first five: RSS is a sawtooth, each
report build streams a snapshot of the events, so single samples mostly measure the phase).

`--kill`: SIGKILL the gateway after half the duration instead, stop the load, and report how many
responses the client completed (successes in particular) have no event, against the flush interval
of the event writer: only responses completed within about one interval before the kill may be lost.

Every loop is bounded in count and time; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import duckdb  # noqa: E402
import httpx  # noqa: E402

from proxy.simulator import Simulator  # noqa: E402
from tests.helpers import SIM_KEYS, Deployment, GatewayProcess  # noqa: E402

REQUEST_ID = "x-tollway-request-id"
PROMPT = "Tell me a story about a tollway that never sleeps."
MAX_RPS = 5_000  # the request budget: duration x MAX_RPS requests at most, whatever happens
REQUEST_TIMEOUT_S = 15
RSS_GROWTH_LIMIT_PCT = 5.0
RSS_WINDOW = 5  # samples whose median stands for "at the start" and "at the end"
KINDS = ("ok", "provider_error", "refused_401", "refused_403", "refused_429", "client_disconnect",
         "transport_error", "other")

#: Generous limits so the soak is not refused wholesale (the sample allows acme users 60 requests a
#: minute), plus one tight limit: erin's requests beyond 30 a minute are refused with 429.
LIMITS = ("tenant,subject,metric,window,limit\n"
          "acme,tenant,usd,month,1000000\n"
          "*,*,requests,minute,100000000\n"
          "*,*,tokens,minute,100000000000\n"
          "globex,erin@globex.com,requests,minute,30\n")


REPORT_INTERVAL_S = 10  # the gateway's [pipeline] report_interval_s in the soak deployment


@dataclass(frozen=True)
class Scenario:
    name: str
    weight: int
    tokens: tuple[str, ...]  # token names, one picked per request
    path: str
    body: dict
    header: str  # where the token goes
    prefix: str = ""
    sim: dict = field(default_factory=dict)  # x-sim-* headers
    disconnect: bool = False  # read one chunk, then close the connection
    bad_token: bool = False


def _openai(stream: bool) -> dict:
    return {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}


def _anthropic(stream: bool) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": PROMPT}]}


GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
OPENAI_PATH, ANTHROPIC_PATH = "/openai/v1/chat/completions", "/anthropic/v1/messages"
GEMINI_PATH = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
BEARER = ("authorization", "Bearer ")

#: alice: acme, role engineering (Claude through acme's own key); bob: acme, no role (Claude denied);
#: carol: globex; dave: globex, token role platform-admins (Anthropic through the operator key, used
#: only for provider 429s, whose key cool-down then refuses his next calls); erin: globex, tight limit.
SCENARIOS = (
    Scenario("openai_chat", 25, ("alice", "carol"), OPENAI_PATH, _openai(False), *BEARER),
    Scenario("openai_stream", 18, ("alice", "carol"), OPENAI_PATH, _openai(True), *BEARER, sim={"x-sim-chunks": "8"}),
    Scenario("anthropic_stream", 15, ("alice",), ANTHROPIC_PATH, _anthropic(True), "x-api-key",
             sim={"x-sim-chunks": "8"}),
    Scenario("gemini_generate", 15, ("carol",), GEMINI_PATH, GEMINI_BODY, "x-goog-api-key"),
    Scenario("slow_stream", 4, ("carol",), OPENAI_PATH, _openai(True), *BEARER,
             sim={"x-sim-chunks": "6", "x-sim-chunk-delay-ms": "100"}),
    Scenario("disconnect_stream", 4, ("alice",), ANTHROPIC_PATH, _anthropic(True), "x-api-key",
             sim={"x-sim-output-tokens": "40", "x-sim-chunks": "20", "x-sim-chunk-delay-ms": "50"}, disconnect=True),
    Scenario("disconnect_openai", 2, ("carol",), OPENAI_PATH, _openai(True), *BEARER,
             sim={"x-sim-output-tokens": "40", "x-sim-chunks": "20", "x-sim-chunk-delay-ms": "50"}, disconnect=True),
    Scenario("fault_500", 2, ("alice", "carol"), OPENAI_PATH, _openai(False), *BEARER, sim={"x-sim-fault": "status:500"}),
    Scenario("fault_503", 2, ("carol",), GEMINI_PATH, GEMINI_BODY, "x-goog-api-key", sim={"x-sim-fault": "status:503"}),
    Scenario("fault_429", 2, ("dave",), ANTHROPIC_PATH, _anthropic(False), "x-api-key",
             sim={"x-sim-fault": "status:429"}),
    Scenario("invalid_token", 2, ("alice",), OPENAI_PATH, _openai(False), *BEARER, bad_token=True),
    Scenario("policy_denied", 2, ("bob",), ANTHROPIC_PATH, _anthropic(False), "x-api-key"),
    Scenario("over_limit", 2, ("erin",), OPENAI_PATH, _openai(False), *BEARER),
)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def build_deployment(root: Path, sim_url: str) -> Deployment:
    """As the `deployment` fixture of tests/conftest.py, plus dave, erin and soak-sized limits."""
    dep = Deployment(root, sim_url)
    dep.add_test_keys()
    dep.issue_token("alice", "acme", "alice@acme.com")
    dep.issue_token("bob", "acme", "bob@acme.com")
    dep.issue_token("carol", "globex", "carol@globex.com")
    dep.issue_token("dave", "globex", "dave@globex.com", roles=("platform-admins",))
    dep.issue_token("erin", "globex", "erin@globex.com")
    (root / "policy" / "limits.csv").write_text(LIMITS)
    # Reports every 10 s, so that the warm-up includes report builds: their memory (DuckDB and Polars
    # pools, kept by the allocator) is part of the steady state the growth is measured against.
    dep.write_toml(extra=f"\n[pipeline]\nreport_interval_s = {REPORT_INTERVAL_S}\n")
    return dep


def flush_interval_ms(dep: Deployment) -> int:
    settings = tomllib.loads((dep.path / "tollway.toml").read_text())
    return int(settings.get("events", {}).get("flush_interval_ms", 500))


@dataclass(slots=True)
class Response:
    request_id: str | None  # None: no headers arrived, or they lacked the id
    scenario: str
    kind: str
    status: int | None  # None: no headers arrived
    done: float  # monotonic time the client finished with it
    latency: float


@dataclass
class Run:
    url: str
    tokens: dict[str, str]
    deadline: float
    budget: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    responses: list[Response] = field(default_factory=list)
    sent: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    rss_start: int | None = None
    rss_end: int | None = None
    kill_at: float | None = None  # monotonic time of the SIGKILL
    gateway_died: str | None = None
    elapsed: float = 0.0
    wall_start: float = field(default_factory=time.time)  # to place the gateway's log lines on the run's clock


def classify(status: int, body: bytes) -> str:
    if status < 300:
        return "ok"
    if status == 429:  # the provider's (relayed) or the gateway's own (limit, key cooling down)
        return "provider_error" if b"Simulated error" in body else "refused_429"
    if status in (401, 403):
        return f"refused_{status}"
    if status >= 500:
        return "provider_error"
    return "other"


async def one_request(client: httpx.AsyncClient, run: Run, sc: Scenario, rng: random.Random) -> None:
    token = "tw_" + secrets.token_hex(16) if sc.bad_token else run.tokens[rng.choice(sc.tokens)]
    headers = {sc.header: sc.prefix + token, **sc.sim}
    started = time.monotonic()
    request_id, status, kind = None, None, "transport_error"
    try:
        async with client.stream("POST", run.url + sc.path, json=sc.body, headers=headers) as response:
            request_id, status = response.headers.get(REQUEST_ID), response.status_code
            if sc.disconnect and status == 200:
                async for _ in response.aiter_raw():
                    break  # leaving the block closes the connection mid-stream
                kind = "client_disconnect"
            else:
                kind = classify(status, await response.aread())
    except httpx.HTTPError:
        kind = "transport_error"
    now = time.monotonic()
    run.responses.append(Response(request_id, sc.name, kind, status, now, now - started))


async def worker(client: httpx.AsyncClient, run: Run, seed: int) -> None:
    rng = random.Random(seed)
    weights = [s.weight for s in SCENARIOS]
    while not run.stop.is_set() and time.monotonic() < run.deadline and run.sent < run.budget:
        run.sent += 1
        await one_request(client, run, rng.choices(SCENARIOS, weights)[0], rng)


async def monitor(run: Run, gw: GatewayProcess, sim: Simulator, started: float, warmup: float,
                  kill_after: float | None) -> None:
    """Sample RSS, keep the simulator's request log short, watch the gateway, SIGKILL it in --kill mode."""
    pid = gw.proc.pid
    step = 0.25
    next_sample = started + warmup
    sample_every = max(1.0, (run.deadline - started) / 20)
    while not run.stop.is_set() and time.monotonic() < run.deadline + 1:
        await asyncio.sleep(step)
        now = time.monotonic()
        sim.clear()
        if gw.proc.poll() is not None and run.kill_at is None:
            run.gateway_died = f"gateway exited with {gw.proc.returncode} after {now - started:.1f} s"
            run.stop.set()
            return
        if now >= next_sample:
            kib = rss_kib(pid)
            if kib is not None:
                run.rss.append((round(now - started, 1), kib))
                if run.rss_start is None:
                    run.rss_start = kib
            next_sample = now + sample_every
        if kill_after is not None and now - started >= kill_after:
            run.rss_end = rss_kib(pid)
            run.kill_at = time.monotonic()
            gw.proc.send_signal(signal.SIGKILL)
            run.stop.set()
            return


async def load(gw: GatewayProcess, sim: Simulator, dep: Deployment, args: argparse.Namespace) -> Run:
    started = time.monotonic()
    run = Run(gw.url, dep.tokens, started + args.duration, int(args.duration * MAX_RPS), wall_start=time.time())
    warmup = min(3 * REPORT_INTERVAL_S, args.duration / 6)
    kill_after = args.duration / 2 if args.kill else None
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        watcher = asyncio.create_task(monitor(run, gw, sim, started, warmup, kill_after))
        workers = [asyncio.create_task(worker(client, run, seed)) for seed in range(args.concurrency)]
        _, pending = await asyncio.wait(workers, timeout=args.duration + 2 * REQUEST_TIMEOUT_S + 5)
        run.stop.set()
        for task in pending:  # bounded: a request can take at most REQUEST_TIMEOUT_S
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.wait_for(watcher, timeout=5)
    run.elapsed = (run.kill_at or time.monotonic()) - started
    if run.rss_end is None and run.kill_at is None:
        run.rss_end = rss_kib(gw.proc.pid)
        if run.rss_end is not None:
            run.rss.append((round(time.monotonic() - started, 1), run.rss_end))
    return run


def read_events(dep: Deployment) -> list[tuple[str, str, int]]:
    """(event_id, outcome, status_code) of every event: Deployment.events() reads every column of every
    row into dicts, too much for a long soak, so the same read-only query asks for three columns."""
    path = dep.path / "events.duckdb"
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:  # e.g. a WAL left by SIGKILL that a read-only connection cannot replay
        copy = Path(tempfile.mkdtemp(dir=dep.path.parent)) / "events.duckdb"
        copy.write_bytes(path.read_bytes())
        wal = path.with_name(path.name + ".wal")
        if wal.exists():
            copy.with_name(copy.name + ".wal").write_bytes(wal.read_bytes())
        con = duckdb.connect(str(copy))
    try:
        return [(str(e), o, s) for e, o, s in con.execute("SELECT event_id, outcome, status_code FROM events")
                .fetchall()]
    finally:
        con.close()


def report_builds(log_text: str, wall_start: float) -> list[tuple[float, str]]:
    """(seconds since the load started, message) of each `reports built` line of the gateway log."""
    builds = []
    for line in log_text.splitlines():
        if "reports built" in line:
            try:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_start
            except ValueError:
                continue
            builds.append((at, line.split(": ", 1)[-1]))
    return builds


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def row(name: str, value) -> None:
    print(f"| {name} | {value} |")


def report(run: Run, events: list[tuple[str, str, int]], args: argparse.Namespace, interval_ms: int,
           gw_exit: int | None, log_text: str) -> int:
    failures: list[str] = []
    responses = run.responses
    kinds = Counter(r.kind for r in responses)
    no_headers = [r for r in responses if r.status is None]
    lacking_id = [r for r in responses if r.status is not None and r.request_id is None]
    seen = Counter(r.request_id for r in responses if r.request_id is not None)
    by_event = Counter(e for e, _, _ in events)
    outcome_of = {e: o for e, o, _ in events}
    missing = [r for r in responses if r.request_id is not None and r.request_id not in by_event]
    extra = [e for e in by_event if e not in seen]
    dup_events = {e: n for e, n in by_event.items() if n > 1}
    dup_seen = {e: n for e, n in seen.items() if n > 1}
    ok_latencies = [r.latency for r in responses if r.kind == "ok"]

    print(f"\nTollway soak ({'SIGKILL at half time' if args.kill else 'SIGTERM at the end'}), "
          f"concurrency {args.concurrency}\n")
    print("| measure | value |\n|---|---|")
    row("duration (s)", f"{run.elapsed:.1f}" + (" (load stopped at the kill)" if args.kill else ""))
    row("requests", f"{len(responses):,}")
    row("requests/s", f"{len(responses) / run.elapsed:,.0f}" if run.elapsed else "-")
    row("ok latency p50 / p99 (ms)", f"{pct(ok_latencies, 0.5):.1f} / {pct(ok_latencies, 0.99):.1f}")
    for kind in KINDS:
        row(f"kind {kind}", f"{kinds.get(kind, 0):,}")
    row("  of which no headers at all (counted apart)", f"{len(no_headers):,}")
    row("responses with headers", f"{len(responses) - len(no_headers):,}")
    row("  of which without x-tollway-request-id", f"{len(lacking_id):,}")
    row("distinct request ids seen by the client", f"{len(seen):,}")
    row("events recorded (rows / distinct ids)", f"{len(events):,} / {len(by_event):,}")
    with_headers = len(responses) - len(no_headers)
    row("events recorded vs responses seen (headers)",
        f"{len(events):,} vs {with_headers:,}: " + ("match" if len(events) == with_headers and not missing
                                                   else "MISMATCH"))
    row("responses without their event", f"{len(missing):,}")
    row("events the client never saw an id for", f"{len(extra):,}")
    row("event ids recorded more than once", f"{len(dup_events):,}")
    row("request ids seen more than once", f"{len(dup_seen):,}")
    for outcome, n in sorted(Counter(o for _, o, _ in events).items(), key=lambda x: -x[1]):
        row(f"event outcome {outcome}", f"{n:,}")
    builds = report_builds(log_text, run.wall_start)
    if run.rss_start and run.rss_end:
        # RSS is a sawtooth (every report build streams a snapshot of the events), so one sample at
        # each end mostly measures the phase: the growth judged is between the medians of the first
        # and the last RSS_WINDOW samples, the single-sample figure is shown beside it.
        first = statistics.median(k for _, k in run.rss[:RSS_WINDOW])
        last = statistics.median(k for _, k in run.rss[-RSS_WINDOW:])
        growth = (last - first) / first * 100
        row("gateway RSS after warm-up / at the end, single samples (MiB)",
            f"{run.rss_start / 1024:.1f} / {run.rss_end / 1024:.1f} "
            f"({(run.rss_end - run.rss_start) / run.rss_start * 100:+.1f} %)")
        row(f"gateway RSS, median of the first / last {RSS_WINDOW} samples (MiB)",
            f"{first / 1024:.1f} / {last / 1024:.1f} ({growth:+.1f} %)")
        row("RSS samples (s: MiB)", ", ".join(f"{t:g}: {k / 1024:.0f}" for t, k in run.rss))
        row("RSS max (MiB)", f"{max(k for _, k in run.rss) / 1024:.1f}")
        after = [k for t, k in run.rss if builds and t > builds[0][0] + 1]
        if len(after) >= 2:  # separates the step of the first in-process report build from a steady creep
            row("RSS growth from the first sample after the first report build to the end",
                f"{after[0] / 1024:.1f} -> {run.rss_end / 1024:.1f} MiB "
                f"({(run.rss_end - after[0]) / after[0] * 100:+.1f} %, informational)")
    else:
        growth = None
        row("gateway RSS", "not sampled")
    row("gateway exit status", gw_exit if gw_exit is not None else "-")

    print("\nper scenario (client-side kinds; event outcomes of the same requests):")
    for sc in SCENARIOS:
        mine = [r for r in responses if r.scenario == sc.name]
        ks = Counter(r.kind for r in mine)
        outs = Counter(outcome_of.get(r.request_id, "NO EVENT") for r in mine if r.request_id is not None)
        print(f"  {sc.name:<18} {len(mine):>7,}  kinds {dict(ks.most_common())}  outcomes {dict(outs.most_common())}")

    limited = [r for r in responses if r.scenario == "over_limit" and r.kind == "ok"]
    if limited:  # the limit counts per calendar minute (UTC): 30 in each minute the run touched
        minutes = {int(t // 60) for t in (time.time() - (time.monotonic() - r.done) for r in limited)}
        print(f"  over_limit: {len(limited)} ok over {len(minutes)} calendar minute(s) touched, limit 30 a minute"
              + ("" if len(limited) <= 30 * len(minutes) else "  <-- MORE THAN THE LIMIT ALLOWS"))

    if builds:  # the gateway's report job ([pipeline] report_interval_s) runs DuckDB queries in-process
        print(f"\ngateway report builds during the run ({len(builds)}), from its log:")
        for at, line in builds[:10]:
            print(f"  at {at:.1f} s: {line}")
    errors = [line for line in log_text.splitlines() if "Traceback" in line or " ERROR " in line]
    if errors:
        print(f"\ngateway log: {len(errors)} error lines, first ones:")
        for line in errors[:5]:
            print("  " + line[:300])

    if run.gateway_died:
        failures.append(run.gateway_died)
    if args.kill:
        failures += kill_report(run, missing, interval_ms)
    else:
        if missing:
            failures.append(f"{len(missing)} responses have no event, e.g. "
                            f"{[(r.request_id, r.scenario, r.status) for r in missing[:5]]}")
        if dup_events:
            failures.append(f"{len(dup_events)} event ids recorded more than once, e.g. {list(dup_events)[:3]}")
        if len(extra) > len(no_headers):
            failures.append(f"{len(extra)} events for ids the client never saw, more than the {len(no_headers)} "
                            "requests that got no headers")
        if lacking_id:
            failures.append(f"{len(lacking_id)} responses lacked {REQUEST_ID}")
        if gw_exit != 0:
            failures.append(f"the gateway exited with {gw_exit} on SIGTERM")
        if growth is None:
            failures.append("gateway RSS could not be sampled")
        elif growth > RSS_GROWTH_LIMIT_PCT:
            failures.append(f"gateway RSS grew {growth:.1f} % (limit {RSS_GROWTH_LIMIT_PCT:g} %)")
    print("\nRESULT: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def kill_report(run: Run, missing: list[Response], interval_ms: int) -> list[str]:
    interval = interval_ms / 1000
    kill = run.kill_at
    before = [r for r in run.responses if r.request_id is not None and r.done <= kill]
    ok_before = [r for r in before if r.kind == "ok"]
    missing_ids = {r.request_id for r in missing}
    missing_ok = [r for r in ok_before if r.request_id in missing_ids]
    recent = [r for r in before if kill - r.done <= interval]
    recent_ok = [r for r in recent if r.kind == "ok"]
    after = [r for r in run.responses if r.done > kill]

    def ages(rs: list[Response]) -> str:
        buckets = Counter("<= 1 interval" if kill - r.done <= interval else
                          "1-2 intervals" if kill - r.done <= 2 * interval else "> 2 intervals" for r in rs)
        return ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())) or "none"

    print(f"\nSIGKILL: event writer flush interval {interval_ms} ms ([events] flush_interval_ms in tollway.toml)")
    print("| measure | value |\n|---|---|")
    row("responses completed before the kill (with an id)", f"{len(before):,}")
    row("  of which successes (kind ok)", f"{len(ok_before):,}")
    row(f"completed within the last {interval_ms} ms before the kill (all / ok)", f"{len(recent):,} / {len(recent_ok):,}")
    row("completed successes without their event", f"{len(missing_ok):,}")
    row("  by age at the kill", ages(missing_ok))
    missing_before = [r for r in missing if r.done <= kill]
    row("completed responses of any kind without their event", f"{len(missing_before):,}")
    row("  by age at the kill", ages(missing_before))
    if missing_before:
        oldest = max(kill - r.done for r in missing_before)
        row("  oldest missing, completed before the kill by (ms)", f"{oldest * 1000:.0f}")
    row("responses cut by the kill (headers, then the connection died)",
        f"{sum(1 for r in after if r.status is not None):,} ({sum(1 for r in after if r.request_id in missing_ids):,} "
        "without an event)")
    row("requests with no headers after the kill", f"{sum(1 for r in after if r.status is None):,}")
    late = [r for r in missing_before if kill - r.done > interval]
    if late:
        return [f"{len(late)} responses completed more than one flush interval ({interval_ms} ms) before the kill "
                f"have no event (ages ms: {sorted(round((kill - r.done) * 1000) for r in late)[:10]})"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the gateway at half the duration")
    args = parser.parse_args()
    if args.duration <= 0 or not 1 <= args.concurrency <= 1024:
        parser.error("--duration must be > 0 and --concurrency within 1..1024")

    sim = Simulator(keys=SIM_KEYS).start()
    try:
        with tempfile.TemporaryDirectory(prefix="tollway-soak-") as tmp:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                dep = build_deployment(Path(tmp) / "deploy", sim.url)  # quiet: `tollway init` talks
            interval_ms = flush_interval_ms(dep)
            gw = GatewayProcess(dep).start()
            try:
                run = asyncio.run(load(gw, sim, dep, args))
            finally:
                if args.kill:
                    gw_exit = gw.stop(signal.SIGKILL, timeout=10)
                else:
                    gw_exit = gw.stop(signal.SIGTERM, timeout=60)
            events = read_events(dep)
            return report(run, events, args, interval_ms, gw_exit, gw.log())
    finally:
        sim.stop()


if __name__ == "__main__":
    sys.exit(main())
