"""The student's adapter as a plain LoRA on its *original* base: what a vLLM server started with --enable-lora
loads (POST /v1/load_lora_adapter) to generate on-policy replies with the weights being trained.

Every variant is written as one rule: a LoRA of rank R with lora_alpha = R (scaling 1, use_rslora false), the
variant's own scaling folded into B, so the served update is exactly B'·A' = the trained model's update.

    lora, rslora      A' = A                 B' = s·B          s = PEFT's layer.scaling (rsLoRA: alpha/sqrt(r))
    moslora           A' = M·A               B' = s·B          the r×r mixer folded into A
    pissa, olora      A' = [A; A0]           B' = [s·B, −s·B0] rank 2r: W_res + s·B·A = W + s·(B·A − B0·A0)

PiSSA and OLoRA trained on W_res = W − s·B0·A0 (written over the base at initialisation), while the server
holds W; their initial adapter (B0, A0: `TrainingSetup.initial_adapter`) turns the update into one on W.
Layers of smaller rank are padded with zeros to the largest (exact), so the folder has one `r`.
LoRA on embed_tokens and lm_head is written too (vLLM 0.32 serves both: tests/vllm/test_rollout_variants.py).
DoRA (a magnitude vector rescales W + B·A: not a low-rank update) and full fine-tuning cannot be served so;
`check_servable` refuses them from the config before training starts, and `write` refuses what it meets.

The tensors are written in the adapter's own dtype (the folds are computed in float32 first); a server
started with another --dtype casts them on load. The folder is written in a temp sibling and renamed into
place, so a server never reads half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmneo import run_dir
from llmneo.config.schema import Config
from llmneo.errors import LlmneoError
from llmneo.models import adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT inits that write over the base weights at initialisation (W_res = W − s·B0·A0, exactly).
_REWRITING_INITS = ("pissa", "olora", "corda")
_NO_SERVER = "generate with HF (drop rollout_endpoint)"


def check_servable(config: Config) -> None:
    """Refuse, in one line, a config whose adapter cannot reach a vLLM server as a plain LoRA."""
    if config.finetuning_type == "full":
        raise LlmneoError(f"rollout_endpoint syncs a LoRA adapter; with finetuning_type: full every weight trains "
                          f"and there is no adapter to serve: train with finetuning_type: lora, or {_NO_SERVER}")
    saved = _saved_adapter_config(config)
    if config.variant == "dora" or saved.get("use_dora"):
        raise LlmneoError(f"rollout_endpoint syncs a plain LoRA adapter, and DoRA's magnitude vector (a per-column "
                          f"rescaling of W + B·A) is not one (vLLM does not serve DoRA): use another lora_variant "
                          f"(lora, rslora, pissa, olora, moslora), or {_NO_SERVER}")
    extra = [key for key in ("lora_bias", "modules_to_save") if saved.get(key)]
    if extra:
        raise LlmneoError(f"rollout_endpoint syncs a plain LoRA adapter; adapter_name_or_path "
                          f"'{config.adapter_name_or_path}' also trains {extra[0]}, which vLLM does not serve: "
                          f"{_NO_SERVER}")
    init = saved.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith((*_REWRITING_INITS, "loftq")):
        raise LlmneoError(f"rollout_endpoint: adapter_name_or_path '{config.adapter_name_or_path}' is a {init} "
                          f"adapter as saved before conversion (a checkpoint's), whose base weights were rewritten; "
                          f"continue from the run's final adapter (a plain LoRA), or {_NO_SERVER}")


def served_rank(config: Config) -> int:
    """The rank the server sees (what --max-lora-rank must allow): 2r for PiSSA / OLoRA, else r."""
    saved = _saved_adapter_config(config)
    if saved:  # adapter_name_or_path continues a saved adapter: its own r (and rank_pattern) decide
        return max([int(saved.get("r", config.lora_rank)), *map(int, (saved.get("rank_pattern") or {}).values())])
    return 2 * config.lora_rank if adapters.rewrites_base(config) else config.lora_rank


def write(model: torch.nn.Module, directory: str | Path, *, initial: dict | None = None) -> int:
    """Write the model's active adapter as a plain PEFT LoRA folder at `directory` (which must not exist or be
    empty); return its rank. `initial`: the adapter's weights at initialisation, needed for PiSSA / OLoRA
    (`TrainingSetup.initial_adapter`; keys as in the PeftModel's state_dict, or as PEFT saves them)."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_model = _peft_model(model)
    name = peft_model.active_adapter
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise LlmneoError(f"the student has several active adapters ({', '.join(name)}); one can be served")
        name = name[0]
    source = peft_model.peft_config[name]
    init = source.init_lora_weights
    if isinstance(init, str) and init.lower().startswith("loftq"):
        raise LlmneoError("a LoftQ adapter trains on quantised base weights; it cannot be served as a plain LoRA "
                          "on the original base")
    rewrites = isinstance(init, str) and init.lower().startswith(_REWRITING_INITS)
    if rewrites and initial is None:
        raise LlmneoError(f"the adapter was initialised with {init}, which rewrote the base weights; writing it as "
                          f"a LoRA on the original base needs its initial weights (initial=setup.initial_adapter)")

    pairs, dtype = _folded_pairs(peft_model, name, initial if rewrites else None)
    rank = max(a.shape[0] for a, _ in pairs.values())
    state = {}
    for (path, embedding), (a, b) in pairs.items():
        a, b = _pad(a, b, rank)
        kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        suffix = "" if embedding else ".weight"
        state[f"{path}.{kind[0]}.{name}{suffix}"] = a.to(dtype).contiguous()
        state[f"{path}.{kind[1]}.{name}{suffix}"] = b.to(dtype).contiguous()
    # PEFT's own naming (the adapter name dropped), as save_pretrained writes it; no base embedding weights.
    tensors = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=name, save_embedding_layers=False)
    targets = sorted({path.rsplit(".", 1)[-1] for path, _ in pairs})
    plain = LoraConfig(task_type=source.task_type, r=rank, lora_alpha=rank, target_modules=targets,
                       lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False, init_lora_weights=True,
                       fan_in_fan_out=source.fan_in_fan_out, inference_mode=True,
                       base_model_name_or_path=source.base_model_name_or_path)
    _write_folder(Path(directory), plain, {k: v.detach().cpu() for k, v in tensors.items()}, save_file)
    return rank


def _peft_model(model: torch.nn.Module):
    """The PeftModel under DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not hasattr(model, "peft_config") or not hasattr(model, "active_adapter"):
        raise LlmneoError("the student has no LoRA adapter to write (finetuning_type: full?); rollout_endpoint "
                          f"serves a LoRA student: {_NO_SERVER}")
    return model


def _folded_pairs(peft_model, name: str, initial: dict | None) -> tuple[dict[tuple[str, bool], tuple], torch.dtype]:
    """{(module path, is embedding): (A', B')}: each layer's update B'·A' (float32) with its scaling and mixer
    folded in, and for a base-rewriting init the initial update subtracted (rank 2r); and the adapter's dtype."""
    from peft.tuners.lora import Embedding, LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    pairs, dtype = {}, None
    for path, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in (*layer.lora_A, *layer.lora_embedding_A):
            continue
        if layer.use_dora.get(name):
            raise LlmneoError(f"{path} is a DoRA layer: its magnitude vector is not a plain LoRA, and vLLM does "
                              f"not serve DoRA; train with another lora_variant, or {_NO_SERVER}")
        if getattr(layer, "lora_bias", {}).get(name):
            raise LlmneoError(f"{path} has a LoRA bias (lora_bias), which a plain LoRA for vLLM cannot carry")
        embedding = isinstance(layer, Embedding)
        if not embedding and not isinstance(layer, LoraLinear):
            raise LlmneoError(f"{path} is a {type(layer).__name__} LoRA layer; only linear and embedding layers are "
                              f"written as a plain LoRA")
        _whole(path, layer, name, embedding)
        scaling = float(layer.scaling[name])
        if embedding:
            a = layer.lora_embedding_A[name].detach().float()  # (r, num_embeddings)
            b = layer.lora_embedding_B[name].detach().float()  # (dim, r)
        else:
            lora_a = layer.lora_A[name]
            a = lora_a.weight.detach().float()  # (r, in)
            if isinstance(lora_a, adapters.MixedLoraA):
                a = lora_a.mixer.detach().float() @ a  # (r, r) @ (r, in): MoSLoRA's B·M·A = B·(M·A)
            b = layer.lora_B[name].weight.detach().float()  # (out, r)
        dtype = dtype or (layer.lora_embedding_A[name] if embedding else layer.lora_A[name].weight).dtype
        b = scaling * b
        if initial is not None:
            a0, b0 = _initial_pair(initial, path, name, embedding, a.shape, b.shape)
            a0, b0 = a0.to(a.device), b0.to(b.device)
            a, b = torch.cat([a, a0]), torch.cat([b, -scaling * b0], dim=1)  # (2r, in), (out, 2r)
        pairs[(path, embedding)] = (a, b)
    if not pairs:
        raise LlmneoError(f"adapter '{name}' has no LoRA layer to write")
    return pairs, dtype


