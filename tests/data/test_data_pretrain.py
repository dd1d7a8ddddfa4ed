"""stage: pt (raw text, every token a target) and packing, in data.build and through `llmneo train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.data import sources, templates
from llmneo.demo import tiny
from llmneo.errors import LlmneoError

IGNORE = -100
TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def c4_dir(tmp_path: Path, texts=TEXTS) -> Path:
    """Like LLaMA-Factory's data/: c4_demo.jsonl registered as `columns: {prompt: text}`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "c4_demo.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}}}))
    return tmp_path


def stream(tok, texts) -> list[int]:
    """What packing must keep: each text as BOS + text + EOS, one after another."""
    return [t for text in texts for t in templates.encode_text(tok, text)[0]]


def test_a_registered_c4_style_dataset_loads_by_name_as_text(tmp_path):
    [(_, rows)] = sources.load_rows(Config(dataset="c4_demo", dataset_dir=str(c4_dir(tmp_path)), stage="pt"))
    assert rows == [{"text": t} for t in TEXTS]


@pytest.mark.parametrize("name, write", [
    ("wiki_demo.txt", lambda p: p.write_text("\n".join(TEXTS[:3]) + "\n")),
    ("texts.jsonl", lambda p: p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))),
    ("texts.json", lambda p: p.write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(TEXTS[:3])]))),
])
def test_text_files_train_every_token(tmp_path, tok, name, write):
    write(tmp_path / name)
    # A registration like LLaMA-Factory's wiki_demo (`columns: {prompt: text}`) and the plain path agree.
    registry = {"corpus": {"file_name": name, "columns": {"prompt": "text"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    for dataset in ("corpus", str(tmp_path / name)):
        [example] = data.build(Config(dataset=dataset, dataset_dir=str(tmp_path), stage="pt", cutoff_len=4096),
                               tok).train  # everything fits in one packed block
        assert example["input_ids"] == stream(tok, TEXTS[:3]) and example["labels"] == example["input_ids"]


def test_packing_cuts_the_concatenated_texts_into_cutoff_len_blocks_and_drops_nothing(tmp_path, tok):
    config = Config(dataset="c4_demo", dataset_dir=str(c4_dir(tmp_path)), stage="pt", cutoff_len=32)
    assert config.effective_packing
    blocks = data.build(config, tok).train
    tokens = stream(tok, TEXTS)
    assert len(tokens) > 3 * 32 and len(tokens) % 32 > 1  # several full blocks and a shorter last one
    assert [len(b["input_ids"]) for b in blocks] == [32] * (len(tokens) // 32) + [len(tokens) % 32]
    assert [t for b in blocks for t in b["input_ids"]] == tokens
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_without_packing_each_text_is_an_example_truncated_at_cutoff_len(tmp_path, tok):
    config = Config(dataset="c4_demo", dataset_dir=str(c4_dir(tmp_path)), stage="pt", cutoff_len=8, packing=False)
    examples = data.build(config, tok).train
    assert [e["input_ids"] for e in examples] == [templates.encode_text(tok, t)[0][:8] for t in TEXTS]


def test_val_size_holds_out_texts_before_packing(tmp_path, tok):
    config = Config(dataset="c4_demo", dataset_dir=str(c4_dir(tmp_path)), stage="pt", cutoff_len=16, val_size=3)
    splits = data.build(config, tok)
    train_text = tok.decode([t for b in splits.train for t in b["input_ids"]])
    eval_text = tok.decode([t for b in splits.eval for t in b["input_ids"]])
    held = [t for t in TEXTS if t in eval_text]
    assert len(held) == 3 and not any(t in train_text for t in held)
    assert all(t in train_text for t in TEXTS if t not in held)
    assert all(len(b["input_ids"]) == 16 for b in splits.eval[:-1])


def test_conversations_under_stage_pt_are_refused(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"instruction": "Say hello.", "output": "Hello there!"}) + "\n")
    with pytest.raises(LlmneoError) as info:
        data.build(Config(dataset=str(path), stage="pt"), tok)
    message = str(info.value)
    assert "\n" not in message and "stage: pt trains on raw text" in message and str(path) in message
    assert "stage: sft" in message


def test_sft_packing_puts_whole_examples_with_their_labels_into_blocks(tmp_path, tok):
    rows = [{"instruction": f"Say {i}.", "output": "Hello there! " * (i % 3 + 1)} for i in range(10)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unpacked = data.build(Config(dataset=str(path), cutoff_len=64), tok).train
    packed = data.build(Config(dataset=str(path), cutoff_len=64, packing=True), tok).train
    assert len(packed) < len(unpacked) and all(len(b["input_ids"]) <= 64 for b in packed)
    assert sorted(len(b["input_ids"]) for b in packed) != sorted(len(e["input_ids"]) for e in unpacked)

    def pairs(example):
        return list(zip(example["input_ids"], example["labels"]))

    # Every example sits whole, labels included, in exactly one block; nothing else is in the blocks.
    assert sum(len(b["input_ids"]) for b in packed) == sum(len(e["input_ids"]) for e in unpacked)
    blocks = [pairs(b) for b in packed]
    for example in map(pairs, unpacked):
        assert any(any(block[i:i + len(example)] == example for i in range(len(block))) for block in blocks)


@pytest.mark.slow
def test_llmneo_train_stage_pt_on_a_registered_c4_dataset_with_a_teacher(tmp_path, base_overrides, tokenizer,
                                                                           capsys):
    cutoff = 24
    data_dir = c4_dir(tmp_path / "data")
    tokens = stream(tokenizer, TEXTS)
    n_blocks = -(-len(tokens) // cutoff)
    overrides = {**base_overrides, "stage": "pt", "dataset": "c4_demo", "dataset_dir": str(data_dir),
                 "cutoff_len": cutoff, "per_device_train_batch_size": n_blocks, "max_steps": 1}
    (tmp_path / "pt.yaml").write_text(yaml.safe_dump(overrides))
    assert cli.main(["train", str(tmp_path / "pt.yaml")]) == 0
    assert f"| {n_blocks} training examples" in capsys.readouterr().out
    results = json.loads((Path(overrides["output_dir"]) / "train_results.json").read_text())
    assert results["method"] == "neo" and results["final_kd_loss"] is not None
    # One step over all ceil(tokens / cutoff_len) blocks saw every token once (train_tokens counts the
    # non-padding tokens): the blocks are cutoff_len long, but for a shorter last one, and drop nothing.
    assert results["train_tokens"] == len(tokens)
    [row] = [json.loads(line) for line in (Path(overrides["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["kd_loss"] is not None
