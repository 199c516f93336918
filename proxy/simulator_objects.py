"""Object endpoints of the simulated providers: files, batches and stored responses.

* OpenAI: ``POST /v1/files`` (multipart, read as it arrives: only its size and first 8 MiB are kept),
  ``GET /v1/files`` (all files, newest first, ``limit``/``after``), ``GET|DELETE /v1/files/{id}``,
  ``GET /v1/files/{id}/content``; ``POST /v1/batches`` runs the input file's chat requests at once
  (status ``completed``, an ``output_file_id`` of JSONL results with usage), ``GET /v1/batches[/{id}]``,
  ``POST /v1/batches/{id}/cancel``; ``GET|DELETE /v1/responses/{id}``.
* Anthropic: ``POST /v1/messages/batches`` (``requests`` answered at once, ``processing_status: ended``,
  ``results_url`` on this server), ``GET /v1/messages/batches[/{id}]``, ``GET …/{id}/results`` (JSONL).
* Gemini: ``POST|GET /v1beta/cachedContents``, ``GET|DELETE /v1beta/cachedContents/{id}``; resumable
  uploads (``POST /upload/v1beta/files``) and ``GET|DELETE /v1beta/files[/{id}]``;
  ``POST /v1beta/models/{m}:batchGenerateContent`` with inline requests, answered at once (the batch's
  ``GET /v1beta/batches/{id}`` holds ``inlinedResponses`` with usage), ``GET /v1beta/batches``.

Every object is visible to every key, as on a real provider account that several tenants share. The
key is checked like the other endpoints; each request is recorded (with no body for multipart ones).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from proxy.simulator import PROVIDERS, STATE_KEY, SimRequest, _dumps, _error, count_tokens, reply_text

_OPENAI, _ANTHROPIC, _GEMINI = PROVIDERS
_KEEP = 8 * 1024 * 1024
OBJECTS_KEY = web.AppKey("tollway_simulator_objects", dict)
JSONL = "application/jsonl"


def add_object_routes(app: web.Application) -> None:
    app[OBJECTS_KEY] = {}
    routes = [
        (_OPENAI, "POST", "/v1/files", _file_create), (_OPENAI, "GET", "/v1/files", _file_list),
        (_OPENAI, "GET", "/v1/files/{id}", _getter("file-")), (_OPENAI, "DELETE", "/v1/files/{id}", _file_delete),
        (_OPENAI, "GET", "/v1/files/{id}/content", _file_content),
        (_OPENAI, "POST", "/v1/batches", _batch_create), (_OPENAI, "GET", "/v1/batches", _batch_list),
        (_OPENAI, "GET", "/v1/batches/{id}", _getter("batch_sim")), (_OPENAI, "POST", "/v1/batches/{id}/cancel", _getter("batch_sim")),
        (_OPENAI, "GET", "/v1/responses/{id}", _response_get), (_OPENAI, "DELETE", "/v1/responses/{id}", _deleted),
        (_ANTHROPIC, "POST", "/v1/messages/batches", _msgbatch_create),
        (_ANTHROPIC, "GET", "/v1/messages/batches", _msgbatch_list),
        (_ANTHROPIC, "GET", "/v1/messages/batches/{id}", _getter("msgbatch_")),
        (_ANTHROPIC, "GET", "/v1/messages/batches/{id}/results", _msgbatch_results),
        (_GEMINI, "POST", "/upload/v1beta/files", _gemini_upload),
        (_GEMINI, "GET", "/v1beta/files", _gemini_files), (_GEMINI, "GET", "/v1beta/files/{id}", _getter("gfile")),
        (_GEMINI, "DELETE", "/v1beta/files/{id}", _deleted),
        (_GEMINI, "POST", "/v1beta/models/{model}:batchGenerateContent", _gemini_batch_create),
        (_GEMINI, "GET", "/v1beta/batches/{id}", _getter("gbatch")),
        (_GEMINI, "GET", "/v1beta/batches", _gemini_batch_list),
        (_GEMINI, "POST", "/v1beta/cachedContents", _cache_create),
        (_GEMINI, "GET", "/v1beta/cachedContents", _cache_list),
        (_GEMINI, "GET", "/v1beta/cachedContents/{id}", _getter("cache")),
        (_GEMINI, "DELETE", "/v1beta/cachedContents/{id}", _deleted),
    ]
    for provider, method, path, handler in routes:
        app.router.add_route(method, provider.prefix + path, _guarded(provider, handler))


def _guarded(provider, handler):
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        multipart = request.content_type.startswith("multipart/") or "upload" in request.headers.get(
            "x-goog-upload-command", "")
        body = None if multipart or not request.body_exists else json.loads(await request.read() or b"null")
        if state.record:
            state.add(SimRequest(provider.name, request.method, request.path[len(provider.prefix):],
                                 request.query_string, {k.lower(): v for k, v in request.headers.items()},
                                 body if isinstance(body, dict) else None))
        expected = state.keys.get(provider.name)
        if expected is not None and provider.credential(request) != expected:
            return _error(provider, 401, "Invalid API key provided.")
        store = request.app[OBJECTS_KEY]
        found = await handler(request, store, body if isinstance(body, dict) else {})
        if found is None:
            return _error(provider, 404, f"No such object: {request.match_info.get('id')}")
        if isinstance(found, web.StreamResponse):
            return found
        return web.Response(body=_dumps(found), content_type="application/json")
    return handle


def _new_id(store: dict, prefix: str) -> str:
    """Unique for the simulator's life (ids are never reused, even after a delete)."""
    store["_next"] = store.get("_next", 0) + 1
    return f"{prefix}{store['_next']:06d}"


