"""What the distributed engine (accelerate: DDP, FSDP, DeepSpeed ZeRO) means for llmneo.

- **Replicated** (single process, DDP, ZeRO-1/2): every rank holds whole weights. The teacher is
  moved to the rank's device in the compute dtype (bf16 with `bf16: true`), frozen, never wrapped.
  The chunked loss calls the output heads directly.
- **Sharded** (FSDP, ZeRO-3): parameters exist whole only inside a module's forward. The teacher is
  sharded the same way, for inference only (eval mode, no grad, no optimizer). Both models' heads then
  run inside their forwards, so llmneo falls back to full logits at the response positions
  (`kd_chunk_size: 0` behaviour) and gathers the full state dict when saving.

accelerate only builds an FSDP state on accelerators; on CPU it runs a launch that asked for FSDP as
plain data parallel. `create_accelerator` turns such a launch (FSDP2, several processes) into an FSDP
run over gloo, so the FSDP2 path is the one a GPU user gets and tests exercise it on CPU
(docs/distributed.md says what ran and what did not).
"""

from __future__ import annotations

import copy
import os

import torch

from llmneo.errors import LlmneoError


def create_accelerator(**kwargs):
    """The run's Accelerator: on the GPUs when there are any, else on CPU; sharded when launched for FSDP."""
    from accelerate import Accelerator

    on_cpu = not torch.cuda.is_available()
    plugin = _cpu_fsdp_plugin() if on_cpu and _fsdp_requested() else None
    accelerator = Accelerator(cpu=on_cpu, **kwargs)
    if plugin is not None:
        _shard_on_cpu(accelerator, plugin)
    return accelerator


def _fsdp_requested() -> bool:
    # What `accelerate launch` exports for `distributed_type: FSDP` (or `--use_fsdp`).
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _cpu_fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # every setting from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise LlmneoError("FSDP on CPU needs FSDP2: set fsdp_version: 2 in the accelerate config (FSDP1 runs on "
                          "GPUs only), or launch without FSDP")
    return plugin


def _shard_on_cpu(accelerator, plugin) -> None:
    """Make accelerate's CPU data-parallel state (gloo) the FSDP2 state it builds on GPUs.

    accelerate (1.x) decides FSDP only for accelerator devices, and runs the same launch on CPU as DDP
    without a word. Setting the state afterwards sends `prepare`, `no_sync`, `clip_grad_norm_` and
    `get_state_dict` down their FSDP2 paths, which are device-agnostic.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # a single process without a process group: nothing to shard over
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # read by barriers and reductions


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
    if plugin.fsdp_version == 2:
        return _fsdp2_inference(teacher, accelerator)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(teacher)
    wrapped = FSDP(teacher, auto_wrap_policy=plugin.auto_wrap_policy, sharding_strategy=plugin.sharding_strategy,
                   device_id=accelerator.device, use_orig_params=True, limit_all_gathers=True)
    return wrapped.eval()


def _fsdp2_inference(teacher, accelerator):
    """Shard the teacher exactly as accelerate shards the student (decoder layers, embeddings and head, root).

    With `cpu_ram_efficient_loading` it broadcasts rank 0's weights, so what the other ranks loaded does not
    matter. The wrap classes are the teacher's own: the plugin remembers the student's, which a teacher of
    another architecture does not contain.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    for_teacher = copy.copy(plugin)
    if not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        for_teacher.transformer_cls_names_to_wrap = None
    accelerator.state.fsdp_plugin = for_teacher
    try:
        teacher = fsdp2_prepare_model(accelerator, teacher)
    finally:
        accelerator.state.fsdp_plugin = plugin
    return teacher.eval()


def state_dict_for_saving(accelerator, model) -> dict | None:
    """The full state dict (all ranks must call this under a sharded engine); None when not needed."""
    if not sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)


def load_state_dict(accelerator, model, tensors: dict):
    """Copy whole tensors (a checkpoint's model) into `model`, sharded or not; returns (missing, unexpected).

    FSDP2's parameters are DTensors, which refuse a plain `load_state_dict` of whole tensors: torch's
    state-dict API shards each tensor the way its parameter is sharded.
    """
    if sharded(accelerator) and accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = model.load_state_dict(tensors, strict=False)
    return result.missing_keys, result.unexpected_keys
