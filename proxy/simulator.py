"""Simulated LLM providers for tests, benchmarks and demos.

One aiohttp application answers in the real wire formats of three providers,
each under its own path prefix so that they never collide:

* ``/openai/...``    chat completions, responses, embeddings, models, and Azure OpenAI's
  ``deployments/{deployment}/chat/completions`` (``api-key`` header)
* ``/anthropic/...`` messages, count_tokens, models
* ``/gemini/...``    generateContent, streamGenerateContent, embedContent,
  batchEmbedContents, countTokens, models

Bodies (streams included) are shaped like the real APIs so that the official
SDKs parse them unchanged.  Content and token counts are deterministic:
input tokens are ``ceil(prompt characters / 4)`` and the reply has one
token per whitespace-separated word.  Request headers named ``x-sim-*``
steer the answer; see ``_Controls`` for the details:

* token counts: ``x-sim-input-tokens``, ``x-sim-output-tokens``,
  ``x-sim-cached-tokens``, ``x-sim-cache-write-tokens``,
  ``x-sim-cache-write-1h-tokens``, ``x-sim-reasoning-tokens``,
  ``x-sim-audio-input-tokens``, ``x-sim-audio-output-tokens``
* other billable dimensions: ``x-sim-web-searches``, ``x-sim-service-tier``,
  ``x-sim-response-model``
* stream shape, delays and faults: ``x-sim-chunks``,
  ``x-sim-chunk-delay-ms``, ``x-sim-latency-ms``, ``x-sim-fault``

Every provider request is recorded as a ``SimRequest`` unless recording is
turned off.

Run stand-alone with ``python -m proxy.simulator --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
import math
import random
import signal
import socket
import struct
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["SimRequest", "Simulator", "count_tokens", "create_sim_app", "main", "reply_text", "serve", "split_text"]

DEFAULT_OUTPUT_TOKENS = 12
DEFAULT_CHUNKS = 5
MAX_OUTPUT_TOKENS = 100_000
MAX_CHUNKS = 10_000
MAX_USAGE = 10**9
OPENAI_TIERS = frozenset({"default", "flex", "priority", "scale"})
STALL_SECONDS = 30.0
EMBEDDING_DIMENSIONS = 16
FAULTS = frozenset({"no-usage", "disconnect-mid-stream", "stall", "truncate", "invalid-json"})
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"


@dataclass
class SimRequest:
    """One request as the simulator received it."""

    provider: str
    method: str
    path: str  # path after the provider prefix, e.g. "/v1/chat/completions"
    query: str
    headers: dict[str, str]  # lower-cased names
    body: dict | None  # parsed JSON object, None if the body is not a JSON object


class _State:
    """Mutable state of one simulator app, shared with the owning thread."""

    def __init__(self, keys: dict[str, str] | None, record: bool, lifelike: bool = False) -> None:
        self.keys = dict(keys or {})
        self.record = record
        self.lifelike = lifelike  # requests without x-sim-* headers get real-world latency and faults
        self.rng = random.Random(11)
        self.cancelled_streams = 0
        self.closing = False
        self.tasks: set[asyncio.Task] = set()
        self._requests: list[SimRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, item: SimRequest) -> None:
        with self._lock:
            self._requests.append(item)

    def snapshot(self) -> list[SimRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> int:
        with self._lock:
            count = len(self._requests)
            self._requests.clear()
            return count

    def next_id(self) -> str:
        return f"{next(self._ids):012d}"


STATE_KEY = web.AppKey("tollway_simulator_state", _State)


# --------------------------------------------------------------------------
# Controls, tokens and generated content
# --------------------------------------------------------------------------


def _int_header(headers: Any, name: str, default: int, upper: int = MAX_OUTPUT_TOKENS) -> int:
    value = headers.get(name)
    if value is None:
        return default
    try:
        return max(0, min(int(value), upper))
    except ValueError:
        return default


def _optional_int_header(headers: Any, name: str) -> int | None:
    value = _int_header(headers, name, -1, MAX_USAGE)
    return None if value < 0 else value


def _text_header(headers: Any, name: str) -> str | None:
    value = headers.get(name, "").strip()
    return value or None


@dataclass(slots=True)
class _Controls:
    """Behaviour requested through ``x-sim-*`` headers.

    ``x-sim-output-tokens`` reply length (still capped by the request's own
    max-token field), ``x-sim-input-tokens`` prompt tokens in place of the
    count from the request text, ``x-sim-cached-tokens`` /
    ``x-sim-cache-write-tokens`` (5-minute TTL) /
    ``x-sim-cache-write-1h-tokens`` (1-hour TTL, Anthropic) /
    ``x-sim-reasoning-tokens`` extra usage, ``x-sim-audio-input-tokens`` /
    ``x-sim-audio-output-tokens`` the audio part of the prompt / of the
    visible output (included in those totals and capped at them; OpenAI chat
    and Gemini), ``x-sim-web-searches`` server-side web searches (Anthropic
    ``server_tool_use``, OpenAI Responses ``web_search_call`` items, Gemini
    ``groundingMetadata``), ``x-sim-service-tier`` the tier the response
    reports (OpenAI and Anthropic), ``x-sim-response-model`` the model the
    response names instead of the requested one, ``x-sim-chunks`` and
    ``x-sim-chunk-delay-ms`` stream shape, ``x-sim-latency-ms`` delay before
    the response, and ``x-sim-fault`` one of ``status:CODE``, ``no-usage``,
    ``disconnect-mid-stream``, ``stall``, ``truncate``, ``invalid-json``.
    Unparsable numbers fall back to the defaults.
    """

    output_tokens: int | None = None
    input_tokens: int | None = None
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    audio_input: int = 0
    audio_output: int = 0
    web_searches: int = 0
    service_tier: str | None = None
    response_model: str | None = None
    chunks: int = DEFAULT_CHUNKS
    chunk_delay: float = 0.0
    latency: float = 0.0
    fault: str = ""
    fault_status: int = 0

    @classmethod
    def parse(cls, headers: Any) -> _Controls:
        ctl = cls(
            output_tokens=_int_header(headers, "x-sim-output-tokens", -1),
            input_tokens=_optional_int_header(headers, "x-sim-input-tokens"),
            cached=_int_header(headers, "x-sim-cached-tokens", 0, MAX_USAGE),
            cache_write=_int_header(headers, "x-sim-cache-write-tokens", 0, MAX_USAGE),
            cache_write_1h=_int_header(headers, "x-sim-cache-write-1h-tokens", 0, MAX_USAGE),
            reasoning=_int_header(headers, "x-sim-reasoning-tokens", 0, MAX_USAGE),
            audio_input=_int_header(headers, "x-sim-audio-input-tokens", 0, MAX_USAGE),
            audio_output=_int_header(headers, "x-sim-audio-output-tokens", 0, MAX_USAGE),
            web_searches=_int_header(headers, "x-sim-web-searches", 0, MAX_CHUNKS),
            service_tier=_text_header(headers, "x-sim-service-tier"),
            response_model=_text_header(headers, "x-sim-response-model"),
            chunks=max(1, _int_header(headers, "x-sim-chunks", DEFAULT_CHUNKS, MAX_CHUNKS)),
            chunk_delay=_int_header(headers, "x-sim-chunk-delay-ms", 0, 10**7) / 1000,
            latency=_int_header(headers, "x-sim-latency-ms", 0, 10**7) / 1000,
            fault=headers.get("x-sim-fault", "").strip().lower(),
        )
        if ctl.output_tokens < 0:
            ctl.output_tokens = None
        if ctl.fault.startswith("status:"):
            try:
                ctl.fault_status = int(ctl.fault[7:])
            except ValueError:
                ctl.fault_status = -1
        return ctl

    def fault_problem(self) -> str | None:
        """A message when the fault header is not understood, else None."""
        if not self.fault or self.fault in FAULTS:
            return None
        if 400 <= self.fault_status <= 599:
            return None
        return f"unknown x-sim-fault {self.fault!r}"


@dataclass(slots=True)
class _Usage:
    """Provider-neutral token counts; each provider lays them out its own way."""

    input: int  # prompt tokens from the request text or x-sim-input-tokens (never cached)
    output: int  # visible reply tokens
    cached: int = 0  # cached prompt tokens (in addition to ``input``)
    cache_write: int = 0  # prompt tokens written to the cache with a 5-minute TTL (Anthropic)
    cache_write_1h: int = 0  # prompt tokens written to the cache with a 1-hour TTL (Anthropic)
    reasoning: int = 0  # hidden reasoning tokens (in addition to ``output``)
    audio_input: int = 0  # audio part of ``input + cached`` (not additional)
    audio_output: int = 0  # audio part of ``output`` (not additional)
    web_searches: int = 0  # server-side web searches performed

    @property
    def prompt(self) -> int:
        """All prompt tokens, cached ones included."""
        return self.input + self.cached


@dataclass(slots=True)
class _Gen:
    """A generated reply: text, its stream pieces, usage and stop cause."""

    text: str
    pieces: list[str]
    usage: _Usage | None  # None when the no-usage fault is active
    hit_limit: bool  # stopped by the request's max-token limit
    model: str  # the model the response names
    searches: int = 0  # web searches whose results the reply shows (even without usage)


_TEXT_KEYS = ("text", "content", "parts")


def _collect_text(value: Any, out: list[str]) -> None:
    """Append every prompt string in ``value`` (messages, parts, ...) to ``out``."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, out)
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            if key in value:
                _collect_text(value[key], out)


