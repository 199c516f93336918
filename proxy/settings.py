"""Deployment settings: `tollway.toml` in the deployment directory, one frozen dataclass per concern.

Every key is optional; the defaults below are the documented ones. Unknown sections or keys are
refused with a message naming them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from proxy.auth_settings import AuthSettings, AuthSettingsError, load_auth

DATA_DIR_ENV = "TOLLWAY_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

#: The providers every deployment knows, with their public endpoints and wire style.
BUILTIN_PROVIDERS: dict[str, dict[str, str]] = {
    "openai": {"base_url": "https://api.openai.com", "style": "openai"},
    "anthropic": {"base_url": "https://api.anthropic.com", "style": "anthropic"},
    "gemini": {"base_url": "https://generativelanguage.googleapis.com", "style": "gemini"},
}
STYLES = ("openai", "anthropic", "gemini", "azure")


class SettingsError(ValueError):
    """`tollway.toml` cannot be used; the message names the key and what to do."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    """Interface the gateway listens on."""
    port: int = 8080
    """TCP port of the gateway."""
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body accepted; larger ones get 413 before they are read."""
    body_timeout_s: float = 30.0
    """Time allowed to receive a whole request body."""
    max_response_bytes: int = 64 * 1024 * 1024
    """Largest JSON answer buffered from a provider (to read its usage); larger ones get 502. Streams and
    other bodies (files, audio) pass through unbuffered and are not capped."""
    max_sse_event_bytes: int = 16 * 1024 * 1024
    """Largest server-sent event read for usage; a longer one is passed on to the client unread."""
    max_upload_bytes: int = 1024 * 1024 * 1024
    """Largest non-JSON request body (multipart uploads, audio, file bytes), streamed to the provider
    without being held; larger ones get 413."""


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    """Route prefix: `/{name}/...`."""
    base_url: str
    """Upstream base URL; `/{name}/{rest}` goes to `{base_url}/{rest}`."""
    style: str = "openai"
    """Wire format: openai | anthropic | gemini | azure."""
    connect_timeout_s: float = 10.0
    """Time allowed to open a connection to the provider."""
    read_timeout_s: float = 600.0
    """Longest silence allowed while waiting for response headers or the next stream chunk."""
    price_provider: str | None = None
    """The price book's provider id for this route, when its name is not one (e.g. "groq", "mistral")."""
    deployments: dict[str, str] = field(default_factory=dict)
    """Azure: deployment name -> the model it serves, for pricing (e.g. prod-4o = "gpt-4o")."""


@dataclass(frozen=True, slots=True)
class EventSettings:
    flush_interval_ms: int = 500
    """Longest time an event waits in memory before it is written to `events.duckdb`."""
    batch_size: int = 5000
    """Events written per DuckDB append."""
    max_buffered: int = 100_000
    """Events kept in memory while `events.duckdb` cannot be written (disk full, file locked)."""
    fail_closed: bool = True
    """When the buffer is full: refuse new requests with 503 (true) rather than serve traffic whose
    events would be dropped (false)."""
    sink: str = "duckdb"
    """Where the gateway writes events: "duckdb" (`events.duckdb`, one gateway process) or "segments"
    (sealed Parquet segments in segments_dir, ingested by `tollway pipeline`; any number of processes)."""
    segments_dir: str = ""
    """With sink = "segments": where sealed segments go: a directory (a path, relative to the deployment
    directory, or a file:// URL; empty means DIR/segments) or object storage (s3://BUCKET/PREFIX,
    gs://BUCKET/PREFIX, az://CONTAINER/PREFIX; credentials from the environment only)."""

    spool: bool = True
    """With sink = "segments": also write each event ahead to a local file (DIR/spool) before the response
    ends, so a killed gateway process loses none (the next gateway started here seals them)."""

    def segments_path(self, data_dir: Path) -> Path:
        """The segments directory, resolved against the deployment directory (not for object storage)."""
        text = self.segments_dir.removeprefix("file://") or "segments"
        return (data_dir / Path(text).expanduser()).resolve()

    def segments_location(self, data_dir: Path) -> str:
        """Names where segments go: the object storage URL as written, or the resolved directory."""
        if segments_scheme(self.segments_dir) in OBJECT_STORE_SCHEMES:
            return self.segments_dir.rstrip("/")
        return str(self.segments_path(data_dir))


@dataclass(frozen=True, slots=True)
class LimitSettings:
    default_max_output_tokens: int = 4096
    """Output reserved against token and usd limits when a request sets no max_tokens of its own."""
    retry_backoff_ms: int = 50
    """Pause before trying the next key of a pool (doubles with each further attempt)."""
    store: str = "memory"
    """Where limit counters, reservations and key cool-downs live: "memory" (one process) or
    "redis://HOST:PORT/DB" (shared by every gateway process and machine)."""


