"""Two vocabularies met token by token: which tokens they share, and GOLD's hybrid loss over them.

`VocabMap` pairs every student token with the teacher token that stands for the same bytes (byte-level BPE
pieces such as `Ġcat` and SentencePiece pieces such as `▁cat` or `<0x41>` are compared by the text they
decode to; special tokens only by their exact text), plus each side's EOS and end-of-turn token with the
other's, which say the same thing in different words.

The hybrid divergence at one aligned position (the student's distribution p over V_S, the teacher's span
distribution q over V_T from teachers.aligner.teacher_spans, whose mass is below 1 when the span continues):

    KD = (1 - w) · D(q̄ ‖ p̄) + w · ULD(p|unshared, q|unshared)

  * q̄, p̄: both distributions restricted to the shared tokens and renormalised there (at `kd_temperature`).
    D is the configured `kd_loss` between them. With one shared vocabulary this is exactly the
    same-tokenizer divergence.
  * ULD: Σ |sort(p_unshared) - sort(q_unshared)| over ranks (the shorter padded with zeros), at T = 1, on the
    unshared tokens' probabilities as they are (not renormalised): it sees what the shared term cannot, the
    mass each side puts outside the shared vocabulary.
  * w = `kd_uld_weight`, or 1 - overlap by default, overlap = shared / |V_S ∪ V_T| (1 for one vocabulary).

Against a top-k teacher (a cross-tokenizer cache) the shared tokens outside its top-k form one more bucket,
whose teacher mass is the tail; ULD sees the unshared top-k only (the tail's spread is unknown).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmneo.loss.divergences import KDSettings, divergence_of_logprobs, masked_logsumexp


@dataclass(frozen=True)
class VocabMap:
    """Shared tokens of a student and a teacher vocabulary, and the ULD weight."""

    student_ids: torch.Tensor  # (S,) shared tokens' student ids, sorted
    teacher_ids: torch.Tensor  # (S,) the same tokens' teacher ids
    to_student: torch.Tensor  # (V_T,) teacher id → student id, -1 where unshared
    student_only: torch.Tensor  # (V_S,) bool: student tokens with no teacher counterpart
    teacher_only: torch.Tensor  # (V_T,) bool
    uld_weight: float

    @functools.cached_property
    def student_only_ids(self) -> torch.Tensor:
        return self.student_only.nonzero().squeeze(-1)

    @functools.cached_property
    def teacher_only_ids(self) -> torch.Tensor:
        return self.teacher_only.nonzero().squeeze(-1)

    @property
    def shared(self) -> int:
        return int(self.student_ids.numel())

    @property
    def overlap(self) -> float:
        """Shared tokens over all tokens of either vocabulary (1 for one vocabulary)."""
        return self.shared / (self.student_only.numel() + self.teacher_only.numel() - self.shared)

    def to(self, device) -> "VocabMap":
        return VocabMap(self.student_ids.to(device), self.teacher_ids.to(device), self.to_student.to(device),
                        self.student_only.to(device), self.teacher_only.to(device), self.uld_weight)


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if "type" in node:
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(backend.to_str()).get("decoder"))
    return found


def token_keys(tokenizer) -> dict[int, tuple[int, object]]:
    """Each id's comparable text: (0, bytes) for ordinary tokens, (1, text) for special tokens, (2, bytes) for a
    byte-fallback piece (matched only where no ordinary token has the same byte)."""
    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    decoder = _byte_decoder() if byte_level else {}
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    keys: dict[int, tuple[int, object]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in added:
            keys[i] = (1, added[i].content) if added[i].special else (0, added[i].content.encode())
        elif byte_level and all(c in decoder for c in token):
            keys[i] = (0, bytes(decoder[c] for c in token))
        elif (fallback := _FALLBACK.fullmatch(token)) is not None:
            keys[i] = (2, bytes([int(fallback.group(1), 16)]))
        else:
            keys[i] = (0, token.replace("▁", " ").encode())
    return keys


def vocab_map(student_tok, teacher_tok, uld_weight: float | None = None,
              paired: list[tuple[int | None, int | None]] = ()) -> VocabMap:
    """The shared tokens of two tokenizers (by the bytes they stand for), plus `paired` (student id, teacher id)
    tokens that mean the same (EOS, end of turn) whatever their text; w = 1 - overlap unless given."""
    student_keys, teacher_keys = token_keys(student_tok), token_keys(teacher_tok)
    by_key: dict[object, int] = {}
    for i, key in sorted(teacher_keys.items(), key=lambda item: (item[1][0], item[0])):
        by_key.setdefault(key[1] if key[0] != 1 else key, i)
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for s, t in paired:
        if s is not None and t is not None and s not in pairs and t not in used:
            pairs[s], used = t, used | {t}
    for s, key in sorted(student_keys.items(), key=lambda item: (item[1][0], item[0])):
        t = by_key.get(key[1] if key[0] != 1 else key)
        if t is not None and s not in pairs and t not in used:
            pairs[s] = t
            used.add(t)
    v_s, v_t = len(student_tok), len(teacher_tok)
    student_ids = torch.tensor(sorted(pairs), dtype=torch.long)
    teacher_ids = torch.tensor([pairs[s] for s in sorted(pairs)], dtype=torch.long)
    to_student = torch.full((v_t,), -1, dtype=torch.long)
    to_student[teacher_ids] = student_ids
    student_only = torch.ones(v_s, dtype=torch.bool)
    student_only[student_ids] = False
    found = VocabMap(student_ids, teacher_ids, to_student, student_only, to_student < 0, 0.0)
    weight = uld_weight if uld_weight is not None else 1.0 - found.overlap
    return dataclasses.replace(found, uld_weight=float(weight))


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ |sort(p) - sort(q)| over ranks per row, the narrower padded with zeros. Only the narrower side is sorted
    whole: of the wider, its top ranks (topk), and past them its remaining mass, which meets the zeros."""
    narrow, wide = (p, q) if p.shape[-1] <= q.shape[-1] else (q, p)
    narrow_sorted = narrow.sort(dim=-1, descending=True).values
    wide_top = _top(wide, narrow.shape[-1])
    return (narrow_sorted - wide_top).abs().sum(dim=-1) + (wide.sum(dim=-1) - wide_top.sum(dim=-1))


