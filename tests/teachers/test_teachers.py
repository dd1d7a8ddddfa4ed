"""Several teachers: a mixture of their probabilities (teacher_weights) or each row routed to one
(teacher_column), with the KD loss reported per teacher; what is not supported is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ALPACA_ROWS, read_metrics, write_jsonl, write_yaml
from safetensors.torch import load_file

from llmneo import cli
from llmneo.config import schema
from llmneo.data import dataset
from llmneo.data.labels import IGNORE_INDEX
from llmneo.models import loading
from llmneo.teachers import several
from llmneo.teachers.live import LiveTeacher


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    from llmneo.demo import tiny

    model = tiny.build_model(tokenizer, hidden_size=40, num_layers=2, seed=7)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("second_teacher"))


@pytest.fixture
def routed_file(tmp_path, second_teacher_dir) -> Path:
    """Even rows to teacher 0 (by index), odd rows to the second teacher (by its folder's name)."""
    return write_jsonl(tmp_path / "routed.jsonl", [{**row, "teacher": 0 if i % 2 == 0 else second_teacher_dir.name}
                                                   for i, row in enumerate(ALPACA_ROWS)])


def test_a_mixture_weighted_1_0_is_the_first_teacher_alone(tmp_path, base_overrides, teacher_dir, second_teacher_dir):
    single, mixed = tmp_path / "single", tmp_path / "mixed"
    assert cli.main(["train", write_yaml(tmp_path, "a.yaml", {**base_overrides, "output_dir": str(single)})]) == 0
    values = {**base_overrides, "output_dir": str(mixed), "teacher_weights": [1, 0],
              "teacher_model_name_or_path": [str(teacher_dir), str(second_teacher_dir)]}
    assert cli.main(["train", write_yaml(tmp_path, "b.yaml", values)]) == 0
    for a, b in zip(read_metrics(single), read_metrics(mixed)):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
        first, second = b["kd_loss_per_teacher"]
        assert first == pytest.approx(a["kd_loss"], rel=1e-4)  # the divergence from teacher 0 alone
        assert second is not None and second != pytest.approx(first, rel=1e-3)
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (single, mixed))
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-6, name


def test_a_mixture_mixes_probabilities_not_logits(tokenizer, teacher_dir, second_teacher_dir, base_overrides):
    """The mixture's rows are log(0.25·p_0 + 0.75·p_1), computed independently from both teachers' logits."""
    cfg = schema.load(overrides={**base_overrides, "teacher_weights": "1,3",
                                 "teacher_model_name_or_path": f"{teacher_dir},{second_teacher_dir}"})
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    assert len(loaded.teachers) == 2
    signal = several.MixtureTeacher([LiveTeacher(t, loaded.vocab_size) for t in loaded.teachers],
                                    cfg.mixture_weights, "cpu")
    batch = dataset.collate(dataset.build(cfg, tokenizer).train[:3], tokenizer.pad_token_id)
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    rows = signal.rows(batch, positions)[0:int(positions.sum())]
    with torch.no_grad():
        probs = [t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
                 [:, :loaded.vocab_size].double().softmax(-1) for t in loaded.teachers]
    expected = (0.25 * probs[0] + 0.75 * probs[1]).log()
    assert torch.allclose(rows.logits.double().log_softmax(-1), expected, atol=1e-5)


