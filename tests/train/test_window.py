"""The logging window (train.window): its sums, its metrics.jsonl row, and its round trip through a checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from llmneo.train.window import Window

LOGGED = {"learning_rate": 1e-4, "grad_norm": 1.0, "elapsed": 2.0}


def _two_teachers_across_tokenizers() -> Window:
    window = Window()
    window.add(10.0, 4.0, 5, 20, on_policy=False, per_teacher=[[3.0, 4.0], [1.0, 1.0]], aligned=[4.0, 5.0])
    window.add(0.0, 6.0, 3, 12, on_policy=True, per_teacher=[[6.0, 3.0], [0.0, 0.0]], aligned=[2.0, 3.0])
    return window


def test_a_window_sums_its_steps_and_rows_them_in_the_metrics_order():
    window = _two_teachers_across_tokenizers()
    assert (window.ce, window.kd, window.tokens, window.seen) == (10.0, 4.0, 5, 32)
    assert (window.op_kd, window.op_tokens, window.op_steps, window.steps) == (6.0, 3, 1, 2)
    assert window.per_teacher == [[9.0, 7], [1.0, 1]] and window.aligned == [6, 8]
    row = window.row(4, 1.23456, **LOGGED, kd_ratio=0.5, generates=True)
    assert list(row) == ["step", "epoch", "loss", "ce_loss", "kd_loss", "learning_rate", "grad_norm",
                         "tokens_per_second", "on_policy", "on_policy_steps", "kd_aligned_fraction",
                         "kd_loss_per_teacher"]
    assert row["epoch"] == 1.2346 and row["tokens_per_second"] == 16.0
    assert row["loss"] == pytest.approx((0.5 * 10 + 0.5 * 4 + 6) / 8) and row["kd_loss"] == pytest.approx(10 / 8)
    assert row["kd_aligned_fraction"] == 6 / 8 and row["kd_loss_per_teacher"] == [9 / 7, 1.0]
    lone = Window()
    lone.add(8.0, 0.0, 4, 10, on_policy=False)
    assert lone.row(1, 0.5, **LOGGED, kd_ratio=None) == {  # no teacher signal: CE alone, kd_loss None
        "step": 1, "epoch": 0.5, "loss": 2.0, "ce_loss": 2.0, "kd_loss": None, "learning_rate": 1e-4,
        "grad_norm": 1.0, "tokens_per_second": 5.0}


def test_a_checkpoint_restores_the_window_exactly_and_reads_the_old_dict():
    window = _two_teachers_across_tokenizers()
    window.add(0.1 + 0.2, 1 / 3, 7, 9, on_policy=False, per_teacher=[[1e-17, 1.0], [2 / 3, 2.0]], aligned=[1.0, 1.0])
    saved = json.loads(json.dumps(asdict(window)))  # as trainer_state.json holds it
    assert Window.from_state(saved) == window
    assert Window.from_state(json.loads(json.dumps(asdict(Window())))) == Window()
    # trainer_state.json before window.Window: a dict, `teachers` for the per-teacher sums, keys only when used
    old = {"ce": window.ce, "kd": window.kd, "tokens": window.tokens, "seen": window.seen, "op_kd": window.op_kd,
           "op_tokens": window.op_tokens, "op_steps": window.op_steps, "steps": window.steps,
           "teachers": window.per_teacher, "aligned": window.aligned}
    assert Window.from_state(old) == window
    assert Window.from_state({"ce": 1.5, "kd": 0.5, "tokens": 3, "seen": 4, "steps": 1}) == Window(
        ce=1.5, kd=0.5, tokens=3, seen=4, steps=1)  # older still: no on-policy sums
