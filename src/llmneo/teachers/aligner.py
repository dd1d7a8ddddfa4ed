"""How teacher positions meet student positions: the third seam, between the teacher signal and the loss.

An aligner asks the teacher signal for its rows and returns rows for exactly the student's response
positions, counting the positions it could align (the loss leaves the KD term of the others out):

    rows(teacher, batch, positions) -> rows   rows for the student's `positions` (bool [B, T])
    take_counts() -> (aligned, positions)     since the metrics last took them; None where all align

`IdentityAligner` serves teacher and student sharing one tokenizer (models.loading checks that): position t of
the teacher is position t of the student, and everything aligns.

`CrossTokenizerAligner` serves a teacher with another tokenizer (kd_cross_tokenizer). The batch carries the
teacher's own tokens of each conversation and, per student token, the teacher span a..b-1 covering the same
text (crosstok.offsets.TeacherSide, or crosstok.offsets.Retokenizer for generated replies). The teacher runs
on its own tokens, and only at the positions the spans need: a-1 (the first token's distribution) and a..b-2
(the continuation tokens' log-probs, summed into the span's `shift`). The result is span_rows.SpanRows. A
cross-tokenizer cache (`teacher.cross`) has done this already: it returns the first-token rows at the
student's positions and says which are aligned.
"""

from __future__ import annotations

from typing import Protocol

import torch

from llmneo.crosstok.span_rows import SpanRows
from llmneo.data.labels import targets_at
from llmneo.teachers.signal import TeacherSignal


class Aligner(Protocol):
    crosses: bool  # True: teacher and student tokenize differently (teacher scores cannot compare token by token)

    def rows(self, teacher: TeacherSignal, batch: dict, positions: torch.Tensor): ...

    def take_counts(self) -> tuple[int, int] | None: ...


class IdentityAligner:
    """Same tokenizer on both sides: the teacher's rows already sit on the student's positions."""

    crosses = False

    def rows(self, teacher: TeacherSignal, batch: dict, positions: torch.Tensor):
        return teacher.rows(batch, positions)

    def take_counts(self) -> None:
        """Nothing to count: every position aligns (the metrics then carry no kd_aligned_fraction)."""
        return None


class CrossTokenizerAligner:
    """A teacher with another tokenizer: SpanRows at the student's positions, over the vocabulary map `vocab`.
    `unaligned_ce` (kd_unaligned: ce): an unaligned position of a row whose replies are the data's takes its CE
    as its KD term, so it trains on full CE; the student's own replies (`reply_is_data` false) never do."""

    crosses = True

    def __init__(self, vocab, unaligned_ce: bool = True):
        self.vocab, self.unaligned_ce = vocab, unaligned_ce
        self.aligned = self.positions = 0

    def take_counts(self) -> tuple[int, int]:
        counts = (self.aligned, self.positions)
        self.aligned = self.positions = 0
        return counts

    def rows(self, teacher: TeacherSignal, batch: dict, positions: torch.Tensor) -> SpanRows:
        if teacher.cross:  # a cross-tokenizer cache: rows and alignment stored per student position
            first = teacher.rows(batch, positions)
            aligned = teacher.aligned(batch, positions)
            shift = torch.zeros(aligned.shape[0], device=aligned.device)
        else:
            first, shift, aligned = teacher_spans(teacher, batch, positions)
        self.aligned += int(aligned.sum())
        self.positions += int(aligned.numel())
        fallback = torch.zeros_like(aligned)
        if self.unaligned_ce:
            data_rows = batch.get("reply_is_data", torch.ones(positions.shape[0], dtype=torch.bool))
            fallback = ~aligned & data_rows.to(positions.device)[positions.nonzero()[:, 0]]
        return SpanRows(first if bool(aligned.any()) else None, shift, aligned, self.vocab,
                        targets=targets_at(batch["labels"], positions), fallback=fallback)


@torch.no_grad()
def teacher_spans(teacher: TeacherSignal, batch: dict, positions: torch.Tensor):
    """(first-token rows | None, shift, aligned) per student position, from the teacher run on its own tokens
    (the batch's teacher fields); `llmneo cache` stores what this returns, as top-k rows."""
    # position p predicts token p+1: its span is token p+1's
    start = torch.full_like(batch["teacher_start"], -1)
    end = torch.full_like(start, -1)
    start[:, :-1], end[:, :-1] = batch["teacher_start"][:, 1:], batch["teacher_end"][:, 1:]
    row = positions.nonzero()[:, 0]  # (N,) the batch row of each position
    a, b = start[positions], end[positions]  # (N,)
    aligned = a >= 1  # a span at token 0 has no position that predicts it
    teacher_ids = batch["teacher_input_ids"]
    needed = torch.zeros_like(teacher_ids, dtype=torch.bool)  # (B, T_teacher)
    who = aligned.nonzero().squeeze(-1)  # (M,) aligned positions
    needed[row[who], a[who] - 1] = True
    extra = (b[who] - a[who] - 1).clamp(min=0)  # continuation tokens per span
    owner = torch.repeat_interleave(torch.arange(who.numel(), device=who.device), extra)  # (K,)
    first_of_owner = torch.cumsum(extra, 0) - extra
    token = a[who][owner] + 1 + (torch.arange(owner.numel(), device=owner.device) - first_of_owner[owner])
    owner_row = row[who][owner]
    needed[owner_row, token - 1] = True
    rows = teacher.rows({"input_ids": teacher_ids, "attention_mask": batch["teacher_attention_mask"]}, needed)
    index = (torch.cumsum(needed.flatten(), 0) - 1).view_as(needed)  # (B, T_teacher): row of each needed one
    first_index = torch.zeros_like(a)
    first_index[who] = index[row[who], a[who] - 1]
    shift = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    if owner.numel():
        continuation = rows.take(index[owner_row, token - 1]).sampled(teacher_ids[owner_row, token]).logprobs
        shift.index_add_(0, who[owner], continuation.float())
    return (rows.take(first_index) if who.numel() else None), shift, aligned


def choose(vocab=None, device=None, unaligned: str = "ce") -> Aligner:
    """The run's aligner, chosen once: cross-tokenizer when the run has a vocabulary map (the teacher's tokenizer
    differs, or kd_cross_tokenizer: true), else the identity. `unaligned`: kd_unaligned."""
    if vocab is None:
        return IdentityAligner()
    return CrossTokenizerAligner(vocab.to(device or "cpu"), unaligned_ce=unaligned == "ce")
