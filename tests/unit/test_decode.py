"""A whole number written with a fraction is an integer (JSON Schema 2020-12, as the served document
says); any other float where an integer goes is refused, naming the field."""

from __future__ import annotations

import msgspec
import pytest

from llmrouter.api.accounts import KeySpec
from llmrouter.errors import InvalidRequest
from llmrouter.wire.decode import decode
from llmrouter.wire.validate import decode_completion_request


def test_whole_floats_are_integers_where_integers_go() -> None:
    params, prompts = decode_completion_request(
        b'{"prompt": [1.0, 2], "n": 2.0, "best_of": 3e0, "max_tokens": 1e2, "temperature": 1}'
    )
    assert (params.n, params.best_of, params.max_tokens, prompts) == (2, 3, 100, ((1, 2),))
    assert all(type(v) is int for v in (params.n, params.best_of, params.max_tokens))
    assert params.temperature == 1.0
    spec = decode(msgspec.json.Decoder(KeySpec), b'{"name": "k", "tpm": 630.0, "rpm": 7}')
    assert spec.tpm == 630 and type(spec.tpm) is int


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "n": 2.5}', "n"),
        (b'{"prompt": "x", "n": 2.0, "max_tokens": -1.0}', "max_tokens"),  # the second refusal
        (b'{"prompt": [1, 2.5]}', "prompt[1]"),
        (b'{"prompt": "x", "n": "2"}', "n"),  # a string stays a string
    ],
)
def test_other_floats_are_refused_naming_the_field(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        decode_completion_request(body)
    assert refused.value.param == param


def test_deep_nesting_after_a_float_is_a_400_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequest):
        decode_completion_request(b'{"prompt": "x", "n": 2.0, "metadata": ' + deep + b"}")
