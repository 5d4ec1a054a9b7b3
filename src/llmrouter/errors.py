"""The error tree. Every failure that reaches a client is one of these.

    LlmrouterError                      500 server_error       (the root; an internal fault)
    ├── InvalidRequest                  400 invalid_request_error
    │   ├── UnsupportedParameter        400 ... code=unsupported_parameter
    │   └── ContextLengthExceeded       400 ... code=context_length_exceeded (other models next)
    ├── AuthenticationFailed            401 authentication_error
    ├── CreditExhausted                 402 insufficient_credits  (an addition to the spec)
    ├── PermissionDenied                403 permission_error      (admin API, a model not allowed)
    ├── ModelNotFound                   404 not_found_error
    ├── NotFound                        404 not_found_error
    ├── MethodNotAllowed                405 invalid_request_error (with `Allow`: the path's methods)
    ├── RequestTimeout                  408 invalid_request_error (the client was too slow sending)
    ├── Conflict                        409 invalid_request_error (a live key has this name already)
    ├── PayloadTooLarge                 413 invalid_request_error
    ├── UriTooLong                      414 invalid_request_error
    ├── HeadersTooLarge                 431 invalid_request_error
    ├── RateLimited                     429 rate_limit_error      (the principal's own limits)
    ├── UnsupportedMediaType            415 invalid_request_error
    ├── ServiceUnavailable              503 service_unavailable   (retryable)
    └── ProviderError                   502 provider_error        (an upstream failed us)
        ├── UpstreamRejected            400 invalid_request_error (the upstream says the request is bad)
        ├── UpstreamAuthFailed          502 provider_error        (retryable: our credentials there)
        ├── UpstreamRefused             400 invalid_request_error (retryable: content policy)
        ├── UpstreamRateLimited         429 rate_limit_error      (retryable, keeps Retry-After)
        ├── UpstreamUnavailable         502 provider_error        (retryable: connection, 5xx)
        ├── InvalidOutput               502 invalid_output        (retryable: failed response_format)
        └── UpstreamTimeout             504 timeout               (retryable)
            └── DeadlineExceeded        504 timeout               (the request's deadline)

Status, type and policy are properties of the class, never inferred from messages. What the client
sees is `status` and `to_body()`. What the executor does next is `next` (`Next`), and whether the
failure counts against the deployment's health is `blames_deployment`; `retryable` says whether
anything may be tried after it at all. tests/unit/test_errors.py holds the tree to that.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import msgspec

__all__ = [
    "QUOTED_CHARS",
    "AuthenticationFailed",
    "Conflict",
    "ContextLengthExceeded",
    "CreditExhausted",
    "DeadlineExceeded",
    "ErrorBody",
    "ErrorObject",
    "HeadersTooLarge",
    "InvalidOutput",
    "InvalidRequest",
    "LlmrouterError",
    "MethodNotAllowed",
    "ModelNotFound",
    "Next",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProviderError",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "UnsupportedMediaType",
    "UnsupportedParameter",
    "UpstreamAuthFailed",
    "UpstreamRateLimited",
    "UpstreamRefused",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UriTooLong",
    "clipped",
    "quoted",
]


# What an error may quote of the client's own input, and the most a message or param may be: a
# 1 MB model name comes back as its first characters, not as a 1 MB error.
QUOTED_CHARS = 64
MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 256


def quoted(value: object, limit: int = QUOTED_CHARS) -> str:
    """`value` as an error message shows client input: its repr, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def clipped(text: str, limit: int = QUOTED_CHARS) -> str:
    """`text` cut to `limit` characters (for a param naming a client's key)."""
    return text if len(text) <= limit else text[:limit] + "..."


class ErrorObject(msgspec.Struct):
    """The spec's error object: every field is a string and always present."""

    code: str
    message: str
    param: str
    type: str


class ErrorBody(msgspec.Struct):
    error: ErrorObject


class Next(enum.Enum):
    """What a request's attempts do after a failure of this kind."""

    STOP = "stop"  # nothing: any other attempt would fail the same way, or there is no time
    ANY = "any"  # the next deployment of the plan (and this one again on a later pass)
    OTHER_DEPLOYMENT = "other_deployment"  # the next, never this deployment again for the request
    OTHER_MODEL = "other_model"  # the request's other models: none of this model's deployments fit
    SAME_AGAIN = "same_again"  # this deployment again (a sampled answer may differ), then the next


