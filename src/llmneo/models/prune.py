"""Depth pruning: derive a smaller student from a teacher by dropping whole decoder blocks.

Which blocks go is either named (`keep_layers`) or chosen by *block influence* (ShortGPT, Men et
al. 2024; the depth-pruning metric of Minitron): for each block, 1 − mean cosine similarity between
the hidden state that enters it and the one that leaves it, over the real tokens of a calibration
dataset. A block that barely changes its input is the cheapest to remove. The kept blocks are copied
bit-exact; the result is a plain HF model whose config matches its depth.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llmneo import run_dir
from llmneo.config.schema import Config, input_paths
from llmneo.data import dataset as data
from llmneo.errors import LlmneoError
from llmneo.models import inputs, loading
from llmneo.process import is_main_process

# Per-layer lists in some configs (e.g. Qwen2's layer_types) must shrink with the layers.
_PER_LAYER_CONFIG_KEYS = ("layer_types",)
PRUNE_RESULTS = "prune_results.json"


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of a Llama-style model (Llama, Qwen2, Mistral, Gemma, ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise LlmneoError(f"cannot find the decoder blocks of {type(model).__name__} (expected model.model.layers); "
                          f"llmneo prune supports Llama-style architectures such as Llama, Qwen2 and Mistral")
    return layers


@torch.no_grad()
def block_influence(model, batches: list[dict], show_progress: bool = True) -> list[float]:
    """Per block: 1 − mean cos(h_in, h_out) over non-padding tokens. Higher = more important.
    `show_progress`: a progress bar over the calibration batches on stderr."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index):
        def capture(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (hidden_in, hidden_out)
        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for batch in tqdm(batches, desc="llmneo prune: block influence", unit="batch", disable=not show_progress,
                          dynamic_ncols=True):
            mask = batch["attention_mask"].bool()  # (B, T)
            captured.clear()
            model(**inputs.forward_inputs(batch), use_cache=False)
            for i, (hidden_in, hidden_out) in captured.items():
                cos = torch.nn.functional.cosine_similarity(hidden_in[mask].double(), hidden_out[mask].double(), dim=-1)
                sums[i] += (1.0 - cos).sum()
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()


def least_influential(importance: list[float], num_layers: int) -> list[int]:
    """Indices (sorted) of the `num_layers` most influential blocks to keep."""
    if not 0 < num_layers <= len(importance):
        raise LlmneoError(f"num_layers must be in [1, {len(importance)}] for this model, got {num_layers}")
    ranked = sorted(range(len(importance)), key=lambda i: importance[i], reverse=True)
    return sorted(ranked[:num_layers])


def parse_keep_layers(text: str, total: int) -> list[int]:
    try:
        keep = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise LlmneoError(f"keep_layers must be comma-separated 0-based indices such as 0,1,5, got '{text}'") from None
    if not keep:
        raise LlmneoError("keep_layers is empty; name at least one layer, e.g. keep_layers=0,1")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise LlmneoError(f"keep_layers {bad} out of range: the model has layers 0..{total - 1}")
    if len(set(keep)) != len(keep):
        raise LlmneoError(f"keep_layers repeats a layer: {text}")
    return sorted(keep)


def keep_only(model, keep: list[int]):
    """Drop every decoder block not in `keep`, in place; returns the model."""
    layers = decoder_layers(model)
    total = len(layers)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(keep)
    for key in _PER_LAYER_CONFIG_KEYS:
        values = getattr(model.config, key, None)
        if isinstance(values, list) and len(values) == total:
            setattr(model.config, key, [values[i] for i in keep])
    return model


def run(config: Config) -> dict:
    """Load `model_name_or_path`, choose the blocks to keep, save the pruned model to `output_dir`."""
    if not config.model_name_or_path:
        raise LlmneoError("model_name_or_path is not set; give the model to prune (usually the teacher)")
    if (config.keep_layers is None) == (config.num_layers is None):
        raise LlmneoError("set exactly one of keep_layers (e.g. keep_layers=0,1,2,7) or num_layers "
                          "(with a calibration dataset, to pick layers by block importance)")
    # Checked now, written only once the pruned model exists: an earlier result stays until this one replaces it.
    output = run_dir.check(config.output_dir, config.overwrite_output_dir, (*run_dir.MODEL_FILES, PRUNE_RESULTS),
                           inputs=input_paths(config))
    tokenizer = loading.load_tokenizer(config.model_name_or_path, "model_name_or_path", config.trust_remote_code)
    dtype = loading.weight_dtype(config, "prune")
    model = loading.load_model(config.model_name_or_path, "model_name_or_path", dtype, config.trust_remote_code)
    loading.check_packing(config, model, "model_name_or_path")
    total = len(decoder_layers(model))
    importance = None
    if config.keep_layers is not None:
        keep = parse_keep_layers(config.keep_layers, total)
    else:
        if not config.dataset:
            raise LlmneoError("num_layers picks layers by block importance on a calibration dataset; "
                              "set dataset=... (or name the layers with keep_layers=...)")
        examples = data.build(config, tokenizer).train
        size = config.per_device_eval_batch_size
        batches = [data.collate(examples[i:i + size], tokenizer.pad_token_id) for i in range(0, len(examples), size)]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        importance = block_influence(model, [{k: v.to(device) for k, v in b.items()} for b in batches],
                                     show_progress=is_main_process())
        model.to("cpu")
        keep = least_influential(importance, config.num_layers)
    keep_only(model, keep)
    summary = {"source": config.model_name_or_path, "kept_layers": keep, "num_layers": len(keep),
               "original_num_layers": total, "block_influence": importance,
               "params": sum(p.numel() for p in model.parameters())}
    with run_dir.replacing(output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        run_dir.write_json(staging / PRUNE_RESULTS, summary)
    return summary
