"""Model loading: precision fallback, dtypes, vocabulary checks, clear errors for wrong paths."""

from __future__ import annotations

import warnings

import pytest
import torch

from llmneo.config import schema
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import loading


def test_bf16_falls_back_to_fp32_without_a_bf16_gpu():
    cfg = schema.load(overrides=["bf16=true"])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert loading.resolve_precision(cfg).mixed_precision == "bf16"
        return
    with pytest.warns(UserWarning, match="training in float32"):
        precision = loading.resolve_precision(cfg)
    assert precision == loading.Precision("no", torch.float32)


def test_teacher_frozen_in_configured_dtype(student_dir, teacher_dir):
    cfg = schema.load(overrides={"model_name_or_path": str(student_dir),
                                 "teacher_model_name_or_path": str(teacher_dir), "torch_dtype": "bfloat16"})
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    assert next(loaded.teacher.parameters()).dtype == torch.bfloat16
    assert not loaded.teacher.training
    assert not any(p.requires_grad for p in loaded.teacher.parameters())


def test_full_student_keeps_fp32_master_weights(student_dir):
    cfg = schema.load(overrides={"model_name_or_path": str(student_dir), "finetuning_type": "full"})
    precision = loading.Precision("bf16", torch.bfloat16)  # as on a bf16 GPU
    assert loading.weight_dtype(cfg, "student", precision) == torch.float32
    assert loading.weight_dtype(cfg, "teacher", precision) == torch.bfloat16


@pytest.mark.parametrize("bf16_gpu", [False, True])
def test_every_command_resolves_dtypes_in_one_function(monkeypatch, bf16_gpu):
    """train (student, teacher), cache (teacher), eval, export (merge) and prune ask models.weight_dtype;
    auto keeps each command's own choice, and torch_dtype wins everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    lora = schema.load(overrides={"bf16": "true"})
    full = schema.load(overrides={"bf16": "true", "finetuning_type": "full"})
    compute = torch.bfloat16 if bf16_gpu else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16 fallback warning on a machine without a bf16 GPU
        assert loading.weight_dtype(lora, "student") == compute
        assert loading.weight_dtype(full, "student") == torch.float32  # fp32 master weights
        assert loading.weight_dtype(lora, "teacher") == compute
        assert loading.weight_dtype(schema.load(overrides={}), "teacher") == torch.float32  # bf16 not asked for
    assert loading.weight_dtype(schema.load(overrides={}), "eval") == compute  # eval: bf16 GPU whatever bf16 says
    assert loading.weight_dtype(lora, "merge") == torch.float32
    assert loading.weight_dtype(lora, "prune") == torch.float32
    fixed = schema.load(overrides={"torch_dtype": "float16", "finetuning_type": "full"})
    for role in loading.ROLES:
        assert loading.weight_dtype(fixed, role) == torch.float16


def test_teacher_freezing_has_one_owner(student_dir, teacher_dir):
    """models.freeze is the one place a teacher is frozen: the live teacher signal relies on it and does not
    change a model it is given."""
    from llmneo.teachers.live import LiveTeacher

    cfg = schema.load(overrides={"model_name_or_path": str(student_dir)})
    model = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student.train()
    LiveTeacher(model, 10)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert loading.freeze(model) is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_padded_vocab_is_accepted_and_real_size_reported(student_dir, teacher_dir, tokenizer):
    cfg = schema.load(overrides={"model_name_or_path": str(student_dir),
                                 "teacher_model_name_or_path": str(teacher_dir)})
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    assert loaded.teacher.config.vocab_size > loaded.student.config.vocab_size
    assert loaded.vocab_size == len(tokenizer)


def test_model_smaller_than_tokenizer_is_an_error(tmp_path, tokenizer):
    small = tiny.build_model(tokenizer, vocab_size=len(tokenizer) - 10)
    tiny.save_pair(small, tokenizer, tmp_path / "small")
    cfg = schema.load(overrides={"model_name_or_path": str(tmp_path / "small")})
    with pytest.raises(LlmneoError, match="output rows but its tokenizer has"):
        loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False)


def test_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import T5Config, T5Model

    t5 = T5Model(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    tiny.save_pair(t5, tokenizer, tmp_path / "t5")
    with pytest.raises(LlmneoError, match="is not a causal language model \\(model type 't5'\\)"):
        loading.load_model(str(tmp_path / "t5"), "model_name_or_path", torch.float32)


def test_missing_and_wrong_paths(tmp_path, student_dir):
    with pytest.raises(LlmneoError, match="does not exist"):
        loading.load_model(str(tmp_path / "nope"), "model_name_or_path", torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmneoError, match="has no config.json"):
        loading.load_model(str(tmp_path / "empty"), "model_name_or_path", torch.float32)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(LlmneoError, match="is a PEFT adapter, not a model"):
        loading.load_model(str(tmp_path / "adapter"), "model_name_or_path", torch.float32)


def test_qwen2_family_loads(tmp_path, tokenizer):
    qwen = tiny.build_model(tokenizer, family="qwen2", vocab_size=len(tokenizer) + 32)
    tiny.save_pair(qwen, tokenizer, tmp_path / "qwen")
    model = loading.load_model(str(tmp_path / "qwen"), "model_name_or_path", torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
