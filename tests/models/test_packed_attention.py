"""Which models keep neat-packed examples apart (models.inputs), and the one-line refusal of those that do not.

For each model family the tests build, a row packing three sequences (position ids restarting at each, no
attention mask) must give each sequence the hidden states it gets alone, with sdpa and with eager attention.
"""

from __future__ import annotations

import pytest
import torch
from helpers import write_yaml
from transformers import AutoConfig, AutoModelForCausalLM

from llmneo import cli
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import heads, inputs

FAMILIES = {"llama": {}, "qwen2": {}, "mistral": {}, "gemma2": {"head_dim": 8}, "cohere": {}, "phi3": {},
            "qwen3": {"head_dim": 8}, "gemma3_text": {"head_dim": 8}}


def _tiny(family: str, implementation: str, **extra):
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **FAMILIES.get(family, {}), **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


@pytest.mark.parametrize("family, implementation", [(f, i) for f in sorted(FAMILIES) for i in ("sdpa", "eager")
                                                     if (f, i) != ("gemma2", "sdpa")])  # transformers: gemma2 is eager
def test_each_family_keeps_packed_sequences_apart(family, implementation):
    model = _tiny(family, implementation)
    inputs.check_isolates(model, "model_name_or_path", rows_per_batch=2)
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randint(3, 96, (n,), generator=generator) for n in (6, 9, 4)]
    row = torch.cat(parts + [torch.zeros(5, dtype=torch.long)])[None]  # (1, 24): three sequences, then padding
    positions = torch.cat([torch.arange(len(p)) for p in parts] + [torch.arange(5)])[None]
    with torch.no_grad():
        packed = heads.final_hidden_states(model, row, None, positions)[0]
        crossed = heads.final_hidden_states(model, row, torch.ones_like(row))[0]  # no restarts: cross-talk
        start = 0
        for part in parts:
            alone = heads.final_hidden_states(model, part[None], torch.ones(1, len(part), dtype=torch.long))[0]
            torch.testing.assert_close(packed[start:start + len(part)], alone, rtol=1e-5, atol=1e-5)
            if start:
                assert (crossed[start:start + len(part)] - alone).abs().max() > 1e-3
            start += len(part)


def test_models_that_would_let_packed_examples_see_each_other_are_refused():
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", vocab_size=96, hidden_size=32,
                                                                  num_hidden_layers=2))
    with pytest.raises(LlmneoError, match="does not build its attention mask"):
        inputs.check_isolates(mamba, "model_name_or_path", 1)
    jamba = _tiny("jamba", "eager")
    with pytest.raises(LlmneoError, match="has mamba layers"):
        inputs.check_isolates(jamba, "teacher_model_name_or_path", 1)
    llama = _tiny("llama", "sdpa")
    llama.config._attn_implementation = "flash_attention_2"  # only what check_isolates reads: no GPU here
    with pytest.raises(LlmneoError, match="per_device_train_batch_size: 1"):
        inputs.check_isolates(llama, "model_name_or_path", 2)
    inputs.check_isolates(llama, "model_name_or_path", 1)  # varlen separates the examples of a one-row batch
    llama.config._attn_implementation = "paged|sdpa"
    with pytest.raises(LlmneoError, match="has not checked"):
        inputs.check_isolates(llama, "model_name_or_path", 1)


def test_a_recurrent_student_with_neat_packing_is_one_line_exit_2(tmp_path, tokenizer, base_overrides, capsys):
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    student = tiny.save_pair(mamba, tokenizer, tmp_path / "mamba")
    values = {**base_overrides, "model_name_or_path": str(student), "neat_packing": True}
    capsys.readouterr()
    assert cli.main(["train", write_yaml(tmp_path, "t.yaml", values)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neat_packing: model_name_or_path (MambaForCausalLM)" in err[0]
    assert not (tmp_path / "out").exists()
