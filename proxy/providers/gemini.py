"""Google Gemini API wire format (`generativelanguage.googleapis.com`).

The model is in the path (`/v1beta/models/{model}:{method}`), streaming is the
`streamGenerateContent` method (SSE with `?alt=sse`, else a JSON array). `promptTokenCount`
includes cached tokens; thoughts are counted apart from candidates and billed as output.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import BadRequest, TollwayError
from proxy.providers.base import Adapter, CallInfo, StreamTap, Usage, int_or_none, json_encode, str_or_none
from proxy.providers.operations import GEMINI as GEMINI_OPERATIONS

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
                 cached_input_tokens=int_or_none(meta.get("cachedContentTokenCount")), reasoning_tokens=thoughts,
                 input_audio_tokens=_modality(meta.get("promptTokensDetails"), "AUDIO"),
                 output_audio_tokens=_modality(meta.get("candidatesTokensDetails"), "AUDIO"))


def _modality(details: Any, modality: str) -> int | None:
    """The token count of one modality in a `…TokensDetails` list, None when not listed."""
    counts = [int_or_none(d.get("tokenCount")) for d in details or () if isinstance(d, dict)
              and d.get("modality") == modality]
    return sum(c or 0 for c in counts) if counts else None


def read_chunk(payload: dict) -> Usage:
    """Usage, model and web searches of one response (or stream chunk). Grounding with Google Search is
    billed per grounded prompt on Gemini 1.x/2.x and per search query from Gemini 3 on."""
    usage = usage_from_gemini(payload.get("usageMetadata"))
    usage.response_model = str_or_none(payload.get("modelVersion"))
    queries = [q for c in payload.get("candidates") or () if isinstance(c, dict)
               for q in (c.get("groundingMetadata") or {}).get("webSearchQueries") or ()]
    if queries:
        per_prompt = (usage.response_model or "").startswith(("gemini-1", "gemini-2"))
        usage.web_search_calls = 1 if per_prompt else len(queries)
    return usage


def _text_chars(payload: dict) -> int:
    total = 0
    for candidate in payload.get("candidates") or ():
        for part in (candidate.get("content") or {}).get("parts") or ():
            total += len(part.get("text") or "") if isinstance(part, dict) else 0
    return total


class GeminiStreamTap(StreamTap):
    def on_payload(self, event_name: str | None, payload: dict) -> bool:
        self.text_chars += _text_chars(payload)
        self.usage.merge(read_chunk(payload))  # usageMetadata is cumulative: the latest one is the total so far
        return True


class GeminiAdapter(Adapter):
    style = "gemini"
    operations = GEMINI_OPERATIONS
    list_items_key, list_id_key, list_id_prefix = "models", "name", "models/"
    credential_headers = ("x-goog-api-key", "authorization")
    credential_query_params = ("key",)
    key_header = "x-goog-api-key"
    max_output_paths = (("generationConfig", "maxOutputTokens"), ("generation_config", "max_output_tokens"))
    model_operations = frozenset({"generate_content", "generate_content_stream", "count_tokens", "embed_content",
                                  "batch_embed_contents", "batches.create"})

    def streams_body(self, headers: dict[str, str]) -> bool:
        """The file bytes of a resumable upload (`X-Goog-Upload-Command: upload[, finalize]`), whatever
        Content-Type the SDK sends with them (google-genai repeats `application/json`)."""
        return "upload" in headers.get("x-goog-upload-command", "").lower() or super().streams_body(headers)

    def inspect(self, method: str, path: str, body: dict | None, raw: bytes) -> CallInfo:
        match = _MODEL_CALL.search(path)
        if not match:
            raise BadRequest("Call a model method, e.g. /gemini/v1beta/models/gemini-2.5-flash:generateContent.")
        if body is None:
            raise BadRequest("The request body must be a JSON object.")
        model, verb = match.groups()
        # a batch's submit costs nothing: its results are metered when read (`proxy.batch_results`)
        return CallInfo(model, verb == "streamGenerateContent", verb,
                        metered=verb not in ("countTokens", "batchGenerateContent"))

    def usage_from_body(self, payload: Any) -> Usage:
        if isinstance(payload, list):  # streamGenerateContent without alt=sse: an array of chunks
            usage = Usage()
            for chunk in payload:
                if isinstance(chunk, dict):
                    usage.merge(read_chunk(chunk))
            return usage
        return read_chunk(payload) if isinstance(payload, dict) else Usage()

    def stream_tap(self, info: CallInfo) -> StreamTap:
        return GeminiStreamTap()

    def output_text_chars(self, payload: Any) -> int:
        chunks = payload if isinstance(payload, list) else [payload]
        return sum(_text_chars(c) for c in chunks if isinstance(c, dict))

    def model_list_body(self, provider: str, model_ids: list[str]) -> Any:
        return {"models": [{"name": f"models/{m}", "displayName": m} for m in model_ids]}

    def error_body(self, err: TollwayError) -> bytes:
        error = {"code": err.status, "message": err.message, "status": _STATUS.get(err.kind, "INTERNAL")}
        if err.code:  # Google's way to name a specific reason
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": err.code.upper(),
                                 "domain": "tollway"}]
        return json_encode({"error": error})
