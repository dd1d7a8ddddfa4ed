"""Cross-tokenizer KD (#13): a teacher with another tokenizer, aligned by the text, GOLD's hybrid loss.

The identity: with one tokenizer forced through the cross-tokenizer path, every token aligns one to one,
every token is shared and the ULD weight is 0, so losses and gradients must equal the same-tokenizer path.
Then alignment on real (tiny) tokenizers that split words differently, the hybrid against a hand
computation, and the whole CLI with a teacher whose tokenizer and vocabulary size differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ALPACA_ROWS, read_metrics, write_jsonl, write_yaml
from llmneo import adapters, alignment, cli, config, crosstok, crossvocab, data, models, train
from llmneo.demo import tiny
from llmneo.losses import KDSettings
from llmneo.rows import SparseRows
from llmneo.teacher import LiveTeacher


def _setup(overrides: dict):
    cfg = config.load(overrides=overrides)
    loaded = models.load(cfg, models.resolve_precision(cfg), with_teacher=True)
    return cfg, loaded


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind, temperature, chunk", [("fkl", 1.0, 16), ("rkl", 1.0, 16), ("jsd", 2.0, 16),
                                                      ("tvd", 1.0, 0), ("skew_fkl", 1.0, 0)])
def test_one_tokenizer_forced_through_the_cross_path_equals_the_same_tokenizer_path(base_overrides, kind,
                                                                                     temperature, chunk):
    cfg, loaded = _setup({**base_overrides, "kd_cross_tokenizer": True, "kd_loss": kind,
                          "kd_temperature": temperature, "kd_chunk_size": chunk})
    assert loaded.teacher_tokenizer is not None and loaded.teacher_tokenizer is not loaded.tokenizer
    side = crosstok.TeacherSide(loaded.teacher_tokenizer, None)
    examples = data.build(cfg, loaded.tokenizer, side).train
    batch = data.collate(examples[:4], loaded.tokenizer.pad_token_id)
    vocab = crosstok.vocab_for(cfg, loaded.tokenizer, loaded.teacher_tokenizer)
    assert vocab.overlap == 1.0 and vocab.uld_weight == 0.0
    assert torch.equal(vocab.student_ids, vocab.teacher_ids)  # every token shared with itself
    model = adapters.apply(loaded.student, cfg)
    teacher = LiveTeacher(loaded.teacher, len(loaded.tokenizer))
    settings = KDSettings.from_config(cfg)
    aligner = alignment.choose(vocab)
    crossed = train.micro_batch_sums(model, teacher, batch, cfg, loaded.vocab_size, 0.5, settings=settings,
                                     aligner=aligner)
    crossed[0].backward()
    crossed_grads = _grads(model)
    assert aligner.take_counts() == (crossed[3], crossed[3])  # every response position aligned
    same = train.micro_batch_sums(model, teacher, batch, cfg, loaded.vocab_size, 0.5, settings=settings)
    same[0].backward()
    same_grads = _grads(model)
    for a, b in zip(crossed[:3], same[:3]):
        assert float(a) == pytest.approx(float(b), abs=1e-5, rel=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(crossed_grads, same_grads)) <= 1e-5
    assert any(float(g.abs().max()) > 1e-4 for g in same_grads)  # gradients that could differ
