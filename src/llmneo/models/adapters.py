"""finetuning_type → what trains: PEFT LoRA adapters (only they train) or every weight.

The paper's guideline is LoRA on every linear layer except `lm_head`, large rank, alpha = 2·rank,
no dropout; those are the config defaults. PEFT does the LoRA; this file only configures it.

Variants (`lora_variant`, or LLaMA-Factory's use_dora / use_rslora / pissa_init):
  dora, rslora, pissa, olora   PEFT's own (use_dora, use_rslora, init_lora_weights="pissa"/"olora")
  moslora                      Mixture-of-Subspaces LoRA (Wu et al., 2024): the update is B·M·A with a
                               learnable r×r mixer M. It is PEFT LoRA plus the mixer, inserted after A
                               (`MixedLoraA`); since B·M·A = B·(M·A), saving folds M into A and writes a
                               plain LoRA adapter that vanilla PEFT loads and merges exactly.
PiSSA and OLoRA rewrite the base weights at initialisation (W_res = W − B0·A0). The final adapter is
converted with PEFT's `path_initial_model_for_weight_conversion` into a standard LoRA (rank 2r) on the
*original* base, so export and eval need nothing special; checkpoints keep the unconverted adapter,
which a resumed run re-applies on top of the same (deterministic) initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llmneo.config.schema import Config
from llmneo.errors import LlmneoError


class MixedLoraA(torch.nn.Linear):
    """PEFT's lora_A followed by MoSLoRA's r×r mixer: x ↦ M·(A·x). `weight` stays A for PEFT's bookkeeping."""

    def __init__(self, lora_a: torch.nn.Linear):
        super().__init__(lora_a.in_features, lora_a.out_features, bias=False, device="meta")
        self.weight = lora_a.weight
        rank = lora_a.out_features
        self.mixer = torch.nn.Parameter(torch.empty(rank, rank, device=lora_a.weight.device, dtype=lora_a.weight.dtype))
        # The MoSLoRA paper initialises the mixer like A (Kaiming uniform); B starts at zero, so the
        # adapted model still equals the base model at step 0.
        torch.nn.init.kaiming_uniform_(self.mixer, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.weight), self.mixer)


def _add_mixers(model: torch.nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, lora_a in list(module.lora_A.items()):
                if not isinstance(lora_a, MixedLoraA):
                    module.lora_A[name] = MixedLoraA(lora_a)


def mixer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """MoSLoRA mixers by parameter name (empty for other variants)."""
    return {name: p.detach() for name, p in model.named_parameters() if name.endswith(".mixer")}


def folded_state_dict(model: torch.nn.Module, state_dict: dict | None = None) -> dict | None:
    """For MoSLoRA: the state dict with each lora_A replaced by M·A and the mixers left out; else None."""
    mixers = mixer_state(model)
    if not mixers:
        return None
    state = dict(state_dict if state_dict is not None else model.state_dict())
    for name, mixer in mixers.items():
        a_key = name[: -len(".mixer")] + ".weight"
        state[a_key] = (mixer.float() @ state[a_key].float()).to(state[a_key].dtype)  # (r, r) @ (r, in)
        state.pop(name, None)
    return state


def target_modules(config: Config) -> str | list[str]:
    """lora_target as PEFT takes it: "all-linear", or the listed module names in their order."""
    target = config.lora_target.strip()
    modules: str | list[str] = "all-linear" if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    if not modules:
        raise LlmneoError("lora_target is empty; use 'all' or module names such as q_proj,v_proj")
    return modules


def lora_config(config: Config):
    from peft import LoraConfig

    modules = target_modules(config)
    variant = config.variant
    init = {"pissa": "pissa", "olora": "olora"}.get(variant, True)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=modules,
        bias="none",
        use_dora=variant == "dora",
        use_rslora=variant == "rslora",
        init_lora_weights=init,
    )


def check_targets(model: torch.nn.Module, targets) -> None:
    """Every lora_target name must match a module, by PEFT's rule for a list (the name itself, or a dotted
    suffix of the module's path): PEFT stops only when *none* matches, so `q_proj,v_porj` would train q_proj alone."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise LlmneoError(f"lora_target: {', '.join(repr(t) for t in missing)} "
                          f"{'matches' if len(missing) == 1 else 'match'} no module of the model; its linear "
                          f"modules are {', '.join(linear)} (or use lora_target: all)")


def rewrites_base(config: Config) -> bool:
    """PiSSA and OLoRA change the frozen base weights at initialisation."""
    return config.finetuning_type == "lora" and config.variant in ("pissa", "olora")


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
        if config.variant != "lora":
            raise LlmneoError("adapter_name_or_path continues a saved adapter as it is; drop lora_variant / "
                              "use_dora / use_rslora / pissa_init (the adapter's own config decides)")
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    modules = target_modules(config)
    if not isinstance(modules, str):  # "all-linear" matches by type; listed names must each match
        check_targets(model, modules)
    try:
        peft_model = get_peft_model(model, lora_config(config))
    except ValueError as exc:
        raise LlmneoError(f"lora_target '{config.lora_target}' does not match the model's modules: "
                          f"{str(exc).splitlines()[0]}") from None
    if config.variant == "moslora":
        _add_mixers(peft_model)
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
