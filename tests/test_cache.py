"""llmneo cache: the offline teacher top-k cache, its fingerprint, and training from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from llmneo import cli
from conftest import ALPACA_ROWS, write_jsonl


def _yaml(tmp_path: Path, name: str, values: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture
def cached(tmp_path, base_overrides, tokenizer):
    """A cache with k = V, so that training from it must equal training with the live teacher."""
    cache_dir = tmp_path / "cache"
    values = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_topk": len(tokenizer)}
    assert cli.main(["cache", _yaml(tmp_path, "cache.yaml", values)]) == 0
    return cache_dir, values


def test_cache_files_and_report(tmp_path, base_overrides, capsys):
    cache_dir = tmp_path / "c64"
    values = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_topk": 16}
    assert cli.main(["cache", _yaml(tmp_path, "c.yaml", values)]) == 0
    printed = capsys.readouterr().out
    assert "bytes per token" in printed and "top-16" in printed
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["k"] == 16 and len(index["offsets"]) == len(ALPACA_ROWS) + 1
    shard = load_file(str(cache_dir / index["shards"][0]["file"]))
    assert shard["ids"].shape == (index["rows"], 16) and shard["logprobs"].shape == (index["rows"], 16)
    mass = shard["logprobs"].exp().sum(-1) + shard["tail"].exp()
    assert (mass - 1).abs().max() < 1e-4
    assert (shard["logprobs"][:, :-1] >= shard["logprobs"][:, 1:]).all()  # sorted top-k
    assert set(index["fingerprint"]) == {"teacher", "tokenizer vocabulary", "template", "dataset rows",
                                         "cutoff_len", "k"}
    # refuses to overwrite, leaves the cache as it was
    assert cli.main(["cache", _yaml(tmp_path, "c.yaml", values)]) == 2
    assert "not empty" in capsys.readouterr().err and (cache_dir / "index.json").is_file()


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
    for a, b in zip(rows_live, rows_cached):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert json.loads((cached_out / "train_results.json").read_text())["method"] == "neo"


def test_stale_cache_names_the_part_that_differs(tmp_path, cached, base_overrides, alien_teacher_dir, capsys):
    cache_dir, _ = cached
    other_data = write_jsonl(tmp_path / "other.jsonl", ALPACA_ROWS[:5])
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
