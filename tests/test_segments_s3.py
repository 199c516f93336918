"""Event segments on object storage: `segments_dir = "s3://bucket/prefix"` against a real S3-compatible
server (moto in server mode, its own process on loopback), reached through the environment only.

A real `tollway serve` seals segments as objects, `tollway pipeline run --once` ingests each answered
request's event exactly once and moves the objects under `ingested/`; an object put back (the same
name, or another) adds nothing; the store killed while the gateway serves: the buffer is kept up to
`max_buffered` (then 503), `/readyz` says why, and once the store is back every kept event arrives;
a pipeline killed between its commit and the moves doubles nothing; unknown schemes and
credentials in `tollway.toml` are refused with a clear message.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest

from proxy.pipeline.ingest import ingest
from proxy.recorder import open_events_db
from proxy.settings import EventSettings
from proxy.sinks.segment_store import INGESTED, ObjectSegments, segment_store_for
from proxy.sinks.segments import SegmentSink
from tests.helpers import GatewayProcess, run_cli
from tests.s3_server import SECRET, S3Server
from tests.test_segments import REQUEST_ID, chat, client_for, event_ids, make_events, pipeline_once, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A fresh bucket; this process and the gateways and pipelines it starts see the server's env."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.create_bucket(f"events-{uuid.uuid4().hex[:12]}")


def s3_deployment(deployment, bucket: str, events: str = "") -> str:
    url = f"s3://{bucket}/events"
    deployment.write_toml(extra=f'sink = "segments"\nsegments_dir = "{url}"\n{events}')
    return url


def sealed_keys(s3: S3Server, bucket: str) -> list[str]:
    return [k for k in s3.keys(bucket, "events/") if "/" not in k.removeprefix("events/")]


def sealed_event_count(bucket: str) -> int:
    store = ObjectSegments(f"s3://{bucket}/events")
    names = store.list_sealed()
    if not names:
        return 0
    import duckdb

    with store.local_copies(names) as paths, duckdb.connect() as con:
        return con.execute("SELECT count(*) FROM read_parquet(?)", [[str(p) for p in paths.values()]]).fetchone()[0]


# --- a real gateway, the pipeline command --------------------------------------------------------
def test_a_gateway_seals_into_s3_and_the_pipeline_ingests_each_answered_request_once(deployment, s3, bucket):
    s3_deployment(deployment, bucket)
    gw = GatewayProcess(deployment).start()
    carol, bob = client_for(gw, deployment.tokens["carol"]), client_for(gw, deployment.tokens["bob"])
    claude = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    try:
        responses = [chat(carol) for _ in range(12)]
        responses += [bob.post("/anthropic/v1/messages", json=claude) for _ in range(3)]  # denied by policy
        assert carol.get("/readyz").json()["checks"]["event_store"] == "ok"
    finally:
        assert gw.stop() == 0
    assert Counter(r.status_code for r in responses) == {200: 12, 403: 3}
    assert not (deployment.path / "segments").exists() and not (deployment.path / "events.duckdb").exists()
    sealed = sealed_keys(s3, bucket)
    assert sealed and all(k.endswith(".parquet") for k in sealed), "SIGTERM sealed the buffer as objects"
    answered = Counter(r.headers[REQUEST_ID] for r in responses)

    first = pipeline_once(deployment)
    assert first["ingest"]["inserted"] == len(responses) and first["manifest"]["source_rows"] == len(responses)
    assert event_ids(deployment) == answered, "each answered request: exactly one event"
    assert sealed_keys(s3, bucket) == [] and s3.keys(bucket, "events/ingested/") == [
        k.replace("events/", "events/ingested/") for k in sealed], "every object moved under ingested/"
    assert pipeline_once(deployment)["ingest"]["events"] == 0, "a second run ingests nothing"

    # As if a pipeline died after its commit, before the move: the object is back under its own name.
    name = sealed[0].removeprefix("events/")
    s3.put(bucket, f"events/{name}", s3.get(bucket, f"events/ingested/{name}"))
    again = pipeline_once(deployment)["ingest"]
    assert (again["moved_only"], again["events"]) == (1, 0), "the ledger knows it: moved, not ingested again"
    # The same events under another name (a seal retried after a lost answer): skipped by event_id.
    s3.put(bucket, f"events/copy-{name}", s3.get(bucket, f"events/ingested/{name}"))
    copied = pipeline_once(deployment)["ingest"]
    assert copied["inserted"] == 0 and copied["duplicates_skipped"] == copied["events"] > 0
    assert event_ids(deployment) == answered, "nothing doubled"
    report = run_cli(deployment.path, "report", "run", "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["source_rows"] == len(responses), report.stderr


def test_the_store_down_keeps_the_buffer_readyz_says_why_and_every_kept_event_arrives(deployment, s3, bucket):
    s3_deployment(deployment, bucket, "max_buffered = 20\n")
    gw = GatewayProcess(deployment).start()
    carol = client_for(gw, deployment.tokens["carol"])
    try:
        seen = [chat(carol) for _ in range(5)]
        wait_for(lambda: sealed_event_count(bucket) == 5)
        assert pipeline_once(deployment)["ingest"]["inserted"] == 5  # moto keeps nothing across its restart
        s3.kill()
        try:
            during = [chat(carol) for _ in range(30)]
            # /readyz's own probe may name the store first ("cannot be listed"); a failed seal wins once seen
            wait_for(lambda: "PUT" in carol.get("/readyz").json()["checks"]["event_store"], timeout=30)
            ready = carol.get("/readyz")
            assert ready.status_code == 503
            reason = ready.json()["checks"]["event_store"]
        finally:
            s3.start()
        s3.create_bucket(bucket)
        wait_for(lambda: carol.get("/readyz").status_code == 200, timeout=30)
        after = [chat(carol) for _ in range(5)]
    finally:
        assert gw.stop() == 0
    assert Counter(r.status_code for r in during) == {200: 20, 503: 10}, "max_buffered events kept, then 503"
    assert all(r.status_code == 200 for r in seen + after)
    assert f"s3://{bucket}/events" in reason and "PUT" in reason, reason
    assert SECRET not in reason and SECRET not in gw.log(), "credentials are never shown or logged"
    pipeline_once(deployment)
    served = Counter(r.headers[REQUEST_ID] for r in seen + during + after if r.status_code == 200)
    assert event_ids(deployment) == served, "every served request's event arrived, once"


def test_a_gateway_stopped_while_its_store_is_down_keeps_the_events_for_its_next_start(deployment, s3, bucket):
    s3_deployment(deployment, bucket)
    gw = GatewayProcess(deployment).start()
    carol = client_for(gw, deployment.tokens["carol"])
    before = [chat(carol) for _ in range(4)]
    wait_for(lambda: sealed_event_count(bucket) == 4)
    assert pipeline_once(deployment)["ingest"]["inserted"] == 4  # moto keeps nothing across its restart
    s3.kill()
    try:
        during = [chat(carol) for _ in range(3)]  # answered, their segment cannot be PUT
        assert gw.stop() == 0, gw.log()
        assert "stay in the spool" in gw.log()
    finally:
        s3.start()
    s3.create_bucket(bucket)
    gw = GatewayProcess(deployment).start()  # seals the spool before it serves
    assert gw.stop() == 0
    pipeline_once(deployment)
    answered = Counter(r.headers[REQUEST_ID] for r in before + during)
    assert all(r.status_code == 200 for r in before + during)
    assert event_ids(deployment) == answered, "the events answered during the outage arrived, once"


def test_an_idle_gateway_finds_its_store_gone_through_readyz_and_back(deployment, s3, bucket):
    s3_deployment(deployment, bucket)
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            assert http.get("/readyz").json()["checks"]["event_store"] == "ok"
            s3.kill()  # no request is sent: only /readyz's own probe can notice
            try:
                wait_for(lambda: http.get("/readyz").status_code == 503, timeout=15)
                reason = http.get("/readyz").json()["checks"]["event_store"]
            finally:
                s3.start()
            s3.create_bucket(bucket)
            wait_for(lambda: http.get("/readyz").status_code == 200, timeout=15)
    finally:
        assert gw.stop() == 0
    assert reason.startswith(f"object store s3://{bucket}/events ") and SECRET not in reason, reason


# --- the pipeline's side, in process -------------------------------------------------------------
def test_a_pipeline_killed_between_its_commit_and_the_moves_doubles_nothing(tmp_path, bucket, monkeypatch):
    store = segment_store_for(EventSettings(sink="segments", segments_dir=f"s3://{bucket}/events/"), tmp_path)
    sink = SegmentSink(store, flush_interval_ms=3_600_000, batch_size=10**9)
    events = make_events(60, datetime.now(UTC))
    for start in range(0, 60, 10):
        for event in events[start:start + 10]:
            sink.record(event)
        sink.flush()
    sink.close()
    assert len(store.list_sealed()) == 6 and sink.last_error is None
    db = open_events_db(tmp_path / "events.duckdb")

    def killed(self, names, folder):
        if folder == INGESTED:
            raise KeyboardInterrupt("killed after the commit")

    monkeypatch.setattr(ObjectSegments, "move", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(db, store, batch=4)
    monkeypatch.undo()
    assert len(store.list_sealed()) == 6, "committed (4 or 6 segments: moves overlap the next batch) but not moved"
    rerun = ingest(db, store, batch=4)
    assert rerun.moved_only >= 4 and rerun.moved_only + rerun.segments == 6, "the committed ones moved, not ingested"
    assert rerun.inserted == 10 * rerun.segments
    assert db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (60, 60)
    assert store.list_sealed() == []


# --- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "expected"), [
    ('segments_dir = "ftp://files.example.com/events"', "ftp:// is not supported; use a directory path, "
     "file:///PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"),
    (f'aws_secret_access_key = "{SECRET}"', "aws_secret_access_key: credentials never go in tollway.toml"),
    (f'segments_dir = "s3://KEY:{SECRET}@bucket/events"', "credentials never go in tollway.toml"),
])
def test_unknown_schemes_and_credentials_in_tollway_toml_are_refused(deployment, line, expected):
    deployment.write_toml(extra=f'sink = "segments"\n{line}\n')
    for command in (("pipeline", "run", "--once"), ("serve",)):
        refused = run_cli(deployment.path, *command)
        assert refused.returncode == 1 and expected in refused.stderr, refused.stderr
        assert SECRET not in refused.stderr