# --- OpenAI files ----------------------------------------------------------------------------------
async def _file_create(request: web.Request, store: dict, _: dict) -> dict:
    reader = await request.multipart()
    purpose, size, kept, name = "user_data", 0, bytearray(), "upload"
    while (part := await reader.next()) is not None:
        if part.name == "purpose":
            purpose = (await part.text()).strip()
            continue
        name = part.filename or name
        while chunk := await part.read_chunk(256 * 1024):
            size += len(chunk)
            if len(kept) < _KEEP:
                kept += chunk[:_KEEP - len(kept)]
    return _add_file(store, name, purpose, bytes(kept), size)


def _add_file(store: dict, name: str, purpose: str, content: bytes, size: int) -> dict:
    file_id = _new_id(store, "file-sim")
    meta = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": name,
            "purpose": purpose, "status": "processed"}
    store[file_id] = {"meta": meta, "content": content}
    return meta


def _page(items: list[dict], request: web.Request) -> dict:
    """A cursor page as OpenAI and Anthropic list them: newest first, `after` an id, `limit`."""
    items = sorted(items, key=lambda i: i["id"], reverse=True)
    after = request.query.get("after") or request.query.get("after_id")
    if after:
        items = [i for i in items if i["id"] < after]
    limit = int(request.query.get("limit", 20))
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _getter(prefix: str):
    """A handler answering the stored object `{id}` of this kind (ids start with `prefix`), else 404."""
    async def get(request, store, _):
        found = store.get(request.match_info["id"])
        return found["meta"] if found and request.match_info["id"].startswith(prefix) else None
    return get


def _of(store: dict, prefix: str) -> list[dict]:
    return [v["meta"] for k, v in store.items() if k.startswith(prefix) and k != "_next"]


async def _file_list(request, store, _):
    return _page(_of(store, "file-"), request)



async def _file_delete(request, store, _):
    found = store.pop(request.match_info["id"], None)
    return {"id": request.match_info["id"], "object": "file", "deleted": True} if found else None


async def _file_content(request, store, _):
    found = store.get(request.match_info["id"])
    if found is None:
        return None
    return web.Response(body=found["content"], content_type="application/octet-stream")


async def _deleted(request, store, _):
    return {"id": request.match_info["id"], "object": "deleted", "deleted": True}


async def _response_get(request, store, _):
    ident = request.match_info["id"]
    return {"id": ident, "object": "response", "status": "completed", "output": [], "model": "gpt-4o-mini"}


# --- OpenAI batches --------------------------------------------------------------------------------
def _answer(model: str, messages: Any, max_tokens: Any) -> tuple[str, int, int]:
    """(reply text, input tokens, output tokens) as the chat endpoints would answer."""
    output = max(1, min(int(max_tokens), 20)) if isinstance(max_tokens, int) else 20
    return reply_text(model, output), count_tokens(messages), output


def _openai_result(line: dict, index: int) -> dict:
    body = line.get("body") or {}
    model = body.get("model", "gpt-4o-mini")
    text, prompt, output = _answer(model, body.get("messages"), body.get("max_tokens"))
    completion = {"id": f"chatcmpl-batch{index}", "object": "chat.completion", "model": model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                            "total_tokens": prompt + output}}
    return {"id": f"batch_req_{index}", "custom_id": line.get("custom_id"),
            "response": {"status_code": 200, "request_id": f"req_{index}", "body": completion}, "error": None}


async def _batch_create(request, store, body):
    source = store.get(body.get("input_file_id") or "")
    if source is None:
        return None
    lines = [json.loads(raw) for raw in source["content"].splitlines() if raw.strip()]
    results = "".join(json.dumps(_openai_result(line, i)) + "\n" for i, line in enumerate(lines, 1)).encode()
    output = _add_file(store, "batch_output.jsonl", "batch_output", results, len(results))
    batch_id = _new_id(store, "batch_sim")
    meta = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "status": "completed",
            "input_file_id": body.get("input_file_id"), "output_file_id": output["id"], "error_file_id": None,
            "completion_window": body.get("completion_window", "24h"), "created_at": int(time.time()),
            "request_counts": {"total": len(lines), "completed": len(lines), "failed": 0}}
    store[batch_id] = {"meta": meta}
    return meta


