"""Tests for llmneo.loss.divergences: hand-computed values, identities between kinds, masking, dtypes, -inf, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmneo.errors import LlmneoError
from llmneo.loss.divergences import KINDS, divergence, token_cross_entropy, token_divergence

# Two positions, V = 3. The second teacher row rules out token 1 (prob 0).
STUDENT = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
TEACHER = [[1.5, 0.2, -0.3], [0.0, -math.inf, 2.0]]


# --- an independent reference in plain python: probabilities, not log-space tricks -----------------------

def _softmax(row, temperature=1.0):
    exps = [math.exp(x / temperature) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _mix(w, a, b):
    return [w * ai + (1 - w) * bi for ai, bi in zip(a, b)]


def _reference(kind, student_row, teacher_row, temperature=1.0, beta=0.5, skew=0.1):
    ps, pt = _softmax(student_row, temperature), _softmax(teacher_row, temperature)
    if kind == "fkl":
        value = _kl(pt, ps)
    elif kind == "rkl":
        value = _kl(ps, pt)
    elif kind == "jsd":
        m = _mix(beta, pt, ps)
        value = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif kind == "skew_fkl":
        value = _kl(pt, _mix(skew, pt, ps))
    elif kind == "skew_rkl":
        value = _kl(ps, _mix(skew, ps, pt))
    elif kind == "tvd":
        value = 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    return value * temperature**2


def _random_logits(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 2).to(dtype)


# --- values --------------------------------------------------------------------------------------------------

# rkl is left out on row 2 below: the student puts mass on a token the teacher rules out, so it is infinite.
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_kind_matches_hand_computed_value(kind, temperature):
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    per_position = token_divergence(student, teacher, kind, temperature=temperature, beta=0.3, skew=0.2)
    expected = [_reference(kind, s, t, temperature, beta=0.3, skew=0.2) for s, t in zip(STUDENT, TEACHER)]
    assert per_position.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    mean = divergence(student, teacher, kind, temperature=temperature, beta=0.3, skew=0.2)
    assert mean.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_matches_hand_computed_value_with_finite_logits(kind):
    student, teacher = [[0.3, 1.2, -2.0]], [[-0.7, 0.4, 1.1]]
    value = divergence(torch.tensor(student), torch.tensor(teacher), kind, beta=0.7, skew=0.25)
    assert value.item() == pytest.approx(_reference(kind, student[0], teacher[0], beta=0.7, skew=0.25), rel=1e-5)
    assert value.item() > 0.01  # a real divergence, not a degenerate zero


def test_known_closed_form_values():
    # Two one-hot-ish extremes: disjoint supports give JSD(0.5) = log 2 and TVD = 1.
    student = torch.tensor([[0.0, -math.inf]])
    teacher = torch.tensor([[-math.inf, 0.0]])
    assert divergence(student, teacher, "jsd", beta=0.5).item() == pytest.approx(math.log(2), rel=1e-6)
    assert divergence(student, teacher, "tvd").item() == pytest.approx(1.0)
    # KL((1/2, 1/4, 1/4) ‖ uniform) = Σ p·log(3p), by hand.
    teacher = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    student = torch.zeros(1, 3)
    expected = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)
    assert divergence(student, teacher, "fkl").item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    logits = _random_logits(4, 5, 11)
    assert divergence(logits, logits.clone(), kind, beta=0.3, skew=0.4).item() == pytest.approx(0.0, abs=1e-6)


# --- identities between kinds ------------------------------------------------------------------------------

def test_jsd_endpoints_are_exactly_fkl_and_rkl():
    student, teacher = _random_logits(3, 7, seed=1), _random_logits(3, 7, seed=2)
    fkl = token_divergence(student, teacher, "fkl")
    rkl = token_divergence(student, teacher, "rkl")
    assert torch.equal(token_divergence(student, teacher, "jsd", beta=0.0), fkl)
    assert torch.equal(token_divergence(student, teacher, "jsd", beta=1.0), rkl)
    assert not torch.allclose(fkl, rkl)  # otherwise the two checks above could not tell the ends apart


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    student, teacher = _random_logits(6, 9, seed=3) * 3, _random_logits(6, 9, seed=4) * 3
    forward = token_divergence(student, teacher, "jsd", beta=0.5)
    backward = token_divergence(teacher, student, "jsd", beta=0.5)
    torch.testing.assert_close(forward, backward)
    assert (forward > 0).all() and (forward <= math.log(2) + 1e-6).all()
    # Near-disjoint distributions come close to the bound.
    far = token_divergence(torch.tensor([[40.0, 0.0]]), torch.tensor([[0.0, 40.0]]), "jsd", beta=0.5)
    assert far.item() == pytest.approx(math.log(2), rel=1e-4)


def test_jsd_is_not_symmetric_off_half():
    student, teacher = _random_logits(2, 9, seed=3), _random_logits(2, 9, seed=4)
    a = token_divergence(student, teacher, "jsd", beta=0.2)
    b = token_divergence(teacher, student, "jsd", beta=0.2)
    assert not torch.allclose(a, b)
    # Swapping the arguments and β ↦ 1-β is the identity.
    torch.testing.assert_close(a, token_divergence(teacher, student, "jsd", beta=0.8))


def test_skew_zero_is_plain_kl():
    student, teacher = _random_logits(3, 7, seed=5), _random_logits(3, 7, seed=6)
    assert torch.equal(token_divergence(student, teacher, "skew_fkl", skew=0.0),
                       token_divergence(student, teacher, "fkl"))
    assert torch.equal(token_divergence(student, teacher, "skew_rkl", skew=0.0),
                       token_divergence(student, teacher, "rkl"))
    # And skew shrinks the divergence (the mixture is closer to the left distribution).
    assert (token_divergence(student, teacher, "skew_fkl", skew=0.5)
            < token_divergence(student, teacher, "fkl")).all()
    assert divergence(student, teacher, "skew_fkl", skew=1.0).item() == pytest.approx(0.0, abs=1e-7)


# --- mask, temperature, dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_mask_selects_positions(kind):
    student, teacher = _random_logits(2, 4, 6, seed=7), _random_logits(2, 4, 6, seed=8)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    value = divergence(student, teacher, kind, mask=mask)

    per_position = token_divergence(student, teacher, kind)
    assert value.item() == pytest.approx(per_position[mask].mean().item(), rel=1e-6)
    assert value.item() != pytest.approx(per_position.mean().item(), rel=1e-3)

    # Garbage, even NaN, at masked-out positions changes nothing.
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = torch.nan
    teacher2[~mask] = 100.0
    assert torch.equal(divergence(student2, teacher2, kind, mask=mask), value)


def test_empty_mask_gives_attached_zero():
    student = _random_logits(2, 3, 5, seed=9).requires_grad_()
    teacher = _random_logits(2, 3, 5, seed=10)
    value = divergence(student, teacher, "jsd", mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0 and value.dim() == 0
    assert value.requires_grad
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_mask_must_be_bool_and_well_shaped():
    logits = _random_logits(2, 3, 5)
    with pytest.raises(ValueError, match="bool"):
        divergence(logits, logits, mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        divergence(logits, logits, mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_scaling(kind):
    student, teacher = _random_logits(3, 8, seed=11), _random_logits(3, 8, seed=12)
    temperature = 2.5
    scaled = divergence(student, teacher, kind, temperature=temperature)
    expected = temperature**2 * divergence(student / temperature, teacher / temperature, kind)
    assert scaled.item() == pytest.approx(expected.item(), rel=1e-5)
    assert scaled.item() != pytest.approx(divergence(student, teacher, kind).item(), rel=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(kind, dtype):
    student, teacher = _random_logits(3, 4, 50, seed=13, dtype=dtype), _random_logits(3, 4, 50, seed=14, dtype=dtype)
    value = divergence(student, teacher, kind, temperature=2.0)
    assert value.dtype == torch.float32
    assert token_divergence(student, teacher, kind).dtype == torch.float32
    assert torch.equal(value, divergence(student.float(), teacher.float(), kind, temperature=2.0))


# --- -inf in the teacher -----------------------------------------------------------------------------------

def _inf_case(seed):
    student = _random_logits(3, 6, seed=seed)
    teacher = _random_logits(3, 6, seed=seed + 1)
    teacher[:, 4:] = -math.inf  # a padded vocabulary the teacher never predicts
    teacher[1, 0] = -math.inf
    return student, teacher


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 0.9),
                                       ("skew_fkl", 0.5), ("skew_rkl", 0.5), ("tvd", 0.5)])
def test_teacher_minus_inf_gives_finite_values_and_gradients(kind, beta):
    student, teacher = _inf_case(seed=15)
    student.requires_grad_()
    teacher.requires_grad_()
    value = divergence(student, teacher, kind, beta=beta, temperature=2.0)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert torch.isfinite(teacher.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_in_both_gives_finite_values_and_gradients(kind):
    # A token impossible under both (e.g. both mask the padded vocab) must not poison anything, even rkl.
    student, teacher = _inf_case(seed=17)
    student[:, 4:] = -math.inf
    student[1, 0] = -math.inf
    student.requires_grad_()
    teacher.requires_grad_()
    value = divergence(student, teacher, kind)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    # ... and equals the divergence over the remaining tokens only.
    reduced = [token_divergence(s[torch.isfinite(s)], t[torch.isfinite(t)], kind).item()
               for s, t in zip(student.detach(), teacher.detach())]
    assert value.item() == pytest.approx(sum(reduced) / len(reduced), rel=1e-5)


def test_rkl_is_infinite_where_the_teacher_rules_out_a_student_token():
    student, teacher = _inf_case(seed=19)
    assert torch.isinf(divergence(student, teacher, "rkl"))


# --- gradients ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                       ("skew_fkl", 0.5), ("skew_rkl", 0.5), ("tvd", 0.5)])
def test_gradcheck_float64(kind, beta):
    # float64 input stays float64, so this checks the same code path the float32 run takes.
    student = _random_logits(2, 3, 5, seed=21, dtype=torch.float64).requires_grad_()
    teacher = _random_logits(2, 3, 5, seed=22, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert divergence(student, teacher, kind, beta=beta).dtype == torch.float64

    def loss(s, t):
        return divergence(s, t, kind, beta=beta, skew=0.3, temperature=1.5, mask=mask)

    assert torch.autograd.gradcheck(loss, (student, teacher))


def test_gradcheck_with_minus_inf_teacher():
    student = _random_logits(2, 5, seed=23, dtype=torch.float64).requires_grad_()
    teacher = _random_logits(2, 5, seed=24, dtype=torch.float64)
    teacher[:, 3:] = -math.inf
    for kind in ("fkl", "jsd", "skew_fkl", "skew_rkl"):
        assert torch.autograd.gradcheck(lambda s: divergence(s, teacher, kind), (student,))


def test_fkl_gradient_is_student_minus_teacher_probabilities():
    # d KL(p_T ‖ softmax(z)) / dz = softmax(z) - p_T, per position; the mean divides by the position count.
    student = _random_logits(4, 6, seed=25).requires_grad_()
    teacher = _random_logits(4, 6, seed=26)
    divergence(student, teacher, "fkl").backward()
    expected = (student.detach().softmax(-1) - teacher.softmax(-1)) / 4
    torch.testing.assert_close(student.grad, expected)


# --- cross-entropy and errors ------------------------------------------------------------------------------

def test_token_cross_entropy_matches_torch_and_ignores_minus_100():
    logits = _random_logits(2, 5, 7, seed=27)
    targets = torch.tensor([[1, -100, 6, 0, -100], [-100, 3, 3, 2, 5]])
    got = token_cross_entropy(logits, targets)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1).clamp(min=0), reduction="none")
    keep = targets != -100
    torch.testing.assert_close(got[keep], expected.reshape(2, 5)[keep])
    assert (got[~keep] == 0).all() and (got[keep] > 0).all()
    # By hand for one position: -log softmax(logits)[target].
    row = logits[0, 0].tolist()
    assert got[0, 0].item() == pytest.approx(-math.log(_softmax(row)[1]), rel=1e-5)


def test_token_cross_entropy_upcasts_bf16():
    logits = _random_logits(3, 9, seed=29, dtype=torch.bfloat16)
    targets = torch.tensor([0, 4, -100])
    got = token_cross_entropy(logits, targets)
    assert got.dtype == torch.float32
    assert torch.equal(got, token_cross_entropy(logits.float(), targets))


def test_unknown_kind_raises():
    logits = _random_logits(2, 4)
    with pytest.raises(LlmneoError, match="unknown divergence kind 'kl'.*fkl, rkl, jsd, skew_fkl, skew_rkl, tvd"):
        divergence(logits, logits, "kl")
    with pytest.raises(LlmneoError, match="unknown divergence kind"):
        token_divergence(logits, logits, "FKL")
    assert KINDS == ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


def test_bad_hyperparameters_raise():
    logits = _random_logits(2, 4)
    with pytest.raises(LlmneoError, match="temperature"):
        divergence(logits, logits, temperature=0.0)
    with pytest.raises(LlmneoError, match="beta"):
        divergence(logits, logits, "jsd", beta=1.5)
    with pytest.raises(LlmneoError, match="skew"):
        divergence(logits, logits, "skew_fkl", skew=-0.1)