def _whole(path: str, layer, name: str, embedding: bool) -> None:
    """Sharded parameters (FSDP2's DTensor, ZeRO-3's partitions) hold a slice on this rank: not the adapter."""
    tensors = ([layer.lora_embedding_A[name], layer.lora_embedding_B[name]] if embedding
               else [layer.lora_A[name].weight, layer.lora_B[name].weight])
    for tensor in tensors:
        if type(tensor).__name__ == "DTensor" or hasattr(tensor, "ds_id"):
            raise LlmneoError(f"{path}'s adapter weights are sharded across processes (FSDP / ZeRO-3); a served "
                              f"rollout needs whole weights: train without sharding, or {_NO_SERVER}")


def _initial_pair(initial: dict, path: str, name: str, embedding: bool, a_shape, b_shape):
    """A0, B0 of the layer at `path` (float32), from a state dict keyed with or without the adapter name."""
    found = []
    for kind in (("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")):
        suffix = "" if embedding else ".weight"
        for key in (f"{path}.{kind}.{name}{suffix}", f"{path}.{kind}{suffix}"):
            if key in initial:
                found.append(initial[key].detach().float().to("cpu"))
                break
        else:
            raise LlmneoError(f"the initial adapter has no {kind} for {path}; pass this run's initial adapter "
                              f"(setup.initial_adapter)")
    a0, b0 = found
    if a0.shape != a_shape or b0.shape != b_shape:
        raise LlmneoError(f"the initial adapter's {path} has shapes {tuple(a0.shape)}, {tuple(b0.shape)}, the "
                          f"adapter's {tuple(a_shape)}, {tuple(b_shape)}; pass this run's initial adapter")
    return a0, b0


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) padded with zero rows / columns to `rank`: the same update B·A."""
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def _write_folder(directory: Path, config, tensors: dict, save_file) -> None:
    """The two files in a temp sibling of `directory`, then one rename: a reader sees the whole folder or none."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise LlmneoError(f"'{directory}' already exists and is not an empty folder; give each sync a fresh folder")
    staging = None
    try:  # the parent folder too: rollout_adapter_dir may be unwritable, or under a file
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(staging))  # PEFT's own adapter_config.json
        run_dir.plain_modes(staging)
        os.replace(staging, directory)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = run_dir.write_failure(exc)
        if reason is not None:
            raise unwritable(directory, reason) from None
        raise


def unwritable(directory: Path, reason: str) -> LlmneoError:
    """A served adapter's folder that cannot be written (disk full, read-only, under a file), as one line."""
    return LlmneoError(f"cannot write the served adapter to '{directory}' (rollout_adapter_dir): {reason}; give "
                       f"rollout_adapter_dir a writable folder (one the server can read)")


def _saved_adapter_config(config: Config) -> dict:
    """adapter_name_or_path's adapter_config.json (a continued adapter's own settings), or {}."""
    if not config.adapter_name_or_path:
        return {}
    path = Path(config.adapter_name_or_path) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
