"""Tiny real Hugging Face tokenizers and models, built in-process.

Tests, the demo and the benchmarks need real `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoints
and a real fast tokenizer, but nothing can be downloaded. These builders make them from code, in
milliseconds, deterministic from a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation moves knowledge from a large teacher into a small student.",
    "Low-rank adaptation trains a small branch W0 + BA instead of the full weight.",
    "user assistant system instruction input output response question answer",
    "What is two plus two? Two plus two is four. Say hello. Hello there!",
    "0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(
    corpus: list[str] | None = None,
    vocab_size: int = 320,
    chat_template: str | None = CHATML_TEMPLATE,
):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (any text encodes, no <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus or _DEFAULT_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(
    tokenizer,
    *,
    family: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
):
    """A randomly initialised causal LM of the given family, sized by the arguments.

    `vocab_size` larger than `len(tokenizer)` makes a padded-vocab model (like Qwen's 151936 vs 152064).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_pair(model, tokenizer, directory: str | Path) -> Path:
    """Save a model and its tokenizer as a plain HF checkpoint (safetensors)."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
