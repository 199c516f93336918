"""Which operations create, name, list or reference a provider object, per wire format: data only.

Objects (files, batches, stored responses, uploads, vector stores, fine-tuning jobs, Anthropic
message batches, Gemini files, cached contents and batches) belong to the tenant that created them
through Tollway; `proxy.objects` enforces it with these tables. An object's id is its last path
segment (`file-abc`; Gemini's `files/abc` is `abc`), the same whether it comes from a response
body or a request path.

    >>> OPENAI.collection("files.retrieve"), OPENAI.collection("files.create")
    ('file', None)
    >>> GEMINI.created_id("files.upload", {"file": {"name": "files/abc"}})
    'abc'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def object_id(value: Any) -> str | None:
    """`files/abc` -> `abc`; None for anything that is not a non-empty string."""
    if not isinstance(value, str) or not value.strip("/"):
        return None
    return value.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class ObjectRules:
    #: operation-name prefix -> the object kind its path id names (`files.` -> `files`)
    collections: tuple[tuple[str, str], ...]
    #: create operations whose response holds the new object's id, and the paths to look for it
    creates: tuple[str, ...]
    id_paths: tuple[tuple[str, ...], ...]
    #: list operation -> the key of its items in the response
    lists: dict[str, str]
    #: request-body fields that name an object by id (a string or a list of strings)
    references: tuple[str, ...] = ()
    #: operations that create an object only when the body does not say `"store": false`
    stored_unless_opted_out: tuple[str, ...] = ()
    #: operations that create an object only when the body says `"store": true`
    stored_when_asked: tuple[str, ...] = ()
    #: where a batch object names the files its results are in (each becomes the batch's, too)
    result_files: tuple[str, ...] = ()
    #: the operation that streams a batch's results directly (Anthropic); files named by
    #: `result_files` are read with `files.content`
    results: str | None = None
    #: where a retrieved batch holds its results inline (Gemini), each `{"response"|"error", "metadata"}`
    inline_results: tuple[tuple[str, ...], ...] = ()
    #: body fields and response headers holding a URL on the provider's host (the client must reach it
    #: through the gateway)
    url_fields: tuple[str, ...] = ()
    url_headers: tuple[str, ...] = ()
    #: the query parameter of such a URL that names an upload session (its bytes come without a credential)
    session_param: str | None = None

    def kind_of(self, operation: str) -> str:
        """The kind of object an operation is about (`files.create` -> `file`)."""
        for prefix, kind in self.collections:
            if operation.startswith(prefix):
                return kind
        return operation.partition(".")[0]

    def collection(self, operation: str) -> str | None:
        """The kind of object an operation's path id names, if it names one (a create names none:
        Gemini's `models/{model}:batchGenerateContent` has a model there)."""
        if operation in self.creates or not any(operation.startswith(p) for p, _ in self.collections):
            return None
        return self.kind_of(operation)

    def list_items(self, operation: str) -> str | None:
        return self.lists.get(operation)

    def creates_object(self, operation: str, body: dict | None) -> bool:
        if operation in self.creates:
            return True
        store = body.get("store") if isinstance(body, dict) else None
        return (operation in self.stored_unless_opted_out and store is not False) or (
            operation in self.stored_when_asked and store is True)

    def created_id(self, operation: str, payload: Any) -> str | None:
        for path in self.id_paths:
            value = payload
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            found = object_id(value)
            if found is not None:
                return found
        return None

    def results_inline(self, payload: Any) -> list | None:
        """A retrieved batch's results, where the wire format puts them in the batch itself."""
        for path in self.inline_results:
            value = payload
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, list):
                return value
        return None

    def referenced_ids(self, body: dict | None) -> list[str]:
        """Ids a request body names in its reference fields."""
        found: list[str] = []
        for name in self.references if isinstance(body, dict) else ():
            value = body.get(name)
            for item in value if isinstance(value, list) else [value]:
                ident = object_id(item)
                if ident is not None:
                    found.append(ident)
        return found


OPENAI = ObjectRules(
    collections=(("files.", "file"), ("batches.", "batch"), ("responses.", "response"), ("uploads.", "upload"),
                 ("vector_stores.", "vector_store"), ("fine_tuning.jobs.", "fine_tuning_job"),
                 ("chat.completions.", "chat_completion")),
    creates=("files.create", "batches.create", "uploads.create", "vector_stores.create", "fine_tuning.jobs.create"),
    id_paths=(("id",),),
    lists={"files.list": "data", "batches.list": "data", "vector_stores.list": "data",
           "fine_tuning.jobs.list": "data", "chat.completions.list": "data"},
    references=("input_file_id", "previous_response_id", "training_file", "validation_file", "file_id", "file_ids"),
    stored_unless_opted_out=("responses.create",),
    stored_when_asked=("chat.completions.create",),
    result_files=("output_file_id", "error_file_id"),
)

ANTHROPIC = ObjectRules(
    collections=(("messages.batches.", "message_batch"), ("files.", "file")),
    creates=("messages.batches.create", "files.create"),
    id_paths=(("id",),),
    lists={"messages.batches.list": "data", "files.list": "data"},
    results="messages.batches.results",
    url_fields=("results_url",),
)

GEMINI = ObjectRules(
    collections=(("files.", "file"), ("cached_contents.", "cached_content"), ("batches.", "batch")),
    creates=("files.upload", "cached_contents.create", "batches.create"),
    id_paths=(("file", "name"), ("name",)),
    lists={"files.list": "files", "cached_contents.list": "cachedContents", "batches.list": "operations"},
    references=("cachedContent", "cached_content"),
    inline_results=(("metadata", "output", "inlinedResponses", "inlinedResponses"),
                    ("response", "inlinedResponses", "inlinedResponses")),
    url_headers=("x-goog-upload-url",),  # where a resumable upload sends its bytes
    session_param="upload_id",
)

RULES = {"openai": OPENAI, "azure": OPENAI, "anthropic": ANTHROPIC, "gemini": GEMINI}
