"""Edge cases of the fused loss that the peers' suites found (issue 9, B): masked vocabularies (-inf logits),
bad temperatures, and a teacher over another vocabulary. The fused path must agree with `losses.divergence`,
or refuse in one line, for every kind and every kind of teacher rows."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.cache.write import topk_rows
from llmneo.errors import LlmneoError
from llmneo.loss import divergences as losses
from llmneo.loss.chunked import fused_loss, kd_values
from llmneo.loss.divergences import KDSettings
from llmneo.loss.rows import DenseRows, LogitRows, SparseRows
from llmneo.loss.spec import LossSpec

N, H, V, PAD = 9, 8, 13, 3  # 9 positions in chunks of 4, 4, 1; V real tokens and PAD padded vocab rows
KD_RATIO = 0.5


class MaskedHead(torch.nn.Module):
    """A linear head over V + PAD rows that gives -inf to the padded rows and to `masked` real tokens."""

    def __init__(self, masked: list[int], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(H, V + PAD, bias=False)
        self.masked = masked + list(range(V, V + PAD))

    def forward(self, hidden):
        logits = self.linear(hidden)
        return logits.index_fill(-1, torch.tensor(self.masked), -math.inf)  # (C, V + PAD)


def _teacher(masked: list[int], rows: str):
    """The teacher's dense (N, V) logits, with -inf at `masked` and at token 7 of every other row, and the
    rows of type `rows` that carry them."""
    head = MaskedHead(masked, seed=1)
    hidden = torch.randn(N, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = head(hidden)[:, :V] * 3  # (N, V)
        dense[::2, 7] = -math.inf
    if rows == "dense_rows":  # DenseRows computes per chunk; mask token 7 in the hidden → logits map instead
        head.masked.append(7)
        with torch.no_grad():
            dense = head(hidden)[:, :V]
        return dense, DenseRows(hidden, head, V)
    if rows == "logit_rows":
        return dense, LogitRows(dense)
    # k = V - 1 exceeds the support of the rows masking two tokens, so their top-k stores -inf log-probs
    sparse = topk_rows(dense, k=V - 1)
    assert torch.isneginf(sparse.logprobs).any(), "the test must exercise -inf top-k log-probs"
    return dense, sparse


def _fused(head, hidden, targets, teacher_rows, settings):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    total, ce, kd = fused_loss(hidden, targets, head, list(head.parameters()), teacher_rows,
                               LossSpec(V, KD_RATIO, KDSettings(**settings), chunk_size=4))
    total.backward()
    return total.detach(), kd, hidden.grad, head.linear.weight.grad


def _reference(head, hidden, targets, teacher_dense, settings):
    """The unfused loss: full student logits, CE and the dense `losses.divergence`, through autograd."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    student = head(hidden)[:, :V]  # (N, V)
    kd_mean = losses.divergence(student, teacher_dense, **settings)
    total = (1 - KD_RATIO) * losses.token_cross_entropy(student, targets).sum() + KD_RATIO * kd_mean * N
    total.backward()
    return total.detach(), kd_mean.detach() * N, hidden.grad, head.linear.weight.grad


