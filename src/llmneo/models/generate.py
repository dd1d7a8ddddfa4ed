"""Replies generated from a batch's prompts: on-policy distillation (the student continues its own
prompts, as in GKD and MiniLLM) and sequence-level KD (the teacher does).

A batch's prompt, per row, is everything before its last reply: the tokens before the last run of
labelled positions (in multi-turn rows the generator writes the last assistant turn). `prompts(batch)`
cuts them out, a `Generator` continues them, and `with_replies` builds the training batch again: prompt +
reply, the reply's tokens labelled up to and including the first EOS, nothing after it.

    Generator.generate(prompts: list[Tensor]) -> list[Tensor]   one reply per prompt, ending at its EOS

`HFGenerator` runs HF `generate` on a model: batched, left-padded, KV cache on, in eval mode (no dropout)
and under no_grad, back in the model's own mode afterwards. A LoRA student generates through *merged
shadow weights*: for the duration of `generate`, each plain LoRA layer's base weight is rebound to a new
tensor W0 + scaling·B·A and the adapter is bypassed, so generation runs at the merged model's speed
(unmerged LoRA costs a second small matmul per layer and token). The trained tensors are never written:
W0 is rebound, not modified, so training and resume stay bit-exact (merging in place and unmerging
would not be in fp32). The price is one transient copy of the adapted weights during generation.
Layers PEFT implements otherwise (DoRA, embeddings, ...) make the whole model generate unmerged.
The served engine (rollout_endpoint: a vLLM server of the base model, the adapter synced to it) is
models/served_rollouts.py; it samples as HFGenerator does and uses `Sampling`, `eos_ids` and `cut_at_eos` here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from llmneo.crosstok import offsets
from llmneo.data import dataset
from llmneo.data.labels import IGNORE_INDEX
from llmneo.errors import LlmneoError
from llmneo.models import heads


class Generator(Protocol):
    """What writes a step's replies (HF `generate` here; an inference engine would be another). Generators
    subclass it, so `generate_many` has a default: one `generate` per micro-batch."""

    def generate(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One reply (token ids) per prompt."""
        ...

    def generate_many(self, batches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Replies for a step's micro-batches of prompts."""
        return [self.generate(prompts) for prompts in batches]


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: up to `max_new_tokens`, at `temperature` (0 = greedy) and `top_p`."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, config) -> "Sampling":
        return cls(config.max_new_tokens, config.temperature, config.top_p)


def prompts(batch: dict) -> list[torch.Tensor]:
    """Each row's prompt: its tokens before the first position of its last labelled run (its last reply).

    A row with no label at all keeps its whole (unpadded) sequence as the prompt.
    """
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(mask.sum())
        labelled = (labels[:length] != IGNORE_INDEX).nonzero().flatten().tolist()
        start = length
        if labelled:
            start = labelled[-1]
            while start > 0 and labels[start - 1] != IGNORE_INDEX:
                start -= 1
        out.append(ids[:start])
    return out


def check_prompts(examples: list[dict]) -> None:
    """Every training example must have a prompt to continue: unlabelled tokens before its reply."""
    for n, example in enumerate(examples, 1):
        if example["labels"][0] != IGNORE_INDEX:
            raise LlmneoError(f"lmbda > 0 / seq_kd continue each example's prompt, but training example {n} is plain "
                              f"text (every token a target, no prompt); use conversation rows (alpaca, sharegpt, "
                              f"messages, prompt/completion) or set lmbda: 0 and seq_kd: false")


def cut_at_eos(reply: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """`reply` up to and including its first EOS (all of it when there is none)."""
    for i, token in enumerate(reply.tolist()):
        if token in eos_ids:
            return reply[:i + 1]
    return reply


def with_replies(prompt_ids: list[torch.Tensor], replies: list[torch.Tensor], pad_token_id: int,
                 device: torch.device) -> dict:
    """The training micro-batch prompt + reply per row, right-padded; only the reply's tokens are labelled."""
    examples = [{"input_ids": p.tolist() + r.tolist(), "labels": [IGNORE_INDEX] * len(p) + r.tolist()}
                for p, r in zip(prompt_ids, replies)]
    return {k: v.to(device) for k, v in dataset.collate(examples, pad_token_id).items()}


def teacher_fields(retokenizer, batch: dict, prompt_ids: list[torch.Tensor], replies: list[torch.Tensor],
                   rebuilt: dict, device: torch.device) -> dict:
    """Cross-tokenizer KD: the teacher's tokens of each generated row (its own prompt from `batch`, the reply
    re-tokenized by crosstok.Retokenizer) and the alignment, collated to `rebuilt`'s width."""
    rows = []
    for i, (prompt, reply) in enumerate(zip(prompt_ids, replies)):
        teacher_prompt = batch["teacher_input_ids"][i, :int(batch["teacher_prompt_len"][i])].tolist()
        rows.append({**retokenizer.fields(teacher_prompt, len(prompt), reply.tolist()), "reply_is_data": False})
    return {k: v.to(device) for k, v in offsets.collate_teacher(rows, rebuilt["input_ids"].shape[1]).items()}


def eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's generation_config eos_token_id(s)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(heads.unwrap(model), "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return ids


def turn_end_ids(examples: list[dict], tokenizer) -> set[int]:
    """The special tokens that end the labelled replies in `examples` (the chat template's end of turn, such as
    <|im_end|>, <|eot_id|> or <end_of_turn>): generated replies must stop there too, or the student would
    learn KD on text after its turn ended, which the data never has. A reply cut by cutoff_len ends on an
    ordinary token, which is not special and so not taken."""
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    ends = set()
    for example in examples:
        labels = example["labels"]
        for i in range(len(labels) - 1, 0, -1):
            if labels[i] != IGNORE_INDEX:
                if labels[i] in special and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX):
                    ends.add(int(labels[i]))
                break
    return ends


class HFGenerator(Generator):
    """HF `generate` on `model` (DDP / accelerate / PEFT wrappers are looked through; PEFT's adapters stay on).
    Replies stop at EOS, at the model's generation_config EOS ids and at `stop_ids` (turn_end_ids), and never
    run past the model's max_position_embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, sampling: Sampling, merge_lora: bool = True,
                 stop_ids: set[int] | None = None):
        self.model = _generating_module(model)
        self.sampling = sampling
        self.pad_token_id = tokenizer.pad_token_id
        self.eos = eos_ids(self.model, tokenizer) | set(stop_ids or ())
        self.merge_lora = merge_lora
        self.max_positions = getattr(heads.unwrap(self.model).config, "max_position_embeddings", None)
        # A head padded past the tokenizer (Qwen's 152064 rows for 151936 tokens) must never emit the padding.
        rows = heads.unwrap(self.model).get_output_embeddings().weight.shape[0]
        self.suppressed = list(range(len(tokenizer), rows))

    def generate(self, prompt_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.generate_many([prompt_ids])[0]

    @torch.no_grad()
    def generate_many(self, batches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Replies for several batches of prompts (a step's micro-batches) under one merge of the LoRA weights."""
        from transformers import GenerationConfig

        was_training = self.model.training
        hf_model = heads.unwrap(self.model)
        own = hf_model.generation_config
        self.model.eval()
        try:
            # HF fills whatever a generation_config leaves unset from the model's own (repetition_penalty,
            # no_repeat_ngram_size, min_new_tokens, ...), which would change what is sampled; replies must come
            # from the model's distribution itself, so the model's is blanked for the call.
            hf_model.generation_config = GenerationConfig()
            with merged_lora(self.model) if self.merge_lora else contextlib.nullcontext():
                return [self._generate(prompts) if prompts else [] for prompts in batches]
        finally:
            hf_model.generation_config = own
            self.model.train(was_training)

    def _generate(self, prompt_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        from transformers import GenerationConfig

        device = prompt_ids[0].device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for row, p in enumerate(prompt_ids):  # left-padded: every row's next token is at the same column
            input_ids[row, width - len(p):] = p
            attention[row, width - len(p):] = 1
        s = self.sampling
        new_tokens = s.max_new_tokens
        if self.max_positions:
            new_tokens = min(new_tokens, self.max_positions - width)
            if new_tokens <= 0:
                raise LlmneoError(f"a prompt of {width} tokens leaves no room to generate within the model's "
                                  f"{self.max_positions} positions; lower cutoff_len")
        options = dict(max_new_tokens=new_tokens, do_sample=s.temperature > 0, use_cache=True,
                       pad_token_id=self.pad_token_id, eos_token_id=sorted(self.eos) or None,
                       suppress_tokens=self.suppressed or None)
        if s.temperature > 0:
            options.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                  generation_config=GenerationConfig(**options))
        return [cut_at_eos(row[width:], self.eos) for row in out]


def _generating_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose `generate` runs the model as trained: the PeftModel (adapters on) or the HF model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP, accelerate
    return model


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module):
    """For the body of the block, every plain LoRA layer computes with W0 + scaling·B·A in one matmul.

    W0's tensor is rebound, never written; afterwards each layer has exactly its own tensors again. If any
    active LoRA layer is of a kind this cannot fold (DoRA, embeddings, convolutions), nothing is changed.
    """
    layers = _foldable_layers(model)
    if not layers:
        yield
        return
    saved = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            delta = sum(_delta(layer, name) for name in layer.active_adapters if name in layer.lora_A)
            saved.append((layer, base, base.weight.data, layer.disable_adapters))
            # a new tensor (W0 is untouched), rounded once to W0's dtype, as PEFT's merge and export round it
            base.weight.data = (base.weight.data.to(delta.dtype) + delta).to(base.weight.dtype)
            layer._disable_adapters = True
        yield
    finally:
        for layer, base, weight, disabled in saved:
            base.weight.data = weight
            layer._disable_adapters = disabled


def _foldable_layers(model: torch.nn.Module) -> list:
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if layer.disable_adapters or getattr(layer, "merged", False):
            return []
        if type(layer) is not LoraLinear or any(layer.use_dora.get(n, False) for n in layer.active_adapters):
            return []
    return layers


def _delta(layer, name: str) -> torch.Tensor:
    """scaling·B·A (MoSLoRA: scaling·B·M·A), shaped like the base weight."""
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    a = lora_a.weight.float()
    mixer = getattr(lora_a, "mixer", None)  # adapters.MixedLoraA
    if mixer is not None:
        a = mixer.float() @ a
    delta = (lora_b.weight.float() @ a) * layer.scaling[name]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta
