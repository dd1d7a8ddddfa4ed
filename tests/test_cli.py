"""The installed `llmneo` command as a user runs it: help text, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmneo.config import schema

LLMNEO = [sys.executable, "-m", "llmneo"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([*LLMNEO, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_lists_every_key(args):
    result = run(*args)
    assert result.returncode == 0
    for name in schema.FIELDS:
        assert f"  {name} (default:" in result.stdout, name
    assert "lora_rank (default: 128)" in result.stdout and "kd_ratio (default: 0.5)" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("llmneo")
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "export" in result.stdout


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    result = run("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"llmneo: error: config file not found: {tmp_path / 'missing.yaml'}; check the path"


@pytest.mark.slow
def test_train_end_to_end_in_a_subprocess(tmp_path, base_overrides):
    """The real process: progress bar on stderr, a one-line summary, outputs on disk."""
    path = tmp_path / "neo.yaml"
    path.write_text(yaml.safe_dump({**base_overrides, "max_steps": 2}))
    result = run("train", str(path), "kd_loss=jsd", "kd_beta=0.3")
    assert result.returncode == 0, result.stderr
    assert "llmneo neo" in result.stderr and "kd=" in result.stderr and "tok_s=" in result.stderr
    assert "Traceback" not in result.stderr
    assert (Path(base_overrides["output_dir"]) / "train_results.json").is_file()


def test_bad_dataset_row_is_one_line_exit_2(tmp_path, base_overrides):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "no answer"}\n')
    path = tmp_path / "neo.yaml"
    path.write_text(yaml.safe_dump({**base_overrides, "dataset": str(bad)}))
    result = run("train", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "row 2" in errors[0] and "output" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(base_overrides["output_dir"]) / "train_results.json").exists()


def _openmp_spin_count(*args: str, policy: str | None, cwd: Path) -> str:
    """GOMP_SPINCOUNT as the OpenMP runtime that torch loaded reports it (OMP_DISPLAY_ENV): 0 for passive waits,
    300000 for the default spin-then-sleep, 30000000000 for ACTIVE."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_DISPLAY_ENV": "VERBOSE"})
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([*LLMNEO, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 2 and "llmneo: error: model_name_or_path: './missing' does not exist" in result.stderr
    counts = [line.split("=", 1)[1].strip(" '") for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not counts:
        pytest.skip("torch's OpenMP runtime is not libgomp (no GOMP_SPINCOUNT to read)")
    return counts[0]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_command_waits_passively_unless_the_user_chose(tmp_path, command):
    """OpenMP's default spin-wait made a training step 40x slower on a shared CPU: every command starts torch with
    OMP_WAIT_POLICY=PASSIVE, as the demo does, and a policy the user set wins."""
    args = (command, "model_name_or_path=./missing", "dataset=d.jsonl", f"output_dir={tmp_path / 'out'}")
    assert _openmp_spin_count(*args, policy=None, cwd=tmp_path) == "0"
    if command == "train":
        assert _openmp_spin_count(*args, policy="ACTIVE", cwd=tmp_path) == "30000000000"
