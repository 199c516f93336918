"""Every request's operation, `provider/operation`, from its method and path: data, one table per wire format.

Names follow the official SDKs' method names (`chat.completions.create`, `files.content`,
`messages.batches.results`, `generate_content`). Organization and admin paths are `admin`;
anything else is `other` (policy refuses both unless a rule names them).

    >>> OPENAI.name("POST", "/v1/chat/completions")
    'chat.completions.create'
    >>> OPENAI.name("GET", "/v1/files/file-abc/content")
    'files.content'
    >>> GEMINI.name("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent")
    'generate_content_stream'
    >>> ANTHROPIC.name("GET", "/v1/organizations/users")
    'admin'
"""

from __future__ import annotations

import re
from urllib.parse import unquote

OTHER, ADMIN = "other", "admin"
_CACHE_LIMIT = 10_000


class OperationTable:
    """`(method, path template, operation)` rules, first match wins. In a template `{}` is one path
    segment and a trailing `/**` any rest; `versions` are the leading segments a path may carry."""

    def __init__(self, versions: tuple[str, ...], rules: tuple[tuple[str, str, str], ...],
                 admin_prefixes: tuple[str, ...]) -> None:
        self._versions = re.compile(rf"^/(?:{'|'.join(versions)})(?=/|$)") if versions else None
        self._admin = admin_prefixes
        self._static: dict[tuple[str, str], str] = {}
        self._patterns: list[tuple[str, re.Pattern[str], str]] = []
        for method, template, name in rules:
            if "{}" in template or template.endswith("/**"):
                body = re.escape(template.removesuffix("/**")).replace(r"\{\}", "([^/]+)")
                rest = "(?:/.*)?" if template.endswith("/**") else ""
                self._patterns.append((method, re.compile(f"{body}{rest}"), name))
            else:
                self._static[method, template] = name
        self._cache: dict[tuple[str, str], tuple[str, str | None]] = {}

    def name(self, method: str, path: str) -> str:
        """The operation of `method path` (the path as sent upstream, without the query)."""
        return self.resolve(method, path)[0]

    def resolve(self, method: str, path: str) -> tuple[str, str | None]:
        """The operation and the path's first `{}` segment (an object or model id), if any.

        >>> OPENAI.resolve("GET", "/v1/files/file-abc/content")
        ('files.content', 'file-abc')
        """
        key = (method, path)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_LIMIT:  # ids make paths unbounded: keep the cache small
                self._cache.clear()
            found = self._cache[key] = self._resolve(method, self.normalize(path))
        return found

    def normalize(self, path: str) -> str:
        """The path without its version prefix, e.g. `/v1/files` -> `/files`."""
        return self._versions.sub("", path, count=1) if self._versions else path

    def _resolve(self, method: str, path: str) -> tuple[str, str | None]:
        path = path.rstrip("/") or "/"
        if any(path == p or path.startswith(p + "/") for p in self._admin):
            return ADMIN, None
        found = self._static.get((method, path))
        if found is not None:
            return found, None
        for rule_method, pattern, name in self._patterns:
            if rule_method == method and (match := pattern.fullmatch(path)):
                return name, unquote(match.group(1)) if match.groups() else None
        return OTHER, None


def _crud(base: str, name: str, *, update: str | None = "POST") -> tuple[tuple[str, str, str], ...]:
    """create, list, retrieve, (update,) delete on `/base` and `/base/{id}`."""
    rules = [("POST", f"/{base}", f"{name}.create"), ("GET", f"/{base}", f"{name}.list"),
             ("GET", f"/{base}/{{}}", f"{name}.retrieve"), ("DELETE", f"/{base}/{{}}", f"{name}.delete")]
    if update:
        rules.append((update, f"/{base}/{{}}", f"{name}.update"))
    return tuple(rules)


