"""Teacher rows: the teacher's signal at a batch's N response positions, as the loss consumes it.

Teachers produce rows (teachers/) and the loss consumes them (chunked.py); each row type knows how to
compute its own divergence against a chunk of student logits, so the loss never asks which kind it holds.
Every type supports `len`, slicing by a position range (`rows[a:b]`, chunk by chunk), and:

    check_vocab(vocab_size)                       refuse a teacher over another vocabulary (one line)
    divergence(student_logits, settings) -> (C,)  per position, T² included, differentiable
    closed_form(logits, targets, kd_ratio, settings) -> (ce_sum, kd_sum, grad) | None
                                                  CE + KD and d/d logits without autograd, where one exists
    sampled(tokens) -> SampledRows                the teacher's log-prob of `tokens` (N,), or a one-line refusal

- `DenseRows`: a live teacher's final hidden states and its output head; a slice is projected then
  (never [B, T, V] logits) and becomes `LogitRows`.
- `LogitRows`: teacher logits already computed (sharded engines, where the head is whole only inside
  forward; or any dense logits).
- `SparseRows`: an offline top-k cache: top-k ids and log-probs (T = 1) and the log of the tail mass.
- `SampledRows`: the teacher's log-prob of one sampled token per position, all that `kd_loss:
  sampled_rkl` needs (on-policy steps; what a served teacher returns). Dense and logit rows give them with
  `sampled(tokens)`, one slice at a time.
- `MixtureRows`: several teachers' dense or logit rows mixed in probability (teacher_weights); a slice
  becomes `MixedLogitRows`, the mixture as logits, which also adds each teacher's own divergence to a sink
  for the metrics.
A teacher with another tokenizer gives `crosstok.span_rows.SpanRows`, which has the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmneo.errors import LlmneoError
from llmneo.loss import closed_form
from llmneo.loss.divergences import KDSettings, sampled_reverse_kl, sparse_token_divergence, token_divergence


@dataclass
class LogitRows:
    """Teacher logits for the response positions, (N, V) over the real vocabulary."""

    logits: torch.Tensor  # (N, V)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, rows: slice) -> "LogitRows":
        return LogitRows(self.logits[rows])

    def check_vocab(self, vocab_size: int) -> None:
        if self.logits.shape[-1] != vocab_size:
            raise LlmneoError(f"the teacher's logits have {self.logits.shape[-1]} vocabulary columns but the "
                              f"student's vocabulary has {vocab_size}; slice the teacher's logits to the shared "
                              f"vocabulary")

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        self.check_vocab(student_logits.shape[-1])
        return token_divergence(student_logits, self.logits, **settings.keywords())

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        self.check_vocab(logits.shape[-1])
        if settings.kind != "fkl":
            return None
        return closed_form.fkl_grad(logits, targets, self.logits, kd_ratio, settings.temperature)

    def take(self, index: torch.Tensor) -> "LogitRows":
        return LogitRows(self.logits[index])

    def sampled(self, tokens: torch.Tensor) -> "SampledRows":
        """The teacher's log-prob (T = 1) of `tokens` (N,), one per position."""
        logprobs = torch.log_softmax(self.logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return SampledRows(tokens, logprobs)


@dataclass
class DenseRows:
    """A live teacher's hidden states at the response positions; logits are computed per slice."""

    hidden: torch.Tensor  # (N, H_teacher)
    head: object  # hidden → logits (N, V_padded)
    vocab_size: int  # the real vocabulary: padded head rows are dropped

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @torch.no_grad()
    def __getitem__(self, rows: slice) -> LogitRows:
        return LogitRows(self.head(self.hidden[rows])[:, : self.vocab_size])  # (C, V)

    def check_vocab(self, vocab_size: int) -> None:
        """Nothing to check before projecting: each projected slice (LogitRows) checks its own columns."""

    def take(self, index: torch.Tensor) -> "DenseRows":
        return DenseRows(self.hidden[index], self.head, self.vocab_size)

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        return self[0:len(self)].divergence(student_logits, settings)

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        return self[0:len(self)].closed_form(logits, targets, kd_ratio, settings)

    @torch.no_grad()
    def sampled(self, tokens: torch.Tensor, chunk_size: int = 256) -> "SampledRows":
        """The teacher's log-prob of `tokens` (N,), projecting `chunk_size` positions at a time."""
        parts = [self[a:a + chunk_size].sampled(tokens[a:a + chunk_size]).logprobs
                 for a in range(0, len(self), chunk_size)]
        return SampledRows(tokens, torch.cat(parts) if parts else tokens.new_zeros(0, dtype=torch.float32))


@dataclass
class SparseRows:
    """A sparse teacher distribution per position: top-k ids and log-probs plus the tail's log-mass."""

    ids: torch.Tensor  # (N, k) int64
    logprobs: torch.Tensor  # (N, k)
    tail: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> "SparseRows":
        return SparseRows(self.ids[rows], self.logprobs[rows], self.tail[rows])

    def take(self, index: torch.Tensor) -> "SparseRows":
        return SparseRows(self.ids[index], self.logprobs[index], self.tail[index])

    def to(self, device: torch.device) -> "SparseRows":
        return SparseRows(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    def check_vocab(self, vocab_size: int) -> None:
        """The top-k ids must lie in [0, vocab_size): one host sync, so the loss calls it once, not per chunk."""
        if self.ids.numel() == 0:
            return
        low, high = (int(x) for x in torch.aminmax(self.ids))
        if low < 0 or high >= vocab_size:
            raise LlmneoError(f"the teacher's top-k ids span {low}..{high} but the student's vocabulary has "
                              f"{vocab_size} tokens (ids 0..{vocab_size - 1}); rebuild the teacher cache with "
                              f"a teacher that shares the student's tokenizer")

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        return sparse_token_divergence(student_logits, self.ids, self.logprobs, self.tail, **settings.keywords())

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        if settings.kind != "fkl" or settings.temperature != 1.0:
            return None
        return closed_form.sparse_fkl_grad(logits, targets, self, kd_ratio)

    def sampled(self, tokens: torch.Tensor) -> "SampledRows":
        raise LlmneoError("a teacher cache holds no log-prob for newly sampled tokens; sampled_rkl needs a live "
                          "teacher (teacher_model_name_or_path)")


@dataclass
class SampledRows:
    """The teacher's log-prob (T = 1) of one sampled token per position: `kd_loss: sampled_rkl`'s signal."""

    ids: torch.Tensor  # (N,) the sampled tokens, the student's targets at these positions
    logprobs: torch.Tensor  # (N,) float

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> "SampledRows":
        return SampledRows(self.ids[rows], self.logprobs[rows])

    def check_vocab(self, vocab_size: int) -> None:
        if self.ids.numel() and int(self.ids.max()) >= vocab_size:
            raise LlmneoError(f"a sampled token id ({int(self.ids.max())}) lies outside the student's vocabulary of "
                              f"{vocab_size}; teacher and student must share the tokenizer")

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        if settings.kind != "sampled_rkl":
            raise LlmneoError(f"kd_loss: {settings.kind} needs the teacher's whole distribution, but these rows hold "
                              f"only the log-prob of each sampled token; use kd_loss: sampled_rkl")
        return sampled_reverse_kl(student_logits, self.ids, self.logprobs)

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        return None  # autograd on the chunk's logits: the estimator is cheap per position

    def sampled(self, tokens: torch.Tensor) -> "SampledRows":
        """Already sampled rows (a served teacher's): they must be for `tokens`."""
        if not torch.equal(self.ids, tokens.to(self.ids.device)):
            raise LlmneoError("the teacher's sampled-token log-probs are for other tokens than the batch's targets")
        return self


class MixedLogitRows(LogitRows):
    """A slice of MixtureRows: the mixture's log-probs as logits, plus each teacher's own logits, so that every
    divergence against a student chunk also adds each teacher's divergence (no gradient) to `sink`."""

    def __init__(self, logits: torch.Tensor, components: list[torch.Tensor], sink: torch.Tensor):
        super().__init__(logits)
        self.components, self.sink = components, sink

    def _record(self, student_logits: torch.Tensor, settings: KDSettings) -> None:
        with torch.no_grad():
            for i, logits in enumerate(self.components):
                self.sink[i, 0] += token_divergence(student_logits.detach(), logits, **settings.keywords()).sum()
                self.sink[i, 1] += logits.shape[0]

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        self._record(student_logits, settings)
        return super().divergence(student_logits, settings)

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        found = super().closed_form(logits, targets, kd_ratio, settings)
        if found is not None:  # else the caller falls back to `divergence`, which records
            self._record(logits, settings)
        return found


@dataclass
class MixtureRows:
    """Several teachers' rows mixed in probability: p = Σ w_i p_i, computed slice by slice from each teacher's
    dense or logit rows (never more than a slice of [N, V] per teacher), as log-probs. `sink` (teachers × 2)
    collects each teacher's own divergence sum and position count, for the metrics."""

    parts: list  # DenseRows | LogitRows, one per teacher, for the same N positions
    log_weights: torch.Tensor  # (teachers,), log w_i (-inf for a weight of 0)
    sink: torch.Tensor  # (teachers, 2)

    def __len__(self) -> int:
        return len(self.parts[0])

    @torch.no_grad()
    def __getitem__(self, rows: slice) -> MixedLogitRows:
        components = [part[rows].logits if isinstance(part, DenseRows) else part.logits[rows] for part in self.parts]
        logp = torch.stack([torch.log_softmax(c.float(), dim=-1) for c in components])  # (teachers, C, V)
        weights = self.log_weights.to(logp.device)[:, None, None]
        mixed = torch.logsumexp(torch.where(torch.isneginf(weights), -torch.inf, logp + weights), dim=0)
        return MixedLogitRows(mixed, components, self.sink)

    def check_vocab(self, vocab_size: int) -> None:
        """Each sliced part checks its own columns (as DenseRows)."""

    def divergence(self, student_logits: torch.Tensor, settings: KDSettings) -> torch.Tensor:
        return self[0:len(self)].divergence(student_logits, settings)

    def closed_form(self, logits, targets, kd_ratio: float, settings: KDSettings):
        return self[0:len(self)].closed_form(logits, targets, kd_ratio, settings)

    def sampled(self, tokens: torch.Tensor) -> SampledRows:
        return self[0:len(self)].sampled(tokens)
