"""Hooks for the schemathesis run of test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Three things schemathesis cannot know from a document, and what is done about each:

- The run's own credentials. It authenticates as one admin key, and the key endpoints can revoke,
  rotate or limit any key, its own among them (the id is in `GET /keys`); after that every
  request is a 401 (or a 429, a 402) and the run tests nothing. A revoke, rotate or edit aimed at
  the run's own key is aimed at a key that does not exist instead: still sent and checked (a 404).
- Values of a format no schema describes: a `grammar` is GBNF (`format: gbnf` in the document);
  schemathesis draws valid ones from GRAMMARS instead of random text, which is never one.
- Rules a schema cannot state (the document's descriptions say them): a value that depends on the
  time (`expires_at` in the future), on the router's configuration (provider and model names, what
  its deployment can honour: at most 5 logprobs), or on another field (`best_of` >= `n`).
  Schemathesis draws such fields independently, so the router refuses some schema-valid requests
  (a 400 naming the field). Such a refusal is dropped only when this module's own reading of the
  rule, below, says the request broke it; any other 400 to a valid request, and any other
  finding, fails the run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import strategies as st

# The run's own key: its id and its name (the key endpoints take either).
OWN_KEY = frozenset(os.environ["LLMROUTER_SCHEMATHESIS_KEY"].split(","))
# The router's configuration (test_schemathesis.config): its providers and its models.
PROVIDERS = frozenset({"fake"})
MODELS = frozenset({"fake/ok"})
MAX_LOGPROBS = 5  # the fake provider's max_logprobs
CHECKED_FORMATS = frozenset({"json_object", "json_schema", "python"})  # the router checks answers
GRAMMARS = (
    'root ::= "yes" | "no"',
    "root ::= [a-z]+",
    'root ::= "(" [0-9]* ")" | word\nword ::= [A-Za-z_]{1,8}',
)
_SPENDS_A_KEY = frozenset({"revoke-key", "rotate-key", "update-key"})

schemathesis.openapi.format("gbnf", st.sampled_from(GRAMMARS))


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if _operation(case) in _SPENDS_A_KEY and case.path_parameters.get("id") in OWN_KEY:
        case.path_parameters["id"] = "not-the-runs-own-key"


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """False (drop it) only for a valid request refused for a rule it really broke."""
    if failure.code != "ST202" or response.status_code != 400 or not isinstance(case.body, dict):
        return True
    param = response.json()["error"]["param"]
    broke = _RULES.get((_operation(case), param.split("[")[0]))
    return broke is None or not broke(case.body, param)


def _operation(case: Any) -> str:
    return str(case.operation.definition.raw.get("operationId"))


def _index(param: str) -> int:
    return int(param.rsplit("[", 1)[1].rstrip("]"))


def _expired(body: dict[str, Any], param: str) -> bool:
    return bool(body["expires_at"] <= time.time())


def _unknown_model(body: dict[str, Any], param: str) -> bool:
    return body["models"][_index(param)] not in MODELS


def _unknown_provider(body: dict[str, Any], param: str) -> bool:
    field = param.split(".")[1].split("[")[0]
    return body["provider"][field][_index(param)] not in PROVIDERS


def _no_provider_left(body: dict[str, Any], param: str) -> bool:
    prefs = body["provider"]
    only, ignore = prefs.get("only"), prefs.get("ignore") or []
    return (only is not None and not PROVIDERS & set(only)) or set(ignore) >= PROVIDERS


def _best_of_refused(body: dict[str, Any], param: str) -> bool:
    """Below `n`; above it with `stream`; or above it with echoed logprobs, which the deployment
    (lacking `n`, so the router picks the best) cannot give the router to choose by."""
    n, best_of = body.get("n") or 1, body["best_of"]
    echoed_logprobs = body.get("echo") and body.get("logprobs") is not None
    return bool(best_of < n or (best_of > n and (body.get("stream") or echoed_logprobs)))


def _too_many_logprobs(body: dict[str, Any], param: str) -> bool:
    return bool(body["logprobs"] > MAX_LOGPROBS)


def _echo_refused(body: dict[str, Any], param: str) -> bool:
    """A token-id prompt echoed under a format the router checks (it would have to spell the ids)."""
    prompt, response_format = body["prompt"], body.get("response_format") or {}
    token_ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
    return token_ids and response_format.get("type") in CHECKED_FORMATS


def _tools_refused(body: dict[str, Any], param: str) -> bool:
    """The fake is a completions upstream: no tools, nor a conversation that holds calls."""
    messages = body.get("messages") or []
    return bool(body.get("tools")) or any(
        m.get("role") == "tool" or m.get("tool_calls") for m in messages
    )


def _unanswered_call(body: dict[str, Any], param: str) -> bool:
    """A tool message must answer a call of an earlier assistant message."""
    i = _index(param.split(".")[0])
    earlier = {
        call["id"]
        for m in body["messages"][:i]
        if m.get("role") == "assistant"
        for call in m.get("tool_calls") or []
    }
    return body["messages"][i]["tool_call_id"] not in earlier


def _image(body: dict[str, Any], param: str) -> bool:
    """Images go only to deployments that take them; the fake takes none."""
    i, j = (int(n) for n in re.findall(r"\[([0-9]+)\]", param)[:2])
    return bool(body["messages"][i]["content"][j].get("type") == "image_url")


def _message_refused(body: dict[str, Any], param: str) -> bool:
    if param.endswith(".tool_call_id"):
        return _unanswered_call(body, param)
    return ".content[" in param and _image(body, param)


def _reasoning(body: dict[str, Any], param: str) -> bool:
    return body.get("reasoning") is not None  # (the fake has no reasoning knob)


def _too_many_top_logprobs(body: dict[str, Any], param: str) -> bool:
    return bool(body["top_logprobs"] > MAX_LOGPROBS)


# (operationId, the refused field) -> whether the request broke the rule that field has.
_RULES: dict[tuple[str, str], Callable[[dict[str, Any], str], bool]] = {
    ("create-key", "expires_at"): _expired,
    ("create-key", "models"): _unknown_model,
    ("update-key", "models"): _unknown_model,
    ("create-completions", "provider.order"): _unknown_provider,
    ("create-completions", "provider.only"): _unknown_provider,
    ("create-completions", "provider.ignore"): _unknown_provider,
    ("create-completions", "provider"): _no_provider_left,
    ("create-completions", "best_of"): _best_of_refused,
    ("create-completions", "logprobs"): _too_many_logprobs,
    ("create-completions", "echo"): _echo_refused,
    ("create-chat-completion", "provider.order"): _unknown_provider,
    ("create-chat-completion", "provider.only"): _unknown_provider,
    ("create-chat-completion", "provider.ignore"): _unknown_provider,
    ("create-chat-completion", "provider"): _no_provider_left,
    ("create-chat-completion", "tools"): _tools_refused,
    ("create-chat-completion", "messages"): _message_refused,
    ("create-chat-completion", "reasoning"): _reasoning,
    ("create-chat-completion", "top_logprobs"): _too_many_top_logprobs,
}
