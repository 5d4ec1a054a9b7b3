"""The local engine's sampling means what the Completions API says: OpenAI's frequency and presence
penalties (not llama.cpp's repeat penalty), logit_bias added to the logits, temperature and top_p."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrouter.providers._llama_engine import Engine, Sampling

VOCAB = 8


@pytest.fixture
def engine() -> Engine:
    return Engine("unit", Path("unused.gguf"), n_ctx=None, n_threads=1, max_queue=1)  # never started


def greedy(engine: Engine, logits: list[float], counts: dict[int, int], **sampling: float) -> int:
    s = Sampling(max_tokens=1, temperature=0.0, **sampling)  # type: ignore[arg-type]
    x = np.array(logits, dtype=np.float32)
    return engine._sample(x, s, counts, np.random.default_rng(0), None)


def test_frequency_penalty_grows_with_each_occurrence(engine: Engine) -> None:
    # token 0 leads token 1 by 1.0; it has occurred twice
    logits = [3.0, 2.0] + [0.0] * (VOCAB - 2)
    assert greedy(engine, logits, {0: 2}, frequency_penalty=0.49) == 0  # 3 - 0.98 > 2
    assert greedy(engine, logits, {0: 2}, frequency_penalty=0.51) == 1  # 3 - 1.02 < 2
    assert greedy(engine, logits, {0: 1}, frequency_penalty=0.99) == 0  # once: 3 - 0.99 > 2


def test_presence_penalty_is_paid_once_however_often(engine: Engine) -> None:
    logits = [3.0, 2.0] + [0.0] * (VOCAB - 2)
    assert greedy(engine, logits, {0: 5}, presence_penalty=0.99) == 0  # 3 - 0.99, not 3 - 4.95
    assert greedy(engine, logits, {0: 5}, presence_penalty=1.01) == 1


def test_both_penalties_add_and_negative_values_reward_repeats(engine: Engine) -> None:
    logits = [2.0, 3.0] + [0.0] * (VOCAB - 2)
    # logit[t] -= count * frequency + presence: 2 - (3 * -0.2 + -0.5) = 3.1 > 3
    assert greedy(engine, logits, {0: 3}, frequency_penalty=-0.2, presence_penalty=-0.5) == 0
    assert greedy(engine, logits, {0: 3}, frequency_penalty=-0.2, presence_penalty=-0.3) == 1


def test_the_penalties_leave_tokens_not_yet_generated_alone(engine: Engine) -> None:
    logits = [3.0, 2.0] + [0.0] * (VOCAB - 2)
    assert greedy(engine, logits, {1: 10}, frequency_penalty=2.0, presence_penalty=2.0) == 0


def test_logit_bias_adds_to_the_logits(engine: Engine) -> None:
    logits = [3.0, 2.0] + [0.0] * (VOCAB - 2)
    s = Sampling(max_tokens=1, temperature=0.0, logit_bias={1: 1.5})
    assert engine._sample(np.array(logits, dtype=np.float32), s, {}, np.random.default_rng(0), None) == 1
    banned = Sampling(max_tokens=1, temperature=1.0, logit_bias={0: -100.0, 1: -100.0})
    rng = np.random.default_rng(1)
    draws = {
        engine._sample(np.array(logits, dtype=np.float32), banned, {}, rng, None) for _ in range(300)
    }
    assert not draws & {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass(engine: Engine) -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)) + 1e-12
    logits = np.log(probs).astype(np.float32)
    s = Sampling(max_tokens=1, temperature=1.0, top_p=0.75)
    rng = np.random.default_rng(2)
    draws = [engine._sample(logits, s, {}, rng, None) for _ in range(2000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 is outside the nucleus
    assert 0.55 < draws.count(0) / len(draws) < 0.70  # renormalised: 0.5 / 0.8 = 0.625
