"""Event durability: an event store that cannot be written (a real `File too large` from the OS,
set on the running gateway with prlimit), fail-closed refusals and recovery with nothing lost,
fail-open dropping, rows the store refuses set aside, and the SIGKILL window."""

from __future__ import annotations

import json
import re
import resource
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import duckdb
import httpx
import pytest

from proxy.events import Event
from proxy.recorder import EventRecorder, open_events_db
from tests.helpers import GatewayProcess

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


class StoreOutage:
    """Make every file write of the gateway process fail (`EFBIG`), as a full disk would, then heal."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.soft, self.hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def __enter__(self) -> StoreOutage:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (1, self.hard))
        return self

    def __exit__(self, *exc) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (self.soft, self.hard))


def start(deployment, events_toml: str) -> tuple[GatewayProcess, httpx.Client]:
    deployment.write_toml(extra=events_toml)
    gw = GatewayProcess(deployment).start()
    client = httpx.Client(base_url=gw.url, timeout=15,
                          headers={"Authorization": f"Bearer {deployment.tokens['carol']}"})
    return gw, client


def chat(client: httpx.Client) -> httpx.Response:
    return client.post("/openai/v1/chat/completions", json=CHAT)


def wait_for(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_fail_closed_refuses_with_503_when_the_buffer_is_full_and_recovers_with_nothing_lost(deployment):
    gw, client = start(deployment, "max_buffered = 20\n")
    try:
        seen = [chat(client) for _ in range(5)]
        wait_for(lambda: "tollway_event_queue_depth 0.0" in client.get("/metrics").text)  # all on disk
        with StoreOutage(gw.proc.pid):
            during = [chat(client) for _ in range(30)]
            wait_for(lambda: client.get("/readyz").status_code == 503)
            ready = client.get("/readyz").json()
            anthropic = client.post("/anthropic/v1/messages", headers={"x-api-key": deployment.tokens["alice"]},
                                    json={"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": CHAT["messages"]})
        wait_for(lambda: client.get("/readyz").status_code == 200)
        after = [chat(client) for _ in range(5)]
    finally:
        assert gw.stop() == 0
    codes = Counter(r.status_code for r in during)
    assert codes[200] == 20 and codes[503] == 10, "the buffer takes exactly max_buffered events, then 503"
    refused = next(r for r in during if r.status_code == 503)
    assert refused.json()["error"]["message"].startswith("Tollway cannot record usage right now")
    assert ready["status"] == "not ready" and "File too large" in ready["checks"]["event_store"]
    assert anthropic.status_code == 503 and anthropic.json()["type"] == "error", "refused in the route's format"
    assert all(r.status_code == 200 for r in seen + after)

    served = {r.headers["x-tollway-request-id"] for r in seen + during + after if r.status_code == 200}
    recorded = {str(e["event_id"]) for e in deployment.events()}
    assert recorded == served, "every served request has exactly its event; refusals for the outage have none"


def test_fail_open_keeps_serving_and_counts_the_events_it_drops(deployment):
    gw, client = start(deployment, "max_buffered = 10\nfail_closed = false\n")
    try:
        with StoreOutage(gw.proc.pid):
            during = [chat(client) for _ in range(25)]
            wait_for(lambda: client.get("/readyz").status_code == 503)
            metrics = client.get("/metrics").text
        wait_for(lambda: client.get("/readyz").status_code == 200)
    finally:
        assert gw.stop() == 0
    assert all(r.status_code == 200 for r in during), "fail open: traffic is served during the outage"
    assert "tollway_event_store_up 0.0" in metrics
    dropped = int(float(re.search(r"^tollway_events_dropped (\S+)$", metrics, re.M).group(1)))
    kept = len(deployment.events())
    assert kept >= 10, "at least the bound's worth of events survives the outage"
    assert dropped + kept == 25 and dropped >= 10, "what is not kept is dropped, and counted"


def test_an_event_the_store_refuses_is_set_aside_and_the_rest_are_written(tmp_path):
    con = open_events_db(tmp_path / "events.duckdb")
    rejected = tmp_path / "rejected-events.jsonl"
    recorder = EventRecorder(con, flush_interval_ms=50, rejected_path=rejected)
    good = [Event(uuid.uuid4(), datetime.now(UTC), tenant="acme", status_code=200, cost_usd=Decimal("0.01"))
            for _ in range(3)]
    bad = Event(uuid.uuid4(), datetime.now(UTC), tenant="acme", status_code=2**40)  # beyond INTEGER
    for event in (good[0], bad, good[1], good[2]):
        recorder.record(event)
    recorder.close()
    ids = {row[0] for row in con.execute("SELECT event_id FROM events").fetchall()}
    con.close()
    assert ids == {e.event_id for e in good}
    assert recorder.rejected == 1 and recorder.last_error is None and recorder.queue_depth == 0
    [line] = rejected.read_text().splitlines()
    entry = json.loads(line)
    assert entry["event"]["event_id"] == str(bad.event_id) and "status_code" in json.dumps(entry["event"])


def test_the_recorder_keeps_every_row_while_the_store_is_locked_and_writes_them_later(tmp_path):
    """A second connection holding an open write transaction blocks nothing in DuckDB, but a closed
    connection does: writing fails, rows stay queued, and a new connection drains them."""
    con = open_events_db(tmp_path / "events.duckdb")
    recorder = EventRecorder(con, flush_interval_ms=50, max_buffered=5)
    con.close()  # every write now fails with a connection error
    events = [Event(uuid.uuid4(), datetime.now(UTC), tenant="t", status_code=200) for _ in range(6)]
    for event in events:
        recorder.record(event)
    wait_for(lambda: recorder.last_error is not None)
    assert not recorder.accepting and recorder.queue_depth == 6
    recorder._con = open_events_db(tmp_path / "events.duckdb")  # the store is back
    wait_for(lambda: recorder.queue_depth == 0)
    recorder.close()
    assert recorder.accepting and recorder.last_error is None
    stored = recorder._con.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stored == 6


def test_sigkill_loses_nothing_older_than_one_flush_interval(deployment):
    gw, client = start(deployment, "")  # the test deployments flush every 200 ms
    served = [chat(client).headers["x-tollway-request-id"] for _ in range(20)]
    time.sleep(0.2 * 3)  # more than one flush interval: every one of them must be on disk
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(timeout=10)
    recorded = {str(e["event_id"]) for e in deployment.events()}
    assert set(served) <= recorded


@pytest.mark.parametrize(("toml", "message"), [
    ("fail_closed = \"no\"\n", "fail_closed must be true or false"),
    ("max_buffered = 1.5\n", "max_buffered must be a whole number"),
])
def test_event_settings_are_type_checked(deployment, toml, message):
    deployment.write_toml(extra=toml)
    gw = GatewayProcess(deployment)
    with pytest.raises(RuntimeError, match=message):
        gw.start()


def test_duckdb_refuses_a_second_writer_so_the_gateway_is_the_only_one(deployment, gateway):
    with pytest.raises(duckdb.IOException):
        duckdb.connect(str(deployment.path / "events.duckdb"))
