"""report_to: accelerate's trackers get the rows metrics.jsonl gets, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

from llmneo import cli
from llmneo.config import schema

KEYS = ("loss", "ce_loss", "kd_loss", "learning_rate", "grad_norm", "epoch")


def _train(overrides: dict) -> int:
    return cli.main(["train", *(f"{k}={v}" for k, v in overrides.items())])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `event_dir`, as TensorBoard itself reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert any(event_dir.glob("events.out.tfevents.*")), f"no event file in {event_dir}"
    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same_rows(scalars: dict, rows: list[dict]) -> None:
    for key in KEYS:
        expected = [(r["step"], r[key]) for r in rows]
        got = scalars[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, value), (step, want) in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-6), (key, step)  # event files hold float32


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_rows(base_overrides):
    """Default place: output_dir/runs/<output_dir's name>; every row of metrics.jsonl, per step."""
    pytest.importorskip("tensorboard")
    out = Path(base_overrides["output_dir"])
    assert _train({**base_overrides, "report_to": "tensorboard", "max_steps": 3, "logging_steps": 1}) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["kd_loss"] is not None for r in rows)
    scalars = _scalars(out / "runs" / out.name)
    _assert_same_rows(scalars, rows)
    assert "step" not in scalars  # the step is the axis, not a series


@pytest.mark.slow
def test_tensorboard_survives_a_resume(base_overrides, tmp_path):
    """A run resumed from checkpoint-2 re-logs steps 3 and 4 into the same run (the default run_name, so
    the same folder): each step once, equal to metrics.jsonl; logging_dir places the files."""
    pytest.importorskip("tensorboard")
    out = Path(base_overrides["output_dir"])
    logs = tmp_path / "tb"
    settings = {**base_overrides, "report_to": "tensorboard", "logging_dir": str(logs),
                "max_steps": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 5e-3}
    assert _train(settings) == 0
    first = _metrics(out)
    shutil.rmtree(out / "checkpoint-4")
    (out / "train_results.json").unlink()
    # TensorBoard reads event files in name order: <second>.<host>.<pid>.<writer count>. Within one second of
    # one process the count decides, and in a pytest worker that has made 9 writers ".10" sorts before ".9".
    # A user's resume is a new process, later; here the resumed run starts in a later second.
    time.sleep(1 - time.time() % 1)
    assert _train({**settings, "resume_from_checkpoint": "auto"}) == 0
    assert json.loads((out / "train_results.json").read_text())["resumed_from"].endswith("checkpoint-2")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in first], rel=1e-6)
    assert [p.name for p in logs.iterdir()] == [out.name]
    assert len(list((logs / out.name).glob("events.out.tfevents.*"))) == 2  # the first run's and the resumed one's
    _assert_same_rows(_scalars(logs / out.name), rows)
    assert not (out / "runs").exists()


@pytest.mark.slow
def test_held_out_results_reach_the_tracker(base_overrides):
    pytest.importorskip("tensorboard")
    out = Path(base_overrides["output_dir"])
    assert _train({**base_overrides, "report_to": "tensorboard", "max_steps": 2, "val_size": 2,
                   "run_name": "neo-a"}) == 0
    results = json.loads((out / "train_results.json").read_text())
    scalars = _scalars(out / "runs" / "neo-a")
    assert scalars["eval_ce_loss"] == [(2, pytest.approx(results["eval_ce_loss"], rel=1e-6))]


def test_report_to_is_a_real_key_not_an_ignored_one(recwarn):
    c = schema.load(overrides=["report_to=tensorboard,wandb", "logging_dir=tb", "run_name=r1"])
    assert schema.report_to(c) == ["tensorboard", "wandb"] and (c.logging_dir, c.run_name) == ("tb", "r1")
    assert schema.report_to(schema.load(overrides=["report_to=none"])) == []
    assert not [w for w in recwarn if "ignores" in str(w.message)]
    assert {"report_to", "logging_dir", "run_name"}.isdisjoint(schema.IGNORED_KEYS)


def test_unknown_tracker_is_one_line(capsys):
    assert cli.main(["train", "report_to=tensorbored", "output_dir=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmneo: error: report_to: unknown tracker 'tensorbored'") and "\n" not in err


def test_missing_tracker_package_names_it(base_overrides, capsys):
    missing = next((name for name in ("aim", "clearml", "dvclive", "swanlab", "comet_ml")
                    if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("every candidate tracker is installed")
    assert _train({**base_overrides, "report_to": missing}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    package = {"comet_ml": "comet-ml"}.get(missing, missing)
    assert err[-1].startswith(f"llmneo: error: report_to={missing} needs the {package} package")
    assert f"pip install {package}" in err[-1]
    assert not (Path(base_overrides["output_dir"]) / "train_results.json").exists()
