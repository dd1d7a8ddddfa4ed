"""The fused chunked loss equals the unchunked path; heads honour soft-capping and logit_scale."""

from __future__ import annotations

import pytest
import torch
from helpers import adapted_pair

from llmneo.config import schema
from llmneo.data import dataset
from llmneo.data.labels import response_positions
from llmneo.demo import tiny
from llmneo.loss import divergences
from llmneo.loss.rows import SparseRows
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, heads, loading
from llmneo.teachers.live import LiveTeacher
from llmneo.teachers.signal import TeacherSignal
from llmneo.train import loop

ALL_LORA = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


def _setup(base_overrides, **extra):
    cfg = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, **extra})
    loaded, model = adapted_pair(cfg)
    examples = dataset.build(cfg, loaded.tokenizer).train[:5]
    batch = dataset.collate(examples, loaded.tokenizer.pad_token_id)
    return cfg, loaded, model, LiveTeacher(loaded.teacher, loaded.vocab_size), batch


def _loss_and_grads(model, teacher, batch, cfg, vocab, kd_ratio=0.5):
    model.zero_grad(set_to_none=True)
    settings = divergences.KDSettings.from_config(cfg) if teacher is not None else divergences.KDSettings()
    loss, ce, kd, n = loop.micro_batch_sums(model, teacher, batch,
                                            LossSpec(vocab, kd_ratio, settings, cfg.kd_chunk_size))
    (loss / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss), float(ce), None if kd is None else float(kd), grads


@pytest.mark.parametrize("kind", divergences.KINDS)
def test_chunked_equals_unchunked_values_and_grads(base_overrides, kind):
    cfg, loaded, model, teacher, batch = _setup(base_overrides, kd_loss=kind, kd_temperature=1.5, kd_beta=0.3)
    chunked = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, "kd_loss": kind,
                                     "kd_temperature": 1.5, "kd_beta": 0.3, "kd_chunk_size": 7})
    reference = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, "kd_loss": kind,
                                       "kd_temperature": 1.5, "kd_beta": 0.3, "kd_chunk_size": 0})
    got = _loss_and_grads(model, teacher, batch, chunked, loaded.vocab_size)
    want = _loss_and_grads(model, teacher, batch, reference, loaded.vocab_size)
    for a, b in zip(got[:3], want[:3]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert any("lm_head" in name for name in got[3]), "lm_head's adapter must be trained"
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for name, g in want[3].items() if "lm_head" in name)


def test_chunked_without_teacher_and_full_finetuning(base_overrides):
    cfg = schema.load(overrides={**base_overrides, "finetuning_type": "full", "kd_chunk_size": 4})
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False)
    model = adapters.apply(loaded.student, cfg)
    batch = dataset.collate(dataset.build(cfg, loaded.tokenizer).train[:4], loaded.tokenizer.pad_token_id)
    got = _loss_and_grads(model, None, batch, cfg, loaded.vocab_size)
    want = _loss_and_grads(model, None, batch, schema.load(overrides={**base_overrides, "finetuning_type": "full",
                                                                      "kd_chunk_size": 0}), loaded.vocab_size)
    assert got[2] is None and got[0] == pytest.approx(want[0], rel=1e-6)
    for name in want[3]:  # lm_head.weight and the embeddings included
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family, extra", [("gemma2", {"final_logit_softcapping": 3.0}),
                                           ("cohere", {"logit_scale": 0.25})])