class LlmrouterError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    next: ClassVar[Next] = Next.STOP
    # Whether the failure says the deployment is unwell (its health counts it): not a failure
    # of the request itself, nor load (a rate limit), nor the content of one answer.
    blames_deployment: ClassVar[bool] = False

    @property
    def retryable(self) -> bool:
        """Whether anything may be tried after this failure."""
        return self.next is not Next.STOP

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.message = message
        self.param = None if param is None else clipped(param, MAX_PARAM_CHARS)
        self.code = code or self.default_code
        self.retry_after = retry_after
        self.attempts: list[Any] = []  # the executor's Attempts before it gave up: header and log
        self.extra_headers: list[tuple[bytes, bytes]] = []
        # Set when a limit refused the request: which ("rpm", "tpm", "concurrency", "credit",
        # "credit_held", "models"); the metrics count refusals by it.
        self.limit: str | None = None

    def to_body(self) -> ErrorBody:
        return ErrorBody(ErrorObject(self.code, self.message, self.param or "", self.type))

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None or not math.isfinite(self.retry_after):
            return self.extra_headers
        retry_after = str(max(0, math.ceil(self.retry_after))).encode()
        return [(b"retry-after", retry_after), *self.extra_headers]


class InvalidRequest(LlmrouterError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    """Too long for this model: the executor moves on to the request's other models, if any."""

    default_code = "context_length_exceeded"
    next = Next.OTHER_MODEL


class AuthenticationFailed(LlmrouterError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class CreditExhausted(LlmrouterError):
    """The principal's credit limit is spent (for this period, if it resets)."""

    status = 402
    type = "insufficient_credits"
    default_code = "credit_limit_exceeded"


class PermissionDenied(LlmrouterError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class ModelNotFound(LlmrouterError):
    status = 404
    type = "not_found_error"
    default_code = "model_not_found"


class NotFound(LlmrouterError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowed(LlmrouterError):
    """A path that exists, asked with a method it does not have; `Allow` lists the methods it has,
    as RFC 9110 requires of a 405."""

    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"

    def __init__(self, message: str, *, allow: Iterable[str]) -> None:
        super().__init__(message)
        self.extra_headers.append((b"allow", ", ".join(allow).encode()))


class RequestTimeout(LlmrouterError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(LlmrouterError):
    """A valid request that clashes with what exists: HTTP's 409, not a 400, since the same
    request succeeds once the other thing is gone."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(LlmrouterError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class UriTooLong(LlmrouterError):
    status = 414
    type = "invalid_request_error"
    default_code = "uri_too_long"


class HeadersTooLarge(LlmrouterError):
    status = 431
    type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class UnsupportedMediaType(LlmrouterError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(LlmrouterError):
    """Over the principal's requests, tokens or concurrency per minute: wait `retry_after`."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailable(LlmrouterError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"
    next = Next.ANY


class ProviderError(LlmrouterError):
    """An upstream provider failed; the message names the provider, never its credentials."""

    status = 502
    type = "provider_error"
    default_code = "upstream_error"


class UpstreamRejected(ProviderError):
    """The upstream called the request invalid. The router checked the request before sending it,
    so what the upstream refused is most often a limit of its own that the config does not
    declare (a temperature range, a schema feature): another deployment may take it."""

    status = 400
    type = "invalid_request_error"
    default_code = "upstream_rejected"
    next = Next.OTHER_DEPLOYMENT


class UpstreamAuthFailed(ProviderError):
    """The upstream refused llmrouter's credentials: a deployment's misconfiguration, not the
    client's fault, so another deployment may still answer."""

    default_code = "upstream_auth_failed"
    next = Next.ANY
    blames_deployment = True


class UpstreamRefused(ProviderError):
    """The provider's content policy refused the request; another provider may not."""

    status = 400
    type = "invalid_request_error"
    default_code = "content_filter"
    next = Next.OTHER_DEPLOYMENT


class UpstreamRateLimited(ProviderError):
    status = 429
    type = "rate_limit_error"
    default_code = "upstream_rate_limited"
    next = Next.ANY  # (and the deployment is skipped for its Retry-After: load, not sickness)


class UpstreamUnavailable(ProviderError):
    default_code = "upstream_unavailable"
    next = Next.ANY
    blames_deployment = True


class InvalidOutput(ProviderError):
    """The answer does not satisfy the request's `response_format`: asked again, it may."""

    type = "invalid_output"
    default_code = "invalid_output"
    next = Next.SAME_AGAIN


class UpstreamTimeout(ProviderError):
    status = 504
    type = "timeout"
    default_code = "upstream_timeout"
    next = Next.ANY
    blames_deployment = True


class DeadlineExceeded(UpstreamTimeout):
    """The request's own deadline passed: nothing to retry, and no fault of the deployment."""

    default_code = "deadline_exceeded"
    next = Next.STOP
    blames_deployment = False
