"""neat_packing: examples packed into one row train exactly as the same examples padded in a batch.

A packed row's position ids restart at every example (data.packing), and the model gets them instead of the
attention mask (models.inputs), so transformers' masking keeps each example's attention inside it. The test
packs a handful of the tests' alpaca examples into one row and compares the loop's CE, KD and gradient sums with
the same examples padded, for fkl and rkl, a live teacher and a top-k cache, chunked and unchunked losses.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapted_pair, assert_same_training, read_metrics, write_yaml

from llmneo import cli
from llmneo.cache import write as cache_write
from llmneo.config import schema
from llmneo.data import dataset, packing
from llmneo.data.labels import IGNORE_INDEX, response_count
from llmneo.loss import divergences
from llmneo.loss.spec import LossSpec

from llmneo.teachers.cached import CachedTeacher
from llmneo.teachers.live import LiveTeacher
from llmneo.train import loop

N = 5  # examples compared


def _sums_and_grads(model, teacher, batch, cfg, vocab):
    model.zero_grad(set_to_none=True)
    spec = LossSpec(vocab, 0.5, divergences.KDSettings.from_config(cfg), cfg.kd_chunk_size)
    loss, ce, kd, n = loop.micro_batch_sums(model, teacher, batch, spec)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [float(loss.detach()), float(ce), float(kd)], n, grads


def _indexed(examples):
    return [{**e, "index": i} for i, e in enumerate(examples)]


@pytest.mark.parametrize("teacher_kind", ["live", "cache"])
@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_packed_row_gives_the_padded_batch_losses_and_gradients(base_overrides, tmp_path, teacher_kind, kind,
                                                                chunk):
    values = {**base_overrides, "kd_loss": kind, "kd_chunk_size": chunk, "cutoff_len": 512, "max_samples": N}
    padded_cfg = schema.load(overrides=values)
    packed_cfg = schema.load(overrides={**values, "neat_packing": True})
    loaded, model = adapted_pair(padded_cfg)
    pad = loaded.tokenizer.pad_token_id
    examples = _indexed(dataset.build(padded_cfg, loaded.tokenizer).train)
    rows = _indexed(dataset.build(packed_cfg, loaded.tokenizer).train)
    assert len(examples) == N and len(rows) == 1, "the five examples must fit one packed row"
    padded, packed = dataset.collate(examples, pad), dataset.collate(rows, pad)
    assert "position_ids" in packed and "position_ids" not in padded
    assert response_count(packed["labels"]) == response_count(padded["labels"])
    if teacher_kind == "live":
        padded_teacher = packed_teacher = LiveTeacher(loaded.teacher, loaded.vocab_size)
    else:  # each layout's own cache, written by `llmneo cache` (the packed one through a packed teacher forward)
        caches = []
        for cfg, name in ((padded_cfg, "padded"), (packed_cfg, "packed")):
            cfg.teacher_cache, cfg.teacher_topk = str(tmp_path / name), 16
            cache_write.write(cfg)
            caches.append(CachedTeacher(cfg.teacher_cache, {}, torch.device("cpu")))
        padded_teacher, packed_teacher = caches
    want, n_want, want_grads = _sums_and_grads(model, padded_teacher, padded, padded_cfg, loaded.vocab_size)
    got, n_got, got_grads = _sums_and_grads(model, packed_teacher, packed, packed_cfg, loaded.vocab_size)
    assert n_got == n_want
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    if teacher_kind == "live":  # packed *with* cross-talk (packing: true), the sums differ: the test can fail
        plain = dataset.collate(_indexed(dataset.build(schema.load(overrides={**values, "packing": True}),
                                                       loaded.tokenizer).train), pad)
        crossed, _, _ = _sums_and_grads(model, packed_teacher, plain, padded_cfg, loaded.vocab_size)
        assert abs(crossed[2] - want[2]) > 1e-4 * abs(want[2]) and abs(crossed[1] - want[1]) > 1e-4 * abs(want[1])


def test_positions_restart_and_each_examples_first_token_is_no_target():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, 2, 3, 4]}]
    rows = packing.best_fit(examples, 16, neat=True)
    assert len(rows) == 1
    row = rows[0]
    # longest first: [1 2 3 4] [5 6 7] [8 9]
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert "position_ids" not in packing.best_fit(examples, 16)[0]
    # raw text: each text's start restarts the positions, also a piece that continues into the next block
    blocks = packing.concatenate(examples, 4, neat=True)
    assert [b["position_ids"] for b in blocks[:2]] == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert blocks[1]["labels"] == [9, IGNORE_INDEX, 2, 3]
    batch = dataset.collate(rows + [{**examples[0], "position_ids": [0, 1, 2]}], pad_token_id=0)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]  # the padding: one more example
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("teacher_kind", ["live", "cache"])
def test_neat_packed_run_trains_like_the_padded_one_through_the_cli(tmp_path, base_overrides, teacher_kind):
    """All six training examples in each step: six padded rows, or one neat-packed row; the same steps follow, and
    the two held-out examples (padded, or packed into one row) score the same."""
    padded = {**base_overrides, "cutoff_len": 512, "per_device_train_batch_size": 6, "kd_chunk_size": 16,
              "val_size": 2, "output_dir": str(tmp_path / "padded")}
    packed = {**padded, "padding_free": True, "per_device_train_batch_size": 1, "output_dir": str(tmp_path / "packed")}
    for name, values in (("padded", padded), ("packed", packed)):
        if teacher_kind == "cache":
            values["teacher_cache"] = str(tmp_path / f"cache_{name}")
            assert cli.main(["cache", write_yaml(tmp_path, f"c_{name}.yaml", values)]) == 0
        assert cli.main(["train", write_yaml(tmp_path, f"{name}.yaml", values)]) == 0
    rows = read_metrics(tmp_path / "packed")
    assert len(rows) == 3 and rows[0]["kd_loss"] is not None
    assert_same_training(tmp_path / "padded", tmp_path / "packed", tol=1e-5)
    results = [json.loads((tmp_path / name / "train_results.json").read_text()) for name in ("padded", "packed")]
    held_out = [key for key in results[0] if key.startswith("eval_") and isinstance(results[0][key], float)]
    assert "eval_ce_loss" in held_out and ("eval_kd_loss" in held_out) == (teacher_kind == "live")
    for key in held_out:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5), key


def test_a_plainly_packed_cache_is_refused_by_a_neat_run_and_neat_rows_are_not_exported(tmp_path, base_overrides,
                                                                                       capsys):
    """The dataset rows do not tell neat from plain packing (same ids and labels), so the fingerprint names it;
    a cache written before it recorded neat_packing counts as plain. axolotl's columns carry no position ids."""
    plain = {**base_overrides, "cutoff_len": 512, "packing": True, "teacher_cache": str(tmp_path / "cache")}
    assert cli.main(["cache", write_yaml(tmp_path, "c.yaml", plain)]) == 0
    index_file = tmp_path / "cache" / "index.json"
    index = json.loads(index_file.read_text())
    del index["fingerprint"]["neat_packing"]  # as before the part was recorded
    index_file.write_text(json.dumps(index))
    neat = {**plain, "neat_packing": True, "teacher_model_name_or_path": None, "output_dir": str(tmp_path / "n")}
    capsys.readouterr()
    assert cli.main(["train", write_yaml(tmp_path, "t.yaml", neat)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the neat_packing differs (cache False, run True)" in err
    neat_cache = {**neat, "teacher_model_name_or_path": base_overrides["teacher_model_name_or_path"],
                  "teacher_cache": str(tmp_path / "neat")}
    assert cli.main(["cache", write_yaml(tmp_path, "n.yaml", neat_cache)]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "export", "axolotl", write_yaml(tmp_path, "n.yaml", neat_cache),
                     str(tmp_path / "kd.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neat-packed rows" in err and not (tmp_path / "kd.jsonl").exists()