OPENAI = OperationTable(
    # OpenAI itself: /v1/...; Azure: /openai/deployments/{name}/... or /openai/v1/...
    ("v1", "openai/deployments/[^/]+", "openai/v1", "openai"),
    (
        *_crud("chat/completions", "chat.completions"),
        ("GET", "/chat/completions/{}/messages", "chat.completions.messages.list"),
        ("POST", "/completions", "completions.create"),
        ("POST", "/responses", "responses.create"),
        ("POST", "/responses/input_tokens", "responses.input_tokens.count"),
        ("GET", "/responses/{}", "responses.retrieve"),
        ("DELETE", "/responses/{}", "responses.delete"),
        ("POST", "/responses/{}/cancel", "responses.cancel"),
        ("GET", "/responses/{}/input_items", "responses.input_items.list"),
        ("GET", "/realtime", "realtime"),
        ("POST", "/realtime/sessions", "realtime.sessions.create"),
        ("POST", "/realtime/transcription_sessions", "realtime.transcription_sessions.create"),
        ("POST", "/realtime/client_secrets", "realtime.client_secrets.create"),
        ("POST", "/embeddings", "embeddings.create"),
        ("POST", "/moderations", "moderations.create"),
        ("POST", "/images/generations", "images.generate"),
        ("POST", "/images/edits", "images.edit"),
        ("POST", "/images/variations", "images.create_variation"),
        ("POST", "/audio/speech", "audio.speech.create"),
        ("POST", "/audio/transcriptions", "audio.transcriptions.create"),
        ("POST", "/audio/translations", "audio.translations.create"),
        ("GET", "/models", "models.list"),
        ("GET", "/models/{}", "models.retrieve"),
        ("DELETE", "/models/{}", "models.delete"),
        *_crud("files", "files", update=None),
        ("GET", "/files/{}/content", "files.content"),
        ("POST", "/uploads", "uploads.create"),
        ("POST", "/uploads/{}/parts", "uploads.parts.create"),
        ("POST", "/uploads/{}/complete", "uploads.complete"),
        ("POST", "/uploads/{}/cancel", "uploads.cancel"),
        ("POST", "/batches", "batches.create"),
        ("GET", "/batches", "batches.list"),
        ("GET", "/batches/{}", "batches.retrieve"),
        ("POST", "/batches/{}/cancel", "batches.cancel"),
        ("POST", "/fine_tuning/jobs", "fine_tuning.jobs.create"),
        ("GET", "/fine_tuning/jobs", "fine_tuning.jobs.list"),
        ("GET", "/fine_tuning/jobs/{}", "fine_tuning.jobs.retrieve"),
        ("POST", "/fine_tuning/jobs/{}/cancel", "fine_tuning.jobs.cancel"),
        ("GET", "/fine_tuning/jobs/{}/events", "fine_tuning.jobs.list_events"),
        ("GET", "/fine_tuning/**", "fine_tuning.other"),
        ("POST", "/fine_tuning/**", "fine_tuning.other"),
        ("DELETE", "/fine_tuning/**", "fine_tuning.other"),
        *_crud("vector_stores", "vector_stores"),
        ("POST", "/vector_stores/{}/search", "vector_stores.search"),
        ("GET", "/vector_stores/{}/**", "vector_stores.files"),
        ("POST", "/vector_stores/{}/**", "vector_stores.files"),
        ("DELETE", "/vector_stores/{}/**", "vector_stores.files"),
    ),
    admin_prefixes=("/organization", "/organizations"),
)

ANTHROPIC = OperationTable(
    ("v1",),
    (
        ("POST", "/messages", "messages.create"),
        ("POST", "/messages/count_tokens", "messages.count_tokens"),
        ("POST", "/messages/batches", "messages.batches.create"),
        ("GET", "/messages/batches", "messages.batches.list"),
        ("GET", "/messages/batches/{}", "messages.batches.retrieve"),
        ("DELETE", "/messages/batches/{}", "messages.batches.delete"),
        ("POST", "/messages/batches/{}/cancel", "messages.batches.cancel"),
        ("GET", "/messages/batches/{}/results", "messages.batches.results"),
        ("POST", "/complete", "completions.create"),
        ("GET", "/models", "models.list"),
        ("GET", "/models/{}", "models.retrieve"),
        *_crud("files", "files", update=None),
        ("GET", "/files/{}/content", "files.content"),
    ),
    admin_prefixes=("/organizations",),
)

GEMINI = OperationTable(
    ("v1beta", "v1alpha", "v1", "upload/v1beta", "upload/v1"),
    (
        ("POST", "/models/{}:generateContent", "generate_content"),
        ("POST", "/models/{}:streamGenerateContent", "generate_content_stream"),
        ("POST", "/models/{}:countTokens", "count_tokens"),
        ("POST", "/models/{}:embedContent", "embed_content"),
        ("POST", "/models/{}:batchEmbedContents", "batch_embed_contents"),
        ("POST", "/models/{}:batchGenerateContent", "batches.create"),
        ("GET", "/models", "models.list"),
        ("GET", "/models/{}", "models.get"),
        ("POST", "/files", "files.upload"),
        ("GET", "/files", "files.list"),
        ("GET", "/files/{}", "files.get"),
        ("DELETE", "/files/{}", "files.delete"),
        ("POST", "/cachedContents", "cached_contents.create"),
        ("GET", "/cachedContents", "cached_contents.list"),
        ("GET", "/cachedContents/{}", "cached_contents.get"),
        ("PATCH", "/cachedContents/{}", "cached_contents.update"),
        ("DELETE", "/cachedContents/{}", "cached_contents.delete"),
        ("GET", "/batches", "batches.list"),
        ("GET", "/batches/{}", "batches.get"),
        ("POST", "/batches/{}:cancel", "batches.cancel"),
        ("DELETE", "/batches/{}", "batches.delete"),
    ),
    admin_prefixes=(),
)
