"""Checkpoints and resume: exact continuation, preemption, kill -9 during saves, NaN, broken checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_metrics, resumed_from, write_yaml
from safetensors.torch import load_file

from llmneo import cli
from llmneo.demo import tiny

STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "adapter_model.safetensors",
               "adapter_config.json")


def _assert_same_run(a: Path, b: Path, tol: float = 1e-6) -> None:
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "learning_rate"):
            assert rb[key] == pytest.approx(ra[key], abs=tol, rel=0), (ra["step"], key)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= tol, name


@pytest.fixture
def resumable(base_overrides, tmp_path):
    """8 rows, batch 2 → 4 micro-batches per epoch; accumulation 3 makes each epoch a step of 3 and a short
    step of 1."""
    return {**base_overrides, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "max_steps": 6,
            "save_steps": 2, "learning_rate": 5e-3, "lora_dropout": 0.1}


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, resumable):
    resumable = {**resumable, "save_steps": 3}
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**resumable, "output_dir": str(full)})]) == 0
    assert sorted(p.name for p in full.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-3", "checkpoint-6"]
    for name in STATE_FILES:
        assert (full / "checkpoint-3" / name).is_file(), name
    state = json.loads((full / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["micro_seen"] == 7  # 1.75 epochs in: mid-epoch, before its short step
    # an interrupted run: only checkpoint-3 and the metrics it had written survive
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(full)[:4]))  # a stray row
    values = {**resumable, "output_dir": str(cut), "resume_from_checkpoint": "auto"}
    assert cli.main(["train", write_yaml(tmp_path, "cut.yaml", values)]) == 0  # no overwrite flag needed
    _assert_same_run(full, cut)
    results = json.loads((cut / "train_results.json").read_text())
    assert results["resumed_from"].endswith("checkpoint-3") and results["global_step"] == 6
    assert results["epoch"] == 3.0  # six steps: three epochs of a step of 3 and a short step of 1


@pytest.mark.slow
def test_save_total_limit_keeps_newest(tmp_path, resumable):
    out = tmp_path / "out"
    values = {**resumable, "output_dir": str(out), "save_steps": 1, "save_total_limit": 2}
    assert cli.main(["train", write_yaml(tmp_path, "r.yaml", values)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-5", "checkpoint-6"]


def _launch(config: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmneo", "train", config, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches(tmp_path, base_overrides):
    values = {**base_overrides, "per_device_train_batch_size": 2, "max_steps": 150, "save_steps": 1000,
              "learning_rate": 1e-3}
    reference = tmp_path / "reference"
    assert cli.main(["train", write_yaml(tmp_path, "ref.yaml", {**values, "output_dir": str(reference)})]) == 0
    out = tmp_path / "preempted"
    config = write_yaml(tmp_path, "p.yaml", {**values, "output_dir": str(out)})
    proc = _launch(config)
    _wait_for(lambda: _rows(out) >= 3 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "resume_from_checkpoint=auto" in err
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 150
    assert not (out / "train_results.json").exists()
    assert cli.main(["train", config, "resume_from_checkpoint=auto"]) == 0
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_kill_9_during_saves_never_breaks_the_last_checkpoint(tmp_path, base_overrides):
    values = {**base_overrides, "per_device_train_batch_size": 2, "max_steps": 60, "save_steps": 1,
              "save_total_limit": 2, "learning_rate": 1e-3, "output_dir": str(tmp_path / "out"),
              "resume_from_checkpoint": "auto"}
    config = write_yaml(tmp_path, "k.yaml", values)
    out = tmp_path / "out"
    rng = random.Random(0)
    for attempt in range(4):
        proc = _launch(config)
        before = _rows(out)
        _wait_for(lambda: _rows(out) > before or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        for checkpoint in (p for p in out.iterdir() if p.name.startswith("checkpoint-")):
            for name in STATE_FILES:
                assert (checkpoint / name).is_file(), (attempt, checkpoint.name, name)
            json.loads((checkpoint / "trainer_state.json").read_text())
            load_file(str(checkpoint / "adapter_model.safetensors"))
    assert cli.main(["train", config]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert (out / "train_results.json").is_file()


@pytest.mark.slow
def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, base_overrides, capsys):
    out = tmp_path / "out"
    values = {**base_overrides, "learning_rate": 1e30, "warmup_ratio": 0.0, "max_grad_norm": 0.0, "save_steps": 1,
              "max_steps": 5, "output_dir": str(out)}
    assert cli.main(["train", write_yaml(tmp_path, "n.yaml", values)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 2" in err and "checkpoint-1" in err
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1
    assert not (out / "train_results.json").exists()


@pytest.mark.slow
def test_broken_and_incompatible_checkpoints(tmp_path, resumable, capsys):
    out = tmp_path / "out"
    values = {**resumable, "output_dir": str(out), "max_steps": 2}
    assert cli.main(["train", write_yaml(tmp_path, "a.yaml", values)]) == 0
    capsys.readouterr()
    ckpt = out / "checkpoint-2"
    resume = {**values, "resume_from_checkpoint": str(ckpt)}
    assert cli.main(["train", write_yaml(tmp_path, "b.yaml", {**resume, "lora_rank": 8})]) == 2
    assert "incompatible" in capsys.readouterr().err
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as after a crash without atomic writes
    assert cli.main(["train", write_yaml(tmp_path, "c.yaml", resume)]) == 2
    assert "corrupt" in capsys.readouterr().err
    (ckpt / "optimizer.pt").unlink()
    assert cli.main(["train", write_yaml(tmp_path, "d.yaml", resume)]) == 2
    assert "optimizer.pt is missing" in capsys.readouterr().err
    assert cli.main(["train", write_yaml(tmp_path, "e.yaml", {**values, "resume_from_checkpoint": "/no/such"})]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_restores_the_logging_window(tmp_path, resumable):
    """logging_steps > save_steps: checkpoint-2 is saved with steps 1-2 still in the logging window, and the
    resumed run's step-3 row must average steps 1-3 exactly as the uninterrupted run's does."""
    values = {**resumable, "max_steps": 4, "logging_steps": 3}
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**values, "output_dir": str(full)})]) == 0
    assert [r["step"] for r in read_metrics(full)] == [3, 4]
    state = json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["history"] == [] and state["window"]["tokens"] > 0  # saved between two logged steps
    resumed = resumed_from(tmp_path, full, "checkpoint-2", values, name="resumed")
    _assert_same_run(full, resumed)


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    model = tiny.build_model(tokenizer, hidden_size=40, num_layers=2, seed=7)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("second_teacher"))


@pytest.mark.slow
def test_a_resumed_runs_first_row_inside_a_logging_window_is_the_uninterrupted_runs(
        tmp_path, resumable, teacher_dir, second_teacher_dir):
    """Two teachers mixed, the cut inside a logging window: checkpoint-2 holds steps 1-2 of it with each teacher's
    sums, and the resumed run's step-3 row is the uninterrupted run's, key for key and in order (its throughput
    aside). So is it from a checkpoint written before window.Window, whose trainer_state held a plain dict."""
    values = {**resumable, "max_steps": 3, "logging_steps": 3, "teacher_weights": [1, 3],
              "teacher_model_name_or_path": [str(teacher_dir), str(second_teacher_dir)]}
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**values, "output_dir": str(full)})]) == 0
    state_file = Path("checkpoint-2", "trainer_state.json")
    window = json.loads((full / state_file).read_text())["window"]
    assert window["steps"] == 2 and len(window["per_teacher"]) == 2 and window["aligned"] is None
    resumed = resumed_from(tmp_path, full, "checkpoint-2", values, name="resumed")
    old = tmp_path / "old"  # the same checkpoint in the shape of the window before window.Window
    old.mkdir()
    shutil.copytree(full / "checkpoint-2", old / "checkpoint-2")
    state = json.loads((old / state_file).read_text())
    state["window"] = {**{k: v for k, v in window.items() if k not in ("per_teacher", "aligned")},
                       "teachers": window["per_teacher"]}
    (old / state_file).write_text(json.dumps(state))
    assert cli.main(["train", write_yaml(tmp_path, "old.yaml", {**values, "output_dir": str(old),
                                                                 "resume_from_checkpoint": "auto"})]) == 0
    expected = read_metrics(full)[0]
    assert expected["step"] == 3 and None not in expected["kd_loss_per_teacher"]
    for cut in (resumed, old):
        first = read_metrics(cut)[0]
        assert list(first) == list(expected)
        for key, value in expected.items():
            if key != "tokens_per_second":
                assert first[key] == pytest.approx(value, abs=1e-6, rel=0), (cut.name, key)
