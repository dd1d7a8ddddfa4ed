"""Sanity warnings, one line each and once per run (under torchrun too): a teacher smaller than the student, the
student as its own teacher, cutoff_len past max_position_embeddings, replies cut by cutoff_len."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import write_yaml

from llmneo import cli
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.demo import tiny

IGNORE = -100
BIN = Path(sys.executable).parent


def _train(tmp_path, capsys, values: dict, name: str = "run") -> str:
    """stderr of one `llmneo train` of `values`, which must succeed."""
    capsys.readouterr()
    assert cli.main(["train", write_yaml(tmp_path, f"{name}.yaml", {"max_steps": 1, **values})]) == 0
    return capsys.readouterr().err


def test_a_teacher_smaller_than_the_student_warns(tmp_path, capsys, base_overrides, student_dir, teacher_dir):
    swapped = {**base_overrides, "model_name_or_path": str(teacher_dir), "teacher_model_name_or_path": str(student_dir)}
    err = _train(tmp_path, capsys, swapped)
    assert err.count(f"llmneo: warning: teacher '{student_dir}' has ") == 1 and "fewer than the student's" in err
    assert "fewer than" not in _train(tmp_path, capsys, {**base_overrides, "output_dir": str(tmp_path / "b")}, "b")


def test_the_student_as_its_own_teacher_warns(tmp_path, capsys, base_overrides, student_dir):
    itself = {**base_overrides, "teacher_model_name_or_path": f"{student_dir}/"}
    err = _train(tmp_path, capsys, itself)
    assert err.count("llmneo: warning: the teacher is the student itself") == 1
    assert "fewer than" not in err


def test_cutoff_len_above_max_position_embeddings_warns(tmp_path, capsys, base_overrides, tokenizer):
    short = tiny.save_pair(tiny.build_model(tokenizer, seed=5, max_position_embeddings=48), tokenizer, tmp_path / "s")
    err = _train(tmp_path, capsys, {**base_overrides, "model_name_or_path": str(short), "cutoff_len": 64})
    assert err.count("llmneo: warning: cutoff_len=64 is above the student's max_position_embeddings=48") == 1
    assert "teacher's max_position_embeddings" not in err  # the teacher has 512
    err = _train(tmp_path, capsys, {**base_overrides, "output_dir": str(tmp_path / "b"), "cutoff_len": 600}, "b")
    assert "above the student's max_position_embeddings=512" in err
    assert "above the teacher's max_position_embeddings=512" in err


def _lost(examples: list[dict], cutoff: int) -> tuple[int, int]:
    """(examples whose reply tokens reach past `cutoff` but keep one before it, reply tokens past it)."""
    kept = [e["labels"] for e in examples if any(label != IGNORE for label in e["labels"][1:cutoff])]
    beyond = [sum(label != IGNORE for label in labels[cutoff:]) for labels in kept]
    return sum(n > 0 for n in beyond), sum(beyond)


def test_replies_cut_by_cutoff_len_are_counted_once(tmp_path, capsys, base_overrides, alpaca_file, tokenizer):
    cutoff = 24
    whole = data.build(Config(dataset=str(alpaca_file), val_size=3, seed=0), tokenizer)
    (cut, lost), (held_cut, held_lost) = _lost(whole.train, cutoff), _lost(whole.eval, cutoff)
    assert cut and held_cut, "the test needs replies cut in both splits"
    err = _train(tmp_path, capsys, {**base_overrides, "cutoff_len": cutoff, "val_size": 3})
    line = (f"llmneo: warning: cutoff_len={cutoff} cut the replies of {cut} of {len(whole.train)} training examples "
            f"({lost} response tokens lost) and {held_cut} of {len(whole.eval)} held-out examples ({held_lost} response "
            f"tokens lost); raise cutoff_len to keep them")
    assert err.count("cut the replies") == 1 and line in err.splitlines()
    assert "cut the replies" not in _train(tmp_path, capsys, {**base_overrides, "output_dir": str(tmp_path / "b")}, "b")


@pytest.mark.slow
def test_under_torchrun_each_warning_prints_once(tmp_path, student_dir, teacher_dir, alpaca_file):
    config = write_yaml(tmp_path, "ddp.yaml", {
        "model_name_or_path": str(teacher_dir), "teacher_model_name_or_path": str(student_dir),  # a smaller teacher
        "dataset": str(alpaca_file), "output_dir": str(tmp_path / "out"), "lora_rank": 4, "cutoff_len": 24,
        "per_device_train_batch_size": 2, "max_steps": 1, "template": "chatml"})  # ignored: a warning
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "llmneo", "train",
                           config], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    warned = Counter(line for line in done.stderr.splitlines() if line.startswith("llmneo: warning:"))
    assert any("fewer than the student's" in line for line in warned), done.stderr[-2000:]
    assert any("cut the replies" in line for line in warned) and any("own chat template" in line for line in warned)
    assert set(warned.values()) == {1}, warned
    assert done.stdout.count("llmneo: neo |") == 1 and done.stdout.count("llmneo: trained") == 1
