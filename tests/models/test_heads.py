"""heads.final_hidden_states decides `logits_to_keep` from the model's forward signature, once, and never
runs a second forward: a model that does not take it gets one plain forward, and a TypeError raised inside
a forward that does take it surfaces instead of triggering a retry."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmneo.config import schema
from llmneo.models import adapters, heads


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


class WithoutLogitsToKeep(LlamaForCausalLM):
    """An architecture whose forward names no logits_to_keep; its **kwargs takes what PEFT passes along."""

    calls = 0

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, inputs_embeds=None, **kwargs):
        type(self).calls += 1
        assert "logits_to_keep" not in kwargs, "not named in the signature: must not be passed"
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               inputs_embeds=inputs_embeds)


class OwnTypeError(LlamaForCausalLM):
    """Takes logits_to_keep, then fails with a TypeError of its own."""

    calls = 0

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, logits_to_keep=0, **kwargs):
        type(self).calls += 1
        raise TypeError("a bug inside the model's forward")


def _inputs():
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_model_without_logits_to_keep_gets_one_plain_forward():
    torch.manual_seed(0)
    model = WithoutLogitsToKeep(_config()).eval()
    ids, mask = _inputs()
    assert not heads.accepts_logits_to_keep(model)
    WithoutLogitsToKeep.calls = 0
    hidden = heads.final_hidden_states(model, ids, mask)
    assert WithoutLogitsToKeep.calls == 1
    want = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, want)


def test_a_type_error_inside_forward_surfaces_after_one_forward():
    model = OwnTypeError(_config()).eval()
    ids, mask = _inputs()
    OwnTypeError.calls = 0
    with pytest.raises(TypeError, match="a bug inside the model's forward"):
        heads.final_hidden_states(model, ids, mask)
    assert OwnTypeError.calls == 1  # no second forward without logits_to_keep


def test_the_decision_looks_through_peft_to_the_hf_model():
    """PEFT's forward takes **kwargs and says nothing: the HF model under it decides."""
    cfg = schema.load(overrides={"lora_rank": 2, "lora_target": "q_proj"})
    for model_class, expected in ((LlamaForCausalLM, True), (WithoutLogitsToKeep, False)):
        wrapped = adapters.apply(model_class(_config()), cfg)
        assert type(wrapped).__name__.startswith("Peft")
        assert heads.accepts_logits_to_keep(wrapped) is expected
        ids, mask = _inputs()
        assert heads.final_hidden_states(wrapped, ids, mask).shape == (2, 6, 16)
