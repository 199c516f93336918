"""The provider adapter interface: what the forwarder asks of each wire format.

The forwarder never reads provider JSON itself: an adapter tells it the model and whether the
call streams, rewrites the body where it must, names the credential headers, and turns response
bodies and stream events into `Usage`. Unknown is `None`, never `0`.

Canonical usage (the same meaning for every provider, whatever its own field names say):
`input_tokens` all prompt tokens, cached reads and cache writes included; `cached_input_tokens`
and `cache_write_tokens` the parts of it read from / written to the prompt cache;
`output_tokens` all generated tokens, reasoning included; `reasoning_tokens` the part of it spent
on reasoning.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgspec

from proxy.crypto import Secret
from proxy.errors import BadRequest, TollwayError
from proxy.providers.operations import OperationTable
from proxy.sse import SseEvent
from proxy.uploads import is_streamed

_json_decode = msgspec.json.Decoder().decode
json_encode = msgspec.json.Encoder().encode


def json_decode(data: bytes) -> Any:
    return _json_decode(data)


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_1h_tokens: int | None = None  # the part of cache_write_tokens kept for an hour
    input_audio_tokens: int | None = None  # the part of input_tokens that is audio
    output_audio_tokens: int | None = None  # the part of output_tokens that is audio
    web_search_calls: int | None = None  # server-side web searches (or grounded prompts) billed per call
    service_tier: str | None = None  # the tier the provider says it served ("flex", "priority", ...)
    response_model: str | None = None  # the model the response names (an alias resolves to a snapshot)

    @property
    def reported(self) -> bool:
        """Whether the provider reported any count (a tier or model name alone is not usage)."""
        return any(getattr(self, name) is not None for name in COUNTS)

    def assign(self, other: Usage) -> None:
        """Become `other`, in place (holders of this object see the new figures)."""
        for name in FIELDS:
            setattr(self, name, getattr(other, name))

    def merge(self, other: Usage) -> None:
        """Take every figure `other` knows (later stream events refine earlier ones)."""
        for name in FIELDS:
            value = getattr(other, name)
            if value is not None:
                setattr(self, name, value)


FIELDS = tuple(f.name for f in fields(Usage))
#: The counted fields of `Usage` (the rest describe how it was served).
COUNTS = tuple(name for name in FIELDS if name not in ("service_tier", "response_model"))


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What an adapter learned from the request."""

    model: str | None  # the provider's own model name, e.g. "gpt-4o-mini"
    stream: bool
    endpoint: str  # e.g. "chat/completions", "messages", "generateContent"
    body: bytes | None = None  # the body to send upstream when it had to change
    hide_usage_event: bool = False  # the usage chunk was injected: do not hand it to the client
    metered: bool = True  # False for calls that consume no tokens (token counting)
    service_tier: str | None = None  # the tier the request asks for, where the wire format has one


#: What reading a provider payload of an unexpected shape raises (`"choices": 5`, `"delta": "x"`).
MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError)


class StreamTap(ABC):
    """Per-stream state: reads usage (and text, for estimates) from events as they pass."""

    def __init__(self, hide_usage_event: bool = False) -> None:
        self.usage = Usage()
        self.text_chars = 0
        self.hide_usage_event = hide_usage_event
        self.object_id: str | None = None  # the id of an object the stream created (a stored response)

    def feed(self, event: SseEvent) -> bool:
        """Read one event; return False when it must not reach the client."""
        if not event.data or event.data == b"[DONE]":
            return True
        try:
            payload = json_decode(event.data)
        except (msgspec.DecodeError, RecursionError):
            return True
        if not isinstance(payload, dict):
            return True
        try:
            return self.on_payload(event.event, payload)
        except MALFORMED:  # a field of an unexpected type: the event passes, its usage is not read
            return True

    @abstractmethod
    def on_payload(self, event_name: str | None, payload: dict) -> bool:
        """Read one decoded event (each provider's events carry usage differently)."""


