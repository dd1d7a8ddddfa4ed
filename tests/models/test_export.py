"""Export: a trained adapter merged into a plain HF model gives the adapter model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from llmneo import cli


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, student_dir, teacher_dir, alpaca_file) -> Path:
    out = tmp_path_factory.mktemp("neo") / "out"
    overrides = {
        "model_name_or_path": str(student_dir), "teacher_model_name_or_path": str(teacher_dir),
        "dataset": str(alpaca_file), "output_dir": str(out), "lora_rank": 4, "max_steps": 4,
        "learning_rate": 1e-2, "warmup_ratio": 0.0, "per_device_train_batch_size": 4, "cutoff_len": 64,
        "lora_target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
    }
    path = out.parent / "neo.yaml"
    path.write_text(yaml.safe_dump(overrides))
    assert cli.main(["train", str(path)]) == 0
    return out


@pytest.mark.slow
def test_export_round_trip(tmp_path, trained_adapter, student_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_dir = tmp_path / "merged"
    # model_name_or_path omitted: read from the adapter's config
    assert cli.main(["export", f"adapter_name_or_path={trained_adapter}", f"export_dir={export_dir}"]) == 0
    assert (export_dir / "model.safetensors").is_file() and (export_dir / "tokenizer_config.json").is_file()
    assert not (export_dir / "adapter_config.json").exists()

    ids = torch.tensor([[1, 17, 42, 99, 7, 3], [1, 250, 12, 5, 66, 2]])
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, trained_adapter).eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2, "the adapter must actually change the model"
    assert (merged_logits - adapter_logits).abs().max() <= 1e-4


def test_export_errors(tmp_path, student_dir, capsys):
    assert cli.main(["export", f"export_dir={tmp_path / 'x'}"]) == 2
    assert "adapter_name_or_path is not set" in capsys.readouterr().err
    assert cli.main(["export", f"adapter_name_or_path={student_dir}", f"export_dir={tmp_path / 'x'}"]) == 2
    assert "is a full model, not an adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_export_keeps_the_base_dtype(tmp_path, tokenizer, alpaca_file):
    """A bf16 base is merged in fp32 for precision but saved in bf16, like the base."""
    from transformers import AutoModelForCausalLM

    from llmneo.demo import tiny

    base_dir = tiny.save_pair(tiny.build_model(tokenizer, seed=4).to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    out = tmp_path / "neo"
    values = {"model_name_or_path": str(base_dir), "dataset": str(alpaca_file), "output_dir": str(out),
              "lora_rank": 2, "max_steps": 1, "per_device_train_batch_size": 4, "cutoff_len": 64,
              "torch_dtype": "float32"}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(values))
    assert cli.main(["train", str(tmp_path / "t.yaml")]) == 0
    assert cli.main(["export", f"adapter_name_or_path={out}", f"export_dir={tmp_path / 'merged'}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert next(merged.parameters()).dtype == torch.bfloat16
