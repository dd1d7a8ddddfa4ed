"""Cross-tokenizer building blocks (#13, first part): alignment by character offsets and ULD's term."""

from __future__ import annotations

import pytest
import torch

from llmneo import crosstok


def _offsets(pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of consecutive pieces of one string."""
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def test_a_word_one_side_splits_aligns_to_several_teacher_tokens_and_the_reverse_is_unaligned():
    # text "unbelievable day": student keeps "unbelievable" whole, teacher splits it; the teacher keeps
    # " day" whole where the student splits it into " d" + "ay"
    student = _offsets(["unbelievable", " d", "ay"])
    teacher = _offsets(["un", "believ", "able", " day"])
    found = crosstok.align(student, teacher)
    assert found.pairs == ((0, 0, 3),)  # student 0 = teacher 0..2
    assert found.unaligned == 2 and found.aligned_fraction == pytest.approx(1 / 3)


def test_identical_tokenizations_align_one_to_one_and_special_tokens_are_skipped():
    spans = [(0, 0)] + _offsets(["Hello", ",", " world"])  # a BOS with an empty span first
    shifted = [(0, 0)] + [(a, b) for a, b in spans[1:]]
    found = crosstok.align(spans, shifted)
    assert found.pairs == ((1, 1, 2), (2, 2, 3), (3, 3, 4)) and found.unaligned == 0


def test_unicode_whitespace_and_byte_fallback_pieces_move_together():
    # "東京 ok": the teacher has byte-fallback pieces for 東 (three tokens, one shared span), the student
    # one token per character; whitespace is its own token on one side and glued to "ok" on the other
    text_pieces_student = ["東", "京", " ", "ok"]
    student = _offsets(text_pieces_student)
    teacher = [(0, 1), (0, 1), (0, 1), (1, 2), (2, 5)]  # <0xE6><0x9D><0xB1>, 京, " ok"
    found = crosstok.align(student, teacher)
    assert found.pairs[:2] == ((0, 0, 3), (1, 3, 4))  # 東 = all three byte pieces, never a part of them
    assert found.unaligned == 2  # " " and "ok" share one teacher token


def test_a_system_prompt_on_one_side_only_does_not_shift_the_response():
    """The teacher's template adds a system prompt the student's lacks: offsets made relative to where each
    side's response begins align exactly as the bare responses do."""
    student_pieces = ["<s>", "User: hi\n", "The", " cat", " sat"]
    teacher_pieces = ["<s>", "System: be kind\n", "User: hi\n", "The", " c", "at", " sat"]
    student = crosstok.relative(_offsets(student_pieces), len("<s>User: hi\n"))
    teacher = crosstok.relative(_offsets(teacher_pieces), len("<s>System: be kind\nUser: hi\n"))
    found = crosstok.align(student, teacher)
    assert found.pairs == ((2, 3, 4), (3, 4, 6), (4, 6, 7)) and found.unaligned == 0
    bare = crosstok.align(_offsets(["The", " cat", " sat"]), _offsets(["The", " c", "at", " sat"]))
    assert [(s + 2, a + 3, b + 3) for s, a, b in bare.pairs] == list(found.pairs)


def test_span_logprob_is_the_first_tokens_distribution_plus_the_continuation():
    logprobs = torch.log_softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids = [0, 3, 5, 2, 6]
    span = crosstok.span_logprob(logprobs, ids, 2, 4)  # tokens 2 and 3
    assert torch.allclose(span, logprobs[1] + logprobs[2, ids[3]])
    assert torch.equal(crosstok.span_logprob(logprobs, ids, 2, 3), logprobs[1])


def test_uld_distance_equals_a_hand_computation_and_has_gradients():
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 0.0, 1.0]])
    p_s = sorted(torch.softmax(student.detach(), -1)[0].tolist(), reverse=True) + [0.0]
    p_t = sorted(torch.softmax(teacher, -1)[0].tolist(), reverse=True)
    expected = sum(abs(a - b) for a, b in zip(p_s, p_t))
    value = crosstok.uld_distance(student, teacher)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    same = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(crosstok.uld_distance(same, same.flip(-1))) == pytest.approx(0.0, abs=1e-7)  # order-free


def test_real_tokenizers_align_tokens_that_cover_the_same_text(tokenizer):
    """Two real HF fast tokenizers with different vocabularies (the tiny test tokenizer and one trained on
    other words): every aligned pair covers the same characters, and most tokens align."""
    from llmneo.demo import tiny

    other = tiny.build_tokenizer(corpus=["completely different words here", "zebra yak xylophone"], vocab_size=300)
    text = "The quick brown fox jumps over the lazy dog. Zebra café 東京!"
    mine = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    theirs = other(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert mine != theirs
    found = crosstok.align(mine, theirs)
    for s, a, b in found.pairs:
        assert text[mine[s][0]:mine[s][1]].strip() == text[theirs[a][0]:theirs[b - 1][1]].strip()
    assert found.pairs and 0 < found.aligned_fraction <= 1
