"""finetuning_type → what trains: PEFT LoRA adapters (only they train) or every weight.

The paper's guideline is LoRA on every linear layer except `lm_head`, large rank, alpha = 2·rank,
no dropout; those are the config defaults. PEFT does the LoRA; this file only configures it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmneo.config import Config
from llmneo.errors import LlmneoError


def lora_config(config: Config):
    from peft import LoraConfig

    target = config.lora_target.strip()
    modules: str | list[str] = "all-linear" if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    if not modules:
        raise LlmneoError("lora_target is empty; use 'all' or module names such as q_proj,v_proj")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=modules,
        bias="none",
    )


def apply(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Wrap the student for training: a PEFT model for lora, the model itself for full."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.finetuning_type == "full":
        if config.adapter_name_or_path:
            raise LlmneoError("adapter_name_or_path is set with finetuning_type: full; merge the adapter "
                              "first (llmneo export) or train with finetuning_type: lora")
        model.requires_grad_(True)
        return model

    from peft import PeftModel, get_peft_model

    if config.adapter_name_or_path:
        path = Path(config.adapter_name_or_path)
        if not (path / "adapter_config.json").is_file():
            raise LlmneoError(f"adapter_name_or_path: '{path}' has no adapter_config.json; give a PEFT adapter dir")
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    try:
        peft_model = get_peft_model(model, lora_config(config))
    except ValueError as exc:
        raise LlmneoError(f"lora_target '{config.lora_target}' does not match the model's modules: "
                          f"{str(exc).splitlines()[0]}") from None
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LlmneoError("nothing to train: no parameter requires grad; check finetuning_type and lora_target")
    return params