class Adapter(ABC):
    """One wire format. Subclasses are data plus a few small hooks."""

    style: ClassVar[str]
    credential_headers: ClassVar[tuple[str, ...]]  # lower-case header names, in order of preference
    key_header: ClassVar[str]  # header the provider key goes in
    key_prefix: ClassVar[str] = ""  # e.g. "Bearer "
    credential_query_params: ClassVar[tuple[str, ...]] = ()
    operations: ClassVar[OperationTable]  # method and path -> the operation's name
    #: Operations whose requests name a model (in the JSON body, a form field or the path); any other
    #: operation (files, batches, stored objects) is governed by operations.csv and ownership alone.
    model_operations: ClassVar[frozenset[str]]
    error_types: ClassVar[dict[str, str]]  # TollwayError.kind -> the provider's error type/status
    #: Where a request body caps its output, first found wins.
    max_output_paths: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: The model list: where its items are, which field names a model, and the prefix to drop from it.
    list_items_key: ClassVar[str] = "data"
    list_id_key: ClassVar[str] = "id"
    list_id_prefix: ClassVar[str] = ""

    def max_output_tokens(self, body: dict | None) -> int | None:
        """The output cap the client set (`max_tokens` and its relatives), if any."""
        for path in self.max_output_paths:
            value = int_or_none(dig(body, *path))
            if value is not None:
                return value
        return None

    @staticmethod
    def model_path(method: str, path: str) -> tuple[bool, str | None]:
        """(is a models call, the model id for a retrieve) for `GET …/models` and `GET …/models/{id}`."""
        if method != "GET":
            return False, None
        parts = [p for p in path.split("/") if p]
        if parts and parts[-1] == "models":
            return True, None
        if len(parts) >= 2 and parts[-2] == "models" and ":" not in parts[-1]:
            return True, parts[-1]
        return False, None

    def filter_model_list(self, payload: Any, allowed: Callable[[str], bool]) -> Any:
        """The provider's own model list, keeping only the models the caller may use."""
        if not isinstance(payload, dict) or not isinstance(payload.get(self.list_items_key), list):
            return payload
        kept = [item for item in payload[self.list_items_key]
                if isinstance(item, dict) and isinstance(item.get(self.list_id_key), str)
                and allowed(item[self.list_id_key].removeprefix(self.list_id_prefix))]
        return {**payload, self.list_items_key: kept}

    @abstractmethod
    def model_list_body(self, provider: str, model_ids: list[str]) -> Any:
        """A model list in this provider's format, for when no upstream key can list them."""

    def streams_body(self, headers: dict[str, str]) -> bool:
        """Whether the request body goes to the provider as it arrives (an upload) rather than read whole."""
        return is_streamed(headers.get("content-type"))

    def client_credential(self, headers: dict[str, str], query: dict[str, str]) -> str | None:
        for name in self.credential_headers:
            value = headers.get(name)
            if value:
                return value[7:].strip() if value[:7].lower() == "bearer " else value.strip()
        for name in self.credential_query_params:
            if query.get(name):
                return query[name]
        return None

    def key_headers(self, key: Secret) -> list[tuple[str, str]]:
        return [(self.key_header, self.key_prefix + key.reveal())]

    @abstractmethod
    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        """The model, the stream flag and the upstream body of a request."""

    @abstractmethod
    def usage_from_body(self, payload: Any) -> Usage:
        """Usage from a whole (non-streamed) response body."""

    @abstractmethod
    def output_text_chars(self, payload: Any) -> int:
        """Characters of generated content in a whole response body (the basis of an estimate)."""

    def read_body(self, payload: Any) -> tuple[Usage, int]:
        """Usage and output characters of a whole response body; a body of an unexpected shape
        yields no usage (the forwarder then estimates the input side) rather than an error."""
        try:
            return self.usage_from_body(payload), self.output_text_chars(payload)
        except MALFORMED:
            return Usage(), 0

    @abstractmethod
    def stream_tap(self, info: CallInfo) -> StreamTap:
        """Fresh per-stream state for one streamed response."""

    @abstractmethod
    def error_body(self, err: TollwayError) -> bytes:
        """A gateway error in this provider's own error format."""

    @staticmethod
    def body_model(body: dict | None) -> str:
        """The `model` field of a JSON body, or a 400 that says what is wrong."""
        if body is None:
            raise BadRequest("The request body must be a JSON object with a \"model\" field.")
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise BadRequest("The request body needs a \"model\" string, e.g. \"model\": \"gpt-4o-mini\".")
        return model.strip()


def estimate_tokens(chars: int) -> int:
    """The usual rule of thumb: four characters a token."""
    return math.ceil(chars / 4)


def text_chars(value: Any, skip: frozenset[str] = frozenset({"model", "role", "type", "id"})) -> int:
    """Characters of every string in a JSON value except identifiers: the basis of an estimate.
    Iterative, so a deeply nested body cannot exhaust the stack."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(v for k, v in item.items() if k not in skip)
        elif isinstance(item, list):
            pending.extend(item)
    return total


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def dig(payload: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(part)
    return payload