def _top(values: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` largest of each row, in descending order."""
    if values.shape[-1] > width:
        return values.topk(width, dim=-1).values
    return values.sort(dim=-1, descending=True).values


def _sorted_l1_grad(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sorted_l1(p, q)` per row and its gradient w.r.t. p: the sign of each rank's difference, put back through
    p's sort order (1 for p's ranks past q's width, which meet zeros)."""
    if p.shape[-1] <= q.shape[-1]:
        p_sorted, order = p.sort(dim=-1, descending=True)
        q_top = _top(q, p.shape[-1])
        difference = p_sorted - q_top
        value = difference.abs().sum(dim=-1) + (q.sum(dim=-1) - q_top.sum(dim=-1))
        return value, torch.zeros_like(p).scatter_(-1, order, difference.sign())
    p_top, order = p.topk(q.shape[-1], dim=-1)
    difference = p_top - q.sort(dim=-1, descending=True).values
    value = difference.abs().sum(dim=-1) + (p.sum(dim=-1) - p_top.sum(dim=-1))
    return value, torch.ones_like(p).scatter_(-1, order, difference.sign())


def hybrid_divergence(student_logits: torch.Tensor, teacher, shift: torch.Tensor, vocab: VocabMap,
                      settings: KDSettings) -> torch.Tensor:
    """Per position (C,): the hybrid of the module docstring. `student_logits` (C, V_S); `teacher`: (C, V_T)
    logits, or a rows.SparseRows over the teacher's vocabulary (log-probs at T = 1); `shift` (C,) the log-prob
    of each span's continuation (0 for one-token spans), added to the first token's log-probs."""
    temperature = settings.temperature
    student = student_logits.float()
    buckets = _buckets(student / temperature, teacher, shift.float(), vocab)
    log_student, log_teacher = buckets.renormalised(temperature)
    matched = divergence_of_logprobs(log_teacher, log_student, settings) * temperature ** 2
    if vocab.uld_weight == 0.0:
        return matched
    p = F.softmax(student, dim=-1)  # ULD compares probabilities at T = 1
    uld = sorted_l1(p[:, vocab.student_only], buckets.q_unshared)
    return (1.0 - vocab.uld_weight) * matched + vocab.uld_weight * uld


@dataclass
class _Buckets:
    """Both sides over the same buckets, as log-weights not yet renormalised: one bucket per shared token (dense
    teacher), or per shared top-k token plus one for the other shared tokens (top-k teacher, whose tail stands
    for them: an upper bound, as it also holds unshared tokens outside the top-k)."""

    student: torch.Tensor  # (M, B) the student's logits at T, gathered (the other bucket: their logsumexp)
    teacher: torch.Tensor  # (M, B) the teacher's span log-probs at T = 1
    q_unshared: torch.Tensor  # (M, U) the teacher's span probabilities on its unshared tokens (zeros allowed)
    ids: torch.Tensor | None = None  # top-k: (M, k) the student ids of the top-k tokens (clamped; see `shared`)
    shared: torch.Tensor | None = None  # top-k: (M, k) bool, the top-k token is shared
    rest: torch.Tensor | None = None  # top-k: (M, V_S) bool, the shared tokens in the other bucket

    def renormalised(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p̄, log q̄): each side's distribution over the buckets at T."""
        teacher = self.teacher if temperature == 1.0 else self.teacher / temperature
        return F.log_softmax(self.student, dim=-1), F.log_softmax(teacher, dim=-1)


def _buckets(scaled: torch.Tensor, teacher, shift: torch.Tensor, vocab: VocabMap) -> _Buckets:
    """The buckets of the student's logits at T (`scaled`, (M, V_S)) and of the teacher: dense logits (M, V_T) or
    top-k rows, with `shift` (M,) added to the teacher's log-probs."""
    if isinstance(teacher, torch.Tensor):
        logq = F.log_softmax(teacher.float(), dim=-1).add_(shift[:, None])  # (M, V_T): span log-probs
        return _Buckets(scaled[:, vocab.student_ids], logq[:, vocab.teacher_ids], logq[:, vocab.teacher_only_ids].exp())
    logq = teacher.logprobs.float() + shift[:, None]  # (M, k)
    student_ids = vocab.to_student[teacher.ids]  # (M, k), -1 where unshared
    shared = student_ids >= 0
    ids = student_ids.clamp(min=0)
    covered = torch.zeros_like(scaled).scatter_add_(-1, ids, shared.float()) > 0  # (a clamped -1 adds 0)
    rest = ~vocab.student_only & ~covered
    student_rest = masked_logsumexp(scaled, rest)
    teacher_rest = (teacher.tail.float() + shift).masked_fill(torch.isneginf(student_rest), -math.inf)
    student = torch.cat([scaled.gather(-1, ids).masked_fill(~shared, -math.inf), student_rest[:, None]], dim=-1)
    teacher_cols = torch.cat([logq.masked_fill(~shared, -math.inf), teacher_rest[:, None]], dim=-1)
    return _Buckets(student, teacher_cols, logq.exp().masked_fill(shared, 0.0), ids, shared, rest)


@torch.no_grad()
def hybrid_fkl_grad(logits: torch.Tensor, targets: torch.Tensor, teacher, shift: torch.Tensor, aligned: torch.Tensor,
                    vocab: VocabMap, kd_ratio: float, temperature: float, fallback: torch.Tensor | None = None):
    """(ce_sum, kd_sum, d/d logits) of (1 - r)·CE + r·hybrid over a chunk, in closed form, for kd_loss fkl against
    dense teacher logits (C, V_T) or a top-k rows.SparseRows over the teacher's vocabulary (None: no position
    aligned). KD counts at `aligned` positions, and is the CE at `fallback` ones (kd_unaligned: ce); else 0.

    The shared term's gradient is (1 - w)·T·(p̄ - q̄) on the shared columns (against top-k rows, the shared tokens
    outside the top-k share one bucket: p_j·(1/P_shared - q̄_rest/P_rest) for each); ULD's, through the
    student's full softmax, w·p ⊙ (g - Σ p·g), with g the sign of each rank's difference on the unshared
    columns. No autograd graph, so a chunk keeps a few (C, V) buffers where autograd keeps about fifteen.
    """
    s = logits.float()
    rows = torch.arange(s.shape[0], device=s.device)
    per_position = torch.logsumexp(s, dim=-1) - s[rows, targets]  # (C,) CE
    ce = per_position.sum()
    falls = fallback.nonzero().squeeze(-1) if fallback is not None else rows[:0]
    kd = per_position[falls].sum()
    scale = torch.full_like(per_position, 1.0 - kd_ratio)  # CE's weight per position: 1 where KD is CE too
    scale[falls] = 1.0
    p = torch.softmax(s, dim=-1)  # (C, V_S): becomes the gradient in place
    index = aligned.nonzero().squeeze(-1)
    every = index.numel() == s.shape[0]  # then no row is gathered or scattered
    weight = vocab.uld_weight
    parts = []  # (student columns or None for all of them, (M, columns) gradient, already times r)
    row_factor = scale.clone()  # what p is multiplied by in the gradient, per row
    if teacher is not None and index.numel():
        student = s if every else s[index]  # (M, V_S)
        scaled = student if temperature == 1.0 else student / temperature
        shift = (shift if every else shift[index]).float()
        if not every:
            teacher = teacher[index] if isinstance(teacher, torch.Tensor) else teacher.take(index)
        buckets = _buckets(scaled, teacher, shift, vocab)
        log_student, log_teacher = buckets.renormalised(temperature)
        values = (1.0 - weight) * temperature ** 2 * divergence_of_logprobs(log_teacher, log_student,
                                                                            KDSettings("fkl"))
        columns, shared_grad = _shared_grad(scaled, buckets, log_student, log_teacher, vocab)
        parts.append((columns, shared_grad.mul_((1.0 - weight) * temperature * kd_ratio)))
        if weight:
            p_unshared = (p if every else p[index])[:, vocab.student_only_ids]  # (M, U_S)
            uld, signs = _sorted_l1_grad(p_unshared, buckets.q_unshared)
            unshared_grad = p_unshared.mul_(signs)  # p ⊙ g on the unshared columns
            # the -p·Σ p·g part joins p's own factor, so no (M, V) buffer is needed for it
            row_factor[index] -= kd_ratio * weight * unshared_grad.sum(dim=-1)
            parts.append((vocab.student_only_ids, unshared_grad.mul_(kd_ratio * weight)))
            values = values + weight * uld
        kd = kd + values.sum()
    grad = p.mul_(row_factor[:, None])  # scale·(p - onehot) + the ULD rows' -r·w·p·Σ p·g, in p's buffer
    grad[rows, targets] -= scale
    for columns, part in parts if kd_ratio else ():
        if columns is None:  # every column
            grad[index] += part
        elif every:
            grad.index_add_(1, columns, part)
        else:
            grad.index_put_((index[:, None], columns[None, :]), part, accumulate=True)
    return ce, kd, grad


def _shared_grad(scaled, buckets: _Buckets, log_student, log_teacher, vocab: VocabMap):
    """(student columns, or None for all of them; d KL(q̄ ‖ p̄) / d(logits / T)) on them: p̄ - q̄ on the shared
    columns (dense); against top-k rows p_j / P_shared on every shared token, minus q̄_b on a top-k bucket's token
    (its p_j / P_b is 1), minus q̄_rest · p_j / P_rest on the other shared tokens."""
    q_bar = log_teacher.exp()
    if buckets.ids is None:
        return vocab.student_ids, log_student.exp_().sub_(q_bar)
    log_total = torch.logsumexp(buckets.student, dim=-1, keepdim=True)  # log P_shared
    grad = torch.where(vocab.student_only, 0.0, (scaled - log_total).exp())
    grad.scatter_add_(-1, buckets.ids, -q_bar[:, :-1].masked_fill(~buckets.shared, 0.0))
    log_rest = buckets.student[:, -1:]  # log P_rest
    safe_rest = log_rest.masked_fill(torch.isneginf(log_rest), 0.0)
    grad -= torch.where(buckets.rest, (scaled - safe_rest).exp() * q_bar[:, -1:], 0.0)
    return None, grad
