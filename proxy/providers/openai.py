"""OpenAI wire format (and every OpenAI-compatible provider, and Azure OpenAI's variant).

Chat Completions streams carry usage only when the client asks for
`stream_options.include_usage`; the gateway asks on the client's behalf and then holds back the
extra usage-only chunk, so the client sees exactly the stream it asked for.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import BadRequest, TollwayError
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
from proxy.providers.operations import OPENAI as OPENAI_OPERATIONS

#: Endpoints whose streams need `stream_options.include_usage` to report usage.
_USAGE_OPT_IN = frozenset({"chat/completions", "completions"})
#: Responses API events whose `response` holds the final usage.
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


#: Tiers an OpenAI request may ask for by name (`auto` leaves the choice to OpenAI).
_TIERS = frozenset({"default", "flex", "priority", "scale"})


def usage_from_openai(usage: Any) -> Usage:
    """Chat/Completions (`prompt_tokens`…) and Responses (`input_tokens`…) usage objects."""
    if not isinstance(usage, dict):
        return Usage()
    if "input_tokens" in usage:  # Responses API (`…_tokens_details`) and Realtime (`…_token_details`, with audio)
        details_in = usage.get("input_tokens_details") or usage.get("input_token_details")
        details_out = usage.get("output_tokens_details") or usage.get("output_token_details")
        return Usage(
            input_tokens=int_or_none(usage.get("input_tokens")),
            output_tokens=int_or_none(usage.get("output_tokens")),
            cached_input_tokens=int_or_none(dig(details_in, "cached_tokens")),
            reasoning_tokens=int_or_none(dig(details_out, "reasoning_tokens")),
            input_audio_tokens=int_or_none(dig(details_in, "audio_tokens")),
            output_audio_tokens=int_or_none(dig(details_out, "audio_tokens")),
        )
    completion = int_or_none(usage.get("completion_tokens"))
    return Usage(
        input_tokens=int_or_none(usage.get("prompt_tokens")),
        output_tokens=completion if completion is not None else (0 if "prompt_tokens" in usage else None),
        cached_input_tokens=int_or_none(dig(usage, "prompt_tokens_details", "cached_tokens")),
        reasoning_tokens=int_or_none(dig(usage, "completion_tokens_details", "reasoning_tokens")),
        input_audio_tokens=int_or_none(dig(usage, "prompt_tokens_details", "audio_tokens")),
        output_audio_tokens=int_or_none(dig(usage, "completion_tokens_details", "audio_tokens")),
    )


def usage_from_response(payload: dict) -> Usage:
    """Usage of a whole chat completion or Responses object, with its tier, model and web searches."""
    usage = usage_from_openai(payload.get("usage"))
    usage.service_tier = str_or_none(payload.get("service_tier"))
    usage.response_model = str_or_none(payload.get("model"))
    output = payload.get("output")
    if isinstance(output, list):  # Responses API: each web_search_call item is one billed search
        searches = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")
        usage.web_search_calls = searches or None
    return usage


class OpenAIStreamTap(StreamTap):
    def on_payload(self, event_name: str | None, payload: dict) -> bool:
        kind = payload.get("type") or event_name
        if kind == "response.created":
            self.object_id = str_or_none(dig(payload, "response", "id"))
            return True
        if kind in _RESPONSE_DONE:
            response = payload.get("response")
            self.usage.merge(usage_from_response(response if isinstance(response, dict) else {}))
            return True
        if kind == "response.output_text.delta":
            self.text_chars += len(payload.get("delta") or "")
            return True
        choices = payload.get("choices")
        for choice in choices or ():
            content = dig(choice, "delta", "content") or dig(choice, "text")
            if isinstance(content, str):
                self.text_chars += len(content)
        if self.usage.response_model is None:  # every chunk repeats them: read them once
            self.usage.response_model = str_or_none(payload.get("model"))
            self.usage.service_tier = str_or_none(payload.get("service_tier"))
        usage = payload.get("usage")
        if usage:
            self.usage.merge(usage_from_openai(usage))
            if self.hide_usage_event and not choices:
                return False
        return True


class OpenAIAdapter(Adapter):
    style = "openai"
    operations = OPENAI_OPERATIONS
    credential_headers = ("authorization",)
    key_header = "authorization"
    key_prefix = "Bearer "
    max_output_paths = (("max_completion_tokens",), ("max_tokens",), ("max_output_tokens",))
    model_operations = frozenset({
        "chat.completions.create", "completions.create", "responses.create", "responses.input_tokens.count",
        "embeddings.create", "images.generate", "images.edit", "images.create_variation", "audio.speech.create",
        "audio.transcriptions.create", "audio.translations.create", "realtime.sessions.create"})
    error_types = {
        "authentication": "invalid_request_error", "permission": "permission_error",
        "not_found": "invalid_request_error", "invalid_request": "invalid_request_error",
        "too_large": "invalid_request_error", "rate_limit": "rate_limit_error", "budget": "insufficient_quota",
        "upstream": "api_error", "timeout": "api_error", "unavailable": "api_error",
    }
    error_codes = {
        "authentication": "invalid_tollway_credential", "permission": "model_not_allowed", "not_found": "unknown_provider",
        "too_large": "request_too_large", "rate_limit": "rate_limit_exceeded", "budget": "insufficient_quota", "timeout": "upstream_timeout",
        "upstream": "upstream_unreachable", "unavailable": "gateway_unavailable",
    }

    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        return self._call(self.body_model(body), _endpoint(path), body)

    def _call(self, model: str, endpoint: str, body: dict) -> CallInfo:
        stream = body.get("stream") is True
        tier = body.get("service_tier") if body.get("service_tier") in _TIERS else None
        if stream and endpoint in _USAGE_OPT_IN and dig(body, "stream_options", "include_usage") is not True:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            return CallInfo(model, True, endpoint, json_encode(body), hide_usage_event=True, service_tier=tier)
        return CallInfo(model, stream, endpoint, service_tier=tier)

    def usage_from_body(self, payload: Any) -> Usage:
        return usage_from_response(payload) if isinstance(payload, dict) else Usage()

    def output_text_chars(self, payload: Any) -> int:
        if not isinstance(payload, dict):
            return 0
        chars = 0
        for choice in payload.get("choices") or ():  # chat and legacy completions
            content = dig(choice, "message", "content") or dig(choice, "text")
            chars += len(content) if isinstance(content, str) else 0
        for item in payload.get("output") or ():  # Responses API
            for part in (item.get("content") if isinstance(item, dict) else None) or ():
                chars += len(part.get("text") or "") if isinstance(part, dict) else 0
        return chars

    def model_list_body(self, provider: str, model_ids: list[str]) -> Any:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": provider}
                                           for m in model_ids]}

    def stream_tap(self, info: CallInfo) -> StreamTap:
        return OpenAIStreamTap(info.hide_usage_event)

    def error_body(self, err: TollwayError) -> bytes:
        return json_encode({"error": {"message": err.message, "type": self.error_types.get(err.kind, "api_error"),
                                      "param": None, "code": err.code or self.error_codes.get(err.kind)}})


class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: `api-key` header; the deployment in the path names the model."""

    style = "azure"
    credential_headers = ("api-key", "authorization")
    key_header = "api-key"
    key_prefix = ""

    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        parts = [p for p in path.split("/") if p]
        if "deployments" not in parts[:-2]:
            return super().inspect(method, path, body, raw)
        at = parts.index("deployments")
        if body is None:
            raise BadRequest("The request body must be a JSON object.")
        return self._call(parts[at + 1], "/".join(parts[at + 2:]), body)


def _endpoint(path: str) -> str:
    """`/v1/chat/completions` -> `chat/completions`."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[0] in ("v1", "openai"):
        parts = parts[1:]
    if not parts:
        raise BadRequest("No API endpoint in the path: call e.g. /openai/v1/chat/completions.")
    return "/".join(parts)
