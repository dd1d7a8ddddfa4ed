"""lora_target: every listed module must match one of the model's modules (PEFT only refuses a list that
matches nothing, so a misspelled name beside a good one used to be dropped silently)."""

from __future__ import annotations

import pytest
from helpers import write_yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import adapters


def _student(tokenizer):
    return tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)


def _adapted(model) -> set[str]:
    """The short names of the modules that received a LoRA branch."""
    return {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_a_misspelled_target_beside_a_good_one_is_an_error_naming_it(tokenizer):
    cfg = schema.load(overrides={"lora_rank": 2, "lora_target": "q_proj,v_porj"})
    with pytest.raises(LlmneoError) as caught:
        adapters.apply(_student(tokenizer), cfg)
    message = str(caught.value)
    assert "'v_porj'" in message and "'q_proj'" not in message and "\n" not in message
    assert "v_proj" in message and "lm_head" in message and "down_proj" in message  # the model's linear modules


def test_every_unmatched_target_is_named(tokenizer):
    cfg = schema.load(overrides={"lora_rank": 2, "lora_target": "q_prj, v_porj ,k_proj"})
    with pytest.raises(LlmneoError, match=r"'q_prj', 'v_porj' match no module"):
        adapters.apply(_student(tokenizer), cfg)


@pytest.mark.parametrize("target, adapted", [
    ("all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("q_proj, v_proj", {"q_proj", "v_proj"}),
    ("self_attn.q_proj,lm_head", {"q_proj", "lm_head"}),  # a dotted suffix of a module's path, as PEFT matches
])
def test_matching_targets_still_work(tokenizer, target, adapted):
    model = adapters.apply(_student(tokenizer), schema.load(overrides={"lora_rank": 2, "lora_target": target}))
    assert _adapted(model) == adapted


@pytest.mark.parametrize("variant", ["dora", "moslora"])
def test_variants_check_their_targets_too(tokenizer, variant):
    good = schema.load(overrides={"lora_rank": 2, "lora_target": "q_proj,v_proj", "lora_variant": variant})
    assert _adapted(adapters.apply(_student(tokenizer), good)) == {"q_proj", "v_proj"}
    bad = schema.load(overrides={"lora_rank": 2, "lora_target": "q_proj,v_porj", "lora_variant": variant})
    with pytest.raises(LlmneoError, match="'v_porj'"):
        adapters.apply(_student(tokenizer), bad)


def test_a_full_run_ignores_lora_target(tokenizer):
    cfg = schema.load(overrides={"finetuning_type": "full", "lora_target": "v_porj"})
    model = adapters.apply(_student(tokenizer), cfg)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_the_cli_refuses_a_misspelled_target_in_one_line(tmp_path, base_overrides, capsys):
    values = {**base_overrides, "lora_target": "q_proj,v_porj"}
    assert cli.main(["train", write_yaml(tmp_path, "t.yaml", values)]) == 2
    err = capsys.readouterr().err.strip()
    assert "v_porj" in err and len(err.splitlines()) == 1
