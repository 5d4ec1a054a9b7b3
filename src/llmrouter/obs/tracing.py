"""OpenTelemetry tracing, when `tracing.otlp_endpoint` is set (and the `otel` extra installed): a
server span per request, continuing the client's W3C `traceparent`; a client span per upstream
attempt, under it; and the attempt's `traceparent` sent to the upstream. Spans are exported over
OTLP/HTTP in batches, off the request path.

When no endpoint is set nothing is imported and nothing is done: every entry point here is one
check of a module global. The tracer is this process's (OpenTelemetry's own model: one tracer
provider per process).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from llmrouter.api.http import Request
    from llmrouter.routing.plan import Target
    from llmrouter.settings import TracingSettings

__all__ = ["RequestSpan", "attempt", "configure", "enabled", "inject", "shutdown", "start_request"]

T = TypeVar("T")
# The longest traceparent or tracestate taken (W3C: tracestate at most 32 entries of 256 or so).
_LONGEST = 8192


class _Tracing:
    def __init__(self, settings: TracingSettings) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise RuntimeError(
                "tracing.otlp_endpoint is set, but OpenTelemetry is not installed: "
                "pip install 'llmrouter[otel]'"
            ) from None
        resource = Resource.create({"service.name": settings.service_name})
        self.provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, headers=dict(settings.headers))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("llmrouter")
        self.propagator = TraceContextTextMapPropagator()
        self.server, self.client = SpanKind.SERVER, SpanKind.CLIENT
        self._status, self._error = Status, StatusCode.ERROR

    def error(self, code: str) -> Any:
        return self._status(self._error, code)


_active: _Tracing | None = None


def configure(settings: TracingSettings) -> None:
    """Start tracing for this process if the settings ask for it (at the server's start)."""
    global _active
    if settings.otlp_endpoint is not None and _active is None:
        _active = _Tracing(settings)


def enabled() -> bool:
    return _active is not None


def shutdown() -> None:
    """Export what is left (at the server's stop)."""
    global _active
    if _active is not None:
        _active.provider.shutdown()
        _active = None


class RequestSpan:
    """A request's span, current from `start_request` until `end`: its attempts' parent."""

    __slots__ = ("span", "token")

    def __init__(self, span: Any, token: Any) -> None:
        self.span, self.token = span, token

    def end(self, status: int, req: Request) -> None:
        """What the request came to, on its span; then it ends and is no longer current."""
        from opentelemetry import context

        span = self.span
        span.set_attribute("http.response.status_code", status)
        acc = req.accounting
        if acc is not None:
            span.set_attribute("llmrouter.model_requested", acc.model_requested)
            if acc.target is not None:
                span.set_attribute("llmrouter.model", acc.target.model.id)
                span.set_attribute("llmrouter.provider", acc.target.deployment.provider)
            if acc.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", acc.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", acc.usage.completion_tokens)
        error = req.log.get("error") or req.log.get("stream_error")
        if (error is not None or status >= 500) and _active is not None:
            span.set_status(_active.error(str(error or status)))
        span.end()
        context.detach(self.token)


def start_request(req: Request, route: str) -> RequestSpan:
    """The request's span, made current. The client's `traceparent` (and `tracestate`), if
    valid, make it a child of the client's span; an invalid one is ignored."""
    from opentelemetry import context, trace

    t = _active
    assert t is not None, "only called when enabled()"
    carrier = {}
    for name in (b"traceparent", b"tracestate"):
        value = req.headers.get(name)
        if value is not None and len(value) <= _LONGEST:  # (a longer one is invalid anyway)
            carrier[name.decode()] = value.decode("latin-1")
    parent = t.propagator.extract(carrier) if carrier else None
    # Named by its route (a bounded set), the path an attribute.
    span = t.tracer.start_span(f"{req.method} {route}", context=parent, kind=t.server)
    span.set_attribute("http.request.method", req.method)
    span.set_attribute("url.path", req.path[:1024])
    span.set_attribute("llmrouter.request_id", req.request_id)
    token = context.attach(trace.set_span_in_context(span))
    return RequestSpan(span, token)


async def attempt(target: Target, work: Awaitable[T]) -> T:
    """One upstream attempt in a span of its own (a stream's: until its first part), current
    while it runs so that `inject` sends it to the upstream."""
    t = _active
    if t is None:
        return await work
    name = f"attempt {target.label}"
    with t.tracer.start_as_current_span(
        name, kind=t.client, record_exception=False, set_status_on_exception=False
    ) as span:
        span.set_attribute("llmrouter.provider", target.deployment.provider)
        span.set_attribute("llmrouter.upstream_model", target.deployment.model)
        span.set_attribute("llmrouter.model", target.model.id)
        try:
            result = await work
        except BaseException as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            span.set_attribute("llmrouter.outcome", code)
            span.set_status(t.error(code))
            raise
        span.set_attribute("llmrouter.outcome", "ok")
        return result


def inject(headers: Mapping[str, str]) -> Mapping[str, str]:
    """The upstream request's headers, with the current attempt's `traceparent` when tracing."""
    t = _active
    if t is None:
        return headers
    carrier = dict(headers)
    t.propagator.inject(carrier)
    return carrier