def test_routing_scores_each_row_with_its_own_teacher(tmp_path, base_overrides, tokenizer, teacher_dir,
                                                      second_teacher_dir, routed_file):
    """One micro-batch, rows routed to two teachers: the KD sum is each row's forward KL to its own teacher,
    computed here with full logits, and each teacher's sum is reported apart."""
    from transformers import AutoModelForCausalLM

    values = {**base_overrides, "dataset": str(routed_file), "teacher_column": "teacher",
              "teacher_model_name_or_path": [str(teacher_dir), str(second_teacher_dir)],
              "per_device_train_batch_size": 8, "max_steps": 1}
    out = Path(values["output_dir"])
    assert cli.main(["train", write_yaml(tmp_path, "r.yaml", values)]) == 0
    row = read_metrics(out)[0]

    cfg = schema.load(overrides=values)
    examples = dataset.build(cfg, tokenizer).train
    student = AutoModelForCausalLM.from_pretrained(base_overrides["model_name_or_path"])  # LoRA B = 0 at step 1
    teachers = [AutoModelForCausalLM.from_pretrained(p) for p in (teacher_dir, second_teacher_dir)]
    sums, counts = [0.0, 0.0], [0, 0]
    vocab = len(tokenizer)
    for example in examples:
        owner = 0 if example["route"] == 0 else 1
        ids = torch.tensor([example["input_ids"]])
        chosen = torch.tensor(example["labels"][1:]) != IGNORE_INDEX
        with torch.no_grad():
            s = student(input_ids=ids).logits[0, :-1][chosen][:, :vocab].double()
            t = teachers[owner](input_ids=ids).logits[0, :-1][chosen][:, :vocab].double()
        sums[owner] += float((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum())
        counts[owner] += int(chosen.sum())
    assert counts[0] and counts[1]
    assert row["kd_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert row["kd_loss_per_teacher"] == pytest.approx([sums[0] / counts[0], sums[1] / counts[1]], rel=1e-4)


def test_routing_values_that_name_no_teacher_and_unsupported_combinations_are_one_line(
        tmp_path, base_overrides, teacher_dir, second_teacher_dir, capsys):
    two = [str(teacher_dir), str(second_teacher_dir)]
    bad_route = write_jsonl(tmp_path / "bad.jsonl", [{**row, "teacher": 5} for row in ALPACA_ROWS])
    missing = write_jsonl(tmp_path / "missing.jsonl", ALPACA_ROWS)
    cases = [
        ({"teacher_model_name_or_path": two}, "combine them with teacher_weights"),
        ({"teacher_model_name_or_path": two, "teacher_weights": "1"}, "must be 2 numbers"),
        ({"teacher_model_name_or_path": two, "teacher_weights": "1,-1"}, "must be 2 numbers"),
        ({"teacher_weights": "1,1"}, "combine several teachers"),
        ({"teacher_model_name_or_path": two, "teacher_weights": "1,1", "teacher_cache": "c"},
         "which a cache does not keep"),
        ({"teacher_model_name_or_path": two, "teacher_weights": "1,1", "seq_kd": True}, "seq_kd writes replies"),
        ({"teacher_model_name_or_path": two, "teacher_column": "teacher", "dataset": str(bad_route)},
         "names none of the 2 teachers"),
        ({"teacher_model_name_or_path": two, "teacher_column": "teacher", "dataset": str(missing)},
         "has no 'teacher' (teacher_column)"),
    ]
    for extra, message in cases:
        assert cli.main(["train", write_yaml(tmp_path, "x.yaml", {**base_overrides, **extra})]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
        assert not (Path(base_overrides["output_dir"]) / "metrics.jsonl").exists()
    values = {**base_overrides, "teacher_endpoint": "http://localhost:1/v1,http://localhost:2/v1",
              "teacher_weights": "1,1"}
    del values["teacher_model_name_or_path"]
    assert cli.main(["train", write_yaml(tmp_path, "e.yaml", values)]) == 2
    assert "route served teachers with teacher_column" in capsys.readouterr().err


@pytest.mark.slow
def test_on_policy_steps_keep_each_rows_teacher(tmp_path, base_overrides, teacher_dir, second_teacher_dir,
                                                routed_file):
    values = {**base_overrides, "dataset": str(routed_file), "teacher_column": "teacher", "lmbda": 1,
              "max_new_tokens": 4, "teacher_model_name_or_path": [str(teacher_dir), str(second_teacher_dir)]}
    out = Path(values["output_dir"])
    assert cli.main(["train", write_yaml(tmp_path, "o.yaml", values)]) == 0
    rows = read_metrics(out)
    assert all(r["on_policy"] for r in rows)
    assert all(v is not None for r in rows for v in r["kd_loss_per_teacher"])


def test_route_index_takes_an_index_or_an_entry():
    entries = ["models/llama-8b", "http://host:8000/v1"]
    assert several.route_index(1, entries) == 1 and several.route_index("0", entries) == 0
    assert several.route_index("llama-8b", entries) == 0 and several.route_index("models/llama-8b", entries) == 0
    assert several.route_index("v1", entries) == 1 and several.route_index(2, entries) is None
    assert several.route_index("nobody", entries) is None


@pytest.mark.slow
def test_cached_teachers_keep_their_own_rows_and_fingerprints_and_route_like_live_ones(
        tmp_path, base_overrides, tokenizer, teacher_dir, second_teacher_dir, routed_file):
    """`llmneo cache` with two teachers writes teacher-0 and teacher-1, each a cache of its own; at k = V (no
    tail) routed training from them equals routed training from the live teachers."""
    values = {**base_overrides, "dataset": str(routed_file), "teacher_column": "teacher",
              "teacher_model_name_or_path": [str(teacher_dir), str(second_teacher_dir)],
              "teacher_topk": len(tokenizer), "teacher_cache": str(tmp_path / "caches"),
              "cache_format": "exact"}  # float32 rows, so that routing is compared to 1e-5
    assert cli.main(["cache", write_yaml(tmp_path, "c.yaml", values)]) == 0
    indexes = [json.loads((tmp_path / "caches" / f"teacher-{i}" / "index.json").read_text()) for i in (0, 1)]
    assert indexes[0]["fingerprint"]["teacher"] != indexes[1]["fingerprint"]["teacher"]
    assert indexes[0]["offsets"] == indexes[1]["offsets"]
    live, cached = tmp_path / "live", tmp_path / "cached"
    live_values = {k: v for k, v in values.items() if k != "teacher_cache"}
    assert cli.main(["train", write_yaml(tmp_path, "l.yaml", {**live_values, "output_dir": str(live)})]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "t.yaml", {**values, "output_dir": str(cached)})]) == 0
    for a, b in zip(read_metrics(live), read_metrics(cached)):
        for key in ("loss", "kd_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        assert b["kd_loss_per_teacher"] == pytest.approx(a["kd_loss_per_teacher"], abs=1e-5)
    # a cache of the teachers in the other order is another teacher's rows: refused, naming the teacher
    swapped = {**values, "teacher_model_name_or_path": [str(second_teacher_dir), str(teacher_dir)],
               "output_dir": str(tmp_path / "swapped")}
    assert cli.main(["train", write_yaml(tmp_path, "s.yaml", swapped)]) == 2
