"""Batch results metered as they pass: one event per result line, at the batch rate, exactly once.

A batch's submit costs nothing; the provider bills each request of it when it completes. Tollway
sees that usage when the results are read through it (OpenAI: the batch's output and error files,
`files.content`; Anthropic: `messages/batches/{id}/results`; Gemini: the inline responses of a
finished batch, `batches.get`). Each JSONL line becomes an event for
the tenant and user who created the batch, priced at the `batch` tier, and counted against their
limits. The lines are read while the bytes pass to the client unchanged; the events are recorded
only when the whole file was read and only by the first download to finish (`claim_results` in
`control.db`), so reading results twice, or a download cut short, never bills twice or half.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from proxy.events import Event
from proxy.meter import price_usage
from proxy.providers.base import Adapter, dig, json_decode, str_or_none

if TYPE_CHECKING:
    from proxy.metering import Prices
    from proxy.objects import Owner

BATCH_TIER = "batch"
_NAMESPACE = uuid.UUID("6f1d3c52-8f0e-4c7a-9a51-6d2b1f0c9e47")  # event ids derived from (object, line)
_MAX_LINE = 64 * 1024 * 1024  # a longer line is passed on unread


@dataclass(slots=True)
class ResultLines:
    """Splits the relayed bytes into JSONL lines and keeps each line's answer (the status and body)."""

    answers: list[tuple[str, int, Any]] = field(default_factory=list)  # (custom id, status, body or None)
    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        if b"\n" not in chunk:
            if len(self._pending) > _MAX_LINE:
                self._pending.clear()
            return
        *lines, rest = bytes(self._pending).split(b"\n")
        self._pending = bytearray(rest)
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._pending.strip():
            self._line(bytes(self._pending))
        self._pending.clear()

    def _line(self, line: bytes) -> None:
        try:
            item = json_decode(line) if line.strip() else None
        except (msgspec.DecodeError, RecursionError):
            return
        if isinstance(item, dict):
            self.answers.append(answer_of(item, len(self.answers)))


def answer_of(item: dict, index: int) -> tuple[str, int, Any]:
    """(custom id, status, response body) of one result, in OpenAI's, Anthropic's or Gemini's shape."""
    custom_id = str_or_none(item.get("custom_id")) or str_or_none(dig(item, "metadata", "key")) or str(index)
    if "response" in item and "custom_id" not in item:  # Gemini inline: {"response": {...}, "metadata": {...}}
        return custom_id, 200, item["response"]
    if "error" in item and "custom_id" not in item:
        return custom_id, 500, None
    if "result" in item:  # Anthropic: {"custom_id", "result": {"type": "succeeded", "message": {...}}}
        succeeded = dig(item, "result", "type") == "succeeded"
        return custom_id, 200 if succeeded else 500, dig(item, "result", "message") if succeeded else None
    status = dig(item, "response", "status_code")  # OpenAI: {"custom_id", "response": {"status_code", "body"}}
    return custom_id, status if isinstance(status, int) else 500, dig(item, "response", "body")


def result_events(answers: list[tuple[str, int, Any]], adapter: Adapter, provider: str, object_id: str,
                  owner: Owner, billing_mode: str | None, prices: Prices, book_provider: str | None) -> list[Event]:
    """One event per answer: usage at the batch tier, for the batch's creator."""
    now, events = datetime.now(UTC), []
    for custom_id, status, body in answers:
        event = Event(event_id=uuid.uuid5(_NAMESPACE, f"{provider}/{object_id}/{custom_id}"), ts=now,
                      tenant=owner.tenant, user_pseudonym=owner.user_pseudonym, provider=provider,
                      endpoint=f"{provider}/batches.results", status_code=status, key_id=owner.key_id,
                      billing_mode=billing_mode, attempts=1, latency_ms=0.0,
                      outcome="ok" if 200 <= status < 400 else "upstream_error")
        usage = adapter.read_body(body)[0] if isinstance(body, dict) else None
        model = usage.response_model if usage is not None else None  # model / modelVersion, as each names it
        if usage is not None and usage.reported and model is not None:
            usage.service_tier = BATCH_TIER
            event.model, event.usage_source = f"{provider}/{model}", "reported"
            price_usage(event, usage, prices, provider, model, book_provider)
        events.append(event)
    return events