def count_tokens(*values: Any) -> int:
    """Deterministic token estimate: ``max(1, ceil(characters / 4))``."""
    out: list[str] = []
    for value in values:
        _collect_text(value, out)
    return max(1, math.ceil(sum(map(len, out)) / 4))


def reply_text(model: str, tokens: int) -> str:
    """The deterministic reply of ``tokens`` whitespace-separated words."""
    words = f"This is a simulated reply from {'-'.join(model.split()) or 'model'}".split()
    words = words[:tokens] + [f"word{i}" for i in range(len(words) + 1, tokens + 1)]
    return " ".join(words)


def split_text(text: str, parts: int) -> list[str]:
    """Split ``text`` into ``parts`` pieces (at word boundaries when possible)."""
    words = text.split(" ")
    if parts <= len(words):
        tokens = [words[0]] + [" " + w for w in words[1:]]
        size = len(tokens)
        return ["".join(tokens[i * size // parts : (i + 1) * size // parts]) for i in range(parts)]
    parts = max(1, min(parts, len(text)))
    size = len(text)
    return [text[i * size // parts : (i + 1) * size // parts] for i in range(parts)]


def _limit(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic vector; values are exact in float32 (base64 round-trips)."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = (seed * (dims // len(seed) + 1))[:dims]
    return [(b - 128) / 128 for b in raw]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(payload: Any, event: str | None = None, eol: bytes = b"\n") -> bytes:
    """One server-sent event: optional ``event:`` line, ``data:`` line, blank line."""
    data = b"data: " + _dumps(payload) + eol + eol
    return b"event: " + event.encode() + eol + data if event else data


@dataclass(slots=True)
class _Stream:
    """A stream answer, pre-encoded: preamble, content chunks, closing events."""

    head: list[bytes]
    chunks: list[bytes]
    tail: list[bytes]
    content_type: str = SSE_TYPE


# --------------------------------------------------------------------------
# Per-request context
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """What a provider handler needs to build its answer."""

    request: web.Request
    body: dict
    ctl: _Controls
    state: _State
    stream: bool = False

    def new_id(self) -> str:
        return self.state.next_id()

    def generate(self, model: str, prompt: tuple, limit: Any) -> _Gen:
        """Build the reply for ``model`` given the prompt parts and max-token limit."""
        ctl = self.ctl
        tokens = DEFAULT_OUTPUT_TOKENS if ctl.output_tokens is None else ctl.output_tokens
        limit = _limit(limit)
        hit_limit = limit is not None and limit < tokens
        tokens = max(1, min(limit if hit_limit else tokens, MAX_OUTPUT_TOKENS))
        text = reply_text(model, tokens)
        usage = None if ctl.fault == "no-usage" else self.usage(prompt, tokens)
        pieces = split_text(text, ctl.chunks) if self.stream else [text]
        return _Gen(text, pieces, usage, hit_limit, ctl.response_model or model, ctl.web_searches)

    def usage(self, prompt: tuple, output: int) -> _Usage:
        """The usage of a reply of ``output`` tokens, with the header-given extras."""
        ctl = self.ctl
        tokens = count_tokens(*prompt) if ctl.input_tokens is None else ctl.input_tokens
        return _Usage(
            input=tokens,
            output=output,
            cached=ctl.cached,
            cache_write=ctl.cache_write,
            cache_write_1h=ctl.cache_write_1h,
            reasoning=ctl.reasoning,
            audio_input=min(ctl.audio_input, tokens + ctl.cached),
            audio_output=min(ctl.audio_output, output),
            web_searches=ctl.web_searches,
        )

    def tier(self, default: str) -> str:
        """The service tier the response reports: the x-sim header's, else ``default``."""
        return self.ctl.service_tier or default


class _BadRequest(Exception):
    """Raised by handlers to answer 400 in the provider's error format."""


def _require_model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter")
    return model


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------

Handler = Callable[[_Call], "dict | list | _Stream"]


class _Provider(ABC):
    """Base of a provider family: credential, error format and routes."""

    name = ""
    error_kinds: dict[int, Any] = {}

    @property
    def prefix(self) -> str:
        return "/" + self.name

    @abstractmethod
    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) for each endpoint of the family."""

    @abstractmethod
    def credential(self, request: web.Request) -> str | None:
        """The key the client sent, where this family's SDK sends it."""

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict:
        """An error in this family's own format."""

    def not_found(self, call: _Call) -> dict:
        raise _NotFound(f"Unknown request URL: {call.request.method} {call.request.path}")


class _NotFound(Exception):
    """Raised by the catch-all route: answer 404 in the provider's format."""


class _OpenAI(_Provider):
    name = "openai"
    error_kinds = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "unsupported_country_region_territory"),
        404: ("invalid_request_error", "unknown_url"),
        429: ("requests", "rate_limit_exceeded"),
    }
    models = ("gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small")

    def routes(self):
        return [
            ("POST", "/v1/chat/completions", self.chat),
            ("POST", "/v1/responses", self.responses),
            ("POST", "/v1/embeddings", self.embeddings),
            ("GET", "/v1/models", self.list_models),
            ("POST", "/deployments/{deployment}/chat/completions", self.azure_chat),
        ]

    def credential(self, request):
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:]
        return request.headers.get("api-key")  # Azure OpenAI's header

    def azure_chat(self, call: _Call):
        """Azure OpenAI: the deployment in the path names the model; the body need not."""
        call.body.setdefault("model", call.request.match_info["deployment"])
        return self.chat(call)

    def error_body(self, status, message):
        kind, code = self.error_kinds.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    # chat completions -----------------------------------------------------

    @staticmethod
    def tier(call: _Call) -> str:
        """The tier asked for in the body, as the API echoes it ("auto" answers "default")."""
        asked = call.body.get("service_tier")
        return call.tier(asked if asked in OPENAI_TIERS else "default")

    @staticmethod
    def chat_usage(u: _Usage) -> dict:
        prompt, completion = u.prompt, u.output + u.reasoning
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": u.audio_input},
            "completion_tokens_details": {
                "reasoning_tokens": u.reasoning,
                "audio_tokens": u.audio_output,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def chat(self, call: _Call):
        body = call.body
        model = _require_model(body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        gen = call.generate(model, (body.get("messages"),), limit)
        finish = "length" if gen.hit_limit else "stop"
        base = {
            "id": "chatcmpl-sim" + call.new_id(),
            "created": int(time.time()),
            "model": gen.model,
            "service_tier": self.tier(call),
            "system_fingerprint": "fp_simulator",
        }
        if not call.stream:
            message = {"role": "assistant", "content": gen.text, "refusal": None, "annotations": []}
            result = {
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            }
            if gen.usage is not None:
                result["usage"] = self.chat_usage(gen.usage)
            return result
        opts = body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True and gen.usage is not None
        base["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            payload = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if with_usage:
                payload["usage"] = None
            return _sse(payload)

        tail = [chunk({}, finish)]
        if with_usage:
            tail.append(_sse({**base, "choices": [], "usage": self.chat_usage(gen.usage)}))
        tail.append(b"data: [DONE]\n\n")
        return _Stream(
            head=[chunk({"role": "assistant", "content": "", "refusal": None})],
            chunks=[chunk({"content": piece}) for piece in gen.pieces],
            tail=tail,
        )

    # responses ------------------------------------------------------------

    @staticmethod
    def responses_usage(u: _Usage | None) -> dict | None:
        if u is None:
            return None
        prompt, output = u.prompt, u.output + u.reasoning
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": u.cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": u.reasoning},
            "total_tokens": prompt + output,
        }

    def response_base(self, call: _Call, gen: _Gen, limit: Any) -> dict:
        """Every field of a Responses object; status, output and usage get filled in later."""
        return {
            "id": "resp_sim" + call.new_id(),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": call.body.get("instructions"),
            "max_output_tokens": _limit(limit),
            "model": gen.model,
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": self.tier(call),
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": {},
        }

    @staticmethod
    def search_call(item_id: str, index: int) -> dict:
        """A completed ``web_search_call`` output item, the ``index``-th search (from 1)."""
        action = {"type": "search", "query": f"simulated query {index}"}
        return {"id": item_id, "type": "web_search_call", "status": "completed", "action": action}

    def responses(self, call: _Call):
        body = call.body
        model = _require_model(body)
        limit = body.get("max_output_tokens")
        gen = call.generate(model, (body.get("instructions"), body.get("input")), limit)
        base = self.response_base(call, gen, limit)
        searches = [self.search_call("ws_sim" + call.new_id(), k) for k in range(1, gen.searches + 1)]
        mid = "msg_sim" + call.new_id()

        def response(status: str, output: list, usage: dict | None) -> dict:
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            fields = {"status": status, "incomplete_details": incomplete, "output": output, "usage": usage}
            return {**base, **fields}

        def part(text: str) -> dict:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        def item(status: str, content: list) -> dict:
            return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}

        final_status = "incomplete" if gen.hit_limit else "completed"
        usage = self.responses_usage(gen.usage)
        done_item = item("completed", [part(gen.text)])
        final = response(final_status, [*searches, done_item], usage)
        if not call.stream:
            return final
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        head = [
            event("response.created", response=response("in_progress", [], None)),
            event("response.in_progress", response=response("in_progress", [], None)),
        ]
        for index, done in enumerate(searches):
            added = {**done, "status": "in_progress"}
            head.append(event("response.output_item.added", output_index=index, item=added))
            head.append(event("response.output_item.done", output_index=index, item=done))
        where = {"item_id": mid, "output_index": len(searches), "content_index": 0}
        head += [
            event("response.output_item.added", output_index=len(searches), item=item("in_progress", [])),
            event("response.content_part.added", **where, part=part("")),
        ]
        chunks = [
            event("response.output_text.delta", **where, delta=piece, logprobs=[]) for piece in gen.pieces
        ]
        tail = [
            event("response.output_text.done", **where, text=gen.text, logprobs=[]),
            event("response.content_part.done", **where, part=part(gen.text)),
            event("response.output_item.done", output_index=len(searches), item=done_item),
            event("response." + final_status, response=final),
        ]
        return _Stream(head, chunks, tail)

    # embeddings and models ------------------------------------------------

    def embeddings(self, call: _Call):
        body = call.body
        model = _require_model(body)
        texts = body.get("input")
        if isinstance(texts, str) or (isinstance(texts, list) and texts and isinstance(texts[0], int)):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise _BadRequest("'input' must be a non-empty string or array")
        dims = _limit(body.get("dimensions")) or EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data, tokens = [], 0
        for index, text in enumerate(texts):
            text = text if isinstance(text, str) else " ".join(map(str, text))
            tokens += count_tokens(text)
            vector: Any = _embedding(text, dims)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        result = {"object": "list", "data": data, "model": model}
        if call.ctl.fault != "no-usage":
            result["usage"] = usage
        return result

    def list_models(self, call: _Call):
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
                for m in self.models
            ],
        }