UNPRICED_CHOICES = ("refuse", "allow")
#: The gateway's own first path segments: a provider cannot be named after one.
RESERVED_PATHS = frozenset({"auth", "healthz", "readyz", "metrics"})
DISCONNECT_CHOICES = ("close", "drain")


@dataclass(frozen=True, slots=True)
class MeteringSettings:
    unpriced: str = "refuse"
    """A model with no price under a usd limit: "refuse" it (403 model_unpriced) or "allow" it unmetered."""
    on_client_disconnect: str = "close"
    """A client leaving mid-stream: "close" the provider's stream (usage estimated) or "drain" it (the
    provider's own usage, read for at most drain_timeout_s)."""
    drain_timeout_s: float = 30.0
    """Longest time a stream is read on after its client left, with on_client_disconnect = "drain"."""
    max_output_tokens: int = 131_072
    """Output reserved against usd limits for a request that sets no cap, when the model's own bound
    (its context window, or max_output_tokens in pricing.csv) is larger or unknown."""


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    report_interval_s: int = 60
    """How often `tollway serve` rebuilds the reports."""
    retention_days: int = 400
    """Raw events older than this are deleted once every report that needs them is built."""


@dataclass(frozen=True, slots=True)
class ControlSettings:
    url: str = "control.db"
    """The control store (keys, tokens, credits, audit log): a SQLite file relative to the deployment
    directory, or "postgresql://USER@HOST:PORT/DB" shared by several gateway machines (the password from
    PGPASSWORD or ~/.pgpass rather than the URL)."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    server: ServerSettings = field(default_factory=ServerSettings)
    providers: dict[str, ProviderSettings] = field(default_factory=dict)
    auth: AuthSettings = field(default_factory=AuthSettings)
    events: EventSettings = field(default_factory=EventSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    metering: MeteringSettings = field(default_factory=MeteringSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    control: ControlSettings = field(default_factory=ControlSettings)

    @property
    def policy_dir(self) -> Path:
        return self.data_dir / "policy"

    @property
    def control_db(self) -> Path:
        return self.data_dir / "control.db"

    @property
    def control_target(self) -> Path | str:
        """The control store: a SQLite file's path, or a PostgreSQL URL ([control] url)."""
        from proxy.control.target import resolve

        return resolve(self.control.url, self.data_dir)

    @property
    def events_db(self) -> Path:
        return self.data_dir / "events.duckdb"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


