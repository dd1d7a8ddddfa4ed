"""`llmneo eval` and `llmneo sweep` with eval_dataset: the held-out data is what gets scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from llmneo import cli
from llmneo.sweep import grid

HELD_OUT = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple, crisp and red."},
    {"instruction": "What colour is the sky?", "input": "", "output": "Blue on a clear day."},
    {"instruction": "Count to five.", "input": "", "output": "1 2 3 4 5"},
]


def _eval(out: Path, *args: str) -> dict:
    assert cli.main(["eval", *args, f"output_dir={out}"]) == 0
    return json.loads((out / "eval_results.json").read_text())


@pytest.mark.slow
def test_eval_scores_eval_dataset_not_dataset(tmp_path, student_dir, alpaca_file):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    model = f"model_name_or_path={student_dir}"
    both = _eval(tmp_path / "both", model, f"dataset={alpaca_file}", f"eval_dataset={held_out}", "cutoff_len=64")
    alone = _eval(tmp_path / "alone", model, f"dataset={held_out}", "cutoff_len=64")
    train = _eval(tmp_path / "train", model, f"dataset={alpaca_file}", "cutoff_len=64")
    assert both["tokens"] == alone["tokens"] != train["tokens"]
    assert both["perplexity"] == alone["perplexity"]


def test_sweep_accepts_eval_dataset_instead_of_val_size(tmp_path, alpaca_file):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    _, _, cells, _ = grid.plan(None, [f"dataset={alpaca_file}", f"eval_dataset={held_out}",
                                       f"output_dir={tmp_path / 'sw'}", "lora_rank=2,4"])
    assert [c.config.eval_dataset for c in cells] == [str(held_out)] * 2
    assert all(c.config.val_size == 0 for c in cells)


# --- one evaluator: train's held-out scores are llmneo eval's ------------------------------------------

HELD_OUT_KEYS = ("ce_loss", "perplexity", "tokens", "kl_to_teacher", "top1_agreement", "kd_loss")


def _train_then_eval(tmp_path: Path, settings: dict) -> tuple[dict, dict]:
    """train with a held-out split, then `llmneo eval` of the trained folder on the same split and teacher."""
    out = Path(settings["output_dir"])
    assert cli.main(["train", *(f"{k}={v}" for k, v in settings.items())]) == 0
    trained = json.loads((out / "train_results.json").read_text())
    same = ("teacher_model_name_or_path", "dataset", "val_size", "seed", "kd_loss", "kd_temperature", "kd_beta")
    scored = _eval(tmp_path / "eval", f"model_name_or_path={out}",
                   *(f"{k}={settings[k]}" for k in same if settings.get(k) is not None))
    return trained, scored


@pytest.mark.slow
def test_train_reports_what_llmneo_eval_measures(tmp_path, base_overrides):
    """Held-out CE, perplexity, KL, agreement and the configured divergence (jsd here), in train_results.json
    under eval_*, equal `llmneo eval` of the saved adapter: one evaluator, the same rows."""
    settings = {**base_overrides, "val_size": 3, "max_steps": 1, "kd_loss": "jsd", "kd_temperature": 2.0,
                "kd_beta": 0.3}
    trained, scored = _train_then_eval(tmp_path, settings)
    for key in HELD_OUT_KEYS:
        assert trained[f"eval_{key}"] == pytest.approx(scored[key], rel=1e-5), key
    assert trained["eval_kl_to_teacher"] > 0.1 and trained["eval_kd_loss"] != pytest.approx(
        trained["eval_kl_to_teacher"], rel=1e-2)  # kd_loss is the run's jsd, not the forward KL


@pytest.mark.slow
def test_train_and_eval_share_one_overflow_rule(tmp_path, base_overrides, student_dir):
    """A held-out CE beyond what exp can hold (~709.78 nats) is an infinite perplexity in train_results.json
    and in `llmneo eval` alike, not exp(50) in one of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loud = tmp_path / "loud_student"
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    with torch.no_grad():  # logits ~1e4 apart: the reply tokens' CE runs into the thousands of nats
        model.get_output_embeddings().weight.mul_(1e5)
    model.save_pretrained(loud)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(loud)
    settings = {**base_overrides, "model_name_or_path": str(loud), "teacher_model_name_or_path": None,
                "val_size": 3, "max_steps": 1}
    trained, scored = _train_then_eval(tmp_path, settings)
    assert trained["eval_ce_loss"] > 710 and trained["eval_ce_loss"] == pytest.approx(scored["ce_loss"], rel=1e-5)
    assert trained["eval_perplexity"] == scored["perplexity"] == float("inf")
