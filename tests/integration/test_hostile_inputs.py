"""Hostile structured-output input through a running router (issue 11): a schema pattern written to
backtrack, schemas and grammars nested or sized to break the checks. Each gets a clear answer — a
400 naming the parameter, or (for an answer that fails its check) a 502 `invalid_output` — never a
500, and `GET /health`, timed from another client meanwhile, answers within 100 ms throughout.

The fake upstream's `say-prompt` model answers with the prompt, so a test chooses the answer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Router, serving
from tests.spec import assert_error

HEALTH_BOUND = 0.1  # seconds: issue 11
BACKTRACKING = {"type": "array", "items": {"type": "string", "pattern": "(a{1,10}){1,10}b"}}
# Each string matches after ~30 ms of backtracking: only a budget for the whole answer stops it.
SLOW = {"type": "array", "items": {"type": "string", "pattern": "(a{1,10}){1,10}b|^a+$"}}


def config(fake: str) -> str:
    # `checks:` as the defaults; one attempt per request (invalid_output is asked again otherwise).
    return f"""default_model: say
routing: {{max_attempts: 1, invalid_output_retries: 0}}
providers:
  fake:
    kind: openai
    base_url: {fake}/v1
    response_formats: [text, json_object, json_schema, grammar]
    timeouts: {{connect: 1, first_token: 20, idle: 20, total: 30}}
models:
  - id: say
    deployments: [{{provider: fake, model: say-prompt}}]
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    with serving(tmp_path_factory.mktemp("hostile"), config(fake_upstream)) as r:
        yield r


# The watcher runs in a process of its own: in this one, encoding a test's multi-megabyte body
# holds the GIL, and a thread here would time that rather than the server.
_WATCHER = """
import http.client, json, select, sys, time
host, port = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection(host, port, timeout=60)
def get():
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    return r.status
get()  # connected before the timing starts
print("ready", flush=True)
times, statuses = [], set()
while True:
    started = time.perf_counter()
    statuses.add(get())
    times.append(time.perf_counter() - started)
    if select.select([sys.stdin], [], [], 0.01)[0]:  # told to stop (or the test is gone)
        break
print(json.dumps({"times": times, "statuses": sorted(statuses)}), flush=True)
"""


class HealthWatch:
    """`GET /health` again and again from a process and a connection of its own while the block
    runs, each timed; at least one before the block ends."""

    def __init__(self, router: Router) -> None:
        host, _, port = router.base.removeprefix("http://").rpartition(":")
        self._address = (host, port)
        self.times: list[float] = []
        self.statuses: set[int] = set()
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> HealthWatch:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, *self._address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._proc is not None
        try:
            out, _ = self._proc.communicate("stop\n", timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise
        if self._proc.returncode == 0 and out.strip():
            seen = json.loads(out.strip().splitlines()[-1])
            self.times, self.statuses = seen["times"], set(seen["statuses"])

    @property
    def slowest(self) -> float:
        assert self.statuses == {200}, self.statuses
        return max(self.times)


def post(router: Router, body: dict[str, Any], client: httpx.Client | None = None) -> httpx.Response:
    send = client.post if client is not None else httpx.post
    return send(f"{router.api}/completions", headers=router.headers(), json=body, timeout=60)


def schema_body(schema: dict[str, Any], answer: str = "{}", **more: Any) -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "hostile", "schema": schema}}
    return {"prompt": answer, "max_tokens": 100_000, "response_format": fmt, **more}


def grammar_body(grammar: str) -> dict[str, Any]:
    return {"prompt": "x", "max_tokens": 5, "response_format": {"type": "grammar", "grammar": grammar}}


def nested(key: str, depth: int) -> Any:
    node: Any = {}
    for _ in range(depth):
        node = {key[:-2]: [node]} if key.endswith("[]") else {key: node}
    return node