def resolve_data_dir(flag: str | None) -> Path:
    """The deployment directory: the flag, else `TOLLWAY_DATA_DIR`, else `./data`."""
    return Path(flag or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()


def load_settings(data_dir: Path) -> Settings:
    """Read `DIR/tollway.toml` (a missing file means all defaults)."""
    path = data_dir / "tollway.toml"
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
    unknown = set(raw) - {"server", "providers", "auth", "events", "limits", "metering", "pipeline", "control"}
    if unknown:
        raise SettingsError(f"{path}: unknown section(s) {sorted(unknown)}")
    auth = raw.get("auth", {})
    if not isinstance(auth, dict):
        raise SettingsError(f"{path}: [auth] must be a table")
    return Settings(
        data_dir=data_dir,
        server=_build(ServerSettings, raw.get("server", {}), f"{path} [server]"),
        providers=_providers(raw.get("providers", {}), path),
        auth=_auth(auth, path),
        events=_events(raw.get("events", {}), f"{path} [events]"),
        limits=_limits(raw.get("limits", {}), f"{path} [limits]"),
        metering=_metering(raw.get("metering", {}), f"{path} [metering]"),
        pipeline=_build(PipelineSettings, raw.get("pipeline", {}), f"{path} [pipeline]"),
        control=_control(raw.get("control", {}), f"{path} [control]"),
    )


def _auth(raw: dict[str, Any], path: Path) -> AuthSettings:
    try:
        return load_auth(raw, path)
    except AuthSettingsError as exc:
        raise SettingsError(str(exc)) from exc


SINKS = ("duckdb", "segments")


def _events(raw: dict[str, Any], where: str) -> EventSettings:
    _refuse_credentials(raw, where)
    settings = _build(EventSettings, raw, where)
    if settings.sink not in SINKS:
        raise SettingsError(f'{where}: sink must be "duckdb" (one gateway process) or "segments" (sealed Parquet '
                            "segments that `tollway pipeline` ingests)")
    _check_segments_dir(settings.segments_dir, where)
    return settings


#: Object storage for event segments (through obstore); "file" and plain paths are local directories.
OBJECT_STORE_SCHEMES = ("s3", "gs", "az")
SEGMENTS_FORMS = "a directory path, file:///PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
CREDENTIALS_FROM_ENV = ("credentials never go in tollway.toml: set them in the environment of every gateway and "
                        "of the pipeline (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL; "
                        "GCS: GOOGLE_APPLICATION_CREDENTIALS; Azure: AZURE_STORAGE_ACCOUNT_NAME, "
                        "AZURE_STORAGE_ACCOUNT_KEY), or give the machine a role")
_CREDENTIAL_WORDS = ("secret", "access_key", "key_id", "token", "password", "credential", "service_account",
                     "sas_", "account_key")


def segments_scheme(text: str) -> str:
    """"s3", "file", ...; "" for a plain path."""
    return text.partition("://")[0].lower() if "://" in text else ""


def _refuse_credentials(raw: dict[str, Any], where: str) -> None:
    found = sorted(k for k in raw if k.lower().startswith(("aws_", "google_", "azure_"))
                   or any(word in k.lower() for word in _CREDENTIAL_WORDS))
    if found:
        raise SettingsError(f"{where}: {', '.join(found)}: {CREDENTIALS_FROM_ENV}")


def _check_segments_dir(text: str, where: str) -> None:
    scheme = segments_scheme(text)
    if scheme and scheme != "file" and scheme not in OBJECT_STORE_SCHEMES:
        raise SettingsError(f"{where}: segments_dir {text!r}: {scheme}:// is not supported; use {SEGMENTS_FORMS}")
    if scheme in OBJECT_STORE_SCHEMES:
        location = text.partition("://")[2]
        if "@" in location.partition("/")[0] or "?" in location:
            raise SettingsError(f"{where}: segments_dir holds credentials or options; {CREDENTIALS_FROM_ENV}")
        if not location.partition("/")[0]:
            raise SettingsError(f"{where}: segments_dir {text!r} names no bucket; use {SEGMENTS_FORMS}")


def _control(raw: dict[str, Any], where: str) -> ControlSettings:
    settings = _build(ControlSettings, raw, where)
    if "://" in settings.url and not settings.url.startswith(("postgresql://", "postgres://", "sqlite://")):
        raise SettingsError(f'{where}: url must be a SQLite file (default "control.db") or a PostgreSQL URL such as '
                            '"postgresql://tollway@127.0.0.1:5432/tollway"')
    return settings


def _limits(raw: dict[str, Any], where: str) -> LimitSettings:
    settings = _build(LimitSettings, raw, where)
    if settings.store != "memory" and not settings.store.startswith(("redis://", "rediss://", "unix://",
                                                                     "redis+sentinel://")):
        raise SettingsError(f'{where}: store must be "memory" or a Redis URL such as "redis://127.0.0.1:6379/0" '
                            '(or "redis+sentinel://HOST:26379,HOST:26379/SERVICE" for Redis behind Sentinel)')
    return settings


def _metering(raw: dict[str, Any], where: str) -> MeteringSettings:
    settings = _build(MeteringSettings, raw, where)
    for name, choices in (("unpriced", UNPRICED_CHOICES), ("on_client_disconnect", DISCONNECT_CHOICES)):
        if getattr(settings, name) not in choices:
            raise SettingsError(f"{where}: {name} must be one of {', '.join(choices)}")
    return settings


def _providers(raw: dict[str, Any], path: Path) -> dict[str, ProviderSettings]:
    merged = {name: dict(values) for name, values in BUILTIN_PROVIDERS.items()}
    for name, values in raw.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"{path} [providers.{name}]: a provider name may hold letters, digits, - and _")
        if name in RESERVED_PATHS:
            raise SettingsError(f"{path} [providers.{name}]: /{name} is the gateway's own endpoint; "
                                "name the provider otherwise")
        merged.setdefault(name, {"style": "openai"}).update(values)
    out = {}
    for name, values in merged.items():
        where = f"{path} [providers.{name}]"
        if "base_url" not in values:
            raise SettingsError(f"{where}: base_url is required")
        settings = _build(ProviderSettings, {"name": name, **values}, where)
        if settings.style not in STYLES:
            raise SettingsError(f"{where}: style must be one of {', '.join(STYLES)}")
        if not all(isinstance(v, str) and v for v in settings.deployments.values()):
            raise SettingsError(f"{where}.deployments: each deployment names a model, e.g. prod-4o = \"gpt-4o\"")
        out[name] = settings
    return out


def _build(cls: type, values: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    for name, value in values.items():
        expected = _expected_type(known[name])
        if expected and not (isinstance(value, expected) and (expected is bool or not isinstance(value, bool))):
            raise SettingsError(f"{where}: {name} must be {_TYPE_WORDS[expected]}, got {value!r}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise SettingsError(f"{where}: {exc}") from exc


_TYPE_WORDS = {bool: "true or false", int: "a whole number", (int, float): "a number", str: "a string",
               dict: "a table"}


def _expected_type(f) -> type | tuple[type, ...] | None:
    """bool, int, number, string or table, from the field's default (`None` defaults are strings)."""
    if f.default_factory is dict:
        return dict
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return (int, float)
    return str
