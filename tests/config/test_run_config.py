"""A run's saved config (output_dir/llmneo_config.yaml), and eval/export of a trained dir defaulting to it;
`llmneo train key=value` without a YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.data import templates
from llmneo.demo import tiny
from llmneo.models import trained_run


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory) -> Path:
    """A student whose tokenizer has no chat template, so the `template` key decides the tokens."""
    tokenizer = tiny.build_tokenizer(chat_template=None)
    return tiny.save_pair(tiny.build_model(tokenizer, seed=5), tokenizer, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, plain_student, alpaca_file) -> Path:
    """Trained without a YAML (key=value only) with a non-default template and a short cutoff."""
    out = tmp_path_factory.mktemp("alpaca_run") / "out"
    args = {"model_name_or_path": plain_student, "dataset": alpaca_file, "output_dir": out, "template": "alpaca",
            "cutoff_len": 130, "lora_rank": 2, "max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 4,
            "learning_rate": 1e-2, "warmup_ratio": 0, "lora_target": "q_proj,v_proj,lm_head"}
    assert cli.main(["train", *(f"{k}={v}" for k, v in args.items())]) == 0
    return out


def _eval(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    assert cli.main(["eval", *args, f"output_dir={out}"]) == 0
    return json.loads((out / "eval_results.json").read_text())


@pytest.mark.slow
def test_train_without_a_yaml_saves_every_key(alpaca_run, plain_student, alpaca_file):
    saved = alpaca_run / schema.SAVED_CONFIG
    assert (alpaca_run / "train_results.json").is_file() and saved.is_file()
    values = yaml.safe_load(saved.read_text())
    assert list(values) == list(schema.FIELDS)  # every key, in the reference order
    assert (values["template"], values["cutoff_len"], values["lora_rank"]) == ("alpaca", 130, 2)
    assert values["model_name_or_path"] == str(plain_student) and values["dataset"] == str(alpaca_file)
    # It loads back as the same config (what `llmneo train llmneo_config.yaml` does first).
    again = schema.load(saved)
    assert schema.to_dict(again) == values
    assert again.template == "alpaca" and again.learning_rate == 1e-2


@pytest.mark.slow
def test_eval_of_a_trained_dir_uses_its_template_and_cutoff(tmp_path, alpaca_run, alpaca_file):
    data = f"dataset={alpaca_file}"
    inherited = _eval(tmp_path, "inherited", f"model_name_or_path={alpaca_run}", data)
    explicit = _eval(tmp_path, "explicit", f"model_name_or_path={alpaca_run}", data, "template=alpaca",
                     "cutoff_len=130")
    assert inherited["tokens"] == explicit["tokens"]
    assert inherited["perplexity"] == pytest.approx(explicit["perplexity"], rel=1e-6)
    # cutoff_len 130 cuts the replies of the longest alpaca renderings; the default 2048 keeps them.
    uncut = _eval(tmp_path, "uncut", f"model_name_or_path={alpaca_run}", data, "cutoff_len=2048")
    assert uncut["tokens"] > inherited["tokens"]
    # An explicit key still wins: the short default template fits every reply within the inherited cutoff.
    other = _eval(tmp_path, "other", f"model_name_or_path={alpaca_run}", data, "template=default")
    assert other["tokens"] == uncut["tokens"] > inherited["tokens"]
    assert other["perplexity"] != pytest.approx(uncut["perplexity"], rel=1e-6)  # same replies, other prompts
    # The same defaults through adapter_name_or_path, and from a checkpoint inside the run.
    by_adapter = _eval(tmp_path, "adapter", f"adapter_name_or_path={alpaca_run}", f"model_name_or_path="
                       f"{json.loads((alpaca_run / 'adapter_config.json').read_text())['base_model_name_or_path']}",
                       data)
    assert by_adapter["tokens"] == inherited["tokens"]
    assert by_adapter["perplexity"] == pytest.approx(inherited["perplexity"], rel=1e-6)
    checkpoint = _eval(tmp_path, "ckpt", f"model_name_or_path={alpaca_run / 'checkpoint-2'}", data)
    assert checkpoint["tokens"] == inherited["tokens"]
    assert checkpoint["perplexity"] == pytest.approx(inherited["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_trained_run_defaults_only_fill_unset_keys(alpaca_run):
    c = trained_run.load(None, [f"model_name_or_path={alpaca_run}"], "export")
    assert (c.template, c.cutoff_len, c.stage) == ("alpaca", 130, "sft")
    c = trained_run.load(None, [f"model_name_or_path={alpaca_run}", "cutoff_len=99"], "export")
    assert (c.template, c.cutoff_len) == ("alpaca", 99)
    assert schema.load(overrides=[f"model_name_or_path={alpaca_run}"]).template is None  # train: no defaults


@pytest.mark.slow
def test_export_carries_the_training_template(tmp_path, alpaca_run):
    from transformers import AutoTokenizer

    assert cli.main(["export", f"adapter_name_or_path={alpaca_run}", f"export_dir={tmp_path / 'merged'}"]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert exported.chat_template == templates.BUILTIN_TEMPLATES["alpaca"]
    text = exported.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                        add_generation_prompt=True)
    assert "### Instruction:" in text and "### Response:" in text


def test_commands_that_need_settings_say_so_in_one_line(capsys):
    for command in ("train", "cache", "sweep"):
        assert cli.main([command]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"llmneo: error: llmneo {command} needs a config") and "\n" not in err


@pytest.mark.slow
def test_cache_runs_without_a_yaml(tmp_path, teacher_dir, student_dir, alpaca_file):
    out = tmp_path / "cache"
    assert cli.main(["cache", f"teacher_model_name_or_path={teacher_dir}", f"model_name_or_path={student_dir}",
                     f"dataset={alpaca_file}", f"teacher_cache={out}", "cutoff_len=64", "teacher_topk=4"]) == 0
    assert any(out.iterdir())


def test_a_run_refused_during_set_up_leaves_output_dir_usable(tmp_path, student_dir, alpaca_file, capsys):
    """The saved config is written before the data is read; a run refused there (here a missing dataset) must
    not make the corrected command fail with "output_dir is not empty"."""
    out = tmp_path / "out"
    args = [f"model_name_or_path={student_dir}", f"output_dir={out}", "lora_rank=2", "max_steps=1",
            "per_device_train_batch_size=4", "cutoff_len=64"]
    assert cli.main(["train", *args, f"dataset={tmp_path / 'missing.jsonl'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["train", *args, f"dataset={alpaca_file}"]) == 0
    assert (out / "train_results.json").is_file()
    # A user's own file is still protected without the overwrite flag.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["train", *args, f"dataset={alpaca_file}", f"output_dir={other}"]) == 2
    assert "is not empty" in capsys.readouterr().err