def groups(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


# -- the answer's check ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_backtracking_pattern_does_not_stall_the_server(router: Router, stream: bool) -> None:
    """Issue 11's attack: 150 strings against `(a{1,10}){1,10}b` took /health to 14.9 s. The
    first string's check must end inside the 1 s budget for its error to be the answer: 23
    characters took 0.84 s of `regex` alone on a slow VM, 21 take half that (150 of them, were
    they all checked, 65 s there)."""
    answer = json.dumps(["a" * 21] * 150)
    started = time.perf_counter()
    with HealthWatch(router) as watch:
        r = post(router, schema_body(BACKTRACKING, answer, stream=stream))
    elapsed = time.perf_counter() - started
    assert watch.slowest < HEALTH_BOUND, watch.times
    if stream:  # the text streamed as it came (the deployment constrains natively): then the error
        assert r.status_code == 200 and '"invalid_output"' in r.text, r.text
        assert "does not match" in r.text
    else:
        error = assert_error(r, 502)["error"]
        assert error["type"] == "invalid_output" and "at 0: " in error["message"], error
    assert elapsed < 5  # the first string's check is the first error: the rest are not run


def test_one_answers_check_has_a_time_budget(router: Router) -> None:
    answer = json.dumps(["a" * 20] * 150)  # each string valid, each ~30 ms to find so
    with HealthWatch(router) as watch:
        r = post(router, schema_body(SLOW, answer))
    assert watch.slowest < HEALTH_BOUND, watch.times
    error = assert_error(r, 502)["error"]
    assert error["type"] == "invalid_output", error
    assert "ran out of time (checks.answer_seconds: 1 s)" in error["message"]


def test_a_small_answer_is_checked_and_answered(router: Router) -> None:
    r = post(router, schema_body(SLOW, json.dumps(["a" * 5, "ab"])))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == '["aaaaa", "ab"]'


# -- the edge ---------------------------------------------------------------------------------


RULE = 'r ::= "' + "x" * 70 + '"\n'
EDGE_CASES = [
    pytest.param(schema_body(nested("not", 122)), "schema_depth", id="schema-not-122"),
    pytest.param(schema_body(nested("items", 400)), "schema_depth", id="schema-items-400"),
    pytest.param(schema_body(nested("anyOf[]", 300)), "schema_depth", id="schema-anyOf-300"),
    pytest.param(
        schema_body({"type": "string", "pattern": "(" * 490 + "a" + ")" * 490}),
        "schema_depth",
        id="pattern-490-groups",
    ),
    pytest.param(
        schema_body({"properties": {f"p{i}": {"description": "x" * 100} for i in range(6000)}}),
        "schema_bytes",
        id="schema-700-kB",
    ),
    pytest.param(grammar_body(groups(490)), "grammar_depth", id="grammar-490-groups"),
    pytest.param(
        grammar_body("root ::= r\n" + RULE * (3_400_000 // len(RULE))),
        "grammar_bytes",
        id="grammar-3.4-MB",
    ),
    pytest.param(
        grammar_body("root ::= " + '"a"{0,2000} ' * 100), "grammar_rules", id="grammar-200k-rules"
    ),
]


@pytest.mark.parametrize(("body", "limit"), EDGE_CASES)
def test_input_beyond_the_limits_is_a_400_naming_the_limit(
    router: Router, body: dict[str, Any], limit: str
) -> None:
    log_before = router.log.stat().st_size
    with HealthWatch(router) as watch:
        r = post(router, body)
    param = "response_format." + ("grammar" if "grammar" in limit else "json_schema.schema")
    error = assert_error(r, 400, param)["error"]
    assert f"checks.{limit}" in error["message"], error
    assert watch.slowest < HEALTH_BOUND, watch.times
    with router.log.open("rb") as log:  # no traceback written either (issue 11: 190 kB each)
        log.seek(log_before)
        assert b"Traceback" not in log.read()


def test_a_chain_of_references_used_twice_each_runs_out_of_time(router: Router) -> None:
    """40 definitions, each `allOf` the next twice: 2^40 visits of the answer, in 1 kB of schema."""
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(40)}
    defs["d40"] = {"type": "string"}
    with HealthWatch(router) as watch:
        r = post(router, schema_body({"$defs": defs, "$ref": "#/$defs/d0"}, '"x"'))
    assert watch.slowest < HEALTH_BOUND, watch.times
    error = assert_error(r, 502)["error"]
    assert "ran out of time" in error["message"], error


def test_a_schema_within_the_limits_is_served(router: Router) -> None:
    schema = {"type": "object", "properties": {"a": nested("items", 60)}}
    r = post(router, schema_body(schema, '{"a": []}'))
    assert r.status_code == 200, r.text


# -- properties -------------------------------------------------------------------------------

BOUNDED = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples in every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EVIL_PATTERNS = [
    "(a{1,10}){1,10}b",
    "(a+)+$",
    "(a|aa)+$",
    "(a|a?)+b",
    "(.*a){12}",
    "((a*)*)*b",
    r"^(\w+\s?)*$",
    "(a{1,10}){1,10}b|^a+$",
]
KEYS = ["not", "items", "anyOf[]", "allOf[]", "prefixItems[]", "additionalProperties", "$defs"]


def _deep(draw: st.DrawFn) -> Any:
    key, depth = draw(st.sampled_from(KEYS)), draw(st.integers(1, 600))
    if key == "$defs":  # {"$defs": {"x": {"$defs": ...}}}
        node: Any = {}
        for _ in range(depth):
            node = {"$defs": {"x": node}}
        return node
    return nested(key, depth)


@st.composite
def hostile_schemas(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["deep", "wide", "pattern", "nested-pattern", "refs"]))
    if kind == "deep":
        return _deep(draw)  # type: ignore[no-any-return]
    if kind == "wide":  # many properties, long descriptions: up to ~1.5 MB
        n, size = draw(st.integers(1, 3000)), draw(st.integers(0, 500))
        return {"type": "object", "properties": {f"p{i}": {"description": "d" * size} for i in range(n)}}
    if kind == "pattern":
        return {
            "type": "array",
            "items": {"type": "string", "pattern": draw(st.sampled_from(EVIL_PATTERNS))},
        }
    if kind == "nested-pattern":
        depth = draw(st.integers(1, 800))
        return {"type": "string", "pattern": "(" * depth + "a" + ")" * depth}
    # `$ref`s each used twice, chained: 2^n visits of the answer for a schema of n definitions
    n = draw(st.integers(1, 40))
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


@st.composite
def hostile_grammars(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["groups", "repetitions", "chain", "large", "alternatives"]))
    if kind == "groups":
        return groups(draw(st.integers(1, 2000)))
    if kind == "repetitions":
        k, high = draw(st.integers(1, 200)), draw(st.integers(1, 2000))
        return "root ::= " + f'"a"{{0,{high}}} ' * k
    if kind == "chain":  # each rule refers to the one before: the nullable check's worst order
        n = draw(st.integers(1, 20_000))
        return f'root ::= r{n - 1}\nr0 ::= ""\n' + "".join(f"r{i} ::= r{i - 1}\n" for i in range(1, n))
    if kind == "large":
        return "root ::= r\n" + RULE * draw(st.integers(1, 50_000))
    n = draw(st.integers(1, 5000))
    return "root ::= " + " | ".join(f'"{i}"' for i in range(n))


