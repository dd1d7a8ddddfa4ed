"""Distillation losses as small pure functions of logits: divergences between teacher and student, and CE.

Every function takes logits shaped `[..., V]` and works in float32 at least (bf16/fp16 logits are upcast;
float64 stays float64 so that `torch.autograd.gradcheck` can check the very same code). The training loop
wants per-token *sums* it can normalise itself over a whole optimizer step (accumulation micro-batches and
ranks), so the per-position forms `token_divergence` and `token_cross_entropy` are public, and
`divergence` is only their masked mean.

Conventions that keep padded or masked vocabularies (logits of -inf) finite, values and gradients alike:
  * 0 · log 0 = 0 inside every KL, so a token that has no mass under the left distribution adds nothing;
  * masking is applied to the *inputs* of the unsafe branch, not just its output, because `torch.where`
    still back-propagates through the branch it discards and 0 · inf there would be NaN.
A divergence that is truly infinite stays infinite: e.g. `rkl` when the student puts mass on a token the
teacher rules out (-inf), or `fkl` the other way round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmneo.config.checks import DIVERGENCES as KINDS  # divergences over the teacher's whole distribution
from llmneo.config.checks import SAMPLED_KD_LOSSES as SAMPLED_KINDS  # estimators scored on sampled tokens
from llmneo.data.labels import IGNORE_INDEX  # the label of prompt and padding positions, as in HF
from llmneo.errors import LlmneoError


@dataclass(frozen=True)
class KDSettings:
    """Which divergence KD uses and its parameters, validated once when built (see `token_divergence`)."""

    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1

    def __post_init__(self):
        check_settings(self.kind, self.temperature, self.beta, self.skew, sampled=True)

    @classmethod
    def from_config(cls, config) -> "KDSettings":
        return cls(config.kd_loss, config.kd_temperature, config.kd_beta, config.kd_skew)

    def keywords(self) -> dict:
        """The divergence functions' keyword arguments."""
        return {"kind": self.kind, "temperature": self.temperature, "beta": self.beta, "skew": self.skew}


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl", *,
               temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean divergence of the student from the teacher over the positions where `mask` is true (all if None).

    `mask` is a bool tensor shaped like the logits without their last dimension. With no selected position
    the result is a 0.0 that is still attached to the graph, so `backward()` works and gives zero grads.
    See `token_divergence` for `kind`, `temperature`, `beta` and `skew`.
    """
    _check_kind(kind)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be the logits' shape without V, "
                             f"{tuple(student_logits.shape[:-1])}")
        # Select first, so masked-out positions cost nothing and whatever they hold cannot reach the result.
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]  # (N, V)
    per_position = token_divergence(student_logits, teacher_logits, kind,
                                    temperature=temperature, beta=beta, skew=skew)
    if per_position.numel() == 0:
        return (per_position * 0).sum()
    return per_position.mean()


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl", *,
                     temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-position divergence `[...]` (float32, or float64 for float64 input), already multiplied by T².

    With p_T = softmax(teacher / T) and p_S = softmax(student / T):
      fkl       KL(p_T ‖ p_S)
      rkl       KL(p_S ‖ p_T)
      jsd       β·KL(p_T ‖ m) + (1-β)·KL(p_S ‖ m), m = β·p_T + (1-β)·p_S  (GKD);
                exactly fkl at β=0 and rkl at β=1
      skew_fkl  KL(p_T ‖ skew·p_T + (1-skew)·p_S)
      skew_rkl  KL(p_S ‖ skew·p_S + (1-skew)·p_T)  (DistiLLM)
      tvd       ½·Σ|p_T - p_S|
    """
    check_settings(kind, temperature, beta, skew)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")

    logp_student = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (..., V)
    logp_teacher = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)  # (..., V)
    per_position = _DIVERGENCES[kind](logp_teacher, logp_student, beta=beta, skew=skew)  # (...)
    # The T² keeps the gradient's size independent of T (Hinton et al.), so kd_ratio means the same at any T.
    return per_position * temperature**2


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position -log p(target) `[...]` in float32 (float64 for float64 logits); 0 where target == -100."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be the logits' shape without V, "
                         f"{tuple(logits.shape[:-1])}")
    vocab = logits.shape[-1]
    per_position = F.cross_entropy(_upcast(logits).reshape(-1, vocab), targets.reshape(-1),  # (N, V), (N,)
                                   ignore_index=IGNORE_INDEX, reduction="none")
    return per_position.reshape(targets.shape)


