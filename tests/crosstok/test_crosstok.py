"""Cross-tokenizer building blocks: alignment by character offsets, GOLD's span probability, ULD's term."""

from __future__ import annotations

import pytest
import torch

from llmneo.crosstok import offsets, vocab


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
    found = offsets.align(student, teacher)
    assert found.pairs == ((0, 0, 3),)  # student 0 = teacher 0..2
    assert found.unaligned == 2 and found.aligned_fraction == pytest.approx(1 / 3)


def test_identical_tokenizations_align_one_to_one_and_special_tokens_are_skipped():
    spans = [(0, 0)] + _offsets(["Hello", ",", " world"])  # a BOS with an empty span first
    shifted = [(0, 0)] + [(a, b) for a, b in spans[1:]]
    found = offsets.align(spans, shifted)
    assert found.pairs == ((1, 1, 2), (2, 2, 3), (3, 3, 4)) and found.unaligned == 0


def test_unicode_whitespace_and_byte_fallback_pieces_move_together():
    # "東京 ok": the teacher has byte-fallback pieces for 東 (three tokens, one shared span), the student
    # one token per character; whitespace is its own token on one side and glued to "ok" on the other
    text_pieces_student = ["東", "京", " ", "ok"]
    student = _offsets(text_pieces_student)
    teacher = [(0, 1), (0, 1), (0, 1), (1, 2), (2, 5)]  # <0xE6><0x9D><0xB1>, 京, " ok"
    found = offsets.align(student, teacher)
    assert found.pairs[:2] == ((0, 0, 3), (1, 3, 4))  # 東 = all three byte pieces, never a part of them
    assert found.unaligned == 2  # " " and "ok" share one teacher token


def test_a_system_prompt_on_one_side_only_does_not_shift_the_response():
    """The teacher's template adds a system prompt the student's lacks: offsets clipped to each side's
    response align exactly as the bare responses do."""
    student_pieces = ["<s>", "User: hi\n", "The", " cat", " sat"]
    teacher_pieces = ["<s>", "System: be kind\n", "User: hi\n", "The", " c", "at", " sat"]
    student_start, teacher_start = len("<s>User: hi\n"), len("<s>System: be kind\nUser: hi\n")
    student = offsets.clip(_offsets(student_pieces), student_start, student_start + len("The cat sat"))
    teacher = offsets.clip(_offsets(teacher_pieces), teacher_start, teacher_start + len("The cat sat"))
    found = offsets.align(student, teacher)
    assert found.pairs == ((2, 3, 4), (3, 4, 6), (4, 6, 7)) and found.unaligned == 0
    bare = offsets.align(_offsets(["The", " cat", " sat"]), _offsets(["The", " c", "at", " sat"]))
    assert [(s + 2, a + 3, b + 3) for s, a, b in bare.pairs] == list(found.pairs)


def test_teacher_spans_are_the_first_tokens_distribution_times_the_continuation(tokenizer):
    """GOLD's span probability, computed independently from the teacher's full log-softmax: for a span a..b-1,
    log p(first token) at position a-1 plus log p of each actual continuation token a+1..b-1."""
    from llmneo.demo import tiny
    from llmneo.teachers.aligner import teacher_spans
    from llmneo.teachers.live import LiveTeacher

    model = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=4).eval()
    teacher_ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    # student tokens 3..6 of row 0 and 2..4 of row 1 are replies; spans of one, two and three teacher tokens
    start = torch.full((2, 8), -1)
    end = torch.full((2, 8), -1)
    for row, token, a, b in [(0, 3, 2, 3), (0, 4, 3, 5), (0, 6, 6, 9), (1, 2, 4, 5), (1, 4, 5, 8)]:
        start[row, token], end[row, token] = a, b
    batch = {"teacher_input_ids": teacher_ids, "teacher_attention_mask": torch.ones_like(teacher_ids),
             "teacher_start": start, "teacher_end": end}
    positions = torch.zeros(2, 8, dtype=torch.bool)
    positions[0, 2:6] = True  # predicting tokens 3..6 (token 5 is unaligned)
    positions[1, 1:4] = True  # predicting tokens 2..4 (token 3 is unaligned)
    first, shift, aligned = teacher_spans(LiveTeacher(model, len(tokenizer)), batch, positions)
    assert aligned.tolist() == [True, True, False, True, True, False, True]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=teacher_ids).logits[..., :len(tokenizer)].float(), -1)  # (2, 12, V)
    spans = [(0, 2, 3), (0, 3, 5), None, (0, 6, 9), (1, 4, 5), None, (1, 5, 8)]
    projected = torch.log_softmax(first[0:len(first)].logits.float(), -1)
    for n, span in enumerate(spans):
        if span is None:
            continue
        row, a, b = span
        continuation = sum(float(logp[row, m - 1, teacher_ids[row, m]]) for m in range(a + 1, b))
        assert float(shift[n]) == pytest.approx(continuation, abs=1e-5)
        assert torch.allclose(projected[n] + shift[n], logp[row, a - 1] + continuation, atol=1e-5)


def test_sorted_l1_equals_a_hand_computation_and_has_gradients():
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.softmax(torch.tensor([[3.0, 0.0, 0.0, 1.0]]), -1)
    p_s = sorted(torch.softmax(student.detach(), -1)[0].tolist(), reverse=True) + [0.0]
    p_t = sorted(teacher[0].tolist(), reverse=True)
    expected = sum(abs(a - b) for a, b in zip(p_s, p_t))
    value = vocab.sorted_l1(torch.softmax(student, -1), teacher)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    same = torch.softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    assert float(vocab.sorted_l1(same, same.flip(-1))) == pytest.approx(0.0, abs=1e-7)  # order-free