class _Anthropic(_Provider):
    name = "anthropic"
    error_kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    models = ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5")

    def routes(self):
        return [
            ("POST", "/v1/messages", self.messages),
            ("POST", "/v1/messages/count_tokens", self.count),
            ("GET", "/v1/models", self.list_models),
        ]

    def credential(self, request):
        # ``x-api-key`` is the documented header; newer SDKs send the key as a bearer token.
        return request.headers.get("x-api-key") or _OpenAI.credential(self, request)

    def error_body(self, status, message):
        kind = self.error_kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    @staticmethod
    def usage(u: _Usage, output_tokens: int, tier: str) -> dict:
        """Usage as in ``message`` and ``message_start`` (without the server tool counts)."""
        return {
            "input_tokens": u.input,
            "cache_creation_input_tokens": u.cache_write + u.cache_write_1h,
            "cache_read_input_tokens": u.cached,
            "cache_creation": {
                "ephemeral_5m_input_tokens": u.cache_write,
                "ephemeral_1h_input_tokens": u.cache_write_1h,
            },
            "output_tokens": output_tokens,
            "service_tier": tier,
        }

    @staticmethod
    def server_tools(u: _Usage) -> dict:
        """The ``server_tool_use`` usage field, when the reply used a server tool."""
        return {"server_tool_use": {"web_search_requests": u.web_searches}} if u.web_searches else {}

    def messages(self, call: _Call):
        body = call.body
        model = _require_model(body)
        gen = call.generate(model, (body.get("system"), body.get("messages")), body.get("max_tokens"))
        stop = "max_tokens" if gen.hit_limit else "end_turn"
        message = {
            "id": "msg_sim" + call.new_id(),
            "type": "message",
            "role": "assistant",
            "model": gen.model,
            "content": [{"type": "text", "text": gen.text}],
            "stop_reason": stop,
            "stop_sequence": None,
        }
        tier = call.tier("standard")
        if not call.stream:
            if gen.usage is not None:
                usage = self.usage(gen.usage, gen.usage.output, tier)
                message["usage"] = {**usage, **self.server_tools(gen.usage)}
            return message
        start = {**message, "content": [], "stop_reason": None}
        if gen.usage is not None:
            start["usage"] = self.usage(gen.usage, 1, tier)
        delta: dict = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
        if gen.usage is not None:
            delta["usage"] = {"output_tokens": gen.usage.output, **self.server_tools(gen.usage)}

        def event(payload: dict) -> bytes:
            return _sse(payload, event=payload["type"])

        return _Stream(
            head=[
                event({"type": "message_start", "message": start}),
                event(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                ),
                event({"type": "ping"}),
            ],
            chunks=[
                event(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    }
                )
                for piece in gen.pieces
            ],
            tail=[
                event({"type": "content_block_stop", "index": 0}),
                event(delta),
                event({"type": "message_stop"}),
            ],
        )

    def count(self, call: _Call):
        body = call.body
        _require_model(body)
        return {"input_tokens": count_tokens(body.get("system"), body.get("messages"))}

    def list_models(self, call: _Call):
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": "2025-01-01T00:00:00Z",
            }
            for m in self.models
        ]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}


