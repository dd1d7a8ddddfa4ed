"""`llmneo eval model_name_or_path=<a run's output_dir>` without a dataset scores the rows that run held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from llmneo import cli
from llmneo.models import trained_run

HELD_OUT_KEYS = ("ce_loss", "perplexity", "tokens", "kl_to_teacher", "top1_agreement", "kd_loss")
HELD_OUT = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple, crisp and red."},
    {"instruction": "Count to five.", "input": "", "output": "1 2 3 4 5"},
]


def _train(settings: dict) -> dict:
    assert cli.main(["train", *(f"{k}={v}" for k, v in settings.items())]) == 0
    return json.loads((Path(settings["output_dir"]) / "train_results.json").read_text())


def _eval(out: Path, *args: str) -> dict:
    assert cli.main(["eval", *args, f"output_dir={out}"]) == 0
    return json.loads((out / "eval_results.json").read_text())


@pytest.mark.slow
def test_eval_of_a_run_scores_the_rows_it_held_out(tmp_path, base_overrides, teacher_dir):
    """The run's dataset, val_size and seed (not the default 42) give the same split; its jsd settings the same
    kd_loss; so every held-out score equals train_results.json's, KL to the teacher included."""
    run = tmp_path / "run"
    settings = {**base_overrides, "output_dir": str(run), "val_size": 3, "max_steps": 1, "seed": 3,
                "kd_loss": "jsd", "kd_temperature": 2.0, "kd_beta": 0.3}
    trained = _train(settings)
    scored = _eval(tmp_path / "eval", f"model_name_or_path={run}", f"teacher_model_name_or_path={teacher_dir}")
    for key in HELD_OUT_KEYS:
        assert scored[key] == pytest.approx(trained[f"eval_{key}"], rel=1e-5), key
    # A value given wins: another held-out size is another set of rows.
    other = _eval(tmp_path / "other", f"model_name_or_path={run}", "val_size=2")
    assert other["tokens"] != scored["tokens"]


@pytest.mark.slow
def test_eval_of_a_run_scores_its_eval_dataset(tmp_path, base_overrides):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    run = tmp_path / "run"
    settings = {**base_overrides, "output_dir": str(run), "eval_dataset": str(held_out), "max_steps": 1,
                "teacher_model_name_or_path": None}
    trained = _train(settings)
    scored = _eval(tmp_path / "eval", f"model_name_or_path={run}")
    assert scored["tokens"] == trained["eval_tokens"]
    assert scored["perplexity"] == pytest.approx(trained["eval_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_eval_of_a_run_without_a_held_out_split_asks_for_data(tmp_path, base_overrides, alpaca_file, capsys):
    """Scoring the rows the run trained on would pass for a held-out score: one line says what to give instead."""
    run = tmp_path / "run"
    _train({**base_overrides, "output_dir": str(run), "max_steps": 1, "teacher_model_name_or_path": None})
    capsys.readouterr()
    assert cli.main(["eval", f"model_name_or_path={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "held out no data" in err and f"dataset={alpaca_file}" in err
    # Given a dataset, it is scored whole (the run's val_size of 0 is no split).
    whole = _eval(tmp_path / "whole", f"model_name_or_path={run}", f"dataset={alpaca_file}")
    assert whole["tokens"] > 0


def test_export_takes_no_data_keys_from_the_run(tmp_path):
    """Only eval scores rows: export of a run takes its template and cutoff, never its dataset or split."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "llmneo_config.yaml").write_text("dataset: rows.jsonl\nval_size: 2\ncutoff_len: 99\nseed: 3\n"
                                            "kd_loss: jsd\n")
    exported = trained_run.load(None, [f"model_name_or_path={run}"], "export")
    assert (exported.cutoff_len, exported.dataset, exported.val_size, exported.kd_loss) == (99, None, 0, "fkl")
    evaluated = trained_run.load(None, [f"model_name_or_path={run}"], "eval")
    assert (evaluated.dataset, evaluated.val_size, evaluated.seed, evaluated.kd_loss) == ("rows.jsonl", 2, 3, "jsd")
    given = trained_run.load(None, [f"model_name_or_path={run}", "dataset=other.jsonl"], "eval")
    assert (given.dataset, given.val_size, given.seed) == ("other.jsonl", 0, 42)
