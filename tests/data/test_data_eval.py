"""eval_dataset: held-out data by name (LLaMA-Factory's key), in data.build and through `llmneo train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.errors import LlmneoError

TRAIN = [{"instruction": f"Say {i}.", "output": f"Train reply {i}."} for i in range(6)]
HELD = [{"instruction": f"Repeat {i}.", "output": f"Held reply {i}."} for i in range(3)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    write_jsonl(tmp_path / "held.jsonl", HELD[:2])
    write_jsonl(tmp_path / "held_folder" / "part.jsonl", HELD[2:])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"held_out": {"file_name": "held.jsonl"}}))
    return tmp_path


def replies(tokenizer, examples) -> list[str]:
    return [tokenizer.decode([t for t in e["labels"] if t != -100]).removesuffix("<|im_end|>") for e in examples]


def test_eval_dataset_is_the_held_out_split_and_all_of_dataset_trains(data_dir, tokenizer):
    # Resolved like `dataset`: a registry name, a file under dataset_dir, a folder; comma-separated.
    config = Config(dataset="train.jsonl", eval_dataset="held_out, held_folder", dataset_dir=str(data_dir))
    splits = data.build(config, tokenizer)
    assert replies(tokenizer, splits.train) == [r["output"] for r in TRAIN]
    assert replies(tokenizer, splits.eval) == [r["output"] for r in HELD]
    same = data.build(Config(dataset="held_out,held_folder", dataset_dir=str(data_dir)), tokenizer).train
    assert splits.eval == same  # the same template and masks as training data


def test_eval_dataset_gets_the_same_cutoff_and_packing(data_dir, tokenizer):
    texts = [{"text": f"Held-out document {i} about the quick brown fox."} for i in range(8)]
    write_jsonl(data_dir / "held_text.jsonl", texts)
    write_jsonl(data_dir / "train_text.jsonl", [{"text": "The lazy dog sleeps. " * 3}] * 8)
    config = Config(dataset="train_text.jsonl", eval_dataset="held_text.jsonl", dataset_dir=str(data_dir),
                    stage="pt", cutoff_len=16)
    splits = data.build(config, tokenizer)
    assert all(len(b["input_ids"]) == 16 for b in splits.eval[:-1]) and len(splits.eval[-1]["input_ids"]) <= 16
    assert "Held-out document 7" in tokenizer.decode([t for b in splits.eval for t in b["input_ids"]])
    assert "Held-out" not in tokenizer.decode([t for b in splits.train for t in b["input_ids"]])


def test_a_missing_eval_dataset_is_named(data_dir, tokenizer):
    with pytest.raises(LlmneoError) as info:
        data.build(Config(dataset="train.jsonl", eval_dataset="nope.jsonl", dataset_dir=str(data_dir)), tokenizer)
    assert str(info.value).startswith("eval_dataset 'nope.jsonl' not found")


@pytest.mark.slow
def test_llmneo_train_with_eval_dataset_reports_eval_metrics(tmp_path, data_dir, base_overrides, tokenizer):
    overrides = {**base_overrides, "dataset": "train.jsonl", "eval_dataset": "held_out",
                 "dataset_dir": str(data_dir), "max_steps": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(overrides))
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 0
    results = json.loads((Path(overrides["output_dir"]) / "train_results.json").read_text())
    held = data.build(Config(dataset="held_out", dataset_dir=str(data_dir)), tokenizer).train
    assert results["eval_tokens"] == sum(sum(label != -100 for label in e["labels"][1:]) for e in held)
    assert results["eval_ce_loss"] > 0 and results["eval_kd_loss"] is not None and results["eval_perplexity"] > 1