class _Gemini(_Provider):
    name = "gemini"
    error_kinds = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        429: "RESOURCE_EXHAUSTED",
        499: "CANCELLED",
        500: "INTERNAL",
        501: "UNIMPLEMENTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    models = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001")
    version = "{version:v1(?:beta|alpha)?}"

    def routes(self):
        base = f"/{self.version}/models/{{model}}"
        return [
            ("POST", base + ":generateContent", self.generate),
            ("POST", base + ":streamGenerateContent", self.generate),
            ("POST", base + ":embedContent", self.embed),
            ("POST", base + ":batchEmbedContents", self.batch_embed),
            ("POST", base + ":countTokens", self.count),
            ("GET", f"/{self.version}/models", self.list_models),
        ]

    def credential(self, request):
        return request.headers.get("x-goog-api-key") or request.query.get("key")

    def error_body(self, status, message):
        kind = self.error_kinds.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        return {"error": {"code": status, "message": message, "status": kind}}

    @staticmethod
    def modalities(total: int, audio: int) -> list[dict]:
        """Per-modality counts: TEXT always, AUDIO when there is some."""
        details = [{"modality": "TEXT", "tokenCount": total - audio}]
        return details + [{"modality": "AUDIO", "tokenCount": audio}] if audio else details

    @staticmethod
    def usage(u: _Usage, prompt_only: bool = False) -> dict:
        prompt = u.prompt
        details = _Gemini.modalities(prompt, u.audio_input)
        if prompt_only:
            return {"promptTokenCount": prompt, "totalTokenCount": prompt, "promptTokensDetails": details}
        result = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": u.output,
            "totalTokenCount": prompt + u.output + u.reasoning,
            "cachedContentTokenCount": u.cached,
            "thoughtsTokenCount": u.reasoning,
            "promptTokensDetails": details,
        }
        if u.audio_output:
            result["candidatesTokensDetails"] = _Gemini.modalities(u.output, u.audio_output)
        return result

    @staticmethod
    def grounding(searches: int) -> dict:
        """The ``groundingMetadata`` of a candidate after ``searches`` Google searches."""
        return {
            "webSearchQueries": [f"simulated query {k}" for k in range(1, searches + 1)],
            "groundingChunks": [],
            "searchEntryPoint": {"renderedContent": ""},
        }

    def generate(self, call: _Call):
        body, info = call.body, call.request.match_info
        model = info["model"]
        call.stream = streaming = call.request.path.endswith(":streamGenerateContent")
        config = body.get("generationConfig") or {}
        limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
        gen = call.generate(model, (body.get("systemInstruction"), body.get("contents")), limit)
        finish = "MAX_TOKENS" if gen.hit_limit else "STOP"
        rid = "sim" + call.new_id()

        def response(text: str, last: bool) -> dict:
            candidate: dict = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if last:
                candidate["finishReason"] = finish
            if last and gen.searches:
                candidate["groundingMetadata"] = self.grounding(gen.searches)
            result: dict = {"candidates": [candidate]}
            if gen.usage is not None:
                result["usageMetadata"] = self.usage(gen.usage, prompt_only=not last)
            result["modelVersion"] = gen.model
            result["responseId"] = rid
            return result

        if not streaming:
            return response(gen.text, True)
        bodies = [response(p, i == len(gen.pieces) - 1) for i, p in enumerate(gen.pieces)]
        if call.request.query.get("alt") == "sse":
            frames = [_sse(b, eol=b"\r\n") for b in bodies]
            return _Stream([], frames[:-1], frames[-1:])
        frames = [(b"[" if i == 0 else b",\r\n") + _dumps(b) for i, b in enumerate(bodies)]
        return _Stream([], frames[:-1], [frames[-1], b"]"], JSON_TYPE)

    @staticmethod
    def _vector(request: Any) -> dict:
        dims = _limit(request.get("outputDimensionality")) or EMBEDDING_DIMENSIONS
        parts: list[str] = []
        _collect_text(request.get("content"), parts)
        return {"values": _embedding(" ".join(parts), dims)}

    def embed(self, call: _Call):
        return {"embedding": self._vector(call.body)}

    def batch_embed(self, call: _Call):
        requests = call.body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _BadRequest("requests must be a non-empty list")
        return {"embeddings": [self._vector(r if isinstance(r, dict) else {}) for r in requests]}

    def count(self, call: _Call):
        body = call.body
        inner = body.get("generateContentRequest") or {}
        total = count_tokens(body.get("contents"), inner.get("contents"), inner.get("systemInstruction"))
        return {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]}

    def list_models(self, call: _Call):
        return {
            "models": [
                {
                    "name": "models/" + m,
                    "version": "001",
                    "displayName": m.replace("-", " ").title(),
                    "inputTokenLimit": 1_048_576,
                    "outputTokenLimit": 65_536,
                    "supportedGenerationMethods": ["embedContent"]
                    if "embedding" in m
                    else ["generateContent", "countTokens"],
                }
                for m in self.models
            ]
        }


