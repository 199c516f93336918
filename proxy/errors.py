"""Gateway errors: one tree, status codes and event outcomes as class attributes.

    TollwayError                 500  upstream_error
    ├── Unauthenticated          401  unauthenticated  (code invalid_tollway_credential)
    ├── Forbidden                403  denied
    │   ├── PolicyDenied
    │   ├── OperationDenied           (code operation_not_allowed: policy/operations.csv)
    │   ├── NoRoute
    │   ├── UnknownTenant             (code unknown_tenant: the credential names no tenant of tenants.csv)
    │   └── ModelUnpriced             (code model_unpriced: no price, and a usd limit applies)
    ├── UnknownProvider          404  bad_request
    ├── ObjectNotFound           404  denied           (code object_not_found: another tenant's object, or one never seen)
    ├── BadRequest               400  bad_request
    │   ├── BodyTooLarge         413
    │   └── BodyTimeout          408
    ├── RateLimited              429  rate_limited     (carries retry_after)
    │   └── BudgetExceeded            budget_exceeded
    ├── InternalError            500  internal_error   (a failure nothing else foresaw; logged)
    ├── StoreUnavailable         503  upstream_error   (not recorded: the event store is what failed)
    ├── LimitStoreUnavailable    503  upstream_error   (code limit_store_unavailable: Redis unreachable; recorded)
    ├── KeysFailing              503  upstream_error   (code provider_keys_failing: for the operator to rotate)
    ├── UpstreamUnreachable      502  upstream_error   (the next key of a pool is tried)
    ├── UpstreamTooLarge         502  upstream_error   (a JSON answer past [server] max_response_bytes)
    ├── UpstreamRefused          (its status) upstream_error (the provider refused a WebSocket handshake)
    └── UpstreamTimeout          504  timeout

Third-party exceptions (aiohttp, asyncio timeouts) are translated into this tree in one place,
`proxy.upstream`. Each provider adapter renders an error in its own format from `kind`.
"""

from __future__ import annotations


class TollwayError(Exception):
    status = 500
    outcome = "upstream_error"
    kind = "upstream"  # generic kind; adapters map it to their own error type
    code: str | None = None  # a specific machine-readable code, where the wire format has a slot for one
    recorded = True  # False: no event is written for this refusal

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Unauthenticated(TollwayError):
    status, outcome, kind = 401, "unauthenticated", "authentication"
    code = "invalid_tollway_credential"  # never the provider's own `invalid_api_key`


class Forbidden(TollwayError):
    status, outcome, kind = 403, "denied", "permission"


class PolicyDenied(Forbidden):
    pass


class OperationDenied(Forbidden):
    code = "operation_not_allowed"


class NoRoute(Forbidden):
    pass


class UnknownTenant(Forbidden):
    code = "unknown_tenant"


class ModelUnpriced(Forbidden):
    code = "model_unpriced"


class UnknownProvider(TollwayError):
    status, outcome, kind = 404, "bad_request", "not_found"


class ObjectNotFound(TollwayError):
    """Another tenant's object, or one the gateway never saw: the same answer, so existence is not confirmed."""

    status, outcome, kind, code = 404, "denied", "not_found", "object_not_found"


class UpstreamRefused(TollwayError):
    """The provider answered a WebSocket handshake with an HTTP error; `status` is its status."""

    outcome, kind = "upstream_error", "upstream"

    def __init__(self, message: str, status: int, retry_after: str | None) -> None:
        super().__init__(message, retry_after=int(retry_after) if retry_after and retry_after.isdigit() else None)
        self.status = status


class BadRequest(TollwayError):
    status, outcome, kind = 400, "bad_request", "invalid_request"


class BodyTooLarge(BadRequest):
    status, kind = 413, "too_large"


class BodyTimeout(BadRequest):
    status = 408


class RateLimited(TollwayError):
    status, outcome, kind = 429, "rate_limited", "rate_limit"


class BudgetExceeded(RateLimited):
    outcome, kind = "budget_exceeded", "budget"


class InternalError(TollwayError):
    status, outcome, kind = 500, "internal_error", "internal"


class StoreUnavailable(TollwayError):
    status, outcome, kind = 503, "upstream_error", "unavailable"
    recorded = False


class LimitStoreUnavailable(TollwayError):
    """The shared limit store (Redis) cannot be reached: refused rather than served past limits (fail closed).
    Recorded (the event store works), with no key tried, so rebuilt counters never count it."""

    status, outcome, kind = 503, "upstream_error", "unavailable"
    code = "limit_store_unavailable"


class KeysFailing(TollwayError):
    status, outcome, kind = 503, "upstream_error", "unavailable"
    code = "provider_keys_failing"


class UpstreamUnreachable(TollwayError):
    status, outcome, kind = 502, "upstream_error", "upstream"


class UpstreamTooLarge(TollwayError):
    status, outcome, kind = 502, "upstream_error", "upstream"


class UpstreamTimeout(TollwayError):
    status, outcome, kind = 504, "timeout", "timeout"


class StartupError(RuntimeError):
    """The deployment cannot be served; the message says which file and what to fix."""