@BOUNDED
@given(
    fmt=st.one_of(
        hostile_schemas().map(
            lambda s: {"type": "json_schema", "json_schema": {"name": "h", "schema": s}}
        ),
        hostile_grammars().map(lambda g: {"type": "grammar", "grammar": g}),
    )
)
def test_hostile_formats_get_a_4xx_or_an_answer_and_never_stall(
    router: Router, fmt: dict[str, Any]
) -> None:
    body = {"prompt": "xyz", "max_tokens": 1, "response_format": fmt}  # the answer is cut: no check
    with HealthWatch(router) as watch:
        r = post(router, body)
    assert r.status_code < 500, r.text[:300]
    if r.status_code == 400:
        assert r.json()["error"]["param"].startswith("response_format"), r.text[:300]
    assert watch.slowest < HEALTH_BOUND, watch.times


@BOUNDED
@given(
    pattern=st.sampled_from(EVIL_PATTERNS),
    string=st.builds(lambda n, end: "a" * n + end, st.integers(0, 30), st.sampled_from(["", "b", "!"])),
    count=st.integers(1, 300),
)
def test_answers_checked_against_evil_patterns_never_stall(
    router: Router, pattern: str, string: str, count: int
) -> None:
    schema = {"type": "array", "items": {"type": "string", "pattern": pattern}}
    with HealthWatch(router) as watch:
        r = post(router, schema_body(schema, json.dumps([string] * count)))
    assert r.status_code == 200 or (
        r.status_code == 502 and r.json()["error"]["type"] == "invalid_output"
    ), r.text
    assert watch.slowest < HEALTH_BOUND, watch.times


def test_the_router_wrote_no_traceback(router: Router) -> None:
    assert "Traceback" not in Path(router.log).read_text()
