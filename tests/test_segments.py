"""Events as sealed segments and `tollway pipeline`: nothing lost, nothing doubled.

A real `tollway serve` with `[events] sink = "segments"`, then `tollway pipeline run --once`: every
answered request has exactly one event; ingesting again (or a segment copied back) adds nothing;
kill -9 of the pipeline mid-ingest, then a rerun: nothing lost or doubled; kill -9 of a gateway
loses at most its unsealed buffer, and its restart counts the sealed events against the limits;
`serve --workers 2` refused without Redis and segments; with a private redis-server (when the Redis
limit store is in this build) two workers serve and every event is there exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import pytest

from proxy.events import Event
from proxy.pipeline.ingest import ingest
from proxy.recorder import open_events_db
from proxy.sinks.segment_store import LocalSegments
from proxy.sinks.segments import SegmentSink, sealed_segments
from proxy.sinks.spool import read_rows
from tests.helpers import OPEN_ACCESS, REPO, GatewayProcess, free_port, run_cli

pytestmark = pytest.mark.timeout(120)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
REQUEST_ID = "x-tollway-request-id"


def segments_deployment(deployment, events: str = "", limits: str = "") -> Path:
    """`[events] sink = "segments"` (plus `events` lines, which may replace the test default interval)."""
    deployment.write_toml(extra='sink = "segments"\n' + events + (f"\n[limits]\n{limits}\n" if limits else ""))
    if "flush_interval_ms" in events:
        toml = deployment.path / "tollway.toml"
        toml.write_text(toml.read_text().replace("flush_interval_ms = 200\n", "", 1))
    return deployment.path / "segments"


def client_for(gw: GatewayProcess, token: str) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=15, headers={"Authorization": f"Bearer {token}"})


def chat(client: httpx.Client) -> httpx.Response:
    return client.post("/openai/v1/chat/completions", json=CHAT)


def pipeline_once(deployment) -> dict:
    done = run_cli(deployment.path, "pipeline", "run", "--once", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def event_ids(deployment) -> Counter:
    return Counter(str(e["event_id"]) for e in deployment.events())


def wait_for(check, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def make_events(count: int, at: datetime) -> list[Event]:
    return [Event(uuid.uuid4(), at - timedelta(milliseconds=i), tenant="acme", user_pseudonym=uuid.uuid4(),
                  provider="openai", model="openai/gpt-4o", endpoint="chat", status_code=200, outcome="ok",
                  input_tokens=12, output_tokens=34, usage_source="provider", cost_usd=Decimal("0.000123457"),
                  latency_ms=12.5, attempts=1) for i in range(count)]


def seal(directory: Path, events: list[Event], per_segment: int) -> None:
    sink = SegmentSink(directory, flush_interval_ms=3_600_000, batch_size=10**9)
    for start in range(0, len(events), per_segment):
        for event in events[start:start + per_segment]:
            sink.record(event)
        sink.flush()
    sink.close()


# --- the sink and the ingest, in process ---------------------------------------------------------
def test_a_sealed_segment_keeps_the_exact_types_and_values(tmp_path):
    events = make_events(30, datetime.now(UTC))
    events[0].cost_usd = Decimal("123456789.123456789")
    events[1].user_pseudonym = None
    seal(tmp_path / "segments", events, per_segment=10)
    segments = sealed_segments(tmp_path / "segments")
    assert len(segments) == 3 and not any(p.name.startswith(".") for p in (tmp_path / "segments").iterdir())
    con = duckdb.connect()
    types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{segments[0]}')").fetchall()}
    assert {name: types[name] for name in ("event_id", "ts", "user_pseudonym", "cost_usd")} == {
        "event_id": "UUID", "ts": "TIMESTAMP WITH TIME ZONE", "user_pseudonym": "UUID", "cost_usd": "DECIMAL(18,9)"}
    db = open_events_db(tmp_path / "events.duckdb")
    result = ingest(db, tmp_path / "segments")
    assert (result.segments, result.events, result.inserted) == (3, 30, 30)
    rows = {r[0]: r for r in db.execute("SELECT * FROM events").fetchall()}
    assert all(rows[e.event_id] == e.row() for e in events), "every value round-trips exactly"
    assert [p.name for p in sorted((tmp_path / "segments" / "ingested").iterdir())] == [p.name for p in segments]


def test_ingest_is_idempotent_by_ledger_and_by_event_id(tmp_path):
    directory = tmp_path / "segments"
    seal(directory, make_events(50, datetime.now(UTC)), per_segment=20)
    db = open_events_db(tmp_path / "events.duckdb")
    assert ingest(db, directory).inserted == 50
    assert ingest(db, directory).events == 0, "nothing waits: a second ingest reads nothing"
    copied = sorted((directory / "ingested").iterdir())[0]
    shutil.copyfile(copied, directory / ("copy-" + copied.name))  # the same events under a new name
    again = ingest(db, directory)
    assert (again.segments, again.events, again.inserted, again.duplicates) == (1, 20, 0, 20)
    assert db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (50, 50)


def test_a_kill_between_the_commit_and_the_moves_is_finished_by_the_next_run(tmp_path, monkeypatch):
    directory = tmp_path / "segments"
    seal(directory, make_events(40, datetime.now(UTC)), per_segment=10)
    db = open_events_db(tmp_path / "events.duckdb")

    def killed(self, names, folder):
        raise KeyboardInterrupt("killed after the commit")

    monkeypatch.setattr(LocalSegments, "move", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(db, directory, batch=2)
    monkeypatch.undo()
    assert len(sealed_segments(directory)) == 4, "committed (2 or 4 segments: moves overlap the next batch) but not moved"
    rerun = ingest(db, directory)
    assert rerun.moved_only >= 2 and rerun.moved_only + rerun.segments == 4, "the committed ones moved, not ingested"
    assert rerun.inserted == 10 * rerun.segments
    assert db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (40, 40)


def test_an_unreadable_segment_is_set_aside_and_the_rest_ingested(tmp_path):
    directory = tmp_path / "segments"
    seal(directory, make_events(30, datetime.now(UTC)), per_segment=10)
    (directory / "00000000T000000000000-host-1-00000001.parquet").write_bytes(b"not parquet")
    db = open_events_db(tmp_path / "events.duckdb")
    result = ingest(db, directory)
    assert (result.segments, result.inserted, result.rejected) == (3, 30, 1)
    assert [p.name for p in (directory / "rejected").iterdir()] == ["00000000T000000000000-host-1-00000001.parquet"]


# --- a real gateway and the pipeline command -----------------------------------------------------
def test_every_answered_request_has_exactly_one_event_after_the_pipeline(deployment):
    segments = segments_deployment(deployment)
    gw = GatewayProcess(deployment).start()
    carol, bob = client_for(gw, deployment.tokens["carol"]), client_for(gw, deployment.tokens["bob"])
    claude = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": CHAT["messages"]}
    try:
        ready = carol.get("/readyz")  # before the first seal has created the segments directory
        assert ready.status_code == 200 and ready.json()["checks"]["event_store"] == "ok", ready.text
        responses = [chat(carol) for _ in range(12)]
        responses += [bob.post("/anthropic/v1/messages", json=claude) for _ in range(3)]  # denied by policy
        responses += [client_for(gw, "tw_not_a_token").post("/openai/v1/chat/completions", json=CHAT)]
    finally:
        assert gw.stop() == 0
    assert Counter(r.status_code for r in responses) == {200: 12, 403: 3, 401: 1}
    assert not (deployment.path / "events.duckdb").exists(), "the gateway never opens events.duckdb"
    assert sealed_segments(segments), "SIGTERM sealed the buffer"
    answered = Counter(r.headers[REQUEST_ID] for r in responses)
    first = pipeline_once(deployment)
    assert first["ingest"]["inserted"] == len(responses) and first["manifest"]["source_rows"] == len(responses)
    assert event_ids(deployment) == answered, "each answered request: exactly one event"
    assert pipeline_once(deployment)["ingest"]["events"] == 0
    for path in (segments / "ingested").iterdir():  # every segment back under a new name: ingested again
        shutil.copyfile(path, segments / ("again-" + path.name))
    assert pipeline_once(deployment)["ingest"]["duplicates_skipped"] == len(responses)
    assert event_ids(deployment) == answered, "nothing doubled"
    report = run_cli(deployment.path, "report", "run", "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["source_rows"] == len(responses), report.stderr


def test_a_segments_directory_that_cannot_be_written_fails_closed_and_recovers_with_nothing_lost(deployment):
    from tests.test_event_store import StoreOutage

    segments = segments_deployment(deployment, "max_buffered = 20\n")
    gw = GatewayProcess(deployment).start()
    carol = client_for(gw, deployment.tokens["carol"])
    try:
        seen = [chat(carol) for _ in range(5)]
        # all five sealed (the queue-depth gauge reads 0 while a batch is still being sealed: an outage then
        # puts it back, and the buffer fills 5 events early)
        wait_for(lambda: len(_sealed_ids(segments)) == 5)
        with StoreOutage(gw.proc.pid):  # every file write fails (EFBIG), as on a full disk
            during = [chat(carol) for _ in range(30)]
            wait_for(lambda: carol.get("/readyz").status_code == 503)
        wait_for(lambda: carol.get("/readyz").status_code == 200)
        after = [chat(carol) for _ in range(5)]
    finally:
        assert gw.stop() == 0
    assert Counter(r.status_code for r in during) == {200: 20, 503: 10}, "max_buffered events, then 503"
    assert all(r.status_code == 200 for r in seen + after)
    pipeline_once(deployment)
    served = Counter(r.headers[REQUEST_ID] for r in seen + during + after if r.status_code == 200)
    assert event_ids(deployment) == served


def test_kill_9_of_the_pipeline_mid_ingest_loses_and_doubles_nothing(deployment):
    segments = segments_deployment(deployment)
    events = make_events(12_000, datetime.now(UTC))
    seal(segments, events, per_segment=40)  # 300 segments, ingested 3 per transaction
    ingested = segments / "ingested"
    for kill in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(deployment.path), "pipeline",
                                 "--interval", "0.1", "--batch", "3"], cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda n=kill: ingested.is_dir() and len(os.listdir(ingested)) > 40 * (n + 1))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert sealed_segments(segments), "killed mid-ingest: segments still wait"
    pipeline_once(deployment)
    assert not sealed_segments(segments)
    assert event_ids(deployment) == Counter(str(e.event_id) for e in events), "every event exactly once"


def test_kill_9_of_a_gateway_loses_nothing_its_restart_seals_the_spool_and_counts_every_event(deployment):
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n"
                                                           "globex,tenant,requests,day,25\n")
    segments = segments_deployment(deployment, "batch_size = 5\nflush_interval_ms = 600000\n")
    gw = GatewayProcess(deployment).start()
    before = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(23)]
    # the writer seals what waits when it wakes (at least batch_size events): 4 segments hold 20 to 23
    wait_for(lambda: len(sealed_segments(segments)) >= 4)
    gw.stop(signal.SIGKILL)
    answered = {r.headers[REQUEST_ID] for r in before}
    sealed = _sealed_ids(segments)
    assert 20 <= len(sealed) <= 23 and sealed <= answered
    spooled = list((deployment.path / "spool").glob("*.spool"))
    assert spooled, "the unsealed events wait in the spool the killed process left"
    gw = GatewayProcess(deployment).start()  # seals the spool first, then seeds from every segment: 23 of 25
    try:
        assert _sealed_ids(segments) == answered, "the restart sealed what the killed process had not"
        after = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(7)]
    finally:
        assert gw.stop() == 0
    assert [r.status_code for r in before] == [200] * 23
    assert [r.status_code for r in after] == [200] * 2 + [429] * 5, "the restart counted all 23"
    assert list((deployment.path / "spool").glob("*.spool")) == [], "a clean stop leaves no spool"
    pipeline_once(deployment)
    recorded = event_ids(deployment)
    assert max(recorded.values()) == 1
    assert set(recorded) == answered | {r.headers[REQUEST_ID] for r in after}, "nothing lost, nothing doubled"


def test_without_the_spool_kill_9_loses_at_most_the_unsealed_buffer(deployment):
    segments = segments_deployment(deployment, "batch_size = 5\nflush_interval_ms = 600000\nspool = false\n")
    gw = GatewayProcess(deployment).start()
    before = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(13)]
    wait_for(lambda: len(sealed_segments(segments)) >= 2)
    gw.stop(signal.SIGKILL)
    assert not (deployment.path / "spool").exists()
    gw = GatewayProcess(deployment).start()
    assert gw.stop() == 0
    pipeline_once(deployment)
    recorded, answered = event_ids(deployment), {r.headers[REQUEST_ID] for r in before}
    assert max(recorded.values()) == 1 and set(recorded) <= answered
    assert 10 <= len(recorded) <= 13, "only the unsealed tail is lost"


def test_a_lost_machines_spool_copied_elsewhere_is_sealed_by_seal_spool_and_counted_once(deployment, tmp_path):
    """The machine is gone but its disk can be read: its spool files, copied to another machine of the
    deployment, are sealed into the deployment's segments by `tollway pipeline seal-spool`; sealing a
    second copy of the same files adds nothing after the pipeline."""
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    segments = segments_deployment(deployment, "batch_size = 1000\nflush_interval_ms = 600000\n")
    gw = GatewayProcess(deployment).start()
    answered = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(6)]
    gw.stop(signal.SIGKILL)
    assert [r.status_code for r in answered] == [200] * 6
    assert sealed_segments(segments) == [], "nothing was sealed before the machine was lost"
    rescued, again = tmp_path / "rescued", tmp_path / "again"
    for copy in (rescued, again):  # read off the lost machine's disk, twice
        shutil.copytree(deployment.path / "spool", copy)
    shutil.rmtree(deployment.path / "spool")

    done = run_cli(deployment.path, "pipeline", "seal-spool", str(rescued), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["events"], report["segments"], report["left"], report["error"]) == (6, 1, [], None)
    assert "sealed 6 events" in done.stderr
    assert list(rescued.iterdir()) == [], "each file goes once its events are sealed, no empty one is left"
    pipeline_once(deployment)
    served = Counter(r.headers[REQUEST_ID] for r in answered)
    assert event_ids(deployment) == served

    assert run_cli(deployment.path, "pipeline", "seal-spool", str(again)).returncode == 0
    assert pipeline_once(deployment)["ingest"]["duplicates_skipped"] == 6
    assert event_ids(deployment) == served, "a spool sealed twice is still counted once"


def test_seal_spool_refuses_what_it_cannot_seal_and_keeps_the_files(deployment, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    duckdb_sink = run_cli(deployment.path, "pipeline", "seal-spool", str(empty))
    assert duckdb_sink.returncode == 1 and '[events] sink is "duckdb"' in duckdb_sink.stderr
    segments_deployment(deployment)
    for where, message in ((empty, "no spool files (*.spool) in"), (tmp_path / "missing", "is not a directory")):
        refused = run_cli(deployment.path, "pipeline", "seal-spool", str(where))
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr

    spool = tmp_path / "spool"
    script = (f"import sys, uuid; sys.path.insert(0, {str(REPO)!r});"
              "from collections import deque; from tests.test_spool import ROW;"
              "from proxy.sinks.spool import EventSpool;"
              f"s = EventSpool(__import__('pathlib').Path({str(spool)!r}), 'lost'); q = deque();"
              "[s.append((uuid.uuid4(),) + ROW[1:], q) for i in range(3)];"
              "import os; os._exit(0)")  # a process killed before sealing
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    deployment.write_toml(extra=f'sink = "segments"\nsegments_dir = "{blocker / "segments"}"\n')
    failed = run_cli(deployment.path, "pipeline", "seal-spool", str(spool))
    assert failed.returncode == 1 and "could not be sealed" in failed.stderr and "run this again" in failed.stderr
    (kept,) = spool.glob("*.spool")
    assert len(read_rows(kept.read_bytes())) == 3, "the unsealed events stay in their file"


def _sealed_ids(segments: Path) -> set[str]:
    files = [str(p) for p in sealed_segments(segments)]
    if not files:
        return set()
    with duckdb.connect() as con:
        return {str(row[0]) for row in con.execute("SELECT event_id FROM read_parquet(?)", [files]).fetchall()}


def test_serve_workers_2_is_refused_without_redis_and_segments(deployment):
    refused = run_cli(deployment.path, "serve", "--workers", "2")
    assert refused.returncode == 2
    assert '[limits] store = "redis://HOST:PORT/DB"' in refused.stderr and 'sink = "segments"' in refused.stderr
    segments_deployment(deployment)
    refused = run_cli(deployment.path, "serve", "--workers", "2")
    assert refused.returncode == 2 and "redis://" in refused.stderr and 'sink = "segments"' not in refused.stderr
    assert "--workers 1" in refused.stderr


def test_a_second_memory_store_gateway_on_a_segments_deployment_is_refused(deployment):
    segments_deployment(deployment)
    gw = GatewayProcess(deployment).start()
    try:
        second = run_cli(deployment.path, "serve", "--port", str(free_port()))
    finally:
        assert gw.stop() == 0
    assert second.returncode == 1 and f"another gateway (process {gw.proc.pid})" in second.stderr
    assert "Redis URL" in second.stderr


def test_the_pipeline_is_refused_with_the_duckdb_sink_and_runs_once_per_deployment(deployment):
    refused = run_cli(deployment.path, "pipeline", "run", "--once")
    assert refused.returncode == 1 and 'sink = "segments"' in refused.stderr
    segments_deployment(deployment)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(deployment.path), "pipeline"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (deployment.path / "pipeline.lock").exists() and
                 (deployment.path / "pipeline.lock").read_text().strip() == str(proc.pid))
        second = run_cli(deployment.path, "pipeline", "run", "--once")
        assert second.returncode == 1 and f"process {proc.pid}" in second.stderr
        report = run_cli(deployment.path, "report", "run")
        assert report.returncode == 0 and "built by the pipeline" in report.stderr, report.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "SIGTERM: a clean stop"


# --- several workers (needs the Redis limit store and redis-server) ------------------------------
def redis_store_available() -> str | None:
    """Why the two-worker test cannot run here; None when it can."""
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


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_workers(deployment, count: int) -> tuple[subprocess.Popen, Path]:
    log = deployment.path / "workers.log"
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(deployment.path), "serve",
                             "--workers", str(count)], cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_for(lambda: log.read_text().count(" ready (pid ") >= count, timeout=60)
    return proc, log


def worker_pids(log: Path) -> list[int]:
    return [int(line.rsplit("(pid ", 1)[1].rstrip(")")) for line in log.read_text().splitlines()
            if " ready (pid " in line]


@pytest.mark.skipif(redis_store_available() is not None, reason=str(redis_store_available()))
def test_two_workers_serve_and_every_event_is_there_exactly_once(deployment, redis_url):
    segments = segments_deployment(deployment, "batch_size = 5\nflush_interval_ms = 600000\n",
                                   f'store = "{redis_url}"')
    proc, log = start_workers(deployment, 2)
    gw = GatewayProcess(deployment)
    try:
        first = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(40)]  # a new connection each
        served_by = {int(p.name.split("-")[-2]) for p in sealed_segments(segments)}
        victim = worker_pids(log)[0]
        wait_for(lambda: len(sealed_segments(segments)) >= 7)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(log)) == 3, timeout=30)  # started again and ready
        second = [chat(client_for(gw, deployment.tokens["carol"])) for _ in range(20)]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()
    assert all(r.status_code == 200 for r in first + second)
    assert len(served_by) == 2, "both workers served (each sealed segments of its own)"
    pipeline_once(deployment)
    recorded = event_ids(deployment)
    answered = {r.headers[REQUEST_ID] for r in first + second}
    # The killed worker's unsealed events were in the spool; the worker started in its place sealed them.
    assert max(recorded.values()) == 1 and set(recorded) == answered, "nothing lost, nothing doubled"
