"""llmneo cache export|import axolotl: a teacher cache as axolotl's KD dataset and back; float16 cache log-probs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, write_yaml
from safetensors import safe_open
from safetensors.torch import load_file

from llmneo import cli
from llmneo.cache import shards, write
from llmneo.cache.fingerprint import fingerprint
from llmneo.teachers import cached

# An fp16 cache's training metrics (loss, ce_loss, kd_loss, grad_norm) stay within this, relative, of the fp32
# cache's on the tests' tiny run; measured at most 4.0e-5 (kd_loss, 20 steps at k = 20 and 64), docs/benchmarks.md
# section 5.
FP16_REL_TOL = 1e-4


def _train(tmp_path: Path, base: dict, cache_dir: Path, name: str) -> Path:
    out = tmp_path / f"train-{name}"
    run = {**base, "output_dir": str(out), "teacher_cache": str(cache_dir), "teacher_model_name_or_path": None}
    assert cli.main(["train", write_yaml(tmp_path, f"{name}.yaml", run)]) == 0
    return out


def _write_cache(tmp_path: Path, base: dict, k: int, name: str = "cache", layout: str = "compact") -> Path:
    cache_dir = tmp_path / name
    values = {**base, "teacher_cache": str(cache_dir), "teacher_topk": k, "cache_format": layout}
    assert cli.main(["cache", write_yaml(tmp_path, f"{name}.yaml", values)]) == 0
    return cache_dir


def _examples(base: dict, tokenizer) -> list[dict]:
    from llmneo.config import schema as config_mod
    from llmneo.data import dataset as data

    return data.build(config_mod.load(overrides=base), tokenizer).train


# --- round trip ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip_through_axolotl_trains_like_the_original_cache(tmp_path, base_overrides, tokenizer, suffix):
    """k = V (the whole distribution, no tail): cache -> export -> import -> train equals training from the cache."""
    import datasets

    original = _write_cache(tmp_path, base_overrides, len(tokenizer))
    file = tmp_path / f"kd{suffix}"
    config = write_yaml(tmp_path, "convert.yaml", {**base_overrides, "teacher_cache": str(original)})
    assert cli.main(["cache", "export", "axolotl", config, str(file)]) == 0
    loaded = datasets.load_dataset(suffix[1:].replace("jsonl", "json"), data_files=str(file), split="train")
    assert loaded.column_names == ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
                                   "target_mask"]  # as HF datasets (and so axolotl) reads it, -inf padding included
    assert len(loaded) == len(_examples(base_overrides, tokenizer)) and loaded[0]["target_logprobs"][0][0] == -math.inf
    imported = tmp_path / "imported"
    assert cli.main(["cache", "import", "axolotl", config, str(file), f"teacher_cache={imported}"]) == 0
    index = json.loads((imported / "index.json").read_text())
    assert index["k"] == len(tokenizer) and index["fingerprint"]["teacher"] is None
    before = json.loads((original / "index.json").read_text())
    assert index["offsets"] == before["offsets"]
    assert {k: v for k, v in index["fingerprint"].items() if k != "teacher"} == \
           {k: v for k, v in before["fingerprint"].items() if k != "teacher"}

    a, b = _train(tmp_path, base_overrides, original, "original"), _train(tmp_path, base_overrides, imported, "back")
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=0), (ra["step"], key)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:  # two renormalizations in float32 (export, import) away from bit-equal
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_a_top_k_round_trip_keeps_the_renormalized_top_k_and_drops_the_tail(tmp_path, base_overrides, tokenizer):
    """k < V: axolotl keeps no tail, so what comes back is each row's top-k renormalized, with tail mass 0."""
    from llmneo.config import schema as config_mod

    original = _write_cache(tmp_path, base_overrides, 8)
    file = tmp_path / "kd.jsonl"
    values = {**base_overrides, "teacher_cache": str(original)}
    assert cli.main(["cache", "export", "axolotl", write_yaml(tmp_path, "c.yaml", values), str(file)]) == 0
    imported = tmp_path / "imported"
    into = write_yaml(tmp_path, "i.yaml", {**values, "teacher_cache": str(imported)})
    assert cli.main(["cache", "import", "axolotl", into, str(file)]) == 0
    examples = _examples(base_overrides, tokenizer)
    expected = fingerprint(config_mod.load(overrides=base_overrides), tokenizer, examples)
    first = cached.CachedTeacher(str(original), expected, torch.device("cpu"))
    second = cached.CachedTeacher(str(imported), {**expected, "teacher": None}, torch.device("cpu"))
    a, b = first.read(0, first.offsets[-1]), second.read(0, second.offsets[-1])
    assert torch.equal(a.ids, b.ids) and torch.isneginf(b.tail).all() and (a.tail > -math.inf).all()
    torch.testing.assert_close(b.logprobs, torch.log_softmax(a.logprobs, dim=-1), rtol=0, atol=1e-6)
    assert first.has_tail and not second.has_tail
    # with no tail, rkl is infinite wherever the student strays outside the top k: refused up front, one line
    rkl = write_yaml(tmp_path, "r.yaml", {**values, "teacher_cache": str(imported), "kd_loss": "rkl",
                                     "output_dir": str(tmp_path / "rkl")})
    assert cli.main(["train", rkl]) == 2
    assert not (tmp_path / "rkl" / "metrics.jsonl").exists()


def test_a_zero_probability_is_written_as_minus_1e9_on_trained_rows_and_padding_stays_minus_inf():
    """axolotl computes p·(log p - log q) on trained rows: -inf there would make 0·-inf = NaN."""
    from llmneo.cache import axolotl
    from llmneo.loss.rows import SparseRows

    example = {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}
    rows = SparseRows(torch.tensor([[7, 3, 4]]), torch.tensor([[0.0, -math.inf, -math.inf]]), torch.tensor([-math.inf]))
    row = axolotl._axolotl_row(example, torch.tensor([False, True, False]), rows, 3, 1.0)
    assert row["target_logprobs"][1] == [0.0, axolotl.ZERO_LOGPROB, axolotl.ZERO_LOGPROB]
    assert row["target_token_ids"][1] == [7, 3, 4] and row["target_mask"] == [[0] * 3, [1] * 3, [0] * 3]
    assert row["target_logprobs"][0] == row["target_logprobs"][2] == [-math.inf] * 3
    assert row["target_token_ids"][0] == [0, 1, 2] and row["labels"] == example["labels"]


# --- what export writes, computed without llmneo's cache -----------------------------------------------------------

@pytest.mark.slow
def test_exported_targets_are_the_teachers_top_k_at_the_next_token(tmp_path, base_overrides, teacher_dir, tokenizer):
    """Rows read back with HF datasets (as axolotl loads them) against the teacher run directly: row t is the
    teacher's top-k at position t (the distribution of token t + 1), at kd_temperature, renormalized over k."""
    import datasets
    from transformers import AutoModelForCausalLM

    k, temperature = 8, 2.0
    values = {**base_overrides, "kd_temperature": temperature}
    cache_dir = _write_cache(tmp_path, values, k, layout="exact")  # compared with the teacher's own log-probs
    file = tmp_path / "kd.parquet"
    assert cli.main(["cache", "export", "axolotl", str(file), f"teacher_cache={cache_dir}",
                     *(f"{key}={value}" for key, value in values.items())]) == 0
    rows = datasets.load_dataset("parquet", data_files=str(file), split="train")
    assert set(rows.column_names) == {"input_ids", "attention_mask", "labels", "target_token_ids",
                                      "target_logprobs", "target_mask"}
    examples = _examples(base_overrides, tokenizer)
    assert len(rows) == len(examples)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32).eval()
    vocab = len(tokenizer)
    for number in (0, 3, len(examples) - 1):
        example, row = examples[number], rows[number]
        ids, labels = example["input_ids"], example["labels"]
        assert row["input_ids"] == ids and row["labels"] == labels and row["attention_mask"] == [1] * len(ids)
        with torch.no_grad():
            logits = teacher(torch.tensor([ids])).logits[0, :, :vocab].float()  # (L, V)
        values_k, ids_k = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)  # (L, k)
        trained = [t < len(ids) - 1 and labels[t + 1] != -100 for t in range(len(ids))]
        assert sum(trained) > 0
        for t, on in enumerate(trained):
            if not on:
                assert row["target_mask"][t] == [0] * k and row["target_token_ids"][t] == list(range(k))
                assert all(v == -math.inf for v in row["target_logprobs"][t])
                continue
            assert row["target_mask"][t] == [1] * k
            got_ids = torch.tensor(row["target_token_ids"][t])
            got = torch.tensor(row["target_logprobs"][t])
            assert sorted(got_ids.tolist()) == sorted(ids_k[t].tolist()), t
            want = torch.log_softmax(values_k[t] / temperature, dim=-1)
            order_got, order_want = got_ids.argsort(), ids_k[t].argsort()
            torch.testing.assert_close(got[order_got], want[order_want], rtol=0, atol=1e-5)
            assert torch.exp(got).sum().item() == pytest.approx(1.0, abs=1e-5)


