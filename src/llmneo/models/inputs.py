"""What a forward of a batch is given, and whether a model keeps neat-packed examples apart.

A padded batch goes in as `input_ids` and its padding `attention_mask`. A neat-packed batch (`neat_packing`,
TRL's `padding_free`) carries `position_ids` that restart at every example of a row; it goes in with those and
no attention mask. transformers' masking utilities (`masking_utils.find_packed_sequence_indices`) then read the
restarts as example boundaries and build a causal mask that stays inside each example (for `eager`, `sdpa` and
`flex_attention`), so no example attends to another. They do so only when the 2-D attention mask is None and
no KV cache is passed, which is why the mask is dropped here and every forward sets `use_cache=False`. The
padding of a right-padded row restarts its positions too, so it is one more example that nobody attends to.

`check_isolates` refuses, once at load time, a model that would not keep the examples apart: one whose modeling
code builds its own mask, or has no attention to mask (a recurrent state crosses every boundary), or an
attention implementation outside those above. Flash-attention's varlen path reads the restarts only in a batch
of one row (transformers `_is_packed_sequence`), so it is accepted only with one row per batch.
"""

from __future__ import annotations

import sys

import torch

from llmneo.errors import LlmneoError

MASKED = ("eager", "sdpa", "flex_attention")  # implementations that take transformers' packed-aware mask
FLASH = ("flash_attention_2", "flash_attention_3")  # varlen from position ids, in a batch of one row only
# masking_utils' builders: a modeling module that imports one of them builds its mask through transformers
MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
RECURRENT_WORDS = ("Mamba", "DeltaNet", "ShortConv", "Rwkv", "RWKV", "Mixer2")  # hybrids' recurrent layers


def forward_inputs(batch: dict) -> dict[str, torch.Tensor | None]:
    """The model's keyword inputs for `batch`: ids and padding mask, or, neat-packed, ids and position ids."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def check_isolates(model: torch.nn.Module, key: str, rows_per_batch: int) -> None:
    """Refuse `model` (loaded from config key `key`) for neat packing if its examples could see each other."""
    name = type(model).__name__
    module = sys.modules.get(type(model).__module__)
    if not any(hasattr(module, builder) for builder in MASK_BUILDERS):
        raise LlmneoError(f"neat_packing: {key} ({name}) does not build its attention mask with transformers' "
                          f"masking utilities (or has no attention), so packed examples would see each other; set "
                          f"neat_packing: false (packing: true packs with cross-talk)")
    recurrent = _recurrent_layers(model)
    if recurrent:
        raise LlmneoError(f"neat_packing: {key} ({name}) has {recurrent} layers, whose state runs on across packed "
                          f"examples whatever the attention mask; set neat_packing: false")
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation in FLASH and rows_per_batch > 1:
        raise LlmneoError(f"neat_packing: {key} uses {implementation}, whose varlen kernel separates packed "
                          f"examples only in a batch of one row; set per_device_train_batch_size: 1 (and "
                          f"per_device_eval_batch_size: 1), or load the model with sdpa")
    if implementation not in MASKED + FLASH:
        raise LlmneoError(f"neat_packing: {key} uses attention implementation '{implementation}', which llmneo "
                          f"has not checked keeps packed examples apart; use {', '.join(MASKED + FLASH)}, or set "
                          f"neat_packing: false")


def _recurrent_layers(model: torch.nn.Module) -> str | None:
    """The kind of a hybrid model's non-attention layers (state-space, linear attention, convolution), if any."""
    kinds = list(getattr(model.config, "layer_types", None) or []) + list(
        getattr(model.config, "layers_block_type", None) or [])
    other = sorted({str(kind) for kind in kinds if "attention" not in str(kind) and str(kind) != "attn"})
    if other:
        return ", ".join(other)
    found = {type(m).__name__ for m in model.modules()
             if any(word in type(m).__name__ for word in RECURRENT_WORDS)}
    return ", ".join(sorted(found)) or None
