"""llmneo cache: the offline teacher top-k cache, its fingerprint, and training from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import ALPACA_ROWS, cache_rows, write_jsonl
from safetensors.torch import load_file

from llmneo import cli


def _yaml(tmp_path: Path, name: str, values: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


# How close training from a k = V cache stays to the live teacher's, relative, per layout: exact float32 rows
# lose nothing; compact rows quantize each log-prob to 8 bits (measured at most 1.6e-4, on grad_norm).
FULL_K_TOLERANCE = {"exact": 1e-5, "compact": 1e-3}


@pytest.fixture(params=["compact", "exact"])
def cached(request, tmp_path, base_overrides, tokenizer):
    """A cache with k = V, so that training from it must equal training with the live teacher."""
    cache_dir = tmp_path / "cache"
    values = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_topk": len(tokenizer),
              "cache_format": request.param}
    assert cli.main(["cache", _yaml(tmp_path, "cache.yaml", values)]) == 0
    return cache_dir, values


@pytest.mark.slow
def test_cache_files_and_report(tmp_path, base_overrides, capsys):
    cache_dir = tmp_path / "c64"
    values = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_topk": 16}
    assert cli.main(["cache", _yaml(tmp_path, "c.yaml", values)]) == 0
    printed = capsys.readouterr().out
    assert "bytes per token" in printed and "top-16" in printed
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["k"] == 16 and len(index["offsets"]) == len(ALPACA_ROWS) + 1
    assert index["format"] == "llmneo-teacher-topk-v2" and index["layout"] == "compact"  # the default
    _, shard = cache_rows(cache_dir)
    assert shard["ids"].shape == (index["rows"], 16) and shard["logprobs"].shape == (index["rows"], 16)
    mass = shard["logprobs"].exp().sum(-1) + shard["tail"].exp()
    assert (mass - 1).abs().max() < 1e-4
    assert (shard["logprobs"][:, :-1] >= shard["logprobs"][:, 1:]).all()  # sorted top-k
    # k is recorded beside the fingerprint, not inside it: any k trains, so it is never compared
    assert list(index["fingerprint"]) == ["teacher", "tokenizer vocabulary", "template", "stage", "packing",
                                          "neat_packing", "cutoff_len", "dataset rows"]
    # refuses to overwrite, leaves the cache as it was
    assert cli.main(["cache", _yaml(tmp_path, "c.yaml", values)]) == 2
    assert "not empty" in capsys.readouterr().err and (cache_dir / "index.json").is_file()


@pytest.mark.slow
def test_training_from_cache_with_full_k_equals_live(tmp_path, cached, base_overrides, capsys):
    cache_dir, values = cached
    live_out, cached_out = tmp_path / "live", tmp_path / "from_cache"
    live = {**base_overrides, "output_dir": str(live_out)}
    from_cache = {**base_overrides, "output_dir": str(cached_out), "teacher_cache": str(cache_dir),
                  "teacher_model_name_or_path": None}
    assert cli.main(["train", _yaml(tmp_path, "live.yaml", live)]) == 0
    capsys.readouterr()
    assert cli.main(["train", _yaml(tmp_path, "cached.yaml", from_cache)]) == 0
    assert "teacher cache" in capsys.readouterr().out
    rows_live = [json.loads(line) for line in (live_out / "metrics.jsonl").read_text().splitlines()]
    rows_cached = [json.loads(line) for line in (cached_out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_live) == len(rows_cached) == 3
    tolerance = FULL_K_TOLERANCE[values["cache_format"]]
    for a, b in zip(rows_live, rows_cached):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=tolerance), key
    assert json.loads((cached_out / "train_results.json").read_text())["method"] == "neo"


@pytest.mark.slow
def test_stale_cache_names_the_part_that_differs(tmp_path, cached, base_overrides, alien_teacher_dir, capsys):
    cache_dir, _ = cached
    other_data = write_jsonl(tmp_path / "other.jsonl", ALPACA_ROWS[:5])
    # No overwrite flag: a run refused during set-up must leave output_dir usable for the corrected command.
    run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None,
           "dataset": str(other_data)}
    assert cli.main(["train", _yaml(tmp_path, "a.yaml", run)]) == 2
    assert "the dataset rows differs" in capsys.readouterr().err
    run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None,
           "model_name_or_path": str(alien_teacher_dir)}
    assert cli.main(["train", _yaml(tmp_path, "b.yaml", run)]) == 2
    assert "the tokenizer vocabulary differs" in capsys.readouterr().err
    run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None, "cutoff_len": 32}
    assert cli.main(["train", _yaml(tmp_path, "c.yaml", run)]) == 2
    err = capsys.readouterr().err
    assert "differs" in err and "rebuild it with llmneo cache" in err
    assert cli.main(["train", _yaml(tmp_path, "d.yaml", {**run, "teacher_cache": str(tmp_path / "nothing")})]) == 2
    assert "has no index.json" in capsys.readouterr().err
    shard = next(cache_dir.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])
    ok_run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None}
    assert cli.main(["train", _yaml(tmp_path, "e.yaml", ok_run)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_tokenizes_like_the_student(tmp_path, base_overrides, teacher_dir, tokenizer):
    """Same vocabulary, different chat template on the teacher side: the cache must use the student's
    rendering, or training from it would be refused (or, worse, misaligned)."""
    import shutil

    from transformers import AutoTokenizer

    teacher_copy = tmp_path / "teacher_other_template"
    shutil.copytree(teacher_dir, teacher_copy)
    other = AutoTokenizer.from_pretrained(teacher_copy)
    other.chat_template = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}" \
                          "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    other.save_pretrained(teacher_copy)
    cache_dir = tmp_path / "cache"
    values = {**base_overrides, "teacher_model_name_or_path": str(teacher_copy), "teacher_cache": str(cache_dir),
              "teacher_topk": 8}
    assert cli.main(["cache", _yaml(tmp_path, "c.yaml", values)]) == 0
    run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None}
    assert cli.main(["train", _yaml(tmp_path, "t.yaml", run)]) == 0


@pytest.mark.slow
def test_mismatch_names_the_setting_not_the_rows_it_changed(tmp_path, cached, base_overrides, capsys):
    """cutoff_len (and stage / packing) change the tokenized rows too; the message must name the setting."""
    cache_dir, _ = cached  # built with cutoff_len=64; 40 truncates some of the fixture's rows (up to 48 tokens)
    run = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None}
    assert cli.main(["train", _yaml(tmp_path, "a.yaml", {**run, "cutoff_len": 40})]) == 2
    err = capsys.readouterr().err
    assert "the cutoff_len differs (cache 64, run 40)" in err and "dataset rows" not in err
    run["output_dir"] = str(tmp_path / "out2")  # the refused run above leaves its saved config in out/
    assert cli.main(["train", _yaml(tmp_path, "b.yaml", {**run, "packing": True})]) == 2
    err = capsys.readouterr().err
    assert "the packing differs (cache False, run True)" in err and "dataset rows" not in err


@pytest.mark.slow
@pytest.mark.parametrize("shard_rows, batch", [(1, 1), (7, 3)], ids=["shard-per-example", "boundaries-mid-batch"])
def test_multi_shard_cache_reads_the_same_rows_as_one_shard(tmp_path, base_overrides, tokenizer, monkeypatch,
                                                              shard_rows, batch):
    """Many small shards (every example its own shard, or several per shard with examples starting on shard
    boundaries) must give exactly the rows of a one-shard cache, for every example and for whole batches
    that span shards, and the same training run."""
    import torch

    from llmneo.cache.fingerprint import fingerprint
    from llmneo.config import schema as config_mod
    from llmneo.data import dataset
    from llmneo.data.labels import response_positions
    from llmneo.teachers import cached as cache_reader

    values = {**base_overrides, "teacher_topk": 8, "per_device_eval_batch_size": batch}
    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    assert cli.main(["cache", _yaml(tmp_path, "one.yaml", {**values, "teacher_cache": str(one_dir)})]) == 0
    assert cli.main(["cache", _yaml(tmp_path, "many.yaml", {**values, "teacher_cache": str(many_dir),
                                                           "cache_shard_size": shard_rows})]) == 0
    one_index = json.loads((one_dir / "index.json").read_text())
    many_index = json.loads((many_dir / "index.json").read_text())
    assert len(one_index["shards"]) == 1
    assert len(many_index["shards"]) >= len(ALPACA_ROWS) // batch  # one shard per eval batch
    assert one_index["offsets"] == many_index["offsets"]

    cfg = config_mod.load(overrides={k: v for k, v in values.items() if k != "per_device_eval_batch_size"})
    examples = dataset.build(cfg, tokenizer).train
    for i, example in enumerate(examples):
        example["index"] = i
    expected = fingerprint(cfg, tokenizer, examples)
    legacy = json.loads((one_dir / "index.json").read_text())  # caches written when k sat in the fingerprint
    (one_dir / "index.json").write_text(json.dumps({**legacy, "fingerprint": {**legacy["fingerprint"], "k": 3}}))
    one = cache_reader.CachedTeacher(str(one_dir), expected, torch.device("cpu"))
    many = cache_reader.CachedTeacher(str(many_dir), expected, torch.device("cpu"))
    assert len(many.handles) == len(many_index["shards"])
    groups = [[e] for e in examples] + [examples, examples[::-1], examples[1:4]]
    for group in groups:
        batch_ = dataset.collate(group, tokenizer.pad_token_id)
        positions, _ = response_positions(batch_["labels"])
        a, b = one.rows(batch_, positions), many.rows(batch_, positions)
        assert len(a) == int(positions.sum()) > 0
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs) and torch.equal(a.tail, b.tail)

    metrics = {}
    for name, directory in (("one", one_dir), ("many", many_dir)):
        out = tmp_path / f"train-{name}"
        run = {**base_overrides, "output_dir": str(out), "teacher_cache": str(directory),
               "teacher_model_name_or_path": None}
        assert cli.main(["train", _yaml(tmp_path, f"t-{name}.yaml", run)]) == 0
        metrics[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics["one"]) == 3
    for a, b in zip(metrics["one"], metrics["many"]):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
def test_closed_form_sparse_loss_equals_autograd_on_every_kind_of_tail(kd_ratio):
    """The cached path's closed-form CE + sparse forward KL (value and gradient) against autograd through
    sparse_token_divergence in float64, on rows whose student tail is ordinary, tiny (1e-22, still summed),
    underflowing in fp32 (below 1e-38: recomputed in log space), or masked with -inf together with the teacher."""
    import torch

    from llmneo.cache.shards import topk_rows
    from llmneo.loss import closed_form
    from llmneo.loss import divergences as losses

    gen = torch.Generator().manual_seed(0)
    C, V, k = 6, 300, 8
    teacher = torch.randn(C, V, generator=gen, dtype=torch.float64) * 3
    teacher[5, :] = -math.inf  # row 5: the teacher's support is exactly its top-k
    teacher[5, :k] = torch.randn(k, generator=gen, dtype=torch.float64)
    rows = topk_rows(teacher.float(), k)
    student = torch.randn(C, V, generator=gen, dtype=torch.float64)
    in_topk = torch.zeros(C, V, dtype=torch.bool).scatter_(-1, rows.ids, True)
    for row, gap in ((1, 10.0), (2, 55.0), (3, 100.0), (4, 130.0)):  # tails ~e^-10, ~1e-22, ~1e-42, ~1e-55
        student[row] = torch.where(in_topk[row], student[row] + gap, student[row])
    student[5] = student[5].masked_fill(~in_topk[5], -math.inf)
    targets = torch.randint(0, V, (C,), generator=gen)
    targets[5] = rows.ids[5, 0]  # a target the masking student can score

    ce, kd, grad = closed_form.sparse_fkl_grad(student.float(), targets, rows, kd_ratio)

    reference = student.clone().requires_grad_(True)
    ce_ref = losses.token_cross_entropy(reference, targets).sum()
    kd_ref = losses.sparse_token_divergence(reference, rows.ids, rows.logprobs.double(), rows.tail.double()).sum()
    grad_ref, = torch.autograd.grad((1 - kd_ratio) * ce_ref + kd_ratio * kd_ref, reference)
    assert torch.isfinite(kd_ref) and torch.isfinite(grad_ref).all()
    assert float(ce) == pytest.approx(float(ce_ref.detach()), rel=1e-5)
    assert float(kd) == pytest.approx(float(kd_ref.detach()), rel=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-6)
