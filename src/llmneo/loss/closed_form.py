"""CE + forward KL and their gradient w.r.t. a chunk's student logits, in closed form.

The fused loss (chunked.py) back-propagates each chunk of positions at once. For forward KL, against dense
teacher logits at any temperature or a sparse top-k teacher at T = 1, the gradient w.r.t. the logits has a
closed form that needs a few (C, V) fp32 buffers where autograd through log_softmax keeps about ten. The
teacher row types (rows.py) call these when the settings allow; every other case goes through autograd.
"""

from __future__ import annotations

import math

import torch

from llmneo.loss.divergences import masked_logsumexp

_LOG_SMALLEST_NORMAL = math.log(torch.finfo(torch.float32).tiny)


def fkl_grad(logits: torch.Tensor, targets: torch.Tensor, teacher_logits, kd_ratio: float, temperature: float):
    """CE and forward-KL sums and their gradient w.r.t. `logits` (C, V), in closed form.

    d CE / ds = softmax(s) - onehot(y);  d [T² KL(p_T‖softmax(s/T))] / ds = T·(softmax(s/T) - p_T).
    At T = 1 it allocates three (C, V) fp32 buffers (p_S turned into the gradient, log p_T, p_T) next to the
    two logits it is given: five live at its peak, where autograd through log_softmax would keep about ten.
    """
    s = logits.float()
    rows = torch.arange(s.shape[0], device=s.device)
    lse = torch.logsumexp(s, dim=-1)  # (C,)
    ce = (lse - s[rows, targets]).sum()
    grad = torch.softmax(s, dim=-1)  # (C, V): p_S, becomes the gradient in place
    if teacher_logits is None:
        grad[rows, targets] -= 1.0
        return ce, None, grad
    t = teacher_logits.float()  # no copy of fp32 logits: a (C, V) buffer, a sixth at the peak
    if temperature != 1.0:
        t = t / temperature
    logp_teacher = torch.log_softmax(t, dim=-1)  # (C, V)
    p_teacher = logp_teacher.exp()  # (C, V)
    scaled = s / temperature if temperature != 1.0 else s
    # KL = Σ p_T·(log p_T − s/T) + logsumexp(s/T), with 0·log 0 = 0: a token the teacher masks (logit -inf)
    # adds nothing. Everything happens in logp_teacher's own buffer, because this path is memory-critical and a
    # mask or a torch.where would cost one more (C, V) buffer. First log p_T → -inf wherever p_T underflowed to
    # 0 (below log of the smallest normal float, changing p_T by < 1e-38), so that log p_T is finite exactly
    # where p_T > 0. Then the ratio is -inf, or NaN where the student masks the token too, only where p_T = 0:
    # zero it there, as a dot product would make 0·(-inf) = NaN. A +inf is p_T > 0 against a student that
    # rules the token out, a truly infinite KL, and stays.
    log_ratio = torch.nn.functional.threshold_(logp_teacher, _LOG_SMALLEST_NORMAL, -math.inf)
    log_ratio.sub_(scaled).nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)  # (C, V)
    lse_scaled = lse if temperature == 1.0 else torch.logsumexp(scaled, dim=-1)
    kl = torch.bmm(p_teacher.unsqueeze(1), log_ratio.unsqueeze(2)).view(-1) + lse_scaled  # (C,)
    kd = (kl * temperature**2).sum()
    del logp_teacher, log_ratio
    if temperature == 1.0:  # (1-r)(p_S - onehot) + r(p_S - p_T) = p_S - (1-r)·onehot - r·p_T
        grad[rows, targets] -= 1.0 - kd_ratio
        grad.sub_(p_teacher, alpha=kd_ratio)
    else:  # (1-r)(p_S - onehot) + r·T·(p_S^T - p_T)
        grad.mul_(1.0 - kd_ratio)
        grad[rows, targets] -= 1.0 - kd_ratio
        grad.add_(p_teacher.sub_(torch.softmax(scaled, dim=-1)), alpha=-kd_ratio * temperature)
    return ce, kd, grad


_TAIL_SUM_EXACT_ABOVE = 1e-25  # a tail mass summed from p_S is exact to fp32 rounding above this (see below)


