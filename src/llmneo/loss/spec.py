"""What the loss of a run is, besides the tensors: decided once from the config and the loaded vocabulary.

The training loop hands one `LossSpec` down (optimizer step → accumulation → micro-batch → fused loss)
instead of unpacking the same four values at every level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmneo.loss.divergences import KDSettings


@dataclass(frozen=True)
class LossSpec:
    """loss = (1 - kd_ratio)·CE + kd_ratio·KD over the response tokens, the student's logits cut to `vocab_size`."""

    vocab_size: int  # the student's real vocabulary: a padded head's extra rows are dropped
    kd_ratio: float  # the KD term's weight; 0 without a teacher signal
    settings: KDSettings  # the divergence and its temperature, beta and skew
    chunk_size: int  # kd_chunk_size: positions projected through the head at a time; 0: full logits (the reference)

    @classmethod
    def from_config(cls, config, vocab_size: int, has_teacher: bool) -> LossSpec:
        """The run's loss; without a teacher signal it is CE alone (kd_ratio 0, default settings)."""
        return cls(vocab_size=vocab_size, kd_ratio=config.kd_ratio if has_teacher else 0.0,
                   settings=KDSettings.from_config(config) if has_teacher else KDSettings(),
                   chunk_size=config.kd_chunk_size)

    def kd_only(self) -> LossSpec:
        """The loss of an on-policy step: on the student's own replies there are no labels to learn (GKD)."""
        return dataclasses.replace(self, kd_ratio=1.0)

    def combine(self, ce: torch.Tensor, kd: torch.Tensor | None) -> torch.Tensor:
        """(1 - kd_ratio)·ce + kd_ratio·kd; ce alone without a teacher's term."""
        return ce if kd is None else (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd
