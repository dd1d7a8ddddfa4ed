"""One-line errors: unsupported LLaMA-Factory features before unknown-key hints; lm-eval data offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.errors import LlmneoError


@pytest.mark.parametrize("key, feature", [
    ("pref_beta", "preference / RLHF training"),
    ("pref_loss", "preference / RLHF training"),
    ("simpo_gamma", "preference / RLHF training"),
    ("kto_chosen_weight", "preference / RLHF training"),
    ("reward_model", "preference / RLHF training"),
    ("image_max_pixels", "multimodal training"),
    ("video_fps", "multimodal training"),
    ("freeze_vision_tower", "multimodal training"),
    ("quantization_bit", "quantized training"),
])
def test_unsupported_feature_keys_name_the_feature(key, feature):
    with pytest.raises(LlmneoError) as err:
        schema.load(overrides=[f"{key}=1"])
    message = str(err.value)
    assert message.startswith(f"config key '{key}' is for {feature}")
    assert "llmneo does not support" in message and "stage: sft" in message and "pt" in message
    assert "did you mean" not in message and "\n" not in message


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm", "ppo"])
def test_unsupported_stage_comes_before_its_keys(tmp_path, stage):
    """A LLaMA-Factory DPO YAML: the stage is the error, not pref_beta (nor a 'did you mean kd_beta?')."""
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "pref_beta": 0.1, "pref_loss": "sigmoid",
                                    "stage": stage, "learnin_rate": 1e-5}))
    with pytest.raises(LlmneoError) as err:
        schema.load(path)
    assert str(err.value).startswith(f"stage '{stage}' is not supported (")
    assert "stage: sft (supervised) or pt (raw text)" in str(err.value)


def test_feature_keys_come_before_unknown_keys():
    with pytest.raises(LlmneoError, match="config key 'pref_beta' is for preference"):
        schema.load(overrides={"learnin_rate": 1, "pref_beta": 0.1})
    with pytest.raises(LlmneoError, match="did you mean 'learning_rate'"):
        schema.load(overrides={"learnin_rate": 1})


def test_unsupported_key_through_the_cli(capsys):
    assert cli.main(["train", "pref_beta=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmneo: error: config key 'pref_beta' is for preference") and "\n" not in err


def test_sweep_axis_of_an_unsupported_key(capsys):
    assert cli.main(["sweep", "output_dir=x", "val_size=2", "pref_beta=0.1,0.2"]) == 2
    assert "config key 'pref_beta' is for preference" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_task_without_its_data_is_one_line(tmp_path, student_dir):
    """arc_easy's data set lives on the Hub; offline and with an empty cache it cannot load."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-m", "llmneo", "eval", f"model_name_or_path={student_dir}",
                             "tasks=arc_easy", "eval_limit=2"], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmneo: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("llmneo: error: lm-eval task arc_easy: its data could not be loaded")
    assert "network" in errors[0] and "HF_HOME" in errors[0] and "local task YAML" in errors[0]
    assert not Path(tmp_path / "eval_results.json").exists()
