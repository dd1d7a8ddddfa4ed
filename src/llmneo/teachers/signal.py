"""The teacher seam: what the training loop may ask of a teacher signal, and nothing else.

Every teacher (live, cached, served, mixture, routed, cross-tokenizer) subclasses `TeacherSignal`, so the
defaults below are real no-ops and the loop never asks `hasattr`: a lone teacher scores every row of a
batch (`groups`), keeps no per-teacher sums, prefetches nothing and has nothing to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Group:
    """Some rows of a micro-batch and the teacher that scores them."""

    signal: TeacherSignal | None  # None: no teacher (CE alone)
    rows: torch.Tensor | None = None  # bool [B]: the rows this teacher scores; None: every row
    index: int | None = None  # this teacher's place among several (its KD sum); None for a lone teacher


def sub_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The rows `rows` (bool [B]) of every field of `batch`: what one group's teacher is asked about."""
    return {key: value[rows] for key, value in batch.items()}


class TeacherSignal(Protocol):
    """The teacher's rows (loss.rows) at the response positions of a batch, and the loop's few other needs."""

    model: torch.nn.Module | None = None  # the in-process teacher model (held-out teacher perplexity), else None
    cross: bool = False  # True: rows are stored per student position already (a cross-tokenizer cache)
    prefetches: bool = False  # True: `prefetch` starts real work (a served teacher), so steps are read a step ahead

    def rows(self, batch: dict, positions: torch.Tensor):
        """The teacher's signal at `positions` (bool [B, T]) of `batch`: one of loss.rows' types."""
        ...

    def groups(self, batch: dict) -> list[Group]:
        """Who scores which rows of `batch`: one group of every row, unless the teacher routes rows."""
        return [Group(self)]

    def add(self, group: Group, kd_sum: torch.Tensor, positions: int) -> None:
        """Note a group's KD sum over its `positions` (several teachers report each one's in the metrics)."""

    def take_sums(self) -> torch.Tensor | None:
        """Each teacher's (KD sum, positions) since the last call, [n_teachers, 2] float64; None for one teacher."""
        return None

    def prefetch(self, batch: dict, positions: torch.Tensor) -> None:
        """Start fetching the rows of a batch that comes later (a served teacher); nothing otherwise."""

    def close(self) -> None:
        """Release what the signal holds open (a served teacher's request threads)."""
