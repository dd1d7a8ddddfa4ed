"""Config: typing of YAML and key=value, defaults from the paper, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmneo.config import reference, schema
from llmneo.errors import LlmneoError


def test_paper_defaults():
    c = schema.load()
    assert (c.finetuning_type, c.lora_target, c.lora_rank, c.lora_dropout) == ("lora", "all", 128, 0.0)
    assert c.effective_lora_alpha == 256
    assert c.kd_ratio == 0.5 and c.kd_loss == "fkl" and c.kd_temperature == 1.0
    assert c.lr_scheduler_type == "cosine" and c.warmup_ratio == 0.1
    assert c.effective_learning_rate == 2e-4
    assert schema.load(overrides=["finetuning_type=full"]).effective_learning_rate == 2e-5
    assert schema.load(overrides=["lora_rank=16"]).effective_lora_alpha == 32
    assert schema.load(overrides=["lora_rank=16", "lora_alpha=8"]).effective_lora_alpha == 8


def test_overrides_are_typed_by_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2e-4\nbf16: true\nmax_samples: 10\n")  # YAML reads 2e-4 as a string
    c = schema.load(path, ["kd_ratio=0.25", "bf16=false", "max_steps=7", "max_samples=null", "lora_target=q_proj"])
    assert c.learning_rate == 2e-4 and isinstance(c.learning_rate, float)
    assert c.kd_ratio == 0.25 and c.bf16 is False and c.max_steps == 7 and c.max_samples is None
    assert c.lora_target == "q_proj"


@pytest.mark.parametrize("override, needle", [
    ("learning_rate=abc", "learning_rate' expects float"),
    ("lora_rank=1.5", "lora_rank' expects int"),
    ("bf16=maybe", "bf16' expects bool"),
    ("kd_ratio=1.5", "kd_ratio must be in [0, 1]"),
    ("lora_rank=0", "lora_rank must be > 0"),
    ("cutoff_len=-5", "cutoff_len must be > 0"),
    ("kd_loss=mse", "kd_loss must be one of"),
    ("finetuning_type=freeze", "finetuning_type must be lora or full"),
    ("kd_temperature=0", "kd_temperature must be > 0, got 0.0"),
    ("lora_alpha=0", "lora_alpha must be > 0, got 0"),
    ("learning_rate=-1e-4", "learning_rate must be > 0, got -0.0001"),
    ("kd_chunk_size=-1", "kd_chunk_size must be >= 0 (0 = unchunked), got -1"),
    ("num_fewshot=-1", "num_fewshot must be >= 0, got -1"),
    ("warmup_ratio=1", "warmup_ratio must be in [0, 1), got 1.0"),
    ("kd_skew=-0.1", "kd_skew must be in [0, 1], got -0.1"),
    ("torch_dtype=int8", "torch_dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    ("lr_scheduler_type=step", "lr_scheduler_type must be one of cosine,"),
    ("stage=dpo", "stage 'dpo' is not supported"),
    ("notakey", "is not key=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(LlmneoError) as err:
        schema.load(overrides=[override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_lone_value_that_is_no_key_is_not_echoed():
    """`llmneo train neo.yaml sk-proj-Abc123` (a key pasted without its name) names the position, not the value."""
    with pytest.raises(LlmneoError) as err:
        schema.load(overrides=["lora_rank=8", "sk-proj-Abc123"])
    assert "override 2 (not shown" in str(err.value) and "Abc123" not in str(err.value)


def test_null_passes_the_range_checks_of_optional_keys():
    c = schema.load(overrides=["lora_alpha=null", "learning_rate=null", "save_total_limit=null", "num_fewshot=null"])
    assert c.lora_alpha is c.learning_rate is c.save_total_limit is c.num_fewshot is None
    assert schema.load(overrides=["kd_chunk_size=0", "warmup_ratio=0", "kd_ratio=1"]).kd_chunk_size == 0


def test_unknown_key_suggests_closest():
    with pytest.raises(LlmneoError, match="did you mean 'learning_rate'"):
        schema.load(overrides=["learning_rat=1e-4"])


def test_ignored_llamafactory_keys_warn_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("overwrite_cache: true\npreprocessing_num_workers: 16\nreport_to: none\n")
    with pytest.warns(UserWarning) as record:
        schema.load(path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "overwrite_cache" in messages[0] and "preprocessing_num_workers" in messages[0]


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(LlmneoError, match="config file not found"):
        schema.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(LlmneoError, match="YAML syntax error .* line"):
        schema.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(LlmneoError, match="must be a mapping"):
        schema.load(listy)


def test_method_from_arms():
    both = ["teacher_model_name_or_path=t"]
    assert schema.load(overrides=both).method == "neo"
    assert schema.load(overrides=both + ["finetuning_type=full"]).method == "kd"
    assert schema.load().method == "lora"
    assert schema.load(overrides=["finetuning_type=full"]).method == "sft"
    assert schema.load(overrides=both + ["kd_ratio=0"]).method == "lora"


def test_help_lists_every_key_with_default():
    text = reference.help_text()
    for name in schema.FIELDS:
        assert f"  {name} (default:" in text
    assert "lora_rank (default: 128)" in text


def test_docs_config_reference_is_current():
    doc = Path(__file__).parents[2] / "docs" / "config.md"
    regenerate = "regenerate: python -m llmneo.config.reference > docs/config.md"
    assert doc.read_text() == reference.reference_markdown(), regenerate
