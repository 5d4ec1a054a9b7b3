"""The error tree's policy: each class says what comes next and whom it blames."""

from __future__ import annotations

import pytest

from llmrouter import errors
from llmrouter.errors import LlmrouterError, Next


def _tree(cls: type[LlmrouterError]) -> list[type[LlmrouterError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_tree(sub))
    return found


TREE = _tree(LlmrouterError)

# What the executor does after each class, written out once more on purpose: a change to the
# policy shows up here as a deliberate edit.
EXPECTED = {
    "LlmrouterError": (Next.STOP, False),
    "InvalidRequest": (Next.STOP, False),
    "UnsupportedParameter": (Next.STOP, False),
    "ContextLengthExceeded": (Next.OTHER_MODEL, False),
    "ServiceUnavailable": (Next.ANY, False),
    "ProviderError": (Next.STOP, False),
    "UpstreamRejected": (Next.OTHER_DEPLOYMENT, False),
    "UpstreamAuthFailed": (Next.ANY, True),
    "UpstreamRefused": (Next.OTHER_DEPLOYMENT, False),
    "UpstreamRateLimited": (Next.ANY, False),
    "UpstreamUnavailable": (Next.ANY, True),
    "InvalidOutput": (Next.SAME_AGAIN, False),
    "UpstreamTimeout": (Next.ANY, True),
    "DeadlineExceeded": (Next.STOP, False),
}


def test_every_class_is_in_the_module_and_the_table() -> None:
    public = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    names = {cls.__name__ for cls in TREE}
    assert names <= public
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_policy_is_a_property_of_the_class(cls: type[LlmrouterError]) -> None:
    error = cls("x") if cls is not errors.MethodNotAllowed else cls("x", allow=["GET"])
    expected = EXPECTED.get(cls.__name__, (Next.STOP, False))
    assert (error.next, error.blames_deployment) == expected
    assert error.retryable == (error.next is not Next.STOP)
    if error.blames_deployment:  # only an upstream can be unwell
        assert isinstance(error, errors.ProviderError) and error.retryable
