"""On-policy rollouts from a real vLLM server of the student's base, with only the adapter synced (rollout_endpoint).

The shared `student_server` serves `vllm_student_dir` (--enable-lora --max-lora-rank 16); the teacher is loaded
in-process. Runs are tiny (LoRA rank 8, 3-4 steps, fp32) and go through the CLI:
- greedy replies through vLLM train exactly as through HF generate, step after step (the adapter the server
  holds is the one being trained);
- with rollout_ahead the replies lag one step (rollout_staleness), so the losses after step 1 differ;
- resumed runs are exact with sampled replies (a seed per row), synchronous and ahead;
- two processes train as one;
- an unreachable server, an unknown model, a server without LoRA, a rank above --max-lora-rank and a student
  without an adapter are each one line and exit code 2, before any step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_server import free_port

from llmneo import cli

from helpers import ALPACA_ROWS, assert_same_training, read_metrics, resumed_from, write_jsonl, write_yaml

BIN = Path(sys.executable).parent
TOL = 1e-4  # vLLM's fp32 CPU kernels against HF's


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rollout_data") / "train.jsonl", ALPACA_ROWS)


@pytest.fixture
def values(vllm_student_dir, vllm_teacher_dir, data_file) -> dict:
    return {"model_name_or_path": str(vllm_student_dir), "teacher_model_name_or_path": str(vllm_teacher_dir),
            "dataset": str(data_file), "lora_rank": 8, "per_device_train_batch_size": 4, "max_steps": 3,
            "logging_steps": 1, "cutoff_len": 64, "seed": 0, "learning_rate": 2e-2, "lmbda": 1, "temperature": 0,
            "max_new_tokens": 8}


def _train(tmp_path: Path, name: str, values: dict) -> Path:
    out = tmp_path / name
    assert cli.main(["train", write_yaml(tmp_path, f"{name}.yaml", {**values, "output_dir": str(out)})]) == 0
    return out


def _served_adapters(server) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/models", timeout=30) as answer:
        return [c["id"] for c in json.loads(answer.read())["data"] if c.get("parent")]


def test_greedy_replies_through_vllm_train_as_through_hf_and_ahead_lags_one_step(tmp_path, values, student_server):
    hf = _train(tmp_path, "hf", values)
    served = _train(tmp_path, "served", {**values, "rollout_endpoint": student_server.url})
    assert_same_training(hf, served, tol=TOL)
    rows = read_metrics(served)
    assert [r["rollout_staleness"] for r in rows] == [0, 0, 0] and all(r["on_policy"] for r in rows)
    assert "rollout_staleness" not in read_metrics(hf)[0]
    # rollout_ahead: step 1 is written before it trains, each later step while the one before trains
    ahead = _train(tmp_path, "ahead", {**values, "rollout_endpoint": student_server.url, "rollout_ahead": 1})
    lagged = read_metrics(ahead)
    assert [r["rollout_staleness"] for r in lagged] == [0, 1, 1]
    assert lagged[0]["loss"] == pytest.approx(rows[0]["loss"], abs=TOL)
    # the adapter changed after step 1: replies from the one before it train otherwise
    assert any(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(lagged[1:], rows[1:]))
    # every adapter was unloaded and its folder deleted
    assert not any(name.startswith("llmneo-") for name in _served_adapters(student_server))
    assert not (served / "rollout_adapters").exists() and not (ahead / "rollout_adapters").exists()


@pytest.mark.parametrize("ahead", [0, 1])
def test_resume_with_sampled_vllm_rollouts_is_exact(tmp_path, values, student_server, ahead):
    run = {**values, "rollout_endpoint": student_server.url, "rollout_ahead": ahead, "temperature": 1.0,
           "max_steps": 4, "save_steps": 2, "lora_dropout": 0.1}
    full = _train(tmp_path, "full", run)
    checkpoint = full / "checkpoint-2"
    assert (checkpoint / "rollout_adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoint / "rollouts.json").read_text())["version"] == 1  # the weights after step 1
    assert (checkpoint / "rollout_replies_0.safetensors").is_file() == bool(ahead)  # step 3's, written ahead
    cut = resumed_from(tmp_path, full, "checkpoint-2", {**run, "output_dir": None})
    assert_same_training(full, cut, tol=1e-6)
    assert [r["rollout_staleness"] for r in read_metrics(cut)] == ([0, 1, 1, 1] if ahead else [0, 0, 0, 0])


def test_two_processes_train_as_one_with_vllm_rollouts(tmp_path, values, student_server):
    run = {**values, "rollout_endpoint": student_server.url, "per_device_train_batch_size": 2, "temperature": 1.0}
    path = write_yaml(tmp_path, "ddp.yaml", run)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "llmneo", "train",
                           path, f"output_dir={ddp}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["train", path, f"output_dir={single}", "gradient_accumulation_steps=2"]) == 0
    assert_same_training(single, ddp, tol=TOL)


@pytest.mark.parametrize("change, expected", [
    ({"rollout_endpoint": "unreachable"}, "cannot connect"),
    ({"rollout_endpoint_model": "nope"}, "rollout_endpoint_model 'nope' is not served"),
    ({"lora_rank": 32}, "LoRA rank 32 is greater than max_lora_rank 16"),
    ({"rollout_endpoint": "teacher"}, "LoRA is not enabled"),
    ({"finetuning_type": "full"}, "with finetuning_type: full there is none"),
])
def test_what_cannot_serve_is_one_line_before_training(tmp_path, values, student_server, teacher_server, capsys,
                                                       change, expected):
    urls = {"unreachable": f"http://127.0.0.1:{free_port()}/v1", "teacher": teacher_server.url}
    run = {**values, "rollout_endpoint": student_server.url, **change}
    run["rollout_endpoint"] = urls.get(run["rollout_endpoint"], run["rollout_endpoint"])
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["train", write_yaml(tmp_path, "bad.yaml", {**run, "output_dir": str(out)})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmneo: error: ") and expected in err[0], err
    assert not out.exists()  # before any step: nothing written
    if change.get("rollout_endpoint") == "teacher":
        assert "--enable-lora --max-lora-rank 8" in err[0]
    if "lora_rank" in change:
        assert "--max-lora-rank 32" in err[0]
