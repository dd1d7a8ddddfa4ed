"""Issue #5's list of bad inputs, one test each: one clear line, exit code 2, nothing that looks finished.

Some cases are also covered in depth next to their module (test_config, test_data, test_cache,
test_resume); here each goes through the CLI exactly as a user would hit it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ALPACA_ROWS, write_jsonl

from llmneo import cli
from llmneo.demo import tiny


def _run(tmp_path: Path, capsys, values: dict | None = None, raw: str | None = None, command: str = "train",
         extra: tuple = ()) -> str:
    """Run the CLI; assert exit 2 with exactly one error line and no traceback; return that line."""
    path = tmp_path / "bad.yaml"
    if raw is not None:
        path.write_text(raw)
    else:
        path.write_text(yaml.safe_dump(values))
    capsys.readouterr()
    assert cli.main([command, str(path), *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmneo: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if values and values.get("output_dir"):
        assert not Path(values["output_dir"], "train_results.json").exists()
    return lines[0]


def test_01_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_02_yaml_syntax_error(tmp_path, capsys):
    assert "YAML syntax error" in _run(tmp_path, capsys, raw="model_name_or_path: [a, b\nkd_ratio: 0.5\n")


def test_03_unknown_key_with_suggestion(tmp_path, capsys, base_overrides):
    assert "did you mean 'kd_ratio'" in _run(tmp_path, capsys, {**base_overrides, "kd_ration": 0.5})


def test_04_wrong_type(tmp_path, capsys, base_overrides):
    assert "learning_rate' expects float" in _run(tmp_path, capsys, base_overrides, extra=("learning_rate=abc",))


@pytest.mark.parametrize("key, value, needle", [("kd_ratio", 1.5, "kd_ratio must be in [0, 1]"),
                                                ("lora_rank", 0, "lora_rank must be > 0"),
                                                ("cutoff_len", -4, "cutoff_len must be > 0")])
def test_05_out_of_range(tmp_path, capsys, base_overrides, key, value, needle):
    assert needle in _run(tmp_path, capsys, {**base_overrides, key: value})


def test_06_missing_model_path(tmp_path, capsys, base_overrides):
    line = _run(tmp_path, capsys, {**base_overrides, "model_name_or_path": str(tmp_path / "missing-model")})
    assert "does not exist" in line and "missing-model" in line


def test_07_not_a_causal_lm(tmp_path, capsys, base_overrides, tokenizer):
    from transformers import T5Config, T5Model

    t5 = T5Model(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    tiny.save_pair(t5, tokenizer, tmp_path / "t5")
    line = _run(tmp_path, capsys, {**base_overrides, "model_name_or_path": str(tmp_path / "t5")})
    assert "not a causal language model" in line


def test_08_different_tokenizers(tmp_path, capsys, base_overrides, alien_teacher_dir):
    line = _run(tmp_path, capsys, {**base_overrides, "teacher_model_name_or_path": str(alien_teacher_dir),
                                   "kd_cross_tokenizer": False})
    assert "tokenizers differ" in line and "kd_cross_tokenizer" in line


def test_09_missing_dataset_file(tmp_path, capsys, base_overrides):
    line = _run(tmp_path, capsys, {**base_overrides, "dataset": str(tmp_path / "nothing.jsonl")})
    assert "nothing.jsonl" in line


def test_10_unknown_dataset_format(tmp_path, capsys, base_overrides):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    line = _run(tmp_path, capsys, {**base_overrides, "dataset": str(odd)})
    assert "odd.jsonl" in line and ("format" in line or "columns" in line)


def test_11_row_missing_its_response(tmp_path, capsys, base_overrides):
    rows = ALPACA_ROWS[:2] + [{"instruction": "no answer here"}]
    bad = write_jsonl(tmp_path / "rows.jsonl", rows)
    line = _run(tmp_path, capsys, {**base_overrides, "dataset": str(bad)})
    assert "rows.jsonl" in line and "row 3" in line and "output" in line


def test_12_empty_dataset(tmp_path, capsys, base_overrides):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _run(tmp_path, capsys, {**base_overrides, "dataset": str(empty)}).lower()


def test_13_all_labels_masked(tmp_path, capsys, base_overrides):
    assert "no trainable tokens" in _run(tmp_path, capsys, {**base_overrides, "cutoff_len": 3})


@pytest.mark.slow
def test_14_stale_teacher_cache(tmp_path, capsys, base_overrides):
    cache_dir = tmp_path / "cache"
    values = {**base_overrides, "teacher_cache": str(cache_dir), "teacher_topk": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    assert cli.main(["cache", str(tmp_path / "c.yaml")]) == 0
    other = write_jsonl(tmp_path / "other.jsonl", ALPACA_ROWS[::-1])
    line = _run(tmp_path, capsys, {**values, "teacher_model_name_or_path": None, "dataset": str(other)})
    assert "dataset rows differs" in line


def test_15_non_empty_output_dir(tmp_path, capsys, base_overrides):
    Path(base_overrides["output_dir"]).mkdir(parents=True)
    (Path(base_overrides["output_dir"]) / "notes.txt").write_text("mine")
    assert "overwrite_output_dir" in _run(tmp_path, capsys, base_overrides)
    assert (Path(base_overrides["output_dir"]) / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_16_corrupt_or_incompatible_checkpoint(tmp_path, capsys, base_overrides):
    out = Path(base_overrides["output_dir"])
    values = {**base_overrides, "max_steps": 1}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(values))
    assert cli.main(["train", str(tmp_path / "ok.yaml")]) == 0
    (out / "train_results.json").unlink()
    assert "incompatible" in _run(tmp_path, capsys, {**values, "resume_from_checkpoint": "auto", "lora_rank": 2})
    (out / "checkpoint-1" / "trainer_state.json").write_text("{not json")
    assert "corrupt" in _run(tmp_path, capsys, {**values, "resume_from_checkpoint": str(out / "checkpoint-1")})


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_17_read_only_output_dir(tmp_path, capsys, base_overrides):
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); read-only output_dir not exercised")
    try:
        line = _run(tmp_path, capsys, {**base_overrides, "output_dir": str(mount / "run")})
        assert "cannot write" in line and "Read-only" in line
    finally:
        _umount(mount)


@pytest.mark.slow
def test_17_disk_full_during_training(tmp_path, capsys, base_overrides):
    mount = tmp_path / "full"
    if not _mount_tmpfs(mount, "size=48k"):
        pytest.skip("cannot mount a tmpfs here (needs root); disk-full output_dir not exercised")
    try:
        out = mount / "run"
        line = _run(tmp_path, capsys, {**base_overrides, "output_dir": str(out), "save_steps": 1, "max_steps": 20})
        assert "cannot write" in line and "No space left on device" in line
        assert not list(out.glob(".tmp-checkpoint-*")), "a half-written checkpoint was left behind"
        for checkpoint in out.glob("checkpoint-*"):  # whatever was committed is complete
            assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] >= 1
    finally:
        _umount(mount)


@pytest.mark.slow
def test_18_kd_ratio_without_teacher(tmp_path, capsys, base_overrides):
    """Behaviour: a warning, then CE-only training (the LoRA/SFT arm), not an error."""
    values = {**base_overrides, "teacher_model_name_or_path": None, "kd_ratio": 0.7}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(values))
    assert cli.main(["train", str(tmp_path / "t.yaml")]) == 0
    err = capsys.readouterr().err
    assert "no teacher_model_name_or_path" in err and "kd_ratio=0.7 is ignored" in err
    results = json.loads((Path(values["output_dir"]) / "train_results.json").read_text())
    assert results["method"] == "lora" and results["kd_ratio"] == 0.0


def test_output_dir_holding_an_input_is_refused(tmp_path, capsys, base_overrides, student_dir):
    before = sorted(p.name for p in Path(student_dir).iterdir())
    line = _run(tmp_path, capsys, {**base_overrides, "output_dir": str(student_dir), "overwrite_output_dir": True})
    assert "holds an input of this run (model_name_or_path" in line
    assert sorted(p.name for p in Path(student_dir).iterdir()) == before


def test_resume_without_output_dir(tmp_path, capsys, base_overrides):
    values = {**base_overrides, "output_dir": None, "resume_from_checkpoint": str(tmp_path)}
    assert "output_dir is not set" in _run(tmp_path, capsys, values)


@pytest.mark.parametrize("override, needle", [("lora_rank=1.5e0", "lora_rank' expects int"),
                                              ("num_train_epochs=inf", "num_train_epochs' expects float"),
                                              ("max_steps=1e999", "max_steps' expects int")])
def test_numbers_that_are_not_numbers(tmp_path, capsys, base_overrides, override, needle):
    assert needle in _run(tmp_path, capsys, base_overrides, extra=(override,))
