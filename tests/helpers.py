"""Helpers the tests share (data rows, config files, metrics, resume and run comparisons).

They live here, not in conftest.py, because tests/vllm has a conftest.py of its own: `from conftest import ...`
would find whichever conftest pytest imported last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

ALPACA_ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "What is two plus two?", "input": "", "output": "Two plus two is four."},
    {"instruction": "Name a colour.", "input": "Pick a warm one.", "output": "Red."},
    {"instruction": "Count to three.", "input": "", "output": "1 2 3"},
    {"instruction": "Describe a fox.", "input": "", "output": "The quick brown fox jumps."},
    {"instruction": "What does LoRA train?", "input": "", "output": "A small branch BA."},
    {"instruction": "Who teaches?", "input": "", "output": "The large teacher."},
    {"instruction": "Who learns?", "input": "", "output": "The small student."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(tmp_path: Path, name: str, values: dict) -> str:
    """A config file `name` in `tmp_path` holding `values`; its path, for the CLI."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def resumed_from(tmp_path: Path, full: Path, checkpoint: str, values: dict, name: str = "cut") -> Path:
    """An interrupted copy of run `full` that kept only `checkpoint`, resumed to the end through the CLI with
    `values` (resume_from_checkpoint: auto); its output_dir, tmp_path/name."""
    from llmneo import cli

    cut = tmp_path / name
    cut.mkdir()
    shutil.copytree(full / checkpoint, cut / checkpoint)
    resumed = {**values, "output_dir": str(cut), "resume_from_checkpoint": "auto"}
    assert cli.main(["train", write_yaml(tmp_path, f"{name}.yaml", resumed)]) == 0
    return cut


def assert_same_training(a: Path, b: Path, tol: float) -> None:
    """Two runs logged the same steps (and kinds of step) with losses and grad norms within `tol`, and saved
    adapters equal within `tol`."""
    from safetensors.torch import load_file

    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b):
        assert ra["step"] == rb["step"] and ra.get("on_policy") == rb.get("on_policy")
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            if ra[key] is None or rb[key] is None:
                assert ra[key] is rb[key] is None, (ra["step"], key)
            else:
                assert rb[key] == pytest.approx(ra[key], abs=tol, rel=0), (ra["step"], key)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= tol, name


def cache_rows(directory: Path) -> tuple[list[int], dict]:
    """A teacher cache's example offsets and every row, decoded whatever the layout: ids, logprobs, tail."""
    from llmneo.cache import shards

    index, rows = shards.all_rows(directory)
    return index["offsets"], {"ids": rows.ids, "logprobs": rows.logprobs, "tail": rows.tail}


def adapted_pair(cfg):
    """(loading.Loaded, the student with LoRA adapters whose B matrices are non-zero, so every LoRA matrix gets a
    gradient) for a config with a teacher."""
    from llmneo.models import adapters, loading

    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    torch.manual_seed(0)
    model = adapters.apply(loaded.student, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return loaded, model
