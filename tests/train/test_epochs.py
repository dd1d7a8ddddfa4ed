"""Training as long as asked: every epoch ends with a shorter optimizer step when gradient_accumulation_steps
does not divide its micro-batches (as in HF Trainer), so no step wraps into the next epoch; that step's loss
is the mean over its own tokens, `epoch` is exact, and a resume across it is exact."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from helpers import assert_same_training, read_metrics, resumed_from, write_jsonl, write_yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.data import dataset
from llmneo.train import loop
from llmneo.train import setup as training_setup
from llmneo.train import steps as step_source

FIFTY = [{"instruction": f"Question {i}: what comes next?", "input": "",
          "output": "Then " * (1 + i % 5) + f"answer {i}."} for i in range(50)]


@pytest.fixture
def fifty(base_overrides, tmp_path) -> dict:
    """50 rows, batch 2 × accumulation 16, one epoch: 25 micro-batches make a step of 16 and one of 9."""
    rows = write_jsonl(tmp_path / "fifty.jsonl", FIFTY)
    return {**base_overrides, "dataset": str(rows), "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 16, "max_steps": -1, "num_train_epochs": 1.0, "logging_steps": 1,
            "learning_rate": 5e-3}


class Replay:
    def __init__(self, step):
        self.step = step

    def next_step(self):
        return self.step


def test_one_epoch_is_a_full_step_and_a_short_one_and_sees_every_row_once(fifty):
    setup = training_setup.prepare(schema.load(overrides=fifty))
    try:
        assert len(setup.loader) == 25 and setup.total_steps == 2
        steps = [setup.steps.next_step() for _ in range(setup.total_steps)]
        assert [len(s.micro) for s in steps] == [16, 9]
        seen = [i for s in steps for batch in s.micro for i in batch["index"].tolist()]
        assert sorted(seen) == list(range(50))  # every row exactly once
    finally:
        setup.accelerator.end_training()


def test_the_short_steps_loss_is_the_mean_over_its_own_tokens(fifty):
    setup = training_setup.prepare(schema.load(overrides=fifty))
    try:
        loop.optimizer_step(setup, 1)
        assert setup.progress.micro_seen == 16
        short = setup.steps.next_step()
        assert len(short.micro) == 9
        with torch.no_grad():  # the step's loss by hand: its sums over its own response tokens
            sums = [loop.micro_batch_sums(setup.model, setup.teacher, batch, setup.loss_spec) for batch in short.micro]
        tokens = sum(n for *_, n in sums)
        assert tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in short.micro)
        ce, kd = sum(float(s[1]) for s in sums) / tokens, sum(float(s[2]) for s in sums) / tokens
        setup.steps, window_tokens = Replay(short), setup.progress.window.tokens
        result = loop.optimizer_step(setup, 2)
        assert result["ce"] == pytest.approx(ce, rel=1e-5) and result["kd"] == pytest.approx(kd, rel=1e-5)
        assert result["loss"] == pytest.approx((1 - setup.kd_ratio) * ce + setup.kd_ratio * kd, rel=1e-5)
        assert setup.progress.window.tokens - window_tokens == tokens
        assert setup.progress.micro_seen == 25  # the micro-batches consumed, not 2 × 16
    finally:
        setup.accelerator.end_training()


@pytest.mark.slow
def test_one_epoch_reports_epoch_one_and_resumes_exactly_across_the_short_step(tmp_path, fifty):
    values = {**fifty, "save_steps": 1}
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**values, "output_dir": str(full)})]) == 0
    results = json.loads((full / "train_results.json").read_text())
    assert results["global_step"] == 2 and results["epoch"] == 1.0
    assert [(r["step"], r["epoch"]) for r in read_metrics(full)] == [(1, 0.64), (2, 1.0)]
    assert json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())["micro_seen"] == 25
    assert read_metrics(full)[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends with the run
    cut = resumed_from(tmp_path, full, "checkpoint-1", values)  # the resumed run's one step is the short one
    assert_same_training(full, cut, tol=1e-6)
    assert json.loads((cut / "train_results.json").read_text())["epoch"] == 1.0


def test_data_packed_into_one_block_is_one_step_per_epoch(base_overrides, tmp_path):
    values = {**base_overrides, "packing": True, "cutoff_len": 512, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 16, "max_steps": -1, "num_train_epochs": 3.0}
    setup = training_setup.prepare(schema.load(overrides=values))
    try:
        assert len(setup.splits.train) == 1 and len(setup.loader) == 1
        assert setup.total_steps == 3
        assert [len(setup.steps.next_step().micro) for _ in range(3)] == [1, 1, 1]  # not 16 copies of the block
    finally:
        setup.accelerator.end_training()


def _loader(size: int, batch_size: int):
    from accelerate import Accelerator

    examples = [{"input_ids": [i + 5], "labels": [i + 5], "index": i} for i in range(size)]
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, sampler=dataset.EpochSampler(size, seed=0),
                                         collate_fn=lambda b: dataset.collate(b, pad_token_id=0),
                                         generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    return accelerator.prepare(loader), accelerator


def _indices(step) -> list[int]:
    return [i for batch in step.micro for i in batch["index"].tolist()]


def test_max_steps_across_epochs_ends_each_epoch_with_its_short_step():
    loader, accelerator = _loader(10, 2)  # 5 micro-batches per epoch, steps of 2, 2, 1
    steps = step_source.DatasetSteps(loader, accelerator, accumulation=2)
    taken = [steps.next_step() for _ in range(7)]
    assert [len(s.micro) for s in taken] == [2, 2, 1, 2, 2, 1, 2]
    for epoch in (taken[0:3], taken[3:6]):
        assert sorted(itertools.chain(*map(_indices, epoch))) == list(range(10))
    # resumed at any step boundary (micro-batch 7: two into the second epoch), the same steps follow
    resumed = step_source.DatasetSteps(loader, accelerator, accumulation=2, start=7)
    assert [_indices(resumed.next_step()) for _ in range(3)] == [_indices(s) for s in taken[4:7]]


@pytest.mark.parametrize("epochs, per_epoch, accumulation, steps", [
    (1.0, 25, 16, 2),    # 16 + 9
    (1.5, 25, 16, 3),    # HF: ceil(1.5 × 2 steps per epoch)
    (3.0, 1, 16, 3),     # an epoch shorter than one accumulation window is one step
    (2.5, 3, 2, 5),      # 2 + 1 per epoch
    (0.1, 30, 1, 3),     # 0.1 × 30 = 3.0000000000000004: not 4 steps
    (0.01, 5, 1, 1),     # at least one step
])
def test_total_steps_count_steps_per_epoch(epochs, per_epoch, accumulation, steps):
    cfg = schema.load(overrides={"num_train_epochs": epochs, "gradient_accumulation_steps": accumulation})
    assert step_source.total_steps(cfg, per_epoch) == steps
    capped = schema.load(overrides={"num_train_epochs": epochs, "max_steps": 7})
    assert step_source.total_steps(capped, per_epoch) == 7


def test_fractional_epochs_stop_inside_an_epoch_with_its_steps_cut_at_its_end():
    loader, accelerator = _loader(50, 2)
    steps = step_source.DatasetSteps(loader, accelerator, accumulation=16)
    total = step_source.total_steps(schema.load(overrides={"num_train_epochs": 1.5,
                                                           "gradient_accumulation_steps": 16}), len(loader))
    sizes = [len(steps.next_step().micro) for _ in range(total)]
    assert sizes == [16, 9, 16] and sum(sizes) / len(loader) == pytest.approx(1.64)


class Recorder:
    """A served teacher's prefetch side: which micro-batches were requested."""

    def __init__(self):
        self.requested = []

    def prefetch(self, batch, positions):
        self.requested.append(batch["index"].tolist())


def test_a_served_teachers_prefetch_follows_the_short_steps():
    loader, accelerator = _loader(10, 2)
    teacher = Recorder()
    steps = step_source.PrefetchSteps(step_source.DatasetSteps(loader, accelerator, accumulation=2), teacher,
                                      step=0, last=4)
    taken = [steps.next_step() for _ in range(4)]
    assert [len(s.micro) for s in taken] == [2, 2, 1, 2]
    assert teacher.requested == [batch["index"].tolist() for s in taken for batch in s.micro]  # none past the last