def _student_tail_logmass(s: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, tail_probs: torch.Tensor):
    """(log Σ_{v ∉ top-k} p_S(v) per row of logits `s` (C, V), the rows done in log space or None).

    `tail_probs` is p_S with the top-k zeroed. Summing it is exact to rounding while the tail mass is far
    above fp32's smallest normal number (1.2e-38): even V = 256k tokens below that add < 3e-33, a relative
    3e-8 of 1e-25. Rows under that bound (a tail that underflows, none at all with k = V, or a student that
    masks its tail with -inf) are rare, and recomputed in log space over the tail tokens, as
    masked_logsumexp would do for every row at the cost of a (C, V) mask and several passes.
    """
    mass = tail_probs.sum(-1)  # (C,)
    tail = mass.log()
    small = mass < _TAIL_SUM_EXACT_ABOVE
    if not bool(small.any()):
        return tail, None
    few = small.nonzero().squeeze(-1)
    in_tail = torch.ones((few.numel(), s.shape[-1]), dtype=torch.bool, device=s.device)
    in_tail.scatter_(-1, ids[few], False)  # (c, V), c = the rows under the bound
    tail[few] = masked_logsumexp(s[few], in_tail) - lse[few]
    return tail, few


def _tail_grad_in_log_space(s, lse, tail_student, teacher_tail, kd_ratio: float) -> torch.Tensor:
    """The tail tokens' gradient p_S(v) - r·p_T(tail)·p_S(v)/p_S(tail), for rows whose tail underflows.

    The factored form p_S(v)·(1 - r·p_T(tail)/p_S(tail)) overflows there (0·inf); here the ratio is taken
    in log space, where it is ≤ 0 for tail tokens. Top-k entries come out meaningless and are overwritten.
    """
    share = s - (lse + tail_student).unsqueeze(-1)  # (c, V): log p_S(v) / p_S(tail)
    pull = (share + teacher_tail.unsqueeze(-1)).exp()  # (c, V): p_T(tail) · p_S(v) / p_S(tail)
    pull = torch.where(teacher_tail.unsqueeze(-1) > -math.inf, pull, 0.0)  # no teacher tail: nothing to pull
    return (s - lse.unsqueeze(-1)).exp() - kd_ratio * pull


def sparse_fkl_grad(logits: torch.Tensor, targets: torch.Tensor, teacher, kd_ratio: float):
    """CE and sparse forward-KL (T = 1) sums and their gradient w.r.t. `logits` (C, V), in closed form.

    Over the k+1 buckets (top-k tokens, tail), d KL / ds_v is p_S(v) - p_T(v) for a top-k token and
    p_S(v)·(1 - p_T(tail) / p_S(tail)) for any other token.
    """
    s = logits.float()
    rows = torch.arange(s.shape[0], device=s.device)
    lse = torch.logsumexp(s, dim=-1)  # (C,)
    ce = (lse - s[rows, targets]).sum()
    logp_topk = s.gather(-1, teacher.ids) - lse.unsqueeze(-1)  # (C, k)
    # p_S with the top-k zeroed: summed, it is the student's tail mass; it then becomes the gradient in place
    # (its top-k entries are overwritten below), so the tail costs one reduction, not a (C, V) mask.
    grad = torch.softmax(s, dim=-1).scatter_(-1, teacher.ids, 0.0)  # (C, V)
    tail_student, underflowed = _student_tail_logmass(s, lse, teacher.ids, grad)  # (C,)
    teacher_logp = teacher.logprobs.float()
    teacher_tail = teacher.tail.float()
    p_teacher = teacher_logp.exp()  # (C, k)
    # A top-k larger than the teacher's support stores log-probs of -inf (p_T = 0): 0·log 0 = 0, not NaN.
    kd_terms = (p_teacher * torch.where(p_teacher > 0, teacher_logp - logp_topk, 0.0)).sum(-1)
    tail_mass = teacher_tail.exp()
    kd_terms = kd_terms + torch.where(tail_mass > 0, tail_mass * (teacher_tail - tail_student), 0.0)
    kd = kd_terms.sum()
    p_student_topk = logp_topk.exp()  # (C, k)
    tail_factor = 1.0 - torch.where(tail_mass > 0, (teacher_tail - tail_student).exp(), 0.0)  # (C,)
    grad.mul_((1.0 - kd_ratio) + kd_ratio * tail_factor.unsqueeze(-1))  # every token as if in the tail
    if underflowed is not None:
        grad[underflowed] = _tail_grad_in_log_space(s[underflowed], lse[underflowed], tail_student[underflowed],
                                                    teacher_tail[underflowed], kd_ratio)
    grad.scatter_(-1, teacher.ids, p_student_topk - kd_ratio * p_teacher)  # top-k: p_S - r·p_T
    grad[rows, targets] -= 1.0 - kd_ratio
    return ce, kd, grad
