"""The fused, chunked CE + KD loss: never more than `chunk_size × V` logits alive per model.

Given the student's final hidden states at the N response positions, the loss walks the positions in
chunks. Per chunk it projects the student through its own output head, computes CE and the divergence
against the teacher rows for the same positions in fp32, and immediately back-propagates that chunk to
the hidden states and the head's trainable parameters (e.g. a LoRA adapter on lm_head). The chunk's
logits are then freed. The gradients are kept and handed to autograd in `backward`, scaled by the
incoming gradient, so the rest of the model back-propagates as usual and no logits are recomputed.
This is the approach of Liger's fused linear losses, written over any head module. `unfused_loss` is the
same loss over logits already materialised, through autograd (kd_chunk_size 0: the reference path).
"""

from __future__ import annotations

import torch

from llmneo.loss import closed_form
from llmneo.loss.divergences import KDSettings, token_cross_entropy
from llmneo.loss.spec import LossSpec


def kd_values(student_logits: torch.Tensor, teacher_rows, settings: KDSettings) -> torch.Tensor:
    """Per-position divergence of `student_logits` (C, V) from teacher rows (rows.py) for the same positions."""
    teacher_rows.check_vocab(student_logits.shape[-1])
    return teacher_rows.divergence(student_logits, settings)


def unfused_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_rows, spec: LossSpec):
    """(loss_sum, ce_sum, kd_sum | None) over N positions from full student logits (N, V), through autograd."""
    ce = token_cross_entropy(student_logits, targets).sum()
    kd = None if teacher_rows is None else kd_values(student_logits, teacher_rows, spec.settings).sum()
    return spec.combine(ce, kd), ce, kd


def _chunk_grads(head, piece, targets, teacher_part, spec: LossSpec, params):
    """(ce, kd | None, grads for [piece, *params]) for one chunk of positions."""
    with torch.enable_grad():
        logits = head(piece)[:, :spec.vocab_size]  # (C, V): padded vocab rows dropped
    if teacher_part is None:
        found = closed_form.fkl_grad(logits.detach(), targets, None, spec.kd_ratio, 1.0)  # CE alone
    else:
        found = teacher_part.closed_form(logits.detach(), targets, spec.kd_ratio, spec.settings)
    if found is not None:
        ce, kd, grad_logits = found
    else:  # a divergence without a closed form here: autograd on the chunk's logits
        student = logits.detach().float().requires_grad_(True)
        with torch.enable_grad():
            ce = token_cross_entropy(student, targets).sum()
            kd = teacher_part.divergence(student, spec.settings).sum()
            loss = spec.combine(ce, kd)
        grad_logits, = torch.autograd.grad(loss, student)
        ce, kd = ce.detach(), kd.detach()
    grads = torch.autograd.grad(logits, [piece, *params], grad_outputs=grad_logits.to(logits.dtype),
                                allow_unused=True)
    return ce, kd, grads


class _FusedChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, teacher_rows, spec: LossSpec, *params):
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        kd_total = ce_total.clone()
        for start in range(0, hidden.shape[0], spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            piece = hidden[rows].detach().requires_grad_(True)
            teacher_part = None if teacher_rows is None else teacher_rows[rows]
            ce, kd, grads = _chunk_grads(head, piece, targets[rows], teacher_part, spec, params)
            grad_hidden[rows] = grads[0]
            for acc, grad in zip(grad_params, grads[1:]):
                if grad is not None:
                    acc += grad
            ce_total += ce
            if kd is not None:
                kd_total += kd
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.mark_non_differentiable(ce_total, kd_total)
        total = ce_total.clone() if teacher_rows is None else spec.combine(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled = [g * grad_total.to(g.dtype) for g in grad_params]
        return (grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, *scaled)


def fused_loss(hidden: torch.Tensor, targets: torch.Tensor, head, head_params: list, teacher_rows, spec: LossSpec):
    """(loss_sum, ce_sum, kd_sum | None) over N positions; `hidden` (N, H), `targets` (N,).

    `head`: hidden (C, H) → logits (C, V_padded), cut here to `spec.vocab_size`; `head_params`: its parameters
    (the trainable ones get gradients). `teacher_rows`: one of rows.py's types for the same N positions, or None
    (CE alone). `loss_sum` = (1 - kd_ratio)·CE_sum + kd_ratio·KD_sum (CE_sum alone without a teacher) and
    carries the gradient; the two parts are detached, for logging. `spec.chunk_size` positions at a time.
    """
    if teacher_rows is not None:
        teacher_rows.check_vocab(spec.vocab_size)  # once per call: a sparse check costs a host sync
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0
        return zero, zero.detach(), None if teacher_rows is None else zero.detach()
    trainable = [p for p in head_params if p.requires_grad]
    total, ce, kd = _FusedChunkedLoss.apply(hidden, targets, head, teacher_rows, spec, *trainable)
    return total, ce, None if teacher_rows is None else kd
