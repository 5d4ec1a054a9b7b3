"""The tokenizer endpoints on the wire, as vLLM serves them: `POST /tokenize`, `POST /detokenize`
and `GET /tokenizer_info` (lm-evaluation-harness's `tokenizer_backend=remote` reads all three).

`model` may be left out, as vLLM's clients (lm-eval among them) do: the router's default model then.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmrouter.wire.completions import ModelName, TokenId

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "TokenizeRequest",
    "TokenizeResponse",
    "detokenize_decoder",
    "tokenize_decoder",
]


class TokenizeRequest(Struct, forbid_unknown_fields=True):
    prompt: str
    model: Annotated[ModelName, Meta(min_length=1)] | UnsetType = UNSET
    # The tokens the model's tokenizer puts around a text (a document start), as a /completions
    # string prompt gets them.
    add_special_tokens: bool = True
    return_token_strs: bool = False  # each token's text too, control tokens spelled out


class TokenizeResponse(Struct):
    count: int
    max_model_len: int | None  # the model's context length as the router knows it
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, forbid_unknown_fields=True):
    tokens: list[TokenId]
    model: Annotated[ModelName, Meta(min_length=1)] | UnsetType = UNSET


class DetokenizeResponse(Struct):
    prompt: str


tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)

# /tokenizer_info's answer is a map (vLLM's is the tokenizer's configuration, open-ended).
TokenizerInfo = dict[str, Any]
