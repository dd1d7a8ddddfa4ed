"""Data-parallel training on CPU (gloo): 2 processes × batch 2 == 1 process × batch 2 × accumulation 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from llmneo import cli

BIN = Path(sys.executable).parent
ROWS = [{"instruction": f"Question {i} about the fox?", "input": "", "output": "Answer " * (1 + i % 4) + "done."}
        for i in range(16)]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same(a: Path, b: Path, tol: float = 1e-5) -> None:
    rows_a, rows_b = _metrics(a), _metrics(b)
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b):
        assert ra["step"] == rb["step"]
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=tol), (ra["step"], key)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= tol, name


@pytest.fixture
def ddp_config(tmp_path, student_dir, teacher_dir) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(student_dir), "teacher_model_name_or_path": str(teacher_dir),
        "dataset": str(data), "lora_rank": 4, "per_device_train_batch_size": 2, "max_steps": 6, "logging_steps": 1,
        "save_steps": 3, "cutoff_len": 64, "learning_rate": 5e-3, "seed": 3}))
    return path


def _torchrun(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "llmneo", "train", str(config),
               *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(tmp_path, ddp_config):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = _torchrun(ddp_config, f"output_dir={ddp}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["train", str(ddp_config), f"output_dir={single}", "gradient_accumulation_steps=2"]) == 0
    _same(single, ddp)
    assert len(_metrics(ddp)) == 6  # written once, by the main process only
    assert (ddp / "checkpoint-3" / "rng_state_0.pt").is_file() and (ddp / "checkpoint-3" / "rng_state_1.pt").is_file()
    assert done.stdout.count("llmneo: trained") == 1

    # resume the 2-process run from its step-3 checkpoint: the same steps 4-6
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(ddp / "checkpoint-3", cut / "checkpoint-3")
    resumed = _torchrun(ddp_config, f"output_dir={cut}", "resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same(ddp, cut, tol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_across_an_epochs_short_step(tmp_path, ddp_config):
    """One epoch of 4 micro-batches per rank at accumulation 3 is a step of 3 and a short step of 1 on every
    rank; one process sees the same rows as 8 micro-batches at accumulation 6: steps of 6 and 2."""
    epoch = ("max_steps=-1", "num_train_epochs=1", "save_steps=100")
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = _torchrun(ddp_config, f"output_dir={ddp}", "gradient_accumulation_steps=3", *epoch)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["train", str(ddp_config), f"output_dir={single}", "gradient_accumulation_steps=6", *epoch]) == 0
    _same(single, ddp)
    for out in (ddp, single):
        results = json.loads((out / "train_results.json").read_text())
        assert (results["global_step"], results["epoch"]) == (2, 1.0)
        assert [r["epoch"] for r in _metrics(out)] == [0.75, 1.0]


@pytest.mark.slow
def test_accelerate_launch(tmp_path, ddp_config):
    """`accelerate launch -m llmneo` runs (on CPU accelerate starts one process unless MPI is set up;
    multi-process CPU runs use torchrun, as above; on GPUs `accelerate launch --num_processes N`)."""
    out = tmp_path / "acc"
    command = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "llmneo", "train", str(ddp_config), f"output_dir={out}", "max_steps=2", "save_steps=100"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["method"] == "neo" and results["epoch"] == pytest.approx(2 / 8)  # 16 rows / batch 2