def test_head_applies_softcapping_and_logit_scale(tokenizer, family, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                               pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # big logits: capping and scaling matter
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    mask = torch.ones_like(ids)
    head, _ = heads.output_head(model)
    with torch.no_grad():
        via_head = head(heads.final_hidden_states(model, ids, mask))
        direct = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(via_head, direct, rtol=1e-5, atol=1e-5)
    plain = model.get_output_embeddings()(heads.final_hidden_states(model, ids, mask))
    assert (plain - direct).abs().max() > 0.1, "the test must exercise the capping / scaling"


@pytest.mark.parametrize("kind", divergences.KINDS)
def test_sparse_with_k_equal_v_is_exact(kind):
    from llmneo.cache.write import topk_rows

    torch.manual_seed(0)
    student = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 11, dtype=torch.float64) * 3
    rows = topk_rows(teacher, k=11)
    for temperature in (1.0, 2.0):
        dense = divergences.token_divergence(student, teacher, kind, temperature=temperature, beta=0.3, skew=0.2)
        sparse = divergences.sparse_token_divergence(student, rows.ids, rows.logprobs.double(), rows.tail.double(), kind,
                                                temperature=temperature, beta=0.3, skew=0.2)
        torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
        g_dense, = torch.autograd.grad(dense.sum(), student)
        g_sparse, = torch.autograd.grad(sparse.sum(), student)
        assert torch.isfinite(g_sparse).all()
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", divergences.KINDS)
def test_sparse_is_a_lower_bound_with_small_k(kind):
    from llmneo.cache.write import topk_rows

    torch.manual_seed(1)
    student, teacher = torch.randn(20, 50), torch.randn(20, 50) * 2
    rows = topk_rows(teacher, k=5)
    assert torch.all(rows.tail < 0) and torch.all(torch.isfinite(rows.tail))
    mass = rows.logprobs.exp().sum(-1) + rows.tail.exp()
    torch.testing.assert_close(mass, torch.ones(20))
    dense = divergences.token_divergence(student, teacher, kind, beta=0.5, skew=0.1)
    sparse = divergences.sparse_token_divergence(student, rows.ids, rows.logprobs, rows.tail, kind, beta=0.5, skew=0.1)
    assert torch.all(sparse <= dense + 1e-5)
    assert sparse.mean() > 0.2 * dense.mean()  # and it keeps most of the signal


def test_chunked_loss_with_sparse_rows_matches_reference(base_overrides):
    """The fused path and the reference path agree with a sparse (cached) teacher too."""
    from llmneo.cache.write import topk_rows

    cfg, loaded, model, teacher, batch = _setup(base_overrides)
    positions, _ = response_positions(batch["labels"])
    dense = teacher.rows(batch, positions)
    sparse = topk_rows(dense[0:len(dense)].logits, k=8)

    class Fixed(TeacherSignal):
        def rows(self, batch, positions):
            return SparseRows(sparse.ids, sparse.logprobs, sparse.tail)

    chunked = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, "kd_chunk_size": 5})
    reference = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, "kd_chunk_size": 0})
    got = _loss_and_grads(model, Fixed(), batch, chunked, loaded.vocab_size)
    want = _loss_and_grads(model, Fixed(), batch, reference, loaded.vocab_size)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-5, msg=name)


def test_qwen2_student_chunked(tmp_path, tokenizer, alpaca_file):
    for name, seed in (("qwen", 9), ("qwen_teacher", 10)):  # AutoTokenizer reloads both the Qwen2 way
        qwen = tiny.build_model(tokenizer, family="qwen2", vocab_size=len(tokenizer) + 16, seed=seed)
        tiny.save_pair(qwen, tokenizer, tmp_path / name)
    overrides = {"model_name_or_path": str(tmp_path / "qwen"),
                 "teacher_model_name_or_path": str(tmp_path / "qwen_teacher"),
                 "dataset": str(alpaca_file), "lora_rank": 4, "cutoff_len": 64}
    cfg, loaded, model, teacher, batch = _setup(overrides, kd_chunk_size=3)
    got = _loss_and_grads(model, teacher, batch, cfg, loaded.vocab_size)
    want = _loss_and_grads(model, teacher, batch, schema.load(overrides={**overrides, "lora_target": ALL_LORA,
                                                                         "kd_chunk_size": 0}), loaded.vocab_size)
    assert got[0] == pytest.approx(want[0], rel=1e-5)


def test_teacher_full_logits_mode_matches_hidden_state_mode(base_overrides):
    """The path used under FSDP / ZeRO-3 (teacher logits from its own forward, no chunking) gives the
    same loss and gradients as the chunked default."""
    cfg, loaded, model, teacher, batch = _setup(base_overrides, kd_chunk_size=4)
    full = LiveTeacher(loaded.teacher, loaded.vocab_size, full_logits=True)
    unchunked = schema.load(overrides={**base_overrides, "lora_target": ALL_LORA, "kd_chunk_size": 0})
    got = _loss_and_grads(model, full, batch, unchunked, loaded.vocab_size)
    want = _loss_and_grads(model, teacher, batch, cfg, loaded.vocab_size)
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[2] == pytest.approx(want[2], rel=1e-5)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-5, msg=name)
