"""eval_strategy / eval_steps (HF's and LLaMA-Factory's keys): held-out eval rows during training, in
metrics.jsonl, on the console and in report_to's trackers; training itself and resume unchanged."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import read_metrics, resumed_from

from llmneo import cli, plot
from llmneo.config import schema

EVAL_KEYS = {"step", "epoch", "eval_loss", "eval_ce_loss", "eval_kd_loss", "eval_perplexity", "eval_kl_to_teacher",
             "eval_top1_agreement", "eval_tokens"}
TRAIN_KEYS = {"step", "epoch", "loss", "ce_loss", "kd_loss", "learning_rate", "grad_norm", "tokens_per_second"}


def _train(settings: dict) -> int:
    return cli.main(["train", *(f"{k}={v}" for k, v in settings.items())])


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture
def evaluated(base_overrides):
    """8 rows, 3 held out; dropout on, so a run whose evaluation drew random numbers or left the student in
    eval mode would train differently."""
    return {**base_overrides, "val_size": 3, "per_device_train_batch_size": 2, "max_steps": 4, "lora_dropout": 0.1,
            "learning_rate": 5e-3}


@pytest.mark.slow
def test_eval_rows_every_eval_steps_leave_training_unchanged(tmp_path, evaluated, capsys):
    plain, periodic = tmp_path / "plain", tmp_path / "periodic"
    assert _train({**evaluated, "output_dir": plain}) == 0
    capsys.readouterr()
    assert _train({**evaluated, "output_dir": periodic, "eval_strategy": "steps", "eval_steps": 2,
                   "report_to": "tensorboard"}) == 0
    printed = capsys.readouterr()
    training, held_out = _split(read_metrics(periodic))
    assert [r["step"] for r in read_metrics(periodic)] == [1, 2, 2, 3, 4, 4]  # each eval row after its step's row
    assert [r["step"] for r in held_out] == [2, 4] and all(set(r) == EVAL_KEYS for r in held_out)
    assert all(set(r) == TRAIN_KEYS for r in training)  # the training rows' schema is unchanged
    for ours, theirs in zip(training, read_metrics(plain), strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert ours[key] == theirs[key], (ours["step"], key)
    first, last = held_out
    assert first["eval_ce_loss"] != last["eval_ce_loss"]  # scored after different steps
    assert last["eval_kl_to_teacher"] is not None and 0 <= last["eval_top1_agreement"] <= 1
    assert last["eval_loss"] == pytest.approx(0.5 * last["eval_ce_loss"] + 0.5 * last["eval_kd_loss"])
    # The last step's scores are the final ones (computed once).
    results = json.loads((periodic / "train_results.json").read_text())
    assert {k: results[k] for k in EVAL_KEYS - {"step", "epoch"}} == {k: last[k] for k in EVAL_KEYS - {"step", "epoch"}}
    assert "step 2 held-out" in printed.out and "step 4 held-out" in printed.out
    assert "llmneo held-out eval" in printed.err  # the evaluation's own progress bar
    from test_tracking import _scalars

    scalars = _scalars(periodic / "runs" / periodic.name)
    assert [s for s, _ in scalars["eval_ce_loss"]] == [2, 4]  # once per eval row, the final scores not again
    assert scalars["eval_ce_loss"][0][1] == pytest.approx(first["eval_ce_loss"], rel=1e-6)


@pytest.mark.slow
def test_eval_steps_default_to_logging_steps_and_the_older_key(tmp_path, evaluated):
    out = tmp_path / "out"
    assert _train({**evaluated, "output_dir": out, "evaluation_strategy": "steps", "logging_steps": 3}) == 0
    assert [r["step"] for r in _split(read_metrics(out))[1]] == [3]


@pytest.mark.slow
def test_eval_strategy_epoch_evaluates_at_each_epochs_end(tmp_path, evaluated):
    """5 training rows in micro-batches of 2: 3 per epoch; 2 epochs of single-micro-batch steps end at 3 and 6."""
    out = tmp_path / "out"
    settings = {**evaluated, "output_dir": out, "eval_strategy": "epoch", "max_steps": -1, "num_train_epochs": 2}
    assert _train(settings) == 0
    assert [(r["step"], r["epoch"]) for r in _split(read_metrics(out))[1]] == [(3, 1.0), (6, 2.0)]
    # max_steps stopping mid-epoch: the last step is evaluated too (as HF Trainer does)
    assert _train({**settings, "output_dir": tmp_path / "cut", "max_steps": 4}) == 0
    assert [r["step"] for r in _split(read_metrics(tmp_path / "cut"))[1]] == [3, 4]


@pytest.mark.slow
def test_resume_keeps_eval_rows_exact(tmp_path, evaluated):
    """Resumed from checkpoint-2 (saved after step 2's eval row), metrics.jsonl equals the uninterrupted run's,
    eval rows included, and so do the weights."""
    values = {**evaluated, "gradient_accumulation_steps": 3, "max_steps": 5, "save_steps": 2,
              "eval_strategy": "steps", "eval_steps": 2}
    full = tmp_path / "full"
    assert _train({**values, "output_dir": full}) == 0
    resumed = resumed_from(tmp_path, full, "checkpoint-2", values)
    rows_full, rows_resumed = read_metrics(full), read_metrics(resumed)
    assert [sorted(r) for r in rows_full] == [sorted(r) for r in rows_resumed]
    assert [r["step"] for r in _split(rows_resumed)[1]] == [2, 4]
    for a, b in zip(rows_full, rows_resumed):
        for key in set(a) - {"tokens_per_second"}:
            assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), (a["step"], key)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "adapter_model.safetensors")) for d in (full, resumed))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)


def test_eval_strategy_config(tmp_path, alpaca_file, capsys):
    base = [f"dataset={alpaca_file}", "val_size=2"]
    assert schema.load(overrides=base + ["eval_strategy=steps"]).effective_eval_strategy == "steps"
    assert schema.load(overrides=base + ["evaluation_strategy=epoch"]).effective_eval_strategy == "epoch"
    # YAML reads a bare `no` as false; and the keys are no longer ignored (no warning lists them)
    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\neval_steps: 5\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert schema.load(path).effective_eval_strategy == "no"
    assert not [str(w.message) for w in caught if "ignores" in str(w.message)]
    for bad, words in ((["eval_strategy=steps"], "there is none; set val_size"),
                       (base + ["eval_strategy=often"], "eval_strategy must be one of no, steps, epoch"),
                       (base + ["eval_strategy=steps", "evaluation_strategy=epoch"], "disagree"),
                       (base + ["eval_steps=0"], "eval_steps must be > 0")):
        assert cli.main(["train", f"model_name_or_path={tmp_path}", f"output_dir={tmp_path / 'o'}", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err


@pytest.mark.slow
def test_eval_strategy_without_a_scorable_held_out_row_stops_before_training(tmp_path, base_overrides, capsys):
    """The one held-out row's prompt is longer than cutoff_len: refused in one line before the first step."""
    from helpers import ALPACA_ROWS, write_jsonl

    from llmneo.data import dataset as data

    rows = [dict(r) for r in ALPACA_ROWS]
    _, held_out = data._split(list(range(len(rows))), 1, base_overrides["seed"])
    rows[held_out[0]]["instruction"] = "word " * 200
    dataset = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    assert _train({**base_overrides, "dataset": dataset, "output_dir": out, "val_size": 1,
                   "eval_strategy": "steps"}) == 2
    err = capsys.readouterr().err
    assert "eval_strategy: steps, but no held-out example has a response token within cutoff_len=64" in err
    metrics = out / "metrics.jsonl"
    assert not list(out.glob("checkpoint-*")) and not (metrics.is_file() and metrics.read_text())  # no step ran


def test_loss_plot_with_eval_rows():
    """Eval rows have no training loss: the training curves stay drawn and eval_loss is drawn beside them."""
    pytest.importorskip("matplotlib")
    rows = [{"step": 1, "loss": 2.0, "ce_loss": 2.5, "kd_loss": 1.5},
            {"step": 2, "loss": 1.0, "ce_loss": 1.2, "kd_loss": 0.8},
            {"step": 2, "eval_loss": 1.4, "eval_ce_loss": 1.6}]
    plt = plot._pyplot()
    fig = plot.loss_figure(plt, rows, "t")
    try:
        labels = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
        assert labels["loss"] == [2.0, 1.0] and labels["ce_loss"] == [2.5, 1.2] and labels["kd_loss"] == [1.5, 0.8]
        assert labels["eval_loss (held-out)"] == [1.4]
    finally:
        plt.close(fig)
