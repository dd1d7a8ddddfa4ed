"""How teacher positions meet student positions: the third seam, between the teacher signal and the loss.

An aligner maps the teacher's rows (rows.py) onto the student's response positions before the loss, and
counts the positions it could not align (the loss then leaves their KD term out):

    align(rows, batch, positions) -> rows    rows for exactly the student's `positions` (bool [B, T])
    unaligned: int                           positions not aligned so far in this run

`IdentityAligner` serves teacher and student sharing one tokenizer (models.py checks that): position t of
the teacher is position t of the student, and everything aligns. A cross-tokenizer aligner would map
spans of teacher tokens onto student tokens here; `choose` is where it would be picked from the config.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Aligner(Protocol):
    unaligned: int

    def align(self, rows, batch: dict, positions: torch.Tensor): ...


class IdentityAligner:
    """Same tokenizer on both sides: the teacher's rows already sit on the student's positions."""

    unaligned = 0

    def align(self, rows, batch: dict, positions: torch.Tensor):
        return rows


def choose(config) -> Aligner:
    """The run's aligner, chosen once from the config (one shared tokenizer: the only case so far)."""
    return IdentityAligner()
