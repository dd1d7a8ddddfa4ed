"""Checkpoints that resume exactly, written so that a kill at any moment leaves the last one intact.

`output_dir/checkpoint-STEP/` holds:
  the adapter (or full model) in safetensors, and the tokenizer
  optimizer.pt, scheduler.pt      state dicts (tensors and numbers only: loaded with weights_only=True)
  rng_state_RANK.pt               python, numpy, torch (and CUDA) RNG states of every rank
  trainer_state.json              step, micro-batches consumed, tokens, runtime, metrics so far, the
                                  logging window's sums (window.Window), the config keys that must
                                  match to resume, the world size
  rollouts.json, rollout_adapter/ rollout_endpoint: the step whose weights the server's adapter holds, and
                                  that adapter (plain LoRA), which a resumed run loads there again
  rollout_replies_RANK.safetensors  rollout_ahead: the next step's replies, written while this one trained (or
                                  before the next one failed)
Every rank writes into `.tmp-checkpoint-STEP/`; only when all files exist does the main process rename
it into place (an atomic rename on one filesystem) and drop checkpoints beyond `save_total_limit`.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmneo import run_dir
from llmneo.config.schema import FIELDS as CONFIG_FIELDS
from llmneo.config.schema import Config
from llmneo.errors import LlmneoError
from llmneo.models import engines
from llmneo.train.window import Window

STATE = "trainer_state.json"
# Keys that shape the model, the data order or the optimizer state: resuming with another value would
# not continue the same run.
MUST_MATCH = ("model_name_or_path", "finetuning_type", "lora_rank", "lora_alpha", "lora_target", "lora_variant",
              "use_dora", "use_rslora", "pissa_init", "lora_dropout", "dataset", "cutoff_len", "max_samples",
              "val_size", "seed", "per_device_train_batch_size", "gradient_accumulation_steps", "template",
              "teacher_model_name_or_path", "teacher_cache", "kd_ratio", "kd_loss", "kd_temperature", "kd_beta",
              "kd_skew", "learning_rate", "lr_scheduler_type", "weight_decay", "lmbda", "seq_kd", "max_new_tokens",
              "temperature", "top_p", "teacher_endpoint", "teacher_endpoint_model", "teacher_topk",
              "kd_cross_tokenizer", "kd_uld_weight", "kd_unaligned", "teacher_template", "rollout_ahead",
              "rollout_sync_steps")


@dataclass
class Progress:
    """Where a run is: everything the loop needs besides model, optimizer and scheduler."""

    step: int = 0
    micro_seen: int = 0  # micro-batches consumed on each rank
    train_tokens: int = 0
    runtime: float = 0.0
    history: list = field(default_factory=list)
    window: Window = field(default_factory=Window)  # the sums since the last logged row
    # steps whose replies were generated, by writer: student (on-policy) and teacher (seq_kd)
    generated_steps: dict = field(default_factory=lambda: {"student": 0, "teacher": 0})
    aligned: list = field(default_factory=lambda: [0, 0])  # cross-tokenizer KD: positions aligned, of all
    # rollout_endpoint: the most steps, over the logging window's on-policy steps, that the replies' adapter lagged
    rollout_staleness: int | None = None


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwritable(what: Path, reason: str) -> LlmneoError:
    return LlmneoError(f"cannot write {what}: {reason}; free disk space or make output_dir writable, then "
                       f"resume with resume_from_checkpoint=auto")


def save(accelerator, model, tokenizer, optimizer, scheduler, out: Path, progress: Progress, config: Config,
         before_commit=None, extra=None) -> Path:
    """Write checkpoint-STEP atomically (all ranks take part); returns its final path. `before_commit()` runs on
    the main process once the checkpoint is complete, before its rename (run_dir.commit_checkpoint). `extra(folder,
    step)` runs on every rank: what the step source keeps for the step after `step` (train.steps: served rollouts)."""
    staged = out / f".tmp-checkpoint-{progress.step}"
    try:
        if accelerator.is_main_process:
            run_dir.staging_dir(out, progress.step)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), staged / f"rng_state_{accelerator.process_index}.pt")
        if extra is not None:
            extra(staged, progress.step)
        state_dict = engines.state_dict_for_saving(accelerator, model)  # every rank takes part when sharded
        if engines.sharded(accelerator):  # each rank holds its own shard of the optimizer state
            torch.save(optimizer.state_dict(), staged / _optimizer_file(accelerator))
        if accelerator.is_main_process:
            extra = {} if state_dict is None else {"state_dict": state_dict}
            accelerator.unwrap_model(model).save_pretrained(staged, safe_serialization=True, **extra)
            tokenizer.save_pretrained(staged)
            if not engines.sharded(accelerator):
                torch.save(optimizer.state_dict(), staged / "optimizer.pt")
            torch.save(scheduler.state_dict(), staged / "scheduler.pt")
            state = {**asdict(progress), "world_size": accelerator.num_processes,
                     "config": {k: getattr(config, k) for k in MUST_MATCH}}
            run_dir.write_json(staged / STATE, state)
        accelerator.wait_for_everyone()
        final = out / f"checkpoint-{progress.step}"
        if accelerator.is_main_process:
            final = run_dir.commit_checkpoint(out, staged, progress.step, config.save_total_limit, before_commit)
        accelerator.wait_for_everyone()
        return final
    except Exception as exc:
        reason = run_dir.write_failure(exc)
        if reason is None:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
        raise unwritable(out / f"checkpoint-{progress.step}", reason) from None


def resolve(config: Config) -> Path | None:
    """The checkpoint to resume from: None, the newest one for `auto`, or the given path."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    if value == "auto":
        found = run_dir.checkpoints(Path(config.output_dir)) if config.output_dir else []
        return found[-1][1] if found else None
    path = Path(value)
    if not path.is_dir():
        raise LlmneoError(f"resume_from_checkpoint: '{path}' is not a directory; give a checkpoint-STEP folder "
                          f"or resume_from_checkpoint=auto")
    return path


