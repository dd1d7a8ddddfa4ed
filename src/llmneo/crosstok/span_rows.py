"""Cross-tokenizer teacher rows: a teacher with another tokenizer, met at the student's response positions.

`SpanRows` is the row type `teachers.aligner.CrossTokenizerAligner` gives the loss, from a live teacher or a
cross-tokenizer cache. It speaks the same interface as the rows in `loss.rows` (`len`, slicing,
`check_vocab`, `divergence`, `closed_form`, `sampled`), and scores with the GOLD hybrid and ULD losses of
`crosstok.vocab`; it lives here so that loss/ never imports crosstok/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmneo.crosstok.vocab import VocabMap, hybrid_divergence, hybrid_fkl_grad
from llmneo.errors import LlmneoError
from llmneo.loss.divergences import KDSettings, token_cross_entropy
from llmneo.loss.rows import DenseRows, LogitRows, SampledRows, SparseRows


@dataclass
class SpanRows:
    """A teacher with another tokenizer, met at the student's N positions (aligner.CrossTokenizerAligner):
    for each aligned position the teacher's distribution of its span's first token over the *teacher's*
    vocabulary (`first`: dense, logit or top-k rows) and the log-prob of the span's continuation (`shift`).
    The divergence is vocab.hybrid_divergence; an unaligned position adds 0, or its CE where `fallback`."""

    first: DenseRows | LogitRows | SparseRows | None  # one row per position (any row where unaligned); None: none
    shift: torch.Tensor  # (N,)
    aligned: torch.Tensor  # (N,) bool
    vocab: VocabMap
    targets: torch.Tensor | None = None  # (N,) the positions' targets, for `fallback`
    fallback: torch.Tensor | None = None  # (N,) bool: unaligned positions whose KD term is their CE (kd_unaligned)

    def __len__(self) -> int:
        return self.aligned.shape[0]

    def __getitem__(self, rows: slice) -> "SpanRows":
        first = None if self.first is None or not bool(self.aligned[rows].any()) else self.first[rows]
        return SpanRows(first, self.shift[rows], self.aligned[rows], self.vocab,
                        None if self.targets is None else self.targets[rows],
                        None if self.fallback is None else self.fallback[rows])

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab.student_only.numel() != vocab_size:
            raise LlmneoError(f"the cross-tokenizer vocabulary map is for a student vocabulary of "
                              f"{self.vocab.student_only.numel()} tokens, but the student has {vocab_size}")

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        values = student_logits.float().sum(-1) * 0.0  # (C,): zeros still attached to the student's graph
        if self.fallback is not None and bool(self.fallback.any()):
            falls = self.fallback.nonzero().squeeze(-1)
            values = values.index_put((falls,), token_cross_entropy(student_logits[falls], self.targets[falls]))
        if self.first is None:
            return values
        index = self.aligned.nonzero().squeeze(-1)
        first = self.first[0:len(self)] if isinstance(self.first, DenseRows) else self.first
        teacher = first.take(index)
        teacher = teacher.logits if isinstance(teacher, LogitRows) else teacher
        part = hybrid_divergence(student_logits[index], teacher, self.shift[index], self.vocab, settings)
        return values.index_put((index,), part)

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        """fkl: vocab.hybrid_fkl_grad (dense or top-k teacher rows); other kinds: autograd (None)."""
        if settings.kind != "fkl":
            return None
        first = self.first[0:len(self)] if isinstance(self.first, DenseRows) else self.first
        teacher = first.logits if isinstance(first, LogitRows) else first  # logits, SparseRows or None
        return hybrid_fkl_grad(logits, targets, teacher, self.shift, self.aligned, self.vocab, kd_ratio,
                               settings.temperature, self.fallback)

    def sampled(self, tokens: torch.Tensor) -> SampledRows:
        raise LlmneoError("kd_loss: sampled_rkl needs the teacher's log-prob of the student's own tokens, which a "
                          "teacher with another tokenizer does not have; use rkl (or fkl, jsd ...) instead")