PROVIDERS: tuple[_Provider, ...] = (_OpenAI(), _Anthropic(), _Gemini())


# --------------------------------------------------------------------------
# Request pipeline
# --------------------------------------------------------------------------


def _error(provider: _Provider, status: int, message: str) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(
        status=status,
        body=_dumps(provider.error_body(status, message)),
        content_type=JSON_TYPE,
        headers=headers,
        reason="Site Overloaded" if status == 529 else None,
    )


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    """Return (parsed JSON or None, whether the body was well-formed or empty)."""
    if not raw:
        return None, True
    try:
        return json.loads(raw), True
    except ValueError:
        return None, False


async def _send_json(call: _Call, payload: Any) -> web.StreamResponse:
    """A JSON answer, with the non-stream variant of the requested fault."""
    data, fault, request = _dumps(payload), call.ctl.fault, call.request
    if fault == "stall":
        await asyncio.sleep(STALL_SECONDS)
    elif fault == "truncate":
        data = data[: len(data) // 2]
    elif fault == "disconnect-mid-stream":
        resp = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        request.transport.abort()
        return resp
    return web.Response(body=data, content_type=JSON_TYPE)


async def _send_stream(call: _Call, plan: _Stream) -> web.StreamResponse:
    """Stream ``plan``, honouring chunk delays and stream faults.

    A client that goes away makes the write or the sleep fail; that is counted
    in ``cancelled_streams`` and the handler ends at once.
    """
    ctl, request, state = call.ctl, call.request, call.state
    resp = web.StreamResponse(headers={"Content-Type": plan.content_type, "Cache-Control": "no-cache"})
    cut = len(plan.chunks) // 2 if ctl.fault in ("disconnect-mid-stream", "stall") else len(plan.chunks)
    try:
        await resp.prepare(request)
        if plan.head:
            await resp.write(b"".join(plan.head))
        await _write_chunks(resp, plan.chunks[:cut], ctl.chunk_delay, bool(plan.head))
        if ctl.fault == "disconnect-mid-stream":
            request.transport.abort()
            return resp
        if ctl.fault == "stall":
            await asyncio.sleep(STALL_SECONDS)
            await _write_chunks(resp, plan.chunks[cut:], ctl.chunk_delay, True)
        if ctl.fault != "truncate":
            if ctl.chunk_delay and (plan.chunks or plan.head):
                await asyncio.sleep(ctl.chunk_delay)
            await resp.write(b"".join(plan.tail))
        await resp.write_eof()
    except ConnectionError:  # the client closed the connection under a write
        state.cancelled_streams += 1
    except asyncio.CancelledError:  # the client went away while we waited
        if not state.closing:
            state.cancelled_streams += 1
        raise
    return resp


async def _write_chunks(
    resp: web.StreamResponse, chunks: list[bytes], delay: float, pause_first: bool
) -> None:
    for index, chunk in enumerate(chunks):
        if delay and (index or pause_first):
            await asyncio.sleep(delay)
        await resp.write(chunk)


def _endpoint(provider: _Provider, handler: Handler) -> Callable:
    """Wrap a provider handler with recording, latency, auth, parsing and faults."""
    prefix_len = len(provider.prefix)

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        raw = await request.read() if request.body_exists else b""
        body, well_formed = _parse_body(raw)
        if not isinstance(body, dict):
            body = None
        if state.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            state.add(
                SimRequest(
                    provider.name,
                    request.method,
                    request.path[prefix_len:],
                    request.query_string,
                    headers,
                    body,
                )
            )
        task = asyncio.current_task()
        state.tasks.add(task)
        try:
            return await _answer(provider, handler, request, state, body, well_formed)
        finally:
            state.tasks.discard(task)

    return handle


async def _answer(
    provider: _Provider,
    handler: Handler,
    request: web.Request,
    state: _State,
    body: dict | None,
    well_formed: bool,
) -> web.StreamResponse:
    ctl = _Controls.parse(request.headers)
    if state.lifelike and not any(name.lower().startswith("x-sim-") for name in request.headers):
        _make_lifelike(ctl, state.rng)
    if ctl.latency:
        await asyncio.sleep(ctl.latency)
    expected = state.keys.get(provider.name)
    if expected is not None:
        presented = provider.credential(request)
        if presented != expected:
            return _error(provider, 401, "Invalid API key provided." if presented else "No API key provided.")
    if handler == provider.not_found:  # an unknown URL is that, whatever its body
        return _error(provider, 404, f"Unknown request URL: {request.method} {request.path}")
    if not well_formed:
        return _error(provider, 400, "The request body is not valid JSON.")
    if request.method == "POST" and body is None:
        return _error(provider, 400, "The request body must be a JSON object.")
    problem = ctl.fault_problem()
    if problem:
        return _error(provider, 400, problem)
    if ctl.fault_status:
        return _error(provider, ctl.fault_status, f"Simulated error with status {ctl.fault_status}.")
    if ctl.fault == "invalid-json":
        return web.Response(body=b'{"id": "sim", "choices": [<not json', content_type=JSON_TYPE)
    body = body if body is not None else {}
    call = _Call(request, body, ctl, state, body.get("stream") is True)
    try:
        result = handler(call)
    except _BadRequest as exc:
        return _error(provider, 400, str(exc))
    except _NotFound as exc:
        return _error(provider, 404, str(exc))
    if isinstance(result, _Stream):
        return await _send_stream(call, result)
    return await _send_json(call, result)


# --------------------------------------------------------------------------
# Control endpoints and app factory
# --------------------------------------------------------------------------


async def _sim_requests(request: web.Request) -> web.Response:
    data = [dataclasses.asdict(r) for r in request.app[STATE_KEY].snapshot()]
    return web.Response(body=_dumps(data), content_type=JSON_TYPE)


async def _sim_clear(request: web.Request) -> web.Response:
    return web.json_response({"cleared": request.app[STATE_KEY].clear()})


async def _sim_health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        {"status": "ok", "requests": len(state.snapshot()), "cancelled_streams": state.cancelled_streams}
    )


