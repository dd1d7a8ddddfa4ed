"""The four arms end to end through the CLI, loss normalisation, and the official LLM-Neo YAML."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.data import dataset
from llmneo.data.labels import response_positions
from llmneo.loss.divergences import KDSettings
from llmneo.loss.spec import LossSpec
from llmneo.models import loading
from llmneo.teachers.live import LiveTeacher
from llmneo.train import loop

METRIC_KEYS = {"step", "epoch", "loss", "ce_loss", "kd_loss", "learning_rate", "grad_norm", "tokens_per_second"}
RESULT_KEYS = {"method", "train_runtime", "train_tokens", "tokens_per_second", "trainable_params",
               "total_params", "peak_memory_bytes", "final_loss"}


def run_cli(tmp_path: Path, overrides: dict, *extra: str) -> int:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return cli.main(["train", str(path), *extra])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("arm, extra", [
    ("neo", {}),
    ("kd", {"finetuning_type": "full"}),
    ("lora", {"teacher_model_name_or_path": None}),
    ("sft", {"finetuning_type": "full", "teacher_model_name_or_path": None}),
])
def test_four_arms_end_to_end(tmp_path, base_overrides, student_dir, arm, extra):
    overrides = {**base_overrides, **extra, "plot_loss": True}
    assert run_cli(tmp_path, overrides) == 0
    out = Path(overrides["output_dir"])
    results = json.loads((out / "train_results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == arm
    assert math.isfinite(results["final_loss"])
    assert results["peak_memory_bytes"] > 0 and results["train_tokens"] > 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(r) for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (rows[0]["kd_loss"] is None) == (arm in ("lora", "sft"))
    assert (out / "training_loss.png").stat().st_size > 1000
    assert (out / "tokenizer_config.json").is_file()

    from transformers import AutoModelForCausalLM

    if arm in ("neo", "lora"):
        from peft import PeftModel

        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
        assert results["trainable_params"] < results["total_params"] / 2
        base = AutoModelForCausalLM.from_pretrained(student_dir)
        model = PeftModel.from_pretrained(base, out)
    else:
        assert (out / "model.safetensors").is_file()
        assert results["trainable_params"] == results["total_params"]
        model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_kd_loss_falls_on_a_fixed_batch(tmp_path, base_overrides):
    # The tiny random student's logits are near zero; adapting lm_head lets it sharpen them quickly.
    overrides = {**base_overrides, "max_samples": 4, "max_steps": 20, "learning_rate": 1e-2,
                 "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                 "lora_target": "q_proj,v_proj,o_proj,down_proj,lm_head"}
    assert run_cli(tmp_path, overrides) == 0
    rows = read_metrics(Path(overrides["output_dir"]))
    assert rows[-1]["kd_loss"] < 0.8 * rows[0]["kd_loss"]
    assert rows[-1]["ce_loss"] < rows[0]["ce_loss"]


def _step_grads(cfg, micro: list[dict], loaded, teacher) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from llmneo.models import adapters

    torch.manual_seed(0)
    model = adapters.apply(loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student, cfg)
    with torch.no_grad():  # non-zero B so LoRA A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    loop.accumulate(Accelerator(cpu=True), model, teacher, micro,
                    LossSpec.from_config(cfg, loaded.vocab_size, has_teacher=teacher is not None))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_matches_one_big_batch(base_overrides):
    cfg = schema.load(overrides=base_overrides)
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    teacher = LiveTeacher(loaded.teacher, loaded.vocab_size)
    examples = dataset.build(cfg, loaded.tokenizer).train[:8]
    pad = loaded.tokenizer.pad_token_id
    one = _step_grads(cfg, [dataset.collate(examples, pad)], loaded, teacher)
    four = _step_grads(cfg, [dataset.collate(examples[i:i + 2], pad) for i in range(0, 8, 2)], loaded, teacher)
    assert one.keys() == four.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    # and not trivially: a per-micro-batch mean (the common bug) would differ
    lengths = [int((dataset.collate(examples[i:i + 2], pad)["labels"][:, 1:] != -100).sum()) for i in range(0, 8, 2)]
    assert len(set(lengths)) > 1, "test data must have unequal response lengths per micro-batch"


@pytest.mark.slow
def test_accumulation_end_to_end_same_first_step(tmp_path, base_overrides):
    """Batch 8 × 1 and batch 2 × accumulation 4 see the same rows in step 1: same loss and grad norm."""
    a = {**base_overrides, "per_device_train_batch_size": 8, "max_steps": 1, "output_dir": str(tmp_path / "a")}
    b = {**a, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "output_dir": str(tmp_path / "b")}
    assert run_cli(tmp_path, a) == 0 and run_cli(tmp_path, b) == 0
    ra, rb = read_metrics(Path(a["output_dir"]))[0], read_metrics(Path(b["output_dir"]))[0]
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-4), key


def test_response_positions_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, -100, -100]])
    positions, targets = response_positions(labels)
    # logits at t predict token t+1: positions 1,2 (→7,8) and 0,1 (→5,6)
    assert positions.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert targets.tolist() == [7, 8, 5, 6]


def rows_count(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def test_padded_vocab_teacher_scores_real_tokens_only(base_overrides, tokenizer):
    cfg = schema.load(overrides=base_overrides)
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    rows = loaded.teacher.get_output_embeddings().weight.shape[0]
    assert rows > len(tokenizer) == loaded.vocab_size
    with torch.no_grad():  # give padding rows huge logits: they must not leak into the distribution
        loaded.teacher.get_output_embeddings().weight[len(tokenizer):] = 50.0
    teacher = LiveTeacher(loaded.teacher, loaded.vocab_size)
    batch = dataset.collate(dataset.build(cfg, loaded.tokenizer).train[:2], tokenizer.pad_token_id)
    positions, _ = response_positions(batch["labels"])
    rows = teacher.rows(batch, positions)
    signal = rows[0:len(rows)].logits
    assert signal.shape == (int(positions.sum()), len(tokenizer))
    full = loaded.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert full.shape[-1] == rows_count(loaded.teacher) > len(tokenizer)
    torch.testing.assert_close(signal, full[positions][:, :len(tokenizer)], rtol=1e-5, atol=1e-5)
    # Over the full padded width the padding rows would take most of the teacher's mass at some positions ...
    assert float(torch.softmax(full[positions].double(), -1)[:, len(tokenizer):].sum(-1).max()) > 0.5
    # ... so the loss must equal KL(p_T || p_S) and CE computed by hand over the real vocabulary only.
    loss_spec = LossSpec(loaded.vocab_size, 0.5, KDSettings.from_config(cfg), cfg.kd_chunk_size)
    _, ce, kd, n = loop.micro_batch_sums(loaded.student, teacher, batch, loss_spec)
    student = loaded.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_q = torch.log_softmax(student[positions].double(), -1)  # (N, V): the student has no padding rows
    log_p = torch.log_softmax(full[positions][:, :len(tokenizer)].double(), -1)
    _, targets = response_positions(batch["labels"])
    assert n == int(positions.sum()) == len(targets)
    assert float(kd) == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-4)
    assert float(ce) == pytest.approx(float(-log_q[torch.arange(n), targets].sum()), rel=1e-5)


def test_different_tokenizer_fails_cleanly_with_kd_cross_tokenizer_false(tmp_path, base_overrides, alien_teacher_dir,
                                                                         capsys):
    overrides = {**base_overrides, "teacher_model_name_or_path": str(alien_teacher_dir), "kd_cross_tokenizer": "false"}
    assert run_cli(tmp_path, overrides) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tokenizers differ" in err
    assert str(alien_teacher_dir) in err and base_overrides["model_name_or_path"] in err
    assert not Path(overrides["output_dir"], "train_results.json").exists()


@pytest.mark.parametrize("change, needle", [
    ({"lora_rnak": 8}, "did you mean 'lora_rank'"),
    ({"learning_rate": "abc"}, "learning_rate' expects float"),
    ({"model_name_or_path": "/no/such/model"}, "does not exist"),
    ({"model_name_or_path": None}, "model_name_or_path is not set"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, base_overrides, capsys, change, needle):
    overrides = {**base_overrides, **change}
    assert run_cli(tmp_path, overrides) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmneo: error")]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in err


def test_non_empty_output_dir_refused(tmp_path, base_overrides, capsys):
    out = Path(base_overrides["output_dir"])
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    assert run_cli(tmp_path, base_overrides) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert run_cli(tmp_path, {**base_overrides, "overwrite_output_dir": True}) == 0
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_kd_ratio_without_teacher_trains_ce_only(tmp_path, base_overrides, capsys):
    """Behaviour: kd_ratio > 0 with no teacher warns and trains on CE alone (weight 1, not 1 - kd_ratio)."""
    overrides = {**base_overrides, "teacher_model_name_or_path": None, "kd_ratio": 0.5}
    assert run_cli(tmp_path, overrides) == 0
    assert "no teacher_model_name_or_path" in capsys.readouterr().err
    row = read_metrics(Path(overrides["output_dir"]))[0]
    assert row["kd_loss"] is None and row["loss"] == pytest.approx(row["ce_loss"])


@pytest.mark.slow
def test_official_llmneo_yaml_runs(tmp_path, student_dir, teacher_dir, monkeypatch):
    """The official LLM-Neo example, unchanged apart from model/dataset/output paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    from helpers import ALPACA_ROWS, write_jsonl

    write_jsonl(tmp_path / "data" / "neo_demo.jsonl", ALPACA_ROWS)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(
        {"neo_demo": {"file_name": "neo_demo.jsonl", "formatting": "alpaca"}}))
    official = Path(__file__).with_name("official_llmneo.yaml").read_text()
    official = (official.replace("STUDENT", str(student_dir)).replace("TEACHER", str(teacher_dir))
                .replace("DATASET", "neo_demo").replace("OUTPUT", str(tmp_path / "neo_out")))
    (tmp_path / "official.yaml").write_text(official)
    assert cli.main(["train", "official.yaml"]) == 0
    results = json.loads((tmp_path / "neo_out" / "train_results.json").read_text())
    assert results["method"] == "neo" and math.isfinite(results["final_loss"])
    assert (tmp_path / "neo_out" / "training_loss.png").is_file()
    adapter_cfg = json.loads((tmp_path / "neo_out" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 128 and adapter_cfg["lora_alpha"] == 256
    assert "lm_head" not in str(adapter_cfg["target_modules"])


@pytest.mark.slow
def test_epoch_based_length_counts_accumulation(tmp_path, base_overrides, tokenizer):
    """No max_steps: the run length comes from num_train_epochs, in optimizer steps of `accum` micro-batches.

    8 rows in batches of 3 make 3 micro-batches per epoch (not a multiple of the accumulation of 2): each
    epoch is a step of 2 and a short step of 1 (as in HF Trainer), 2 steps per epoch, so 2.5 epochs are
    ceil(2.5 × 2) = 5 optimizer steps, which consume 8 micro-batches, 8 / 3 epochs. Ignoring the
    accumulation would give 8 steps.
    """
    overrides = {**base_overrides, "max_steps": -1, "num_train_epochs": 2.5, "per_device_train_batch_size": 3,
                 "gradient_accumulation_steps": 2, "logging_steps": 1, "save_steps": 3}
    cfg = schema.load(overrides=overrides)
    rows = len(dataset.build(cfg, tokenizer).train)
    assert rows == 8
    batches = math.ceil(rows / 3)
    steps = math.ceil(2.5 * math.ceil(batches / 2))
    assert (batches, steps) == (3, 5)
    assert run_cli(tmp_path, overrides) == 0
    out = Path(overrides["output_dir"])
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == steps
    assert results["epoch"] == pytest.approx(8 / batches)
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in metrics] == [round(m / batches, 4) for m in (2, 3, 5, 6, 8)]  # 1.0 after one epoch
    assert metrics[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends with the run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