def sparse_token_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence against a *sparse* teacher: its top-k log-probs plus one tail bucket.

    `student_logits` (..., V); `topk_ids` (..., k) and `topk_logprobs` (..., k) the teacher's top-k at
    T=1; `tail_logmass` (...) the log of the teacher's remaining mass. Both distributions are coarse-
    grained to the same k+1 buckets (the k tokens, and "everything else"), and `kind` is computed over
    them exactly as `token_divergence` does over V. With k = V (tail mass 0) this equals the dense value,
    at any temperature. Otherwise it is a lower bound of the dense divergence (every kind here is an
    f-divergence, which coarse-graining can only shrink), exact on the top-k tokens and collapsing the
    tail into one term. With T != 1 the teacher's tail bucket is scaled as if it were one token.
    """
    check_settings(kind, temperature, beta, skew)
    logp_student = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (..., V)
    in_topk = torch.zeros_like(logp_student, dtype=torch.bool).scatter_(-1, topk_ids, True)  # (..., V)
    student_topk = logp_student.gather(-1, topk_ids)  # (..., k)
    student_tail = masked_logsumexp(logp_student, ~in_topk)  # (...)
    student_buckets = torch.cat([student_topk, student_tail.unsqueeze(-1)], dim=-1)  # (..., k+1)
    teacher_buckets = torch.cat([_upcast(topk_logprobs), _upcast(tail_logmass).unsqueeze(-1)], dim=-1)
    teacher_buckets = F.log_softmax(teacher_buckets / temperature, dim=-1)  # (..., k+1)
    per_position = _DIVERGENCES[kind](teacher_buckets, student_buckets, beta=beta, skew=skew)
    return per_position * temperature**2


def divergence_of_logprobs(logp_teacher: torch.Tensor, logp_student: torch.Tensor,
                           settings: KDSettings) -> torch.Tensor:
    """Per position: `settings.kind` between two distributions already given as log-probs over the same last dim
    (e.g. buckets a cross-tokenizer loss built); no temperature is applied here."""
    _check_kind(settings.kind)
    return _DIVERGENCES[settings.kind](logp_teacher, logp_student, beta=settings.beta, skew=settings.skew)


def masked_logsumexp(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logsumexp over the `keep` entries of the last dim; -inf (with zero gradient) where none is kept.

    A row whose kept entries are all -inf (e.g. a student that masks its tail tokens) counts as empty too.
    """
    safe = values.masked_fill(~keep, -math.inf)  # (..., V)
    empty = torch.isneginf(safe.detach().amax(dim=-1))  # (...): a reduction, no (..., V) temporary
    # Rows of only -inf would be logsumexp(-inf, ...), whose backward is NaN: feed zeros instead (in place:
    # masked_fill's backward does not need its output, and this saves a (..., V) buffer).
    safe.masked_fill_(empty.unsqueeze(-1), 0.0)
    return torch.logsumexp(safe, dim=-1).masked_fill(empty, -math.inf)


# --- the divergences, on log-probabilities (..., V) → (...) -------------------------------------------------

def _fkl(logp_teacher, logp_student, *, beta, skew):
    return _kl(logp_teacher, logp_student)


def _rkl(logp_teacher, logp_student, *, beta, skew):
    return _kl(logp_student, logp_teacher)


def _jsd(logp_teacher, logp_student, *, beta, skew):
    # The mixture form tends to 0 at both ends (m becomes one of the two), while JSD(β)/β → fkl as β → 0
    # and JSD(β)/(1-β) → rkl as β → 1; so, as in TRL, the endpoints are defined as those two divergences.
    if beta == 0.0:
        return _kl(logp_teacher, logp_student)
    if beta == 1.0:
        return _kl(logp_student, logp_teacher)
    logp_mixture = _log_mixture(logp_teacher, logp_student, beta)
    return beta * _kl(logp_teacher, logp_mixture) + (1.0 - beta) * _kl(logp_student, logp_mixture)


def _skew_fkl(logp_teacher, logp_student, *, beta, skew):
    return _kl(logp_teacher, _log_mixture(logp_teacher, logp_student, skew))