ROWS = ["logit_rows", "dense_rows", "sparse"]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("student_masks", [False, True], ids=["teacher_masks", "both_mask"])
def test_masked_vocabulary_fused_equals_dense_divergence(kind, temperature, rows, student_masks):
    """B1: -inf teacher logits (masked tokens, or a top-k larger than the support) gave NaN in fused fkl.

    With `both_mask` the student rules out the same tokens, so every kind is finite (rkl included): this is
    the student side of the same 0·(-inf), in the closed-form fkl and in the sparse forms' tail.
    """
    masked = [3]
    teacher_dense, teacher_rows = _teacher(masked, rows)
    if student_masks:
        masked = [3, 7]  # the teacher masks 3 everywhere and 7 on every other row
        teacher_dense[:, 7] = -math.inf
        if rows == "sparse":
            teacher_rows = topk_rows(teacher_dense, k=V - 1)
        elif rows != "dense_rows":
            teacher_rows = LogitRows(teacher_dense)
    head = MaskedHead(masked if student_masks else [], seed=0)
    hidden = torch.randn(N, H, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10])  # never a masked token: CE stays finite
    settings = {"kind": kind, "temperature": temperature, "beta": 0.3, "skew": 0.2}

    got = _fused(head, hidden, targets, teacher_rows, settings)
    want = _reference(head, hidden, targets, teacher_dense, settings)
    if kind == "rkl" and not student_masks:  # the student puts mass where the teacher has none: truly infinite
        assert torch.isposinf(want[1]) and torch.isposinf(got[1])
        return
    assert torch.isfinite(want[1]) and torch.isfinite(want[2]).all()
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)  # kd sum
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # total
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)  # d/d hidden
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5)  # d/d head weight


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fkl_teacher_probability_underflowing_where_the_student_masks(temperature):
    """A teacher logit so low that p_T underflows to 0 (but log p_T is finite), on a token the student masks:
    the dense KL counts 0 there (0·log 0), the closed form must not make it 0·inf = NaN."""
    head = MaskedHead([7], seed=0)
    hidden = torch.randn(N, H, generator=torch.Generator().manual_seed(3))
    targets = torch.zeros(N, dtype=torch.long)
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(4))
    teacher[:, 7] = -300.0 * temperature
    assert torch.all(torch.softmax(teacher / temperature, dim=-1)[:, 7] == 0)
    settings = {"kind": "fkl", "temperature": temperature, "beta": 0.5, "skew": 0.1}
    got = _fused(head, hidden, targets, LogitRows(teacher), settings)
    want = _reference(head, hidden, targets, teacher, settings)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masked_logsumexp_of_only_minus_inf_is_minus_inf_with_zero_gradient():
    """The sparse forms' tail: a student that masks every tail token made the backward NaN."""
    values = torch.tensor([[0.5, -math.inf, -math.inf], [0.5, 1.0, -math.inf]], requires_grad=True)
    keep = torch.tensor([[False, True, True], [True, True, True]])
    result = losses.masked_logsumexp(values, keep)
    assert torch.isneginf(result[0]) and float(result[1].detach()) == pytest.approx(math.log(math.exp(0.5) + math.e))
    grad_empty, = torch.autograd.grad(result[0], values, retain_graph=True)
    assert torch.equal(grad_empty, torch.zeros_like(values))
    grad_full, = torch.autograd.grad(result[1], values)
    torch.testing.assert_close(grad_full[1], torch.softmax(values[1].detach(), dim=-1))


# --- B2: temperature ------------------------------------------------------------------------------------------

BAD_TEMPERATURES = [0.0, -1.0, math.inf, math.nan]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_divergences_refuse_a_bad_temperature(temperature):
    student, teacher = torch.randn(4, V), torch.randn(4, V)
    sparse = topk_rows(teacher, k=4)
    message = "temperature must be a finite number > 0"
    for kind in losses.KINDS:
        with pytest.raises(LlmneoError, match=message):
            losses.divergence(student, teacher, kind, temperature=temperature)
        with pytest.raises(LlmneoError, match=message):
            losses.sparse_token_divergence(student, sparse.ids, sparse.logprobs, sparse.tail, kind,
                                           temperature=temperature)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_fused_loss_refuses_a_bad_temperature(kind, temperature, rows):
    _, teacher_rows = _teacher([3], rows)
    head = MaskedHead([], seed=0)
    settings = {"kind": kind, "temperature": temperature, "beta": 0.3, "skew": 0.2}
    for n in (N, 0):  # with no response position too: the settings are wrong whatever the batch
        with pytest.raises(LlmneoError, match="temperature must be a finite number > 0"):
            fused_loss(torch.randn(n, H), torch.zeros(n, dtype=torch.long), head, list(head.parameters()),
                       teacher_rows if n else teacher_rows[0:0], LossSpec(V, KD_RATIO, KDSettings(**settings), 4))


