"""A causal LM split in two: the final hidden states, and the output head as a function.

The chunked loss never materialises [B, T, V] logits. It takes the decoder's final hidden states,
keeps the response positions, and projects them chunk by chunk through the model's *own* head:
the `lm_head` module itself (so a LoRA adapter on it trains), then whatever the architecture applies
after it in `forward`: Cohere's `logit_scale`, Gemma 2/3's final logit soft-capping.

`final_states` is the one place that goes from a batch to the final hidden states, the model's own head and the
real vocabulary: the student's loss, a live teacher, held-out evaluation and the cache writer all start there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM under DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP, accelerate
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # PEFT: adapters are injected in place, so this still uses them
    return model


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    base = unwrap(model)
    inner = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if not isinstance(inner, torch.nn.Module):
        raise TypeError(f"{type(base).__name__} has no decoder module (expected .model or get_decoder())")
    return inner


def output_head(model: torch.nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.nn.Parameter]]:
    """(hidden (N, H) → logits (N, V_padded), the head's trainable parameters)."""
    base = unwrap(model)
    lm_head = base.get_output_embeddings()
    scale = getattr(base, "logit_scale", None)  # Cohere multiplies the logits by it
    cap = getattr(base.config, "final_logit_softcapping", None)  # Gemma 2/3

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return head, [p for p in lm_head.parameters() if p.requires_grad]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under `model`'s wrappers names `logits_to_keep` in its forward.

    Decided from the HF model's own signature: DDP and PEFT forwards take **kwargs and pass them on, so the
    wrappers say nothing; a model's own **kwargs (attention kwargs) does not mean it keeps logits.
    """
    return _names_logits_to_keep(type(unwrap(model)))


@functools.cache
def _names_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, H) hidden states entering the head, from one forward through the (possibly wrapped) model.

    `position_ids` (neat packing) go in instead of the mask, which is then None (models.inputs says why).

    The forward goes through the outermost wrapper so DDP / accelerate autocast hooks run; a forward
    hook on the decoder catches its output, and `logits_to_keep=1` (where the model's forward takes it)
    keeps the head's own work to one position per row.
    """
    captured: dict[str, torch.Tensor] = {}

    def catch(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs.update(position_ids=position_ids, attention_mask=None)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    handle = decoder(model).register_forward_hook(catch)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured["hidden"]


@dataclass(frozen=True)
class FinalStates:
    """A model's final hidden states for one batch and its own head, which makes logits from them on demand."""

    hidden: torch.Tensor  # (B, T, H): what enters the head
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden (N, H) → logits (N, V_padded), as `output_head`
    head_params: list[torch.nn.Parameter]  # the head's trainable parameters (a LoRA on lm_head)
    vocab_size: int  # the real vocabulary: a padded head's extra rows are dropped

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, H) taken from `self.hidden` → logits (N, V) over the real vocabulary."""
        return self.head(hidden)[:, :self.vocab_size]


def final_states(model: torch.nn.Module, batch: dict, vocab_size: int) -> FinalStates:
    """One forward of `batch` (input_ids, attention_mask; position_ids when neat-packed) to the final hidden states,
    with the model's own head and the real vocabulary it is cut to. Callers keep the positions they score and
    project those only."""
    head, head_params = output_head(model)
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    return FinalStates(hidden, head, head_params, vocab_size)