async def _batch_list(request, store, _):
    return _page(_of(store, "batch_sim"), request)



# --- Anthropic message batches ---------------------------------------------------------------------
async def _msgbatch_create(request, store, body):
    batch_id = _new_id(store, "msgbatch_sim")
    lines = []
    for i, item in enumerate(body.get("requests") or (), 1):
        params = item.get("params") or {}
        model = params.get("model", "claude-haiku-4-5")
        text, prompt, output = _answer(model, params.get("messages"), params.get("max_tokens"))
        message = {"id": f"msg_batch{i}", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "output_tokens": output, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0}}
        lines.append({"custom_id": item.get("custom_id"), "result": {"type": "succeeded", "message": message}})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta = {"id": batch_id, "type": "message_batch", "processing_status": "ended",
            "request_counts": {"processing": 0, "succeeded": len(lines), "errored": 0, "canceled": 0,
                               "expired": 0},
            "created_at": now, "ended_at": now, "expires_at": now, "archived_at": None, "cancel_initiated_at": None,
            "results_url": f"{request.url.origin()}{_ANTHROPIC.prefix}/v1/messages/batches/{batch_id}/results"}
    store[batch_id] = {"meta": meta, "content": "".join(json.dumps(x) + "\n" for x in lines).encode()}
    return meta


async def _msgbatch_list(request, store, _):
    page = _page(_of(store, "msgbatch_"), request)
    return {k: v for k, v in page.items() if k != "object"}



async def _msgbatch_results(request, store, _):
    found = store.get(request.match_info["id"])
    if found is None or not request.match_info["id"].startswith("msgbatch_"):
        return None
    return web.Response(body=found["content"], content_type="application/binary")


# --- Gemini cached contents ------------------------------------------------------------------------
async def _cache_create(request, store, body):
    name = "cachedContents/" + _new_id(store, "cache")
    meta = {"name": name, "model": body.get("model"), "usageMetadata": {"totalTokenCount": count_tokens(body)}}
    store[name.rsplit("/", 1)[1]] = {"meta": meta}
    return meta


async def _cache_list(request, store, _):
    return {"cachedContents": _of(store, "cache")}



# --- Gemini files: the resumable upload protocol -----------------------------------------------------
async def _gemini_upload(request, store, body):
    """`start` opens a session and answers its URL (on this server, like Google's on its own); `upload`
    appends the body; `finalize` makes the file."""
    command = request.headers.get("x-goog-upload-command", "")
    if command == "start":
        session = _new_id(store, "upload")
        store[session] = {"size": 0, "meta": (body or {}).get("file") or {}}
        url = f"{request.url.origin()}{_GEMINI.prefix}/upload/v1beta/files?upload_id={session}&upload_protocol=resumable"
        return web.Response(headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"})
    session = store.get(request.query.get("upload_id", ""))
    if session is None:
        return None
    async for chunk in request.content.iter_any():
        session["size"] += len(chunk)
    if "finalize" not in command:
        return web.Response(headers={"x-goog-upload-status": "active"})
    name = "files/" + _new_id(store, "gfile")
    meta = {"name": name, "displayName": session["meta"].get("displayName"), "sizeBytes": str(session["size"]),
            "mimeType": session["meta"].get("mimeType", "application/octet-stream"), "state": "ACTIVE",
            "uri": f"{request.url.origin()}{_GEMINI.prefix}/v1beta/{name}"}
    store[name.rsplit("/", 1)[1]] = {"meta": meta}
    return web.Response(body=_dumps({"file": meta}), content_type="application/json",
                        headers={"x-goog-upload-status": "final"})


async def _gemini_files(request, store, _):
    return {"files": _of(store, "gfile")}



# --- Gemini batches (inline requests) --------------------------------------------------------------
async def _gemini_batch_create(request, store, body):
    model = request.match_info["model"]
    batch = body.get("batch") or {}
    items = (((batch.get("input_config") or batch.get("inputConfig") or {}).get("requests") or {})
             .get("requests") or [])
    responses = []
    for i, item in enumerate(items, 1):
        contents = (item.get("request") or {}).get("contents")
        text, prompt, output = _answer(model, contents, None)
        responses.append({"metadata": item.get("metadata") or {"key": str(i)}, "response": {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": output,
                              "totalTokenCount": prompt + output},
            "modelVersion": model}})
    name = "batches/" + _new_id(store, "gbatch")
    metadata = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                "model": f"models/{model}", "displayName": batch.get("display_name") or batch.get("displayName"),
                "state": "BATCH_STATE_SUCCEEDED", "name": name,
                "output": {"inlinedResponses": {"inlinedResponses": responses}}}
    store[name.rsplit("/", 1)[1]] = {"meta": {"name": name, "metadata": metadata, "done": True}}
    return {"name": name, "metadata": {**metadata, "state": "BATCH_STATE_PENDING", "output": None}}



async def _gemini_batch_list(request, store, _):
    return {"operations": _of(store, "gbatch")}
