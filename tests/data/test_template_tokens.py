"""A built-in template on a tokenizer that lacks its special tokens: refused in one line, or (full fine-tuning
without a teacher) the tokens added as single tokens with trainable rows; export stops on the end of turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmneo import cli
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.data import templates
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import loading


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory) -> Path:
    """A student whose tokenizer has the ChatML tokens (<|im_start|>, <|im_end|>) but no chat template."""
    tokenizer = tiny.build_tokenizer(chat_template=None)
    return tiny.save_pair(tiny.build_model(tokenizer, seed=1), tokenizer, tmp_path_factory.mktemp("plain"))


def _run(tmp_path, plain_student, alpaca_file, **values) -> dict:
    return {"model_name_or_path": str(plain_student), "dataset": str(alpaca_file), "output_dir": str(tmp_path / "out"),
            "lora_rank": 4, "per_device_train_batch_size": 4, "max_steps": 2, "cutoff_len": 64, **values}


def test_llama3_on_a_chatml_vocabulary_is_refused_for_lora_and_kd(tmp_path, plain_student, teacher_dir, alpaca_file,
                                                                    capsys):
    for values in ({"template": "llama3"},
                   {"template": "llama3", "finetuning_type": "full", "teacher_model_name_or_path": str(teacher_dir)}):
        config = write_yaml(tmp_path, "run.yaml", _run(tmp_path, plain_student, alpaca_file, **values))
        assert cli.main(["train", config]) == 2
        err = capsys.readouterr().err
        [line] = [line for line in err.splitlines() if "error" in line]
        assert line.startswith("llmneo: error: template 'llama3'") and "Traceback" not in err
        err = line
        assert "<|start_header_id|>, <|end_header_id|>, <|eot_id|>" in err and "chatml, qwen" in err
        assert "finetuning_type: full" in err
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_eval_and_cache_data_refuse_the_missing_tokens_too(tmp_path, alpaca_file):
    plain = tiny.build_tokenizer(chat_template=None)
    with pytest.raises(LlmneoError, match=r"template 'gemma' writes the special tokens <start_of_turn>, <end_of_turn>"):
        data.build(Config(dataset=str(alpaca_file), dataset_dir=str(tmp_path), template="gemma"), plain)
    # chatml's tokens it has: each marker is one token
    [example, *_] = data.build(Config(dataset=str(alpaca_file), dataset_dir=str(tmp_path), template="chatml"),
                               plain).train
    assert example["input_ids"].count(plain.convert_tokens_to_ids("<|im_end|>")) == 2


def test_added_tokens_get_the_mean_embedding_row():
    tokenizer = tiny.build_tokenizer(chat_template=None)
    model = tiny.build_model(tokenizer, seed=4)
    before = model.get_input_embeddings().weight.detach().clone()
    missing = templates.missing_tokens(tokenizer, "llama3")
    loading.add_template_tokens(tokenizer, model, "llama3", missing)
    assert templates.missing_tokens(tokenizer, "llama3") == []
    assert tokenizer.eos_token == "<|eot_id|>" and len(tokenizer) == before.shape[0] + 3
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(tokenizer) == model.get_output_embeddings().weight.shape[0]
    assert torch.equal(rows[:before.shape[0]], before)
    assert torch.allclose(rows[-3:], before.mean(dim=0).expand(3, -1))


@pytest.mark.slow
def test_full_finetuning_adds_the_tokens_and_stops_on_eot(tmp_path, plain_student, alpaca_file, capsys):
    config = write_yaml(tmp_path, "run.yaml", _run(tmp_path, plain_student, alpaca_file, template="llama3",
                                                   finetuning_type="full", learning_rate=1e-3))
    assert cli.main(["train", config]) == 0
    captured = capsys.readouterr()
    assert "added <|start_header_id|>, <|end_header_id|>, <|eot_id|> to the tokenizer" in captured.err
    assert "| built-in template llama3" in captured.out
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer("Hi.<|eot_id|>", add_special_tokens=False)["input_ids"][-1] == eot
    assert tokenizer.eos_token_id == eot
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert eot in (stops if isinstance(stops, list) else [stops])
    # the run's data ends each reply in that one token
    rendered = data.build(Config(dataset=str(alpaca_file), dataset_dir=str(tmp_path), template="llama3"), tokenizer)
    assert all(example["labels"][-1] == eot for example in rendered.train)


@pytest.mark.slow
def test_export_ships_a_template_that_stops_at_its_end_of_turn(tmp_path, plain_student, alpaca_file, capsys):
    config = write_yaml(tmp_path, "run.yaml", _run(tmp_path, plain_student, alpaca_file, template="chatml"))
    assert cli.main(["train", config]) == 0
    assert "| built-in template chatml" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert cli.main(["export", f"adapter_name_or_path={tmp_path / 'out'}", f"export_dir={merged}"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == templates.BUILTIN_TEMPLATES["chatml"]
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    capsys.readouterr()
    # the same adapter exported under a template whose tokens the tokenizer lacks: refused, nothing written
    assert cli.main(["export", f"adapter_name_or_path={tmp_path / 'out'}", f"export_dir={tmp_path / 'x'}",
                     "template=llama3"]) == 2
    assert "<|eot_id|>" in capsys.readouterr().err and not (tmp_path / "x" / "model.safetensors").exists()


def test_an_unset_template_is_named(tmp_path, plain_student, student_dir, alpaca_file, capsys):
    values = _run(tmp_path, plain_student, alpaca_file, max_steps=1)
    assert cli.main(["train", write_yaml(tmp_path, "a.yaml", values)]) == 0
    captured = capsys.readouterr()
    assert "| built-in template default (template unset)" in captured.out
    assert captured.err.count("template is unset and the tokenizer has no chat template") == 1
    own = {**values, "model_name_or_path": str(student_dir), "output_dir": str(tmp_path / "own")}
    assert cli.main(["train", write_yaml(tmp_path, "b.yaml", own)]) == 0
    captured = capsys.readouterr()
    assert "| the tokenizer's chat template" in captured.out and "template is unset" not in captured.err
