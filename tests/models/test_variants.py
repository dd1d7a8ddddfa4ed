"""LoRA variants: each trains with KD through the chunked loss, saves a plain PEFT adapter that loads on
the original base, and exports to merged logits equal to the trained model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmneo import cli
from llmneo.config import schema
from llmneo.models import adapters, loading

VARIANTS = ("lora", "dora", "rslora", "pissa", "olora", "moslora")
IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 60, 61], [1, 250, 12, 5, 66, 2, 9, 10]])


def _train(tmp_path: Path, base_overrides: dict, **extra) -> tuple[Path, dict]:
    values = {**base_overrides, "lora_target": "q_proj,v_proj,down_proj,lm_head", "max_steps": 4,
              "learning_rate": 2e-2, "warmup_ratio": 0.0, "kd_chunk_size": 5, **extra}
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli.main(["train", str(path)]) == 0
    return Path(values["output_dir"]), values


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _trained_in_place(values: dict, out: Path) -> torch.Tensor:
    """The model exactly as training left it: the variant re-initialised (PiSSA/OLoRA rewrite the base,
    MoSLoRA adds mixers) and the final checkpoint's raw weights loaded on top."""
    from peft import set_peft_model_state_dict

    cfg = schema.load(overrides=values)
    student = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student
    model = adapters.apply(student, cfg)
    final = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    result = set_peft_model_state_dict(model, load_file(str(final / "adapter_model.safetensors")))
    assert not getattr(result, "unexpected_keys", [])
    return _logits(model)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_saves_loads_and_exports(tmp_path, base_overrides, student_dir, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, values = _train(tmp_path, base_overrides, lora_variant=variant)
    results = json.loads((out / "train_results.json").read_text())
    assert results["method"] == "neo" and results["final_kd_loss"] is not None
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert (saved_config["use_dora"], saved_config["use_rslora"]) == (variant == "dora", variant == "rslora")
    reference = _trained_in_place(values, out)

    base = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    base_logits = _logits(base)
    plain = PeftModel.from_pretrained(base, out)  # vanilla PEFT, original base weights
    assert (reference - base_logits).abs().max() > 1e-3, "training must have moved the model"
    torch.testing.assert_close(_logits(plain), reference, rtol=0, atol=1e-4)

    export_dir = tmp_path / "merged"
    assert cli.main(["export", f"adapter_name_or_path={out}", f"export_dir={export_dir}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), reference, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_moslora_mixer_trains_and_folds_exactly(tmp_path, base_overrides):
    out, values = _train(tmp_path, base_overrides, lora_variant="moslora")
    final = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    raw = load_file(str(final / "adapter_model.safetensors"))
    mixers = {k: v for k, v in raw.items() if k.endswith("mixer")}
    assert mixers and all(v.shape == (4, 4) for v in mixers.values())
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not any(k.endswith("mixer") for k in saved)  # the output is plain LoRA
    for key, mixer in mixers.items():
        a_key = key.replace(".mixer", ".weight")
        torch.testing.assert_close(saved[a_key], mixer @ raw[a_key], rtol=0, atol=1e-6)
    # the mixer is not the identity and it moved during training
    cfg = schema.load(overrides=values)
    fresh = adapters.apply(loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student, cfg)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert any(n.endswith(".mixer") for n in trainable)


@pytest.mark.slow
def test_llamafactory_booleans_select_variants(tmp_path, base_overrides):
    assert schema.load(overrides={"use_dora": True}).variant == "dora"
    assert schema.load(overrides={"use_rslora": True}).variant == "rslora"
    assert schema.load(overrides={"pissa_init": True}).variant == "pissa"
    from llmneo.errors import LlmneoError

    with pytest.raises(LlmneoError, match="pick one variant"):
        schema.load(overrides={"use_dora": True, "use_rslora": True})
    with pytest.raises(LlmneoError, match="contradicts"):
        schema.load(overrides={"use_dora": True, "lora_variant": "pissa"})
    out, _ = _train(tmp_path, base_overrides, use_dora=True, max_steps=1)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_lora_variant_key_reaches_peft(base_overrides, variant):
    """lora_variant itself (not only LLaMA-Factory's use_dora / use_rslora) configures PEFT's layers."""
    from peft.tuners.lora import LoraLayer

    values = {**base_overrides, "lora_variant": variant, "lora_rank": 4, "lora_alpha": 6}
    cfg = schema.load(overrides=values)
    model = adapters.apply(loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student, cfg)
    peft_config = model.peft_config["default"]
    assert (peft_config.use_dora, peft_config.use_rslora) == (variant == "dora", variant == "rslora")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        # rsLoRA scales the update by alpha / sqrt(r) instead of alpha / r
        expected = 6 / 4 ** 0.5 if variant == "rslora" else 6 / 4
        assert layer.scaling["default"] == pytest.approx(expected)
        # DoRA adds a trainable magnitude vector per adapted layer
        assert ("default" in layer.lora_magnitude_vector) == (variant == "dora")
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert bool(magnitudes) == (variant == "dora")
