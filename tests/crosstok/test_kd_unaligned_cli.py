"""`kd_unaligned` reaches the loss from the config: a training run's first KD loss under `ce` and under `skip`
differ, and each is what the aligner gives with that setting.

The aligner's own test sets the option on the function; this one goes through `llmneo train`, so a run that
dropped the key on its way (always `ce`, or always `skip`) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ALPACA_ROWS, read_metrics, write_jsonl, write_yaml
from test_cross_tokenizer import other_family_tokenizer

from llmneo import cli
from llmneo.config import schema
from llmneo.crosstok import offsets as crosstok
from llmneo.data import dataset
from llmneo.demo import tiny
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, loading
from llmneo.teachers import aligner as alignment
from llmneo.teachers.live import LiveTeacher
from llmneo.train import loop


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> Path:
    """A teacher of another family (its own tokenizer, end of turn and padded head), sure of itself."""
    other = other_family_tokenizer()
    model = tiny.build_model(other, hidden_size=48, num_layers=3, seed=5, vocab_size=len(other) + 64 - len(other) % 64)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, other, tmp_path_factory.mktemp("other_family"))


@pytest.fixture
def unaligned_overrides(base_overrides, other_teacher, tmp_path) -> dict:
    """One step over four rows in one batch, from a teacher with another tokenizer."""
    rows = write_jsonl(tmp_path / "four.jsonl", ALPACA_ROWS[:4])
    return {**base_overrides, "teacher_model_name_or_path": str(other_teacher), "dataset": str(rows),
            "max_steps": 1}


def first_kd_by_the_function(values: dict) -> float:
    """The KD loss per response token of the run's first batch (every row; the adapter starts as a no-op), from
    micro_batch_sums with the aligner that `values`' kd_unaligned names."""
    cfg = schema.load(overrides=values)
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    side = crosstok.TeacherSide(loaded.teacher_tokenizer, cfg.teacher_template or cfg.template)
    examples = dataset.build(cfg, loaded.tokenizer, side).train
    batch = dataset.collate(examples, loaded.tokenizer.pad_token_id)
    vocab = crosstok.vocab_for(cfg, loaded.tokenizer, loaded.teacher_tokenizer)
    teacher = LiveTeacher(loaded.teacher, len(loaded.teacher_tokenizer))
    aligner = alignment.choose(vocab, unaligned=cfg.kd_unaligned)
    with torch.no_grad():
        _, _, kd, count = loop.micro_batch_sums(adapters.apply(loaded.student, cfg), teacher, batch,
                                                LossSpec.from_config(cfg, loaded.vocab_size, has_teacher=True),
                                                aligner=aligner)
    aligned, positions = aligner.take_counts()
    assert 0 < aligned < positions  # some positions are unaligned: the setting has something to change
    return float(kd) / count


@pytest.mark.slow
def test_kd_unaligned_from_the_config_sets_the_first_steps_kd_loss(tmp_path, unaligned_overrides):
    first = {}
    for mode in ("ce", "skip"):
        values = {**unaligned_overrides, "kd_unaligned": mode, "output_dir": str(tmp_path / mode)}
        assert cli.main(["train", write_yaml(tmp_path, f"{mode}.yaml", values)]) == 0
        rows = read_metrics(Path(values["output_dir"]))
        assert rows[0]["step"] == 1 and rows[0]["kd_aligned_fraction"] < 1.0
        first[mode] = rows[0]["kd_loss"]
        assert first[mode] == pytest.approx(first_kd_by_the_function(values), rel=1e-4), mode
    # an unaligned position's CE is far above the 0 that skip gives it
    assert first["ce"] > 1.2 * first["skip"] > 0
