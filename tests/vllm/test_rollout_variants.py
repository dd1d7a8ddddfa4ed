"""Every servable LoRA variant, written by models.plain_lora and loaded into the real student server (its base
is the student's original base), generates exactly the greedy tokens HF generates with the PEFT model; an
adapter above --max-lora-rank is refused by the server."""

from __future__ import annotations

import copy

import pytest
import torch

from llmneo.config import schema
from llmneo.models import adapters, plain_lora

RANK = 4  # PiSSA / OLoRA serve 2r = 8, within the student server's --max-lora-rank 16
MAX_TOKENS = 12
PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 12], [1, 60, 61, 9, 10, 66, 5, 33]]


@pytest.fixture(scope="module")
def base(vllm_student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_student_dir, dtype=torch.float32)


def _trained(base, variant: str, rank: int = RANK, target: str = "all"):
    """The PEFT student (with its initial adapter for PiSSA / OLoRA), moved off its initialisation as training
    would move it."""
    cfg = schema.load(overrides={"lora_variant": variant, "lora_rank": rank, "lora_alpha": 3 * rank,
                                 "lora_target": target, "gradient_checkpointing": False})
    model = adapters.apply(copy.deepcopy(base), cfg)
    initial = ({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
               if adapters.rewrites_base(cfg) else None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval(), initial, cfg


def _through_eos(ids: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (where vLLM stops)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _hf_greedy(model, eos: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                       do_sample=False, eos_token_id=eos, pad_token_id=0)
            out.append(_through_eos(generated[0, len(prompt):].tolist(), eos))
    return out


def _served_greedy(server, name: str, eos: int) -> list[list[int]]:
    status, answer = server.post("/v1/completions", {"model": name, "prompt": PROMPTS, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "return_token_ids": True})
    assert status == 200, answer
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    return [_through_eos(list(choice["token_ids"]), eos) for choice in choices]


def _load(server, name: str, path) -> None:
    status, answer = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    assert status == 200, answer


@pytest.mark.parametrize("variant, target", [("lora", "all"), ("rslora", "all"), ("moslora", "all"),
                                             ("pissa", "all"), ("olora", "all"),
                                             ("pissa", "q_proj,embed_tokens,lm_head")])
def test_each_variant_generates_on_the_server_what_it_generates_in_hf(student_server, base, vllm_tokenizer,
                                                                      tmp_path, variant, target):
    model, initial, cfg = _trained(base, variant, target=target)
    plain_lora.check_servable(cfg)
    rank = plain_lora.write(model, tmp_path / "sync-1", initial=initial)
    assert rank == plain_lora.served_rank(cfg) == (2 * RANK if variant in ("pissa", "olora") else RANK)
    eos = vllm_tokenizer.eos_token_id
    name = f"student-{variant}-{len(target)}"
    _load(student_server, name, tmp_path / "sync-1")
    try:
        served = _served_greedy(student_server, name, eos)
    finally:
        status, answer = student_server.post("/v1/unload_lora_adapter", {"lora_name": name})
        assert status == 200, answer
    expected = _hf_greedy(model, eos)
    assert served == expected
    assert expected != _hf_greedy(base, eos), "the adapter must change what is generated"
    assert all(len(ids) >= 2 for ids in expected)


def test_a_rank_above_max_lora_rank_is_refused_by_the_server(student_server, base, vllm_tokenizer, tmp_path):
    model, initial, cfg = _trained(base, "pissa", rank=9, target="q_proj")
    assert plain_lora.served_rank(cfg) == 18  # what a caller checks against --max-lora-rank 16 before training
    assert plain_lora.write(model, tmp_path / "big", initial=initial) == 18
    status, answer = student_server.post("/v1/load_lora_adapter", {"lora_name": "too-big",
                                                                   "lora_path": str(tmp_path / "big")})
    assert status == 500
    assert answer["error"]["type"] == "InternalServerError"
    assert "LoRA rank 18 is greater than max_lora_rank 16." in answer["error"]["message"]
    # the server still serves adapters afterwards
    small, _, _ = _trained(base, "lora", target="q_proj")
    plain_lora.write(small, tmp_path / "small")
    _load(student_server, "small", tmp_path / "small")
    try:
        assert _served_greedy(student_server, "small", vllm_tokenizer.eos_token_id) == _hf_greedy(
            small, vllm_tokenizer.eos_token_id)
    finally:
        student_server.post("/v1/unload_lora_adapter", {"lora_name": "small"})
