"""The fused, chunked CE + KD loss: never more than `chunk_size × V` logits alive per model.

Given the student's final hidden states at the N response positions, the loss walks the positions in
chunks. Per chunk it projects the student through its own output head, computes CE and the divergence
against the teacher rows for the same positions in fp32, and immediately back-propagates that chunk to
the hidden states and the head's trainable parameters (e.g. a LoRA adapter on lm_head). The chunk's
logits are then freed. The gradients are kept and handed to autograd in `backward`, scaled by the
incoming gradient, so the rest of the model back-propagates as usual and no logits are recomputed.
This is the approach of Liger's fused linear losses, written over any head module.
"""

from __future__ import annotations

import torch

from llmneo.losses import sparse_token_divergence, token_cross_entropy, token_divergence
from llmneo.teacher import SparseRows


def kd_values(student_logits: torch.Tensor, teacher_part, settings: dict) -> torch.Tensor:
    """Per-position divergence of `student_logits` (C, V) from a dense (C, V) or sparse teacher part."""
    if isinstance(teacher_part, SparseRows):
        return sparse_token_divergence(student_logits, teacher_part.ids, teacher_part.logprobs, teacher_part.tail,
                                       **settings)
    return token_divergence(student_logits, teacher_part, **settings)


def _chunk_loss(head, hidden, targets, teacher_part, vocab_size, kd_ratio, settings):
    logits = head(hidden)[:, :vocab_size]  # (C, V): padded vocab rows dropped
    ce = token_cross_entropy(logits, targets).sum()
    if teacher_part is None:
        return ce, ce, None
    kd = kd_values(logits, teacher_part, settings).sum()
    return (1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd


class _FusedChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, teacher_rows, vocab_size, kd_ratio, settings, chunk_size, *params):
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = total.clone()
        kd_total = total.clone()
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            piece = hidden[rows].detach().requires_grad_(True)
            teacher_part = None if teacher_rows is None else teacher_rows[rows]
            with torch.enable_grad():
                loss, ce, kd = _chunk_loss(head, piece, targets[rows], teacher_part, vocab_size, kd_ratio, settings)
            grads = torch.autograd.grad(loss, [piece, *params], allow_unused=True)
            grad_hidden[rows] = grads[0]
            for acc, grad in zip(grad_params, grads[1:]):
                if grad is not None:
                    acc += grad
            total += loss.detach()
            ce_total += ce.detach()
            if kd is not None:
                kd_total += kd.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled = [g * grad_total.to(g.dtype) for g in grad_params]
        return (grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None, None, None, *scaled)


def fused_loss(hidden: torch.Tensor, targets: torch.Tensor, head, head_params: list, teacher_rows, *,
               vocab_size: int, kd_ratio: float, settings: dict, chunk_size: int):
    """(loss_sum, ce_sum, kd_sum | None) over N positions; `hidden` (N, H), `targets` (N,).

    `loss_sum` = (1 - kd_ratio)·CE_sum + kd_ratio·KD_sum (CE_sum alone without a teacher) and carries
    the gradient; the two parts are detached, for logging.
    """
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0
        return zero, zero.detach(), None if teacher_rows is None else zero.detach()
    trainable = [p for p in head_params if p.requires_grad]
    total, ce, kd = _FusedChunkedLoss.apply(hidden, targets, head, teacher_rows, vocab_size, kd_ratio, settings,
                                            chunk_size, *trainable)
    return total, ce, None if teacher_rows is None else kd
