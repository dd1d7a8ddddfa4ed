"""Which steps are on-policy: with probability lmbda, "drawn from seed and the step number" (README, lmbda in
docs/config.md), so every rank draws the same and a resumed run makes the same draws.

The expected draws are computed here from the formula itself, not from the function under test: a
random.Random seeded by the text "llmneo-lmbda-{seed}-{step}". It is pinned, not only its properties,
because a checkpoint written by an earlier version resumes with the draws that version made. Python's and
torch's global RNGs are disturbed between steps (as dropout, sampling and data loading do) and must change
nothing; a draw must not disturb them either.
"""

from __future__ import annotations

import random

import pytest
import torch

from llmneo.models.generate import Generator
from llmneo.train.steps import RolloutSteps, Step, on_policy_draw

SEED, LMBDA = 7, 0.3


def formula(seed: int, step: int, lmbda: float) -> bool:
    return lmbda > 0 and random.Random(f"llmneo-lmbda-{seed}-{step}").random() < lmbda


class OneBatch:
    """Dataset steps of one micro-batch: a prompt of three tokens and a two-token reply."""

    def next_step(self) -> Step:
        return Step([{"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, -100, -100, 8, 9]]),
                      "attention_mask": torch.ones(1, 5, dtype=torch.long)}])


class FixedReply(Generator):
    """A student that always replies with the same two tokens and draws from no RNG."""

    def generate(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.tensor([3, 4]) for _ in prompts]


def rollout_steps(step: int = 0) -> RolloutSteps:
    return RolloutSteps(OneBatch(), FixedReply(), None, LMBDA, SEED, pad_token_id=0, device="cpu", step=step)


def disturb(i: int) -> None:
    """What the rest of a training step may do to the global RNGs."""
    random.seed(1000 + i)
    random.random()
    torch.manual_seed(2000 + i)
    torch.rand(7)


def test_the_formula_is_what_the_draw_gives_at_every_probability():
    for seed in (0, 1, SEED, 12345):
        for lmbda in (0.0, 1e-9, 0.3, 0.5, 0.999, 1.0):
            assert [on_policy_draw(seed, s, lmbda) for s in range(1, 101)] == [
                formula(seed, s, lmbda) for s in range(1, 101)], (seed, lmbda)
    assert not any(on_policy_draw(SEED, s, 0.0) for s in range(1, 101))
    assert all(on_policy_draw(SEED, s, 1.0) for s in range(1, 101))
    share = sum(on_policy_draw(SEED, s, LMBDA) for s in range(1, 4001)) / 4000
    assert share == pytest.approx(LMBDA, abs=0.03)
    # another seed draws other steps
    assert [on_policy_draw(0, s, 0.5) for s in range(1, 41)] != [on_policy_draw(1, s, 0.5) for s in range(1, 41)]


def test_rollout_steps_follow_the_formula_whatever_the_global_rngs_do():
    source, kinds = rollout_steps(), []
    for i in range(1, 41):
        disturb(i)
        python_state, torch_state = random.getstate(), torch.get_rng_state()
        step = source.next_step()
        assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state), i
        kinds.append(step.on_policy)
        if step.on_policy:  # the student's reply replaced the dataset's
            assert step.micro[0]["input_ids"].tolist() == [[5, 6, 7, 3, 4]] and step.replies == "student"
        else:
            assert step.micro[0]["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and step.replies == "dataset"
    assert kinds == [formula(SEED, s, LMBDA) for s in range(1, 41)]
    assert True in kinds and False in kinds


def test_a_resumed_source_draws_the_steps_after_its_checkpoint():
    for start in (0, 1, 17):
        source = rollout_steps(step=start)
        drawn = []
        for i in range(12):
            disturb(start * 100 + i)  # the resumed run's global RNGs are not the uninterrupted run's
            drawn.append(source.next_step().on_policy)
        assert drawn == [formula(SEED, s, LMBDA) for s in range(start + 1, start + 13)], start
