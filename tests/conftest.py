"""Shared fixtures: tiny real HF checkpoints (Llama / Qwen2) and data files, built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llmneo.demo import tiny  # noqa: E402

from helpers import ALPACA_ROWS, write_jsonl  # noqa: E402  (the fixtures below use them)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    model = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A bigger teacher whose embedding matrix is padded past the tokenizer (like Qwen's 152064).

    Its output head is scaled up so its distributions are peaked, far from a random student's
    near-uniform ones: KD then has something to teach.
    """
    import torch

    model = tiny.build_model(tokenizer, hidden_size=48, num_layers=3, seed=2,
                             vocab_size=len(tokenizer) + 64 - len(tokenizer) % 64)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def alien_teacher_dir(tmp_path_factory) -> Path:
    """A teacher with a different tokenizer."""
    other = tiny.build_tokenizer(corpus=["completely different words here", "zebra yak xylophone"], vocab_size=300)
    model = tiny.build_model(other, hidden_size=32, num_layers=2, seed=3)
    return tiny.save_pair(model, other, tmp_path_factory.mktemp("alien"))


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA_ROWS)


@pytest.fixture
def base_overrides(student_dir, teacher_dir, alpaca_file, tmp_path) -> dict:
    """A fast Neo run: tiny rank, a few steps, fp32."""
    return {
        "model_name_or_path": str(student_dir),
        "teacher_model_name_or_path": str(teacher_dir),
        "dataset": str(alpaca_file),
        "output_dir": str(tmp_path / "out"),
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "cutoff_len": 64,
        "seed": 0,
    }
