"""Cross-tokenizer building blocks (issue #13, first part): aligning two tokenizations of the same text, and
ULD's sorted-probability term. Not wired into training yet: `llmneo train` still refuses a teacher with
another tokenizer (models.check_same_tokenizer).

Alignment (as TRL's GOLD does it, by the text): each tokenizer's tokens cover character spans of the same
string (HF fast tokenizers' offset mappings). Both sequences are cut at the character positions where
*both* have a token boundary; between two such cuts lies a block. A block holding exactly one student
token aligns that token with the block's teacher tokens (one or more); a block with several student
tokens cannot be aligned token by token, and its student tokens are counted as unaligned. Tokens whose
spans coincide (byte-fallback pieces of one character) move together, so a character is never split.

ULD (Boizard et al.): with no shared vocabulary, compare the two distributions as sorted probability
vectors, sum |sort(p_S) - sort(p_T)| after padding the shorter with zeros: the Wasserstein-1 distance
between them as distributions over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alignment:
    """`pairs[i] = (s, a, b)`: student token s covers the same text as teacher tokens a..b-1."""

    pairs: tuple[tuple[int, int, int], ...]
    unaligned: int  # student tokens (with text) in blocks of several student tokens

    @property
    def aligned_fraction(self) -> float:
        total = len(self.pairs) + self.unaligned
        return len(self.pairs) / total if total else 1.0


def _ends(offsets: list[tuple[int, int]]) -> list[int]:
    """Each token's end, moved to the end of the run of tokens sharing its span (byte pieces of a character)."""
    ends = [end for _, end in offsets]
    for i in range(len(offsets) - 2, -1, -1):
        if offsets[i] == offsets[i + 1]:
            ends[i] = ends[i + 1]
    return ends


def align(student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]) -> Alignment:
    """Align two tokenizations of one text from their character offsets (tokens with an empty span, such as
    special tokens, are skipped on both sides)."""
    student = [(i, span) for i, span in enumerate(student_offsets) if span[1] > span[0]]
    teacher = [(j, span) for j, span in enumerate(teacher_offsets) if span[1] > span[0]]
    s_ends = _ends([span for _, span in student])
    t_ends = _ends([span for _, span in teacher])
    common = sorted(set(s_ends) & set(t_ends))
    pairs, unaligned = [], 0
    si = ti = 0
    for cut in common:
        block_s, block_t = [], []
        while si < len(student) and s_ends[si] <= cut:
            block_s.append(student[si][0])
            si += 1
        while ti < len(teacher) and t_ends[ti] <= cut:
            block_t.append(teacher[ti][0])
            ti += 1
        if len(block_s) == 1 and block_t:
            pairs.append((block_s[0], block_t[0], block_t[-1] + 1))
        else:
            unaligned += len(block_s)
    unaligned += len(student) - si  # text after the last common boundary (a truncated side)
    return Alignment(tuple(pairs), unaligned)


def relative(offsets: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    """Offsets into a rendered conversation, made relative to the response that begins at character `start`:
    tokens before it get an empty span (skipped by `align`), so what each side's template put before the
    response (a system prompt on one side only) does not shift the alignment."""
    return [(a - start, b - start) if a >= start else (0, 0) for a, b in offsets]


def span_logprob(teacher_logprobs: torch.Tensor, teacher_ids: list[int], a: int, b: int) -> torch.Tensor:
    """GOLD's probability of a teacher span a..b-1 as one unit, in log space: the distribution of its first
    token (row a-1 predicts token a) over the vocabulary, plus the log-probs of the actual continuation
    tokens a+1..b-1. `teacher_logprobs` (T, V) are the teacher's next-token log-probs by position."""
    continuation = sum((teacher_logprobs[t - 1, teacher_ids[t]] for t in range(a + 1, b)),
                       start=teacher_logprobs.new_zeros(()))
    return teacher_logprobs[a - 1] + continuation


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per position (N,): Σ |sort(p_S) - sort(p_T)| over ranks, the shorter vocabulary padded with zeros.
    Differentiable in the student's logits (the sort is a permutation)."""
    p_s = torch.softmax(student_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    p_t = torch.softmax(teacher_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(dim=-1)
