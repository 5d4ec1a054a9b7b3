"""OpenTelemetry tracing through a real router process: spans exported over OTLP/HTTP to a
collector (a real HTTP server here, decoding the protobuf the exporter sends), the client's
`traceparent` continued, each attempt a span, and its `traceparent` sent to the upstream."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.conftest import UPSTREAM_KEYS, serving

pytestmark = pytest.mark.timeout(120)


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.headers: list[dict[str, str]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                collector.headers.append(dict(self.headers))
                for resource in export.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, trace_id: bytes, count: int, timeout: float = 20) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = [s for s in self.spans if s.trace_id == trace_id]
            if len(spans) >= count:
                return spans
            time.sleep(0.1)
        raise AssertionError(f"{len(self.spans)} spans came, not {count} of trace {trace_id.hex()}")


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


def config(fake: str, tracing: str = "") -> str:
    return f"""
providers:
  fake:
    kind: openai
    base_url: {fake}/v1
    api_key: {UPSTREAM_KEYS["fake"]}
models:
  - id: m/ok
    deployments: [{{provider: fake, model: ok}}]
  - id: m/fallback
    strategy: ordered
    deployments:
      - {{provider: fake, model: status-503}}
      - {{provider: fake, model: ok}}
{tracing}"""


def traceparent() -> tuple[str, bytes, bytes]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-01", trace_id, span_id


def test_spans_continue_the_clients_trace_and_reach_the_upstream(
    tmp_path: Path, fake_upstream: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within a tenth of a second
    tracing = f"tracing: {{otlp_endpoint: '{collector.url}', headers: {{x-collector-token: t0k}}}}"
    with serving(tmp_path, config(fake_upstream, tracing)) as router:
        header, trace_id, client_span = traceparent()
        r = httpx.post(
            f"{router.api}/completions",
            headers={**router.headers(), "traceparent": header},
            json={"model": "m/fallback", "prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        sent = httpx.get(f"{fake_upstream}/_stats", timeout=5).json()["last_headers"]
        spans = collector.wait_for(trace_id, 3)

    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert server.parent_span_id == client_span
    assert server.name == "POST completions"  # its route: a bounded set of names
    assert {a.key: a.value for a in server.attributes}["url.path"].string_value == "/api/v1/completions"
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["llmrouter.request_id"].string_value == r.headers["x-request-id"]
    assert attributes["llmrouter.model"].string_value == "m/fallback"
    attempts = sorted(
        (s for s in spans if s.kind == Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano
    )
    assert [s.name for s in attempts] == ["attempt fake/status-503", "attempt fake/ok"]
    assert all(s.parent_span_id == server.span_id for s in attempts)
    assert attempts[0].status.code == Status.STATUS_CODE_ERROR
    assert attempts[0].status.message == "upstream_unavailable"
    assert attempts[1].status.code != Status.STATUS_CODE_ERROR
    # The upstream was sent the answering attempt's span as its parent, in the client's trace.
    version, upstream_trace, upstream_parent, flags = sent["traceparent"].split("-")
    assert (version, flags) == ("00", "01")
    assert bytes.fromhex(upstream_trace) == trace_id
    assert bytes.fromhex(upstream_parent) == attempts[1].span_id
    assert collector.headers[0]["x-collector-token"] == "t0k"


def test_a_request_without_a_traceparent_starts_a_trace(
    tmp_path: Path, fake_upstream: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    tracing = f"tracing: {{otlp_endpoint: '{collector.url}'}}"
    with serving(tmp_path, config(fake_upstream, tracing)) as router:
        r = httpx.post(
            f"{router.api}/completions",
            headers={**router.headers(), "traceparent": "00-not-a-valid-header-01"},
            json={"model": "m/ok", "prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200
        sent = httpx.get(f"{fake_upstream}/_stats", timeout=5).json()["last_headers"]
        upstream_trace = bytes.fromhex(sent["traceparent"].split("-")[1])
        spans = collector.wait_for(upstream_trace, 2)
    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert server.parent_span_id == b""  # a root: the invalid header was ignored


def test_without_an_endpoint_nothing_is_traced_or_passed_on(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, config(fake_upstream)) as router:
        header, _, _ = traceparent()
        r = httpx.post(
            f"{router.api}/completions",
            headers={**router.headers(), "traceparent": header},
            json={"model": "m/ok", "prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200
        sent = httpx.get(f"{fake_upstream}/_stats", timeout=5).json()["last_headers"]
        assert "traceparent" not in {k.lower() for k in sent}