def _skew_rkl(logp_teacher, logp_student, *, beta, skew):
    return _kl(logp_student, _log_mixture(logp_student, logp_teacher, skew))


def _tvd(logp_teacher, logp_student, *, beta, skew):
    return 0.5 * (logp_teacher.exp() - logp_student.exp()).abs().sum(-1)


_DIVERGENCES = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "skew_fkl": _skew_fkl, "skew_rkl": _skew_rkl,
                "tvd": _tvd}
assert tuple(_DIVERGENCES) == KINDS


# --- numerics ------------------------------------------------------------------------------------------------

def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p·(log p - log q) over the last dim, with 0·log 0 = 0."""
    p = logp.exp()  # (..., V)
    # p == 0 (also when exp underflows) adds nothing. Zero the inputs there too: log p and log q may be -inf,
    # and -inf - -inf is NaN, which the discarded branch of a where would still send into the backward pass.
    support = p > 0
    safe_logp = torch.where(support, logp, 0.0)
    safe_logq = torch.where(support, logq, 0.0)
    return (p * (safe_logp - safe_logq)).sum(-1)


def _log_mixture(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b) from log a and log b, without leaving log space."""
    # At w = 0 or 1 one term vanishes; returning the other exactly avoids log(0) and makes skew = 0 equal
    # plain KL bit for bit.
    if weight_a == 0.0:
        return logp_b
    if weight_a == 1.0:
        return logp_a
    terms = torch.stack([logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a)])  # (2, ..., V)
    # A token impossible under both has logsumexp(-inf, -inf) = -inf, whose backward is exp(-inf - -inf) = NaN.
    # Feed zeros there instead and put the -inf back afterwards; every KL term on such a token is 0 anyway.
    impossible = torch.isneginf(terms).all(dim=0)  # (..., V)
    log_mixture = torch.logsumexp(terms.masked_fill(impossible, 0.0), dim=0)  # (..., V)
    return log_mixture.masked_fill(impossible, -math.inf)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # Softmax over a large vocabulary in bf16 loses most of the small probabilities KD is about.
    return logits if logits.dtype == torch.float64 else logits.float()


def sampled_reverse_kl(student_logits: torch.Tensor, tokens: torch.Tensor,
                       teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position (N,): reverse KL(p_S || p_T) estimated from one token x ~ p_S sampled at that position.

    The value is the estimate logp_S(x) - logp_T(x); the gradient is that of the score-function surrogate
    -sg[logp_T(x) - logp_S(x)] · logp_S(x) (REINFORCE with the per-token reward logp_T - logp_S, as in
    Tinker's on-policy distillation). Over x ~ p_S both are unbiased for the exact reverse KL and its
    gradient, from the teacher's log-prob of the sampled token alone. `student_logits` (N, V), `tokens`
    (N,), `teacher_logprobs` (N,) at temperature 1.
    """
    logp = torch.log_softmax(_upcast(student_logits), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (N,)
    teacher_logprobs = teacher_logprobs.to(logp.dtype)
    surrogate = -(teacher_logprobs - logp).detach() * logp
    return (logp - teacher_logprobs).detach() + (surrogate - surrogate.detach())


def check_settings(kind: str, temperature: float, beta: float, skew: float, *, sampled: bool = False) -> None:
    """The argument checks shared by the dense and the sparse divergences and the fused loss (`sampled`:
    also the estimators scored on sampled tokens, SAMPLED_KINDS)."""
    if not (sampled and kind in SAMPLED_KINDS):
        _check_kind(kind)
    # Written so that NaN fails too; an infinite T would make every distribution uniform and the T² factor
    # turn the divergence into inf·0 = NaN.
    if not (temperature > 0 and math.isfinite(temperature)):
        raise LlmneoError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise LlmneoError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew <= 1.0:
        raise LlmneoError(f"skew must be in [0, 1], got {skew}")


def _check_kind(kind: str) -> None:
    if kind in SAMPLED_KINDS:
        raise LlmneoError(f"{kind} is scored on sampled tokens only (on-policy steps, rows.SampledRows), not "
                          f"against a teacher distribution; use rkl for the exact reverse KL")
    if kind not in KINDS:
        raise LlmneoError(f"unknown divergence kind {kind!r}; choose one of: {', '.join(KINDS)}")

