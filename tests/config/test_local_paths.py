"""Local model paths: adapters record an absolute base, and a missing local path never reaches the Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmneo import cli
from llmneo.config import schema


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory, student_dir, alpaca_file) -> Path:
    """Trained from `work/` with model_name_or_path=models/student, a relative path shaped like a Hub id."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(student_dir, work / "models" / "student")
    here = os.getcwd()
    os.chdir(work)
    try:
        assert cli.main(["train", "model_name_or_path=models/student", f"dataset={alpaca_file}", "output_dir=run",
                         "lora_rank=2", "max_steps=2", "save_steps=1", "per_device_train_batch_size=4",
                         "cutoff_len=64", "learning_rate=1e-2", "lora_target=q_proj,v_proj"]) == 0
    finally:
        os.chdir(here)
    return work / "run"


@pytest.mark.slow
def test_adapters_record_the_absolute_base(relative_run):
    base = str(relative_run.parent / "models" / "student")
    for folder in (relative_run, relative_run / "checkpoint-1", relative_run / "checkpoint-2"):
        recorded = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == base, folder


@pytest.mark.slow
def test_export_and_eval_from_another_directory(relative_run, tmp_path, monkeypatch, alpaca_file):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["export", f"adapter_name_or_path={relative_run}", "export_dir=merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()
    assert cli.main(["eval", f"model_name_or_path={relative_run}", f"dataset={alpaca_file}"]) == 0


def _llmneo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI with the Hub *not* in offline mode, pointed at a closed local port: a Hub lookup would fail
    with the Hub client's own words, so an error in llmneo's words means nothing was looked up."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(cwd / "hf_home"))
    return subprocess.run([sys.executable, "-m", "llmneo", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def _adapter_recording(tmp_path: Path, relative_run: Path, base: str) -> Path:
    adapter = tmp_path / "moved_adapter"
    shutil.copytree(relative_run, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": base}))
    return adapter


@pytest.mark.slow
def test_missing_absolute_base_is_one_line(tmp_path, relative_run):
    missing = str(tmp_path / "gone" / "student")
    adapter = _adapter_recording(tmp_path, relative_run, missing)
    result = _llmneo("export", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / 'merged'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"llmneo: error: the base model '{missing}' recorded in {adapter / 'adapter_config.json'} does not exist "
        f"here; set model_name_or_path to the base model")
    assert "Traceback" not in result.stderr and not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_missing_relative_base_under_a_local_folder_is_not_looked_up(tmp_path, relative_run):
    """`models/student` next to a `models/` folder is a local path: missing, it is an error, not a Hub id."""
    (tmp_path / "models").mkdir()
    adapter = _adapter_recording(tmp_path, relative_run, "models/student")
    result = _llmneo("export", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / 'merged'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "llmneo: error: the base model 'models/student' recorded in"), result.stderr
    result = _llmneo("eval", "model_name_or_path=models/student", "dataset=x.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "llmneo: error: model_name_or_path: 'models/student' does not exist; give a local model directory or a "
        "Hub id (owner/name)"), result.stderr


def test_what_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("/abs/model", "./model", "../model", "~/model", "a/b/c", "models/student", "student"):
        assert schema.looks_local(name), name
    for name in ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B-Instruct"):
        assert not schema.looks_local(name), name