# --- refusals ---------------------------------------------------------------------------------------------------

def _one_error(err: str, message: str) -> None:
    """One `llmneo: error:` line holding `message`, no traceback (warnings may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("llmneo: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err

@pytest.mark.slow
def test_bad_files_are_one_line_errors_that_write_nothing(tmp_path, base_overrides, tokenizer, capsys):
    cache_dir = _write_cache(tmp_path, base_overrides, 4)
    good = tmp_path / "good.jsonl"
    config = write_yaml(tmp_path, "c.yaml", {**base_overrides, "teacher_cache": str(cache_dir)})
    assert cli.main(["cache", "export", "axolotl", config, str(good)]) == 0
    rows = [json.loads(line) for line in good.read_text().splitlines()]
    examples = _examples(base_overrides, tokenizer)
    first = next(t for t in range(len(examples[0]["labels"]) - 1) if examples[0]["labels"][t + 1] != -100)
    capsys.readouterr()

    def edited(change) -> list[dict]:
        copy = json.loads(json.dumps(rows))
        change(copy)
        return copy

    def set_at(column, value):
        return lambda r: r[0][column].__setitem__(first, value)

    cases = {
        "no target_mask column": (edited(lambda r: r[2].pop("target_mask")), "has no target_mask column"),
        "other tokens": (edited(lambda r: r[1]["input_ids"].__setitem__(2, r[1]["input_ids"][2] + 1)),
                         "first difference at token 2"),
        "short targets": (edited(lambda r: r[0]["target_logprobs"].pop()), "positions but input_ids has"),
        "id outside vocab": (edited(set_at("target_token_ids", [len(tokenizer), 1, 2, 3])), "outside the tokenizer"),
        "repeated id": (edited(set_at("target_token_ids", [5, 5, 6, 7])), "appears twice"),
        "masked row": (edited(set_at("target_mask", [0, 0, 0, 0])), "target_mask is 0"),
        "nan": (edited(set_at("target_logprobs", [float("nan"), -1.0, -2.0, -3.0])), "not NaN"),
        "other k": (edited(set_at("target_logprobs", [-1.0, -2.0])), "must be lists of the same length"),
        "float ids": (edited(set_at("target_token_ids", [1.5, 2, 3, 4])), "must hold integers"),
        "a row short": (rows[:-1], f"has {len(rows) - 1} rows but this config tokenizes {len(rows)}"),
        "a row more": (rows + rows[:1], "more rows than"),
    }
    imported = tmp_path / "imported"
    for name, (content, message) in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps(r) + "\n" for r in content))
        assert cli.main(["cache", "import", "axolotl", config, str(bad), f"teacher_cache={imported}"]) == 2, name
        _one_error(capsys.readouterr().err, message)
        assert not imported.exists() and not list(tmp_path.glob(".imported*")), name
    (tmp_path / "broken.jsonl").write_text('{"input_ids": [1, 2\n')
    others = [
        (["import", "axolotl", config, str(tmp_path / "broken.jsonl"), f"teacher_cache={imported}"],
         "line 1 is not JSON"),
        (["import", "axolotl", config, str(good)], "is not empty; set overwrite_output_dir=true"),
        (["import", "llamafactory", config, str(good)], "unknown format 'llamafactory'"),
        (["import", "axolotl", config, str(tmp_path / "kd.csv")], "neither a .jsonl nor a .parquet"),
        (["import", "axolotl", config, str(tmp_path / "missing.jsonl")], "does not exist"),
        (["export", "axolotl", config, str(good)], "exists; set overwrite_output_dir=true"),
        (["export", config], "needs a format"),
        (["export", "axolotl"], "got 0 file names"),
        (["import", "axolotl", config, str(good), f"teacher_cache={imported}", "cutoff_len=40"], "input_ids are not"),
    ]
    for args, message in others:
        assert cli.main(["cache", *args]) == 2, args
        _one_error(capsys.readouterr().err, message)
    assert not imported.exists()
    # a stale cache (another cutoff_len) is refused by export, and no file is left behind
    stale = tmp_path / "stale.jsonl"
    assert cli.main(["cache", "export", "axolotl", config, str(stale), "cutoff_len=40"]) == 2
    assert "the cutoff_len differs" in capsys.readouterr().err
    assert not stale.exists() and not list(tmp_path.glob(".stale.jsonl*"))
    assert cli.main(["cache", config]) == 2  # `llmneo cache CONFIG.yaml` is unchanged: it refuses a full cache
    assert "not empty" in capsys.readouterr().err


# --- float16 log-probs -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_float16_cache_trains_within_tolerance_of_float32_and_old_caches_still_load(tmp_path, base_overrides,
                                                                                  monkeypatch):
    """A float32 teacher (CPU) writes float32 log-probs; a 16-bit one float16, read back as float32. A cache from
    before `logprobs_dtype` was recorded (format v1, float32, no such key) still trains, and identically. 20 steps; with
    `pytest -s` it prints the figures of docs/benchmarks.md section 5."""
    k, steps = 20, 20
    fp32 = _write_cache(tmp_path, base_overrides, k, "fp32", layout="exact")
    monkeypatch.setattr(write, "logprobs_dtype", lambda config: torch.float16)  # as under bf16: true on a GPU
    fp16 = _write_cache(tmp_path, base_overrides, k, "fp16", layout="exact")
    monkeypatch.undo()
    assert json.loads((fp32 / "index.json").read_text())["logprobs_dtype"] == "float32"
    assert json.loads((fp16 / "index.json").read_text())["logprobs_dtype"] == "float16"
    rows = json.loads((fp16 / "index.json").read_text())["rows"]
    shards = {name: d / "shard-00000.safetensors" for name, d in (("fp32", fp32), ("fp16", fp16))}
    with safe_open(str(shards["fp16"]), framework="pt") as handle:
        assert handle.get_slice("logprobs").get_dtype() == "F16" and handle.get_slice("ids").get_dtype() == "I32"
    assert shards["fp32"].stat().st_size - shards["fp16"].stat().st_size == pytest.approx(rows * k * 2, abs=64)
    exact, rounded = load_file(str(shards["fp32"])), load_file(str(shards["fp16"]))
    assert torch.equal(exact["ids"], rounded["ids"]) and torch.equal(exact["tail"], rounded["tail"])
    error = (rounded["logprobs"].float() - exact["logprobs"]).abs()
    assert (error <= exact["logprobs"].abs() * 2.0**-11 + 2.0**-25).all()  # half an fp16 ulp (subnormals: 2^-25)

    old = tmp_path / "old"
    old.mkdir()
    for file in fp32.iterdir():
        (old / file.name).write_bytes(file.read_bytes())
    index = json.loads((old / "index.json").read_text())  # as format v1 wrote it before logprobs_dtype existed
    del index["logprobs_dtype"], index["layout"]
    index["format"] = "llmneo-teacher-topk-v1"
    (old / "index.json").write_text(json.dumps(index))
    outs = {name: _train(tmp_path, {**base_overrides, "max_steps": steps}, d, name)
            for name, d in (("fp32", fp32), ("fp16", fp16), ("old", old))}
    runs = {name: read_metrics(out) for name, out in outs.items()}
    assert len(runs["fp32"]) == len(runs["old"]) == len(runs["fp16"]) == steps
    for a, b in zip(runs["fp32"], runs["old"]):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == a[key], (a["step"], key)
    for a, b in zip(runs["fp32"], runs["fp16"]):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=FP16_REL_TOL, abs=0), (a["step"], key)
    weights = [load_file(str(outs[name] / "adapter_model.safetensors")) for name in ("fp32", "fp16")]
    finite = torch.isfinite(exact["logprobs"])
    print(f"\nfloat16 vs float32 cache, k = {k}, {rows} rows: log-prob rounding max {error[finite].max():.3g} "
          f"(relative {(error[finite] / exact['logprobs'][finite].abs().clamp_min(1e-30)).max():.3g}); "
          f"p-weighted per row max {(exact['logprobs'].exp() * error).sum(-1).max():.3g}")
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(runs["fp32"], runs["fp16"])]
        print(f"{key}: max |diff| over {steps} steps {max(diffs):.3g}, relative "
              f"{max(d / abs(a[key]) for d, a in zip(diffs, runs['fp32'])):.3g}")
    print(f"adapter weights: max |diff| {max((weights[0][n] - weights[1][n]).abs().max() for n in weights[0]):.3g}")


def test_k_entries_cost_6_bytes_each_in_float16_and_8_in_float32(tmp_path):
    """The shard layout per response token: k int32 ids, k log-probs, one float32 tail."""
    from llmneo.loss.rows import SparseRows

    n, k = 1000, 64
    rows = SparseRows(torch.randint(0, 128_000, (n, k)), -torch.rand(n, k) * 20, -torch.rand(n) * 5)
    sizes = {}
    for name, dtype in (("float16", torch.float16), ("float32", torch.float32)):
        shards.save_shard(tmp_path / f"{name}.safetensors", [rows], dtype)
        sizes[name] = (tmp_path / f"{name}.safetensors").stat().st_size
        assert shards.make_index(k, [0, n], [], {}, dtype)["logprobs_dtype"] == name
    assert sizes["float16"] == pytest.approx(n * (6 * k + 4), abs=256)  # 388 B per token at k = 64
    assert sizes["float32"] == pytest.approx(n * (8 * k + 4), abs=256)  # 516 B


def test_export_never_overwrites_an_input_and_bad_text_is_one_line(tmp_path, base_overrides, capsys):
    cache_dir = _write_cache(tmp_path, base_overrides, 4)
    values = {**base_overrides, "teacher_cache": str(cache_dir), "overwrite_output_dir": True}
    config = write_yaml(tmp_path, "c.yaml", values)
    dataset = Path(base_overrides["dataset"])
    before = dataset.read_bytes()
    capsys.readouterr()
    assert cli.main(["cache", "export", "axolotl", config, str(dataset.with_suffix(".jsonl"))]) == 2
    _one_error(capsys.readouterr().err, "is the run's dataset")
    assert dataset.read_bytes() == before
    (tmp_path / "dir.jsonl").mkdir()
    assert cli.main(["cache", "export", "axolotl", config, str(tmp_path / "dir.jsonl")]) == 2
    _one_error(capsys.readouterr().err, "is a directory")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("{\"input_ids\": \"caf\u00e9\"}\n".encode("latin-1"))
    into = write_yaml(tmp_path, "i.yaml", {**values, "teacher_cache": str(tmp_path / "imported")})
    assert cli.main(["cache", "import", "axolotl", into, str(latin)]) == 2
    _one_error(capsys.readouterr().err, "is not UTF-8")
    assert not (tmp_path / "imported").exists()
