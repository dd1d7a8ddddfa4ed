"""`llmneo eval` and `llmneo sweep` with eval_dataset: the held-out data is what gets scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmneo import cli, sweep

from conftest import write_jsonl

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
    _, _, cells, _ = sweep.plan(None, [f"dataset={alpaca_file}", f"eval_dataset={held_out}",
                                       f"output_dir={tmp_path / 'sw'}", "lora_rank=2,4"])
    assert [c.config.eval_dataset for c in cells] == [str(held_out)] * 2
    assert all(c.config.val_size == 0 for c in cells)
