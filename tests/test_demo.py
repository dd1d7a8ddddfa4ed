"""The embedded demo: a shortened run writes its report; the teacher is cached; the verdict is honest."""

from __future__ import annotations

import json

import pytest

from llmneo import cli, demo
from llmneo.errors import LlmneoError

SHORT = ["max_steps=3", "teacher_steps=4", "teacher_rows=64", "train_rows=24", "heldout_rows=16",
         "hidden_size=32", "towns=6"]


@pytest.mark.slow
def test_short_demo_writes_report_and_reuses_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", f"output_dir={out}", *SHORT]) == 0
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # header + teacher, pruned student, four arms
    for name in ("teacher", "pruned student", "| sft", "| lora", "| kd", "| neo"):
        assert name in report
    assert "**Verdict.**" in report and "Neo" in report
    assert (out / "curves.png").stat().st_size > 5000
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["neo"]["trainable_params"] < rows["kd"]["trainable_params"]
    assert rows["neo"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert all(r["perplexity"] > 1.0 for r in results["rows"])
    assert "reusing" not in capsys.readouterr().out
    assert cli.main(["demo", f"output_dir={out}", *SHORT]) == 0
    assert "reusing the cached teacher" in capsys.readouterr().out


def test_demo_settings_are_validated(capsys):
    assert cli.main(["demo", "max_stepz=3"]) == 2
    assert "unknown demo setting" in capsys.readouterr().err
    with pytest.raises(LlmneoError, match="student_layers must be smaller"):
        demo.parse(None, ["student_layers=4", "teacher_layers=4"])
    with pytest.raises(LlmneoError, match="kd_ratio must be in"):
        demo.parse(None, ["kd_ratio=3"])
    settings, shared = demo.parse(None, ["max_steps=7", "kd_loss=jsd"])
    assert settings.max_steps == 7 and shared == {"kd_loss": "jsd"}


def _rows(neo_ppl, neo_kl, lora_ppl, lora_kl, kd_kl):
    base = {"model": "pruned", "perplexity": 3.0, "kl_to_teacher": 1.0}
    return [{"model": "teacher"}, base,
            {"model": "lora", "perplexity": lora_ppl, "kl_to_teacher": lora_kl, "trainable_params": 10},
            {"model": "kd", "perplexity": 1.5, "kl_to_teacher": kd_kl, "trainable_params": 100},
            {"model": "neo", "perplexity": neo_ppl, "kl_to_teacher": neo_kl, "trainable_params": 10}]


def test_verdict_says_what_happened_either_way():
    good = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1))
    assert "Neo beats LoRA" in good and "is closer to the teacher" in good and "recovers 89%" in good
    bad = demo.verdict(_rows(1.6, 0.4, 1.5, 0.3, 0.1))
    assert "does not beat LoRA" in bad and "is not closer to" in bad and "recovers 67%" in bad
    none = demo.verdict(_rows(1.6, 0.4, 1.5, 0.3, 1.2))
    assert "no KD gain to compare with" in none
