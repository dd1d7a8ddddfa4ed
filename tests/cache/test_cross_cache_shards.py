"""A cross-tokenizer teacher cache in many shards reads and trains exactly as the same cache in one shard.

The same-tokenizer cache has its multi-shard test (test_cache.py); a cross-tokenizer cache also stores
`aligned` per position, which CachedTeacher.aligned reads by its own shard lookup.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_training, write_yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.crosstok import offsets as crosstok
from llmneo.data import dataset, labels
from llmneo.models import loading
from llmneo.teachers import cached


@pytest.mark.slow
@pytest.mark.parametrize("shard_rows, batch", [(1, 1), (7, 3)], ids=["shard-per-example", "boundaries-mid-batch"])
def test_a_cross_tokenizer_cache_in_many_shards_equals_one_shard(tmp_path, base_overrides, tokenizer, alien_teacher_dir,
                                                                 shard_rows, batch):
    values = {**base_overrides, "teacher_model_name_or_path": str(alien_teacher_dir), "teacher_topk": 8,
              "per_device_eval_batch_size": batch}
    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    assert cli.main(["cache", write_yaml(tmp_path, "one.yaml", {**values, "teacher_cache": str(one_dir)})]) == 0
    assert cli.main(["cache", write_yaml(tmp_path, "many.yaml", {**values, "teacher_cache": str(many_dir),
                                                                 "cache_shard_size": shard_rows})]) == 0
    one_index, many_index = (json.loads((d / "index.json").read_text()) for d in (one_dir, many_dir))
    assert one_index["cross_tokenizer"] is many_index["cross_tokenizer"] is True
    assert len(one_index["shards"]) == 1 and len(many_index["shards"]) >= 8 // batch
    assert one_index["offsets"] == many_index["offsets"]

    cfg = schema.load(overrides=values)
    teacher_tok = loading.load_tokenizer(str(alien_teacher_dir), "teacher", False)
    side = crosstok.TeacherSide(teacher_tok, cfg.teacher_template or cfg.template)
    examples = dataset.build(cfg, tokenizer, side).train
    for i, example in enumerate(examples):
        example["index"] = i
    # both caches come from this config: the fingerprint check has nothing to tell them apart
    one = cached.CachedTeacher(str(one_dir), {}, torch.device("cpu"))
    many = cached.CachedTeacher(str(many_dir), {}, torch.device("cpu"))
    assert one.cross and many.cross and len(many.handles) == len(many_index["shards"])
    every = []
    for group in [[e] for e in examples] + [examples, examples[::-1], examples[1:4], examples[5:]]:
        collated = dataset.collate(group, tokenizer.pad_token_id)
        positions, _ = labels.response_positions(collated["labels"])
        a, b = one.aligned(collated, positions), many.aligned(collated, positions)
        assert a.shape == (int(positions.sum()),) and torch.equal(a, b)
        rows_a, rows_b = one.rows(collated, positions), many.rows(collated, positions)
        assert torch.equal(rows_a.ids, rows_b.ids) and torch.equal(rows_a.logprobs, rows_b.logprobs)
        assert torch.equal(rows_a.tail, rows_b.tail)
        if len(group) == 1:
            every.append(a)
    # the premise: examples differ in where their unaligned positions sit, so a wrong shard shows
    assert len({tuple(a.tolist()) for a in every}) > 1 and not all(bool(a.all()) for a in every)

    for name, directory in (("one", one_dir), ("many", many_dir)):
        run = {**base_overrides, "output_dir": str(tmp_path / f"train-{name}"), "teacher_cache": str(directory),
               "teacher_model_name_or_path": None, "max_steps": 2}
        assert cli.main(["train", write_yaml(tmp_path, f"train-{name}.yaml", run)]) == 0
    assert_same_training(tmp_path / "train-one", tmp_path / "train-many", tol=0.0)