# --- B3: a teacher over another vocabulary ----------------------------------------------------------------------

def _misfit_rows(case: str):
    """Teacher rows that do not index exactly the student's V tokens."""
    logits = torch.randn(N, V + 2)
    if case == "logit_rows_wider":
        return LogitRows(logits)
    if case == "logit_rows_narrower":
        return LogitRows(logits[:, : V - 1])
    if case == "dense_rows_wider":  # DenseRows slices to its own vocab_size, which here exceeds the student's
        return DenseRows(torch.randn(N, H), torch.nn.Linear(H, V + 2, bias=False), V + 2)
    sparse = topk_rows(logits[:, :V], k=4)
    ids = sparse.ids.clone()
    ids[5, 2] = V if case == "sparse_id_too_large" else -1
    return SparseRows(ids, sparse.logprobs, sparse.tail)


MISFITS = ["logit_rows_wider", "logit_rows_narrower", "dense_rows_wider", "sparse_id_too_large",
           "sparse_id_negative"]


@pytest.mark.parametrize("case", MISFITS)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_teacher_over_another_vocabulary_is_refused(kind, case):
    """B3: fkl raised a raw bmm shape error, the other kinds a ValueError or an index error."""
    rows = _misfit_rows(case)
    head = torch.nn.Linear(H, V + PAD, bias=False)  # a padded student head: its extra rows are dropped
    settings = {"kind": kind, "temperature": 1.0, "beta": 0.3, "skew": 0.2}
    match = "top-k ids span" if case.startswith("sparse") else f"vocabulary columns but the student's vocabulary has {V}"
    with pytest.raises(LlmneoError, match=match):
        fused_loss(torch.randn(N, H), torch.zeros(N, dtype=torch.long), head, list(head.parameters()), rows,
                   LossSpec(V, KD_RATIO, KDSettings(**settings), chunk_size=4))
    with pytest.raises(LlmneoError, match=match):  # the unfused reference path (kd_chunk_size: 0) too
        kd_values(head(torch.randn(N, H))[:, :V], rows[0:N], KDSettings(**settings))


def test_dense_rows_whose_head_is_as_wide_as_the_student_fit():
    """DenseRows slices to its own vocab_size: a larger vocab_size over a V-wide head still yields V columns."""
    torch.manual_seed(0)
    hidden, teacher_hidden = torch.randn(N, H), torch.randn(N, H)
    head, teacher_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    settings = {"kind": "fkl", "temperature": 1.0, "beta": 0.5, "skew": 0.1}
    _, _, kd = fused_loss(hidden, torch.zeros(N, dtype=torch.long), head, list(head.parameters()),
                          DenseRows(teacher_hidden, teacher_head, V + 5),
                          LossSpec(V, KD_RATIO, KDSettings(**settings), chunk_size=4))
    with torch.no_grad():
        want = losses.divergence(head(hidden), teacher_head(teacher_hidden)) * N
    torch.testing.assert_close(kd, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_no_response_position_gives_an_attached_zero(kind, rows):
    """A micro-batch with no response position (every label -100): zero sums, zero gradients, no error."""
    _, teacher_rows = _teacher([3], rows)
    head = MaskedHead([], seed=0)
    settings = {"kind": kind, "temperature": 2.0, "beta": 0.3, "skew": 0.2}
    hidden = torch.randn(0, H, requires_grad=True)
    total, ce, kd = fused_loss(hidden, torch.zeros(0, dtype=torch.long), head, list(head.parameters()),
                               teacher_rows[0:0], LossSpec(V, KD_RATIO, KDSettings(**settings), chunk_size=4))
    assert float(total.detach()) == 0.0 and float(ce) == 0.0 and float(kd) == 0.0
    total.backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, H)
