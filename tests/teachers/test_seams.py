"""The training loop's seams: each optimizer step takes its micro-batches from the step source and the
teacher's rows through the aligner, chosen once at set-up; and the non-finite guard of an engine that
updates inside backward (DeepSpeed) stops before that backward."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.config import schema
from llmneo.data import dataset
from llmneo.loss.divergences import KDSettings
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, loading
from llmneo.teachers import aligner as alignment
from llmneo.teachers.live import LiveTeacher
from llmneo.train import loop
from llmneo.train import setup as training_setup
from llmneo.train import steps as step_source


class Replay:
    """A step source that hands out the same micro-batches every step (where a rollout would generate)."""

    def __init__(self, micro):
        self.micro, self.calls = micro, 0

    def next_step(self):
        self.calls += 1
        return step_source.Step(self.micro)


class CountingAligner(alignment.IdentityAligner):
    def __init__(self):
        self.calls = 0

    def rows(self, teacher, batch, positions):
        self.calls += 1
        rows = super().rows(teacher, batch, positions)
        assert len(rows) == int(positions.sum())
        return rows


def test_each_step_takes_its_batches_from_the_step_source_and_rows_through_the_aligner(tmp_path, base_overrides):
    cfg = schema.load(overrides={**base_overrides, "output_dir": str(tmp_path / "out"), "max_steps": 2,
                                 "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2})
    setup = training_setup.prepare(cfg)
    try:
        assert isinstance(setup.steps, step_source.DatasetSteps)
        assert isinstance(setup.aligner, alignment.IdentityAligner) and setup.aligner.take_counts() is None
        assert isinstance(setup.teacher, LiveTeacher)
        micro = setup.steps.next_step().micro
        assert len(micro) == 2 and all(b["input_ids"].shape[0] == 2 for b in micro)
        setup.steps, setup.aligner = Replay(micro), CountingAligner()
        result = loop.optimizer_step(setup, 1)
        assert setup.steps.calls == 1 and setup.aligner.calls == 2  # one step, one alignment per micro-batch
        assert setup.progress.step == 1 and setup.progress.micro_seen == 2
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        assert setup.progress.window.tokens == tokens
        assert math.isfinite(result["loss"]) and result["kd"] is not None
        assert all(p.grad is None for p in setup.params)  # stepped, then zero_grad(set_to_none=True)
    finally:
        setup.accelerator.end_training()


def test_non_finite_loss_stops_before_a_backward_that_would_update(base_overrides):
    """Under DeepSpeed the engine steps inside the boundary micro-batch's backward: the guard checks the
    step's all-reduced loss after that forward, so a NaN never reaches the weights. Here the teacher's head
    makes the KD term NaN and the step has one (boundary) micro-batch: no backward may run at all."""
    from accelerate import Accelerator

    cfg = schema.load(overrides=base_overrides)
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    with torch.no_grad():
        loaded.teacher.get_output_embeddings().weight[0] = math.nan
    model = adapters.apply(loaded.student, cfg)
    batch = dataset.collate(dataset.build(cfg, loaded.tokenizer).train[:2], loaded.tokenizer.pad_token_id)
    teacher = LiveTeacher(loaded.teacher, loaded.vocab_size)
    loss_spec = LossSpec(loaded.vocab_size, 0.5, KDSettings.from_config(cfg), cfg.kd_chunk_size)
    with pytest.raises(loop.NonFiniteLoss) as caught:
        loop.accumulate(Accelerator(cpu=True), model, teacher, [batch], loss_spec, check_before_boundary=True)
    assert math.isnan(caught.value.loss)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    # without the engine's in-backward update (DDP, single process) the guard runs after clipping instead
    loop.accumulate(Accelerator(cpu=True), model, teacher, [batch], loss_spec)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
