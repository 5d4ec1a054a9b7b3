"""What an upstream says comes back without the secrets llmrouter sent it."""

from __future__ import annotations

import pytest

from llmrouter.obs.redact import Redactor

KEY = "sk-SECRETKEY-abcdef123456"
BASIC = "Basic dXNlcjpwYXNzd29yZDEyMw=="


@pytest.mark.parametrize(
    "said",
    [
        f"proxy saw: authorization: Bearer {KEY}",  # verbatim
        f"bad key {KEY.lower()}",  # in another case
        f"bad key {KEY.upper()}!",
        f"authorization: Bearer {KEY[:15]}...",  # cut short
        f"authorization: {BASIC}",  # a configured header value, whole
        "credentials dXNlcjpwYXNzd29yZDEyMw== are not valid",  # its credential alone
        f'{{"message": "key={KEY}"}}',  # inside JSON
    ],
)
def test_every_appearance_of_a_secret_is_redacted(said: str) -> None:
    redact = Redactor([KEY, BASIC, "application/json"])
    out = redact(said)
    assert "[redacted]" in out
    for secret in (KEY, "dXNlcjpwYXNzd29yZDEyMw=="):
        assert secret[:12].lower() not in out.lower(), out


def test_what_is_not_a_secret_is_left_alone() -> None:
    redact = Redactor([KEY, "1", "json", None, ""])  # values under 8 characters are not secrets
    assert redact("model gpt-1 answered 1 json error") == "model gpt-1 answered 1 json error"
    assert Redactor([])("anything") == "anything"


def test_a_secret_quoted_as_json_or_in_a_url_is_redacted() -> None:
    secret = "Zm9vYmFy/Ojk5OTk5+OTk5OTk5OTk5OTk5"  # base64 holds `/` and `+`
    redact = Redactor([f"Basic {secret}"])
    for said in (
        '{"error": "refused credential Zm9vYmFy\\/Ojk5OTk5+OTk5OTk5OTk5OTk5"}',  # JSON's `\/`
        "GET /x?auth=Zm9vYmFy%2FOjk5OTk5%2BOTk5OTk5OTk5OTk5",  # percent-encoded
    ):
        out = redact(said)
        assert "[redacted]" in out and "Ojk5OTk5" not in out, out


def test_the_quoted_forms_keep_the_rules_of_the_plain_one() -> None:
    redact = Redactor(["https://myapp.example.com", "a/b c"])  # a referer; a value too short
    other = "redirect to https%3A%2F%2Fdocs.other.org%2Fpath failed"
    assert redact(other) == other  # only a quote of the secret's own start is one
    assert redact("value a/b c and a%2Fb%20c") == "value a/b c and a%2Fb%20c"
    assert redact("to https%3A%2F%2Fmyapp.example.com/x") == "to [redacted]"