def _optimizer_file(accelerator) -> str:
    return f"optimizer_{accelerator.process_index}.pt" if engines.sharded(accelerator) else "optimizer.pt"


def load(path: Path, accelerator, model, optimizer, scheduler, config: Config) -> Progress:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the progress to continue from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_file = path / STATE
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    weights = path / ("adapter_model.safetensors" if config.finetuning_type == "lora" else "model.safetensors")
    optimizer_file = path / _optimizer_file(accelerator)
    for needed in (state_file, optimizer_file, path / "scheduler.pt", rng_file, weights):
        if not needed.is_file():
            raise LlmneoError(f"checkpoint '{path}' is incomplete or corrupt: {needed.name} is missing; resume from "
                              f"another checkpoint-STEP or start again with overwrite_output_dir=true")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlmneoError(f"checkpoint '{path}' is corrupt: {STATE} is not valid JSON; resume from another "
                          f"checkpoint-STEP") from None
    for key in MUST_MATCH:
        # a key newer than the checkpoint was written with its default then
        saved = state.get("config", {}).get(key, CONFIG_FIELDS[key].default)
        if saved != getattr(config, key):
            raise LlmneoError(f"checkpoint '{path}' is incompatible with this run: it was written with "
                              f"{key}={saved!r}, this run has {key}={getattr(config, key)!r}; use the same settings")
    if state.get("world_size") != accelerator.num_processes:
        raise LlmneoError(f"checkpoint '{path}' was written by {state.get('world_size')} processes and this run has "
                          f"{accelerator.num_processes}; resume with the same number of processes")
    try:
        tensors = load_file(str(weights))
        _load_weights(accelerator, accelerator.unwrap_model(model), tensors, config)
        optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(rng_file, weights_only=True))
    except (SafetensorError, RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmneoError(f"checkpoint '{path}' is corrupt or incompatible ({reason}); resume from another "
                          f"checkpoint-STEP or start again with overwrite_output_dir=true") from None
    missing = [k for k in ("step", "micro_seen", "train_tokens", "runtime", "history", "window") if k not in state]
    if missing:
        raise LlmneoError(f"checkpoint '{path}' is corrupt: {STATE} lacks {', '.join(missing)}; resume from "
                          f"another checkpoint-STEP")
    progress = Progress(**{k: state[k] for k in ("step", "micro_seen", "train_tokens", "runtime", "history")})
    progress.window = Window.from_state(state["window"])
    progress.generated_steps = {**progress.generated_steps, **state.get("generated_steps", {})}
    progress.aligned = list(state.get("aligned", [0, 0]))
    progress.rollout_staleness = state.get("rollout_staleness")
    return progress


def _load_weights(accelerator, model, tensors: dict, config: Config) -> None:
    if config.finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"unexpected adapter weights {unexpected[:3]}")
        return
    missing, unexpected = engines.load_state_dict(accelerator, model, tensors)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
