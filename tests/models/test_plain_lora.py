"""models.plain_lora: every servable variant written as a plain LoRA that vanilla PEFT loads onto the original
base with the trained model's logits; what cannot be served is refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from llmneo.config import schema
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import adapters, loading, plain_lora
from llmneo.train import setup as training_setup

SERVABLE = ("lora", "rslora", "moslora", "pissa", "olora")
RANK = 4
IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 60, 61], [1, 250, 12, 5, 66, 2, 9, 10]])


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)


def _trained(base, tokenizer, variant: str, target: str = "all", seed: int = 0):
    """The student as train.setup builds it (PEFT model and initial adapter), its adapter moved off its
    initialisation (B is zero there for plain LoRA) as training would."""
    cfg = schema.load(overrides={"lora_variant": variant, "lora_rank": RANK, "lora_alpha": 3 * RANK,
                                 "lora_target": target})
    loaded = loading.Loaded(student=copy.deepcopy(base), teacher=None, tokenizer=tokenizer, vocab_size=len(tokenizer))
    model, initial = training_setup._student(cfg, loaded)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval(), initial, cfg


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _served(base, directory):
    """The written folder loaded by vanilla PEFT onto a fresh copy of the original base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@pytest.mark.parametrize("variant", SERVABLE)
def test_each_variant_serves_its_trained_logits_on_the_original_base(tmp_path, base, tokenizer, variant):
    model, initial, cfg = _trained(base, tokenizer, variant)
    reference = _logits(model)
    assert (reference - _logits(base)).abs().max() > 1e-2, "the adapter must change the model"

    rank = plain_lora.write(model, tmp_path / "sync-1", initial=initial)
    rewrites = variant in ("pissa", "olora")
    assert rank == (2 * RANK if rewrites else RANK) == plain_lora.served_rank(cfg)
    torch.testing.assert_close(_logits(_served(base, tmp_path / "sync-1")), reference, rtol=0, atol=1e-5)

    config = json.loads((tmp_path / "sync-1" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (rank, rank, False, False)
    assert config["init_lora_weights"] is True  # vLLM refuses "pissa" / "olora" (they rewrite its base)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    tensors = load_file(str(tmp_path / "sync-1" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors  # PEFT's saved names
    assert not any("mixer" in key or ".default." in key for key in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert [p.name for p in tmp_path.iterdir()] == ["sync-1"]  # the staging sibling was renamed away


@pytest.mark.parametrize("variant", ["moslora", "pissa"])
def test_embedding_and_head_layers_are_written_too(tmp_path, base, tokenizer, variant):
    model, initial, _ = _trained(base, tokenizer, variant, target="q_proj,embed_tokens,lm_head", seed=1)
    plain_lora.write(model, tmp_path / "a", initial=initial)
    torch.testing.assert_close(_logits(_served(base, tmp_path / "a")), _logits(model), rtol=0, atol=1e-5)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    assert not any("base_layer" in key for key in tensors)  # the base stays the server's own (PiSSA rewrote it here)


def test_a_wrapped_model_and_an_initial_adapter_as_peft_saves_it(tmp_path, base, tokenizer):
    """DDP / accelerate wrap the PeftModel in `.module`; an initial adapter read back from initial_adapter/
    has PEFT's saved key names (no adapter name)."""
    from peft import get_peft_model_state_dict

    class Wrapper(torch.nn.Module):  # what DDP and accelerate's wrappers have in common: the model at .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model, initial, _ = _trained(base, tokenizer, "olora")
    saved_form = get_peft_model_state_dict(model, state_dict=initial)  # named as save_pretrained writes them
    assert saved_form.keys().isdisjoint(initial)
    plain_lora.write(Wrapper(model), tmp_path / "a", initial=saved_form)
    torch.testing.assert_close(_logits(_served(base, tmp_path / "a")), _logits(model), rtol=0, atol=1e-5)


def test_a_bf16_adapter_is_written_in_bf16(tmp_path, base, tokenizer):
    model, _, _ = _trained(base, tokenizer, "moslora")
    plain_lora.write(model.to(torch.bfloat16), tmp_path / "a")
    assert {t.dtype for t in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).values()} == {torch.bfloat16}


def _one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_dora_and_full_finetuning_are_refused_in_one_line(tmp_path, base, tokenizer):
    with pytest.raises(LlmneoError) as caught:
        plain_lora.check_servable(schema.load(overrides={"lora_variant": "dora"}))
    assert "DoRA" in _one_line(caught) and "magnitude" in str(caught.value) and "lora_variant" in str(caught.value)
    with pytest.raises(LlmneoError) as caught:
        plain_lora.check_servable(schema.load(overrides={"finetuning_type": "full"}))
    assert "finetuning_type: full" in _one_line(caught) and "drop rollout_endpoint" in str(caught.value)
    for variant in SERVABLE:
        plain_lora.check_servable(schema.load(overrides={"lora_variant": variant}))

    dora, _, _ = _trained(base, tokenizer, "dora")
    with pytest.raises(LlmneoError) as caught:
        plain_lora.write(dora, tmp_path / "dora")
    assert "DoRA" in _one_line(caught)
    with pytest.raises(LlmneoError) as caught:
        plain_lora.write(copy.deepcopy(base), tmp_path / "full")
    assert "finetuning_type: full" in _one_line(caught)
    assert not list(tmp_path.iterdir())  # nothing written, not even a staging folder


def test_pissa_without_its_initial_adapter_and_a_used_folder_are_refused(tmp_path, base, tokenizer):
    model, initial, _ = _trained(base, tokenizer, "pissa")
    with pytest.raises(LlmneoError) as caught:
        plain_lora.write(model, tmp_path / "a")
    assert "initial" in _one_line(caught)
    plain_lora.write(model, tmp_path / "a", initial=initial)
    with pytest.raises(LlmneoError) as caught:
        plain_lora.write(model, tmp_path / "a", initial=initial)
    assert "fresh folder" in _one_line(caught)


def test_served_rank_is_what_the_server_sees(tmp_path):
    assert plain_lora.served_rank(schema.load(overrides={"lora_rank": 8})) == 8
    assert plain_lora.served_rank(schema.load(overrides={"lora_rank": 8, "lora_variant": "rslora"})) == 8
    assert plain_lora.served_rank(schema.load(overrides={"lora_rank": 8, "pissa_init": True})) == 16
    assert plain_lora.served_rank(schema.load(overrides={"lora_rank": 8, "lora_variant": "olora"})) == 16
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12, "use_dora": False}))
    assert plain_lora.served_rank(schema.load(overrides={"lora_rank": 8, "adapter_name_or_path": str(tmp_path)})) == 12


def test_layers_of_smaller_rank_are_padded_to_one_rank(tmp_path, base):
    """PEFT's rank_pattern gives layers their own rank; the folder has one r, the smaller layers zero-padded."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           rank_pattern={"v_proj": 2}))
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn_like(p))
    assert plain_lora.write(model, tmp_path / "a") == 4
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 4
    torch.testing.assert_close(_logits(_served(base, tmp_path / "a")), _logits(model.eval()), rtol=0, atol=1e-5)
