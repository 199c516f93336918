"""Google Gemini API wire format (`generativelanguage.googleapis.com`).

The model is in the path (`/v1beta/models/{model}:{method}`), streaming is the
`streamGenerateContent` method (SSE with `?alt=sse`, else a JSON array). `promptTokenCount`
includes cached tokens; thoughts are counted apart from candidates and billed as output.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import BadRequest, TollwayError
from proxy.providers.base import Adapter, CallInfo, StreamTap, Usage, int_or_none, json_encode

_MODEL_CALL = re.compile(r"/(?:v1beta|v1|v1alpha)/(?:models|tunedModels)/([^/:]+):([A-Za-z]+)$")
_STATUS = {
    "authentication": "UNAUTHENTICATED", "permission": "PERMISSION_DENIED", "not_found": "NOT_FOUND",
    "invalid_request": "INVALID_ARGUMENT", "too_large": "INVALID_ARGUMENT", "rate_limit": "RESOURCE_EXHAUSTED",
    "budget": "RESOURCE_EXHAUSTED",
    "upstream": "UNAVAILABLE", "timeout": "DEADLINE_EXCEEDED", "unavailable": "UNAVAILABLE",
}


def usage_from_gemini(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    prompt = int_or_none(meta.get("promptTokenCount"))
    tool_prompt = int_or_none(meta.get("toolUsePromptTokenCount")) or 0
    candidates = int_or_none(meta.get("candidatesTokenCount"))
    thoughts = int_or_none(meta.get("thoughtsTokenCount"))
    output = None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    return Usage(input_tokens=None if prompt is None else prompt + tool_prompt, output_tokens=output,
                 cached_input_tokens=int_or_none(meta.get("cachedContentTokenCount")), reasoning_tokens=thoughts)


def _text_chars(payload: dict) -> int:
    total = 0
    for candidate in payload.get("candidates") or ():
        for part in (candidate.get("content") or {}).get("parts") or ():
            total += len(part.get("text") or "") if isinstance(part, dict) else 0
    return total


class GeminiStreamTap(StreamTap):
    def on_payload(self, event_name: str | None, payload: dict) -> bool:
        self.text_chars += _text_chars(payload)
        if "usageMetadata" in payload:  # cumulative: the latest one is the total so far
            self.usage.merge(usage_from_gemini(payload["usageMetadata"]))
        return True


class GeminiAdapter(Adapter):
    style = "gemini"
    list_items_key, list_id_key, list_id_prefix = "models", "name", "models/"
    credential_headers = ("x-goog-api-key", "authorization")
    credential_query_params = ("key",)
    key_header = "x-goog-api-key"
    max_output_paths = (("generationConfig", "maxOutputTokens"), ("generation_config", "max_output_tokens"))

    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        match = _MODEL_CALL.search(path)
        if not match:
            raise BadRequest("Call a model method, e.g. /gemini/v1beta/models/gemini-2.5-flash:generateContent.")
        if body is None:
            raise BadRequest("The request body must be a JSON object.")
        model, verb = match.groups()
        return CallInfo(model, verb == "streamGenerateContent", verb, metered=verb != "countTokens")

    def usage_from_body(self, payload: Any) -> Usage:
        if isinstance(payload, list):  # streamGenerateContent without alt=sse: an array of chunks
            usage = Usage()
            for chunk in payload:
                if isinstance(chunk, dict) and "usageMetadata" in chunk:
                    usage.merge(usage_from_gemini(chunk["usageMetadata"]))
            return usage
        return usage_from_gemini(payload.get("usageMetadata") if isinstance(payload, dict) else None)

    def stream_tap(self, info: CallInfo) -> StreamTap:
        return GeminiStreamTap()

    def output_text_chars(self, payload: Any) -> int:
        chunks = payload if isinstance(payload, list) else [payload]
        return sum(_text_chars(c) for c in chunks if isinstance(c, dict))

    def model_list_body(self, provider: str, model_ids: list[str]) -> Any:
        return {"models": [{"name": f"models/{m}", "displayName": m} for m in model_ids]}

    def error_body(self, err: TollwayError) -> bytes:
        status = _STATUS.get(err.kind, "INTERNAL")
        return json_encode({"error": {"code": err.status, "message": err.message, "status": status}})