async def _on_shutdown(app: web.Application) -> None:
    """Cancel in-flight handlers (stalls, long streams) so shutdown is prompt."""
    state = app[STATE_KEY]
    state.closing = True
    for task in list(state.tasks):
        task.cancel()


def _make_lifelike(ctl: _Controls, rng: random.Random) -> None:
    """Real-world shape for the demo: a few hundred ms before the answer, replies of varied length
    streamed in chunks ~30 ms apart, and now and then a 429 or a 5xx as real providers give."""
    ctl.latency = rng.lognormvariate(-1.6, 0.5)  # median ~0.2 s
    ctl.output_tokens = int(rng.lognormvariate(4.5, 0.7))  # median ~90 tokens
    ctl.chunks, ctl.chunk_delay = 12, rng.uniform(0.015, 0.045)
    roll = rng.random()
    if roll < 0.02:
        ctl.fault, ctl.fault_status = "status:429", 429
    elif roll < 0.03:
        ctl.fault, ctl.fault_status = "status:503", 503


def create_sim_app(keys: dict[str, str] | None = None, *, record: bool = True,
                   lifelike: bool = False) -> web.Application:
    """Build the simulator application.

    ``keys`` maps a provider family ("openai", "anthropic", "gemini") to the
    only credential it accepts; a family without a key accepts any.  Serve it
    with ``handler_cancellation=True`` (as ``Simulator`` and ``main`` do) so
    that a client going away mid-wait ends the stream at once.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = _State(keys, record, lifelike)
    router = app.router
    router.add_get("/_sim/requests", _sim_requests)
    router.add_delete("/_sim/requests", _sim_clear)
    router.add_get("/_sim/health", _sim_health)
    for provider in PROVIDERS:
        for method, path, handler in provider.routes():
            router.add_route(method, provider.prefix + path, _endpoint(provider, handler))
    from proxy.simulator_ws import add_websocket_routes  # it imports this module

    add_websocket_routes(app)
    from proxy.simulator_objects import add_object_routes  # it imports this module, too

    add_object_routes(app)
    for provider in PROVIDERS:
        router.add_route("*", provider.prefix + "/{tail:.*}", _endpoint(provider, provider.not_found))
    app.on_shutdown.append(_on_shutdown)
    return app


def _make_runner(app: web.Application) -> web.AppRunner:
    return web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)


# --------------------------------------------------------------------------
# Background-thread server
# --------------------------------------------------------------------------


class Simulator:
    """Run the simulator on 127.0.0.1 in a background thread with its own loop.

    Use as a context manager or call ``start()`` / ``stop()``.
    """

    def __init__(self, keys: dict[str, str] | None = None, port: int = 0, record: bool = True) -> None:
        self.app = create_sim_app(keys, record=record)
        self.port = port
        self.url = ""
        self._state = self.app[STATE_KEY]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def requests(self) -> list[SimRequest]:
        """A snapshot of every recorded request, in arrival order."""
        return self._state.snapshot()

    @property
    def cancelled_streams(self) -> int:
        """How many streams ended because the client went away."""
        return self._state.cancelled_streams

    def clear(self) -> None:
        """Forget the recorded requests."""
        self._state.clear()

    def start(self) -> Simulator:
        """Start serving; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="llm-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"simulator failed to start: {self._error}") from self._error
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = _make_runner(self.app)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{self.port}"
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        """Stop serving, cancelling in-flight requests; safe to call twice."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _parse_key(text: str) -> tuple[str, str]:
    family, sep, key = text.partition("=")
    if not sep or family not in {p.name for p in PROVIDERS} or not key:
        raise argparse.ArgumentTypeError(
            f"expected FAMILY=KEY with FAMILY openai|anthropic|gemini, got {text!r}"
        )
    return family, key


def _announce(url: str) -> None:
    print(f"simulator listening on {url}", file=sys.stderr, flush=True)


async def serve(host: str, port: int, keys: dict[str, str], record: bool, lifelike: bool, *,
                sock: socket.socket | None = None, on_ready: Callable[[str], None] = _announce) -> None:
    """Serve until SIGINT or SIGTERM. `sock`, already bound (as `tollway simulator` binds it), replaces
    `port`; `on_ready` gets the URL once the simulator listens."""
    runner = _make_runner(create_sim_app(keys, record=record, lifelike=lifelike))
    await runner.setup()
    await (web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)).start()
    bound = runner.addresses[0]
    on_ready(f"http://{host}:{bound[1]}")
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy.simulator", description="Simulated OpenAI, Anthropic and Gemini APIs."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--key",
        action="append",
        type=_parse_key,
        default=[],
        metavar="FAMILY=KEY",
        help="only accept KEY for FAMILY (repeatable)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not record requests")
    parser.add_argument("--lifelike", action="store_true",
                        help="requests without x-sim-* headers get real-world latency, reply lengths and "
                             "occasional 429/503 answers")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, dict(args.key), not args.no_record, args.lifelike))
    return 0


if __name__ == "__main__":
    sys.exit(main())
