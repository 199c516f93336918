"""Anthropic Messages wire format.

Anthropic reports `input_tokens` without the prompt-cache reads and writes; canonical usage adds
them back. In a stream, `message_start` carries the input side and `message_delta` the
cumulative output (and, in newer API versions, refined input figures).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import TollwayError
from proxy.providers.base import (
    Adapter,
    CallInfo,
    StreamTap,
    Usage,
    dig,
    int_or_none,
    json_encode,
    str_or_none,
)
from proxy.providers.operations import ANTHROPIC as ANTHROPIC_OPERATIONS


def usage_from_anthropic(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    uncached = int_or_none(usage.get("input_tokens"))
    read = int_or_none(usage.get("cache_read_input_tokens"))
    write = int_or_none(usage.get("cache_creation_input_tokens"))
    total_in = None if uncached is None else uncached + (read or 0) + (write or 0)
    return Usage(input_tokens=total_in, output_tokens=int_or_none(usage.get("output_tokens")),
                 cached_input_tokens=read, cache_write_tokens=write,
                 cache_write_1h_tokens=int_or_none(dig(usage, "cache_creation", "ephemeral_1h_input_tokens")),
                 web_search_calls=int_or_none(dig(usage, "server_tool_use", "web_search_requests")),
                 service_tier=str_or_none(usage.get("service_tier")))


class AnthropicStreamTap(StreamTap):
    """Keeps Anthropic's own figures: a field a `message_delta` leaves out keeps its `message_start` value."""

    _INPUT_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation",
                     "server_tool_use", "service_tier")

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, Any] = {}

    def on_payload(self, event_name: str | None, payload: dict) -> bool:
        kind = payload.get("type") or event_name
        if kind == "content_block_delta":
            delta = payload.get("delta") or {}
            self.text_chars += len(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        elif kind == "message_start":
            self._update(dig(payload, "message", "usage"), self._INPUT_FIELDS)  # its output figure is a placeholder
            self.usage.merge(Usage(response_model=str_or_none(dig(payload, "message", "model"))))
        elif kind == "message_delta":
            self._update(payload.get("usage"), (*self._INPUT_FIELDS, "output_tokens"))
        return True

    def _update(self, usage, names: tuple[str, ...]) -> None:
        if not isinstance(usage, dict):
            return
        for name in names:
            value = usage.get(name)
            if value is not None:
                self._raw[name] = value
        model = self.usage.response_model
        self.usage.assign(usage_from_anthropic(self._raw))  # in place: the forwarder holds this object
        self.usage.response_model = model


class AnthropicAdapter(Adapter):
    style = "anthropic"
    operations = ANTHROPIC_OPERATIONS
    credential_headers = ("authorization", "x-api-key")  # Claude Code may send both, x-api-key stale
    key_header = "x-api-key"
    max_output_paths = (("max_tokens",),)
    model_operations = frozenset({"messages.create", "messages.count_tokens", "completions.create"})
    error_types = {
        "authentication": "authentication_error", "permission": "permission_error",
        "not_found": "not_found_error", "invalid_request": "invalid_request_error",
        "too_large": "request_too_large", "rate_limit": "rate_limit_error", "budget": "rate_limit_error",
        "upstream": "api_error", "timeout": "timeout_error", "unavailable": "overloaded_error",
    }

    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        endpoint = "/".join(p for p in path.split("/") if p and p != "v1")
        model = self.body_model(body)
        return CallInfo(model, body.get("stream") is True, endpoint, metered=endpoint != "messages/count_tokens")

    def usage_from_body(self, payload: Any) -> Usage:
        if not isinstance(payload, dict):
            return Usage()
        usage = usage_from_anthropic(payload.get("usage"))
        usage.response_model = str_or_none(payload.get("model"))
        return usage

    def stream_tap(self, info: CallInfo) -> StreamTap:
        return AnthropicStreamTap()

    def output_text_chars(self, payload: Any) -> int:
        blocks = payload.get("content") if isinstance(payload, dict) else None
        return sum(len(b.get("text") or b.get("thinking") or "") for b in blocks or () if isinstance(b, dict))

    def model_list_body(self, provider: str, model_ids: list[str]) -> Any:
        return {"data": [{"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
                         for m in model_ids], "has_more": False,
                "first_id": model_ids[0] if model_ids else None, "last_id": model_ids[-1] if model_ids else None}

    def error_body(self, err: TollwayError) -> bytes:
        kind = self.error_types.get(err.kind, "api_error")
        return json_encode({"type": "error", "error": {"type": kind, "message": err.message}})
