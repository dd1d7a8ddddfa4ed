"""What the distributed engine (accelerate: DDP, FSDP, DeepSpeed ZeRO) means for llmneo.

- **Replicated** (single process, DDP, ZeRO-1/2): every rank holds whole weights. The teacher is
  moved to the rank's device in the compute dtype (bf16 with `bf16: true`), frozen, never wrapped.
  The chunked loss calls the output heads directly.
- **Sharded** (FSDP, ZeRO-3): parameters exist whole only inside a module's forward. The teacher is
  sharded the same way, for inference only (eval mode, no grad, no optimizer). Both models' heads then
  run inside their forwards, so llmneo falls back to full logits at the response positions
  (`kd_chunk_size: 0` behaviour) and gathers the full state dict when saving.

The sharded paths need GPUs and were not exercised by this repository's tests (see docs/distributed.md).
"""

from __future__ import annotations

import copy

import torch


def sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def place_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen teacher, replicated on this rank or sharded like the student; always eval mode."""
    teacher.eval().requires_grad_(False)
    if not sharded(accelerator):
        return teacher.to(accelerator.device)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_inference(teacher, accelerator)
    return _fsdp_inference(teacher, accelerator)


def _deepspeed_inference(teacher, accelerator):
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.setdefault("zero_optimization", {})["stage"] = 3
    config["train_micro_batch_size_per_gpu"] = config.get("train_micro_batch_size_per_gpu", 1)
    if config["train_micro_batch_size_per_gpu"] == "auto":
        config["train_micro_batch_size_per_gpu"] = 1
    config.pop("train_batch_size", None)
    config.pop("gradient_accumulation_steps", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _fsdp_inference(teacher, accelerator):
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import fully_shard

        teacher.to(accelerator.device)
        for layer in getattr(getattr(teacher, "model", teacher), "layers", []):
            fully_shard(layer)
        fully_shard(teacher)
        return teacher.eval()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(teacher)
    wrapped = FSDP(teacher, auto_wrap_policy=plugin.auto_wrap_policy, sharding_strategy=plugin.sharding_strategy,
                   device_id=accelerator.device, use_orig_params=True, limit_all_gathers=True)
    return wrapped.eval()


def state_dict_for_saving(accelerator, model) -> dict | None:
    """The full state dict (all ranks must call this under a sharded engine); None when not needed."""
    if not sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)
