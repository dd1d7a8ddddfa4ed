"""No data is lost (issue 18, part 1): a refused or failed command changes nothing in its output folder, a new
run replaces an earlier one's results only once it has its own (and only files of the kinds it writes),
files keep a plain open()'s permissions, and the saved config runs from any directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from helpers import ALPACA_ROWS, read_metrics, write_jsonl, write_yaml

from llmneo import cli, run_dir
from llmneo.demo import tiny


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path → content digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(tmp_path: Path, values: dict, name: str = "run.yaml") -> int:
    return cli.main(["train", write_yaml(tmp_path, name, values)])


@pytest.fixture
def finished(tmp_path, base_overrides) -> tuple[Path, dict, dict]:
    """A finished run with two checkpoints: (output_dir, its values, a snapshot of the folder)."""
    values = {**base_overrides, "max_steps": 2, "save_steps": 1}
    assert train(tmp_path, values, "first.yaml") == 0
    out = Path(values["output_dir"])
    return out, values, snapshot(out)


@pytest.mark.slow
@pytest.mark.parametrize("change, needle", [
    ({"model_name_or_path": "/no/such/model"}, "does not exist"),
    ({"dataset": "/no/such/data.jsonl"}, "not found"),
    ({"teacher_model_name_or_path": "/no/such/teacher"}, "does not exist"),
    ({"learning_rate": 1e30, "warmup_ratio": 0.0, "max_grad_norm": 0.0, "max_steps": 5, "save_steps": 50},
     "non-finite"),  # fails in training, before its first checkpoint
])
def test_a_failing_run_keeps_the_earlier_results(tmp_path, finished, capsys, change, needle):
    out, values, before = finished
    capsys.readouterr()
    assert train(tmp_path, {**values, "overwrite_output_dir": True, **change}) == 2
    err = capsys.readouterr().err
    assert needle in err and "checkpoint-" not in err  # the earlier run's checkpoints are not this run's
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_new_run_replaces_the_earlier_one_when_it_has_its_own(tmp_path, base_overrides):
    values = {**base_overrides, "max_steps": 4, "save_steps": 1}
    assert train(tmp_path, values, "first.yaml") == 0
    out = Path(values["output_dir"])
    (out / "notes.txt").write_text("mine")
    # The earlier run's checkpoint-3 and -4 are newer than anything this run writes: they must neither survive
    # (a later resume_from_checkpoint=auto would take them for this run's) nor evict its checkpoint-2.
    again = {**values, "overwrite_output_dir": True, "max_steps": 2, "save_total_limit": 1, "learning_rate": 1e-3}
    assert train(tmp_path, again) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert yaml.safe_load((out / "llmneo_config.yaml").read_text())["learning_rate"] == 1e-3
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_lora_run_never_removes_a_model_it_does_not_write(tmp_path, base_overrides, teacher_dir):
    folder = tmp_path / "exported"
    shutil.copytree(teacher_dir, folder)  # e.g. an exported model, which is not this run's input
    model_files = {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}
    assert train(tmp_path, {**base_overrides, "output_dir": str(folder), "overwrite_output_dir": True}) == 0
    assert {name: (folder / name).read_bytes() for name in model_files} == model_files
    assert (folder / "adapter_model.safetensors").is_file()
    # The model there still loads as itself: transformers would apply the adapter files beside it on its own.
    import torch

    from llmneo.models import loading

    loaded = loading.load_model(str(folder), "model_name_or_path", torch.float32)
    original = loading.load_model(str(teacher_dir), "model_name_or_path", torch.float32)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.name_or_path == str(folder.resolve())


@pytest.mark.slow
def test_a_refused_resume_changes_nothing(tmp_path, finished, capsys):
    out, values, before = finished
    (out / "train_results.json").unlink()  # as if interrupted after checkpoint-2
    before = snapshot(out)
    resumed = {**values, "resume_from_checkpoint": "auto", "learning_rate": 1e-1}
    assert train(tmp_path, resumed) == 2
    assert "incompatible" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_refused_run_into_a_new_folder_creates_nothing(tmp_path, base_overrides, capsys):
    out = tmp_path / "new" / "run"
    assert train(tmp_path, {**base_overrides, "output_dir": str(out), "dataset": str(tmp_path / "none.jsonl")}) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_export_and_prune_keep_earlier_results_until_they_have_their_own(tmp_path, finished, student_dir,
                                                                         teacher_dir, capsys):
    adapter, _, _ = finished
    merged = tmp_path / "merged"
    assert cli.main(["export", f"adapter_name_or_path={adapter}", f"export_dir={merged}"]) == 0
    before = snapshot(merged)
    # an adapter that does not fit the base is refused after the export folder was checked: nothing changes
    assert cli.main(["export", f"adapter_name_or_path={adapter}", f"model_name_or_path={teacher_dir}",
                     f"export_dir={merged}", "overwrite_output_dir=true"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert snapshot(merged) == before

    pruned = tmp_path / "pruned"
    args = ["prune", f"model_name_or_path={student_dir}", f"output_dir={pruned}"]
    assert cli.main([*args, "keep_layers=0"]) == 0
    before = snapshot(pruned)
    assert cli.main([*args, "keep_layers=0,7", "overwrite_output_dir=true"]) == 2  # the model has 2 layers
    assert "out of range" in capsys.readouterr().err
    assert snapshot(pruned) == before
    (pruned / "notes.txt").write_text("mine")
    assert cli.main([*args, "keep_layers=1", "overwrite_output_dir=true"]) == 0
    assert json.loads((pruned / "prune_results.json").read_text())["kept_layers"] == [1]
    assert (pruned / "notes.txt").read_text() == "mine" and not list(pruned.glob(".tmp-*"))


def _modes(folder: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of `folder` and everything in it."""
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_get_a_plain_opens_permissions(tmp_path, base_overrides, student_dir, mask):
    plain = {("file", 0o666 & ~mask), ("dir", 0o777 & ~mask)}
    old = os.umask(mask)
    try:
        lora = {**base_overrides, "max_steps": 1, "output_dir": str(tmp_path / "lora")}
        full = {**lora, "finetuning_type": "full", "output_dir": str(tmp_path / "full")}
        assert train(tmp_path, lora, "lora.yaml") == 0 and train(tmp_path, full, "full.yaml") == 0
        assert cli.main(["export", f"adapter_name_or_path={tmp_path / 'lora'}",
                         f"export_dir={tmp_path / 'merged'}"]) == 0
        assert cli.main(["prune", f"model_name_or_path={student_dir}", "keep_layers=0",
                         f"output_dir={tmp_path / 'pruned'}"]) == 0
        assert cli.main(["cache", write_yaml(tmp_path, "cache.yaml", {
            **base_overrides, "teacher_cache": str(tmp_path / "cache"), "teacher_topk": 4})]) == 0
    finally:
        os.umask(old)
    for name in ("lora", "full", "merged", "pruned", "cache"):
        assert _modes(tmp_path / name) == plain, name
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "checkpoint-1" / "trainer_state.json").is_file()


def test_atomic_writes_keep_an_existing_files_mode(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}")
    path.chmod(0o640)
    run_dir.write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}


@pytest.mark.slow
def test_the_saved_config_runs_from_another_directory(tmp_path, monkeypatch, student_dir, teacher_dir, tokenizer):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(student_dir, here / "models" / "student")
    shutil.copytree(teacher_dir, here / "models" / "teacher")
    other = tiny.build_model(tokenizer, hidden_size=48, num_layers=2, seed=9)
    tiny.save_pair(other, tokenizer, here / "models" / "teacher2")
    (here / "data").mkdir()
    write_jsonl(here / "data" / "train.jsonl", ALPACA_ROWS)
    (here / "data" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "train.jsonl"}}))
    write_jsonl(here / "held_out.jsonl", ALPACA_ROWS[:2])
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    values = {"model_name_or_path": "models/student", "teacher_model_name_or_path": "models/teacher,models/teacher2",
              "teacher_weights": "0.5,0.5", "dataset": "mine", "eval_dataset": "held_out.jsonl",
              "output_dir": "out/run", "lora_rank": 4, "per_device_train_batch_size": 4, "max_steps": 1,
              "cutoff_len": 64}
    assert train(here, values) == 0
    saved = yaml.safe_load((here / "out" / "run" / "llmneo_config.yaml").read_text())
    assert saved["model_name_or_path"] == str(here / "models" / "student")
    assert saved["teacher_model_name_or_path"] == f"{here / 'models' / 'teacher'},{here / 'models' / 'teacher2'}"
    assert saved["dataset"] == "mine" and saved["dataset_dir"] == str(here / "data")  # a name stays a name
    assert saved["eval_dataset"] == str(here / "held_out.jsonl")
    assert saved["output_dir"] == str(here / "out" / "run")
    monkeypatch.chdir(elsewhere)
    assert cli.main(["train", str(here / "out" / "run" / "llmneo_config.yaml"), "output_dir=again"]) == 0
    assert (elsewhere / "again" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_new_run_replaces_the_earlier_runs_tracker_files(tmp_path, base_overrides):
    pytest.importorskip("tensorboard")
    values = {**base_overrides, "max_steps": 1, "report_to": "tensorboard"}
    assert train(tmp_path, values, "first.yaml") == 0
    out = Path(values["output_dir"])
    first = {p.name for p in (out / "runs" / out.name).iterdir()}
    assert train(tmp_path, {**values, "overwrite_output_dir": True}) == 0
    second = {p.name for p in (out / "runs" / out.name).iterdir()}
    assert second and not second & first


@pytest.mark.slow
def test_a_failed_sweep_retry_leaves_the_cell_as_it_was(tmp_path, base_overrides, capsys):
    config = write_yaml(tmp_path, "sweep.yaml", {**base_overrides, "val_size": 2, "max_steps": 1,
                                                 "output_dir": str(tmp_path / "sweep")})
    assert cli.main(["sweep", config, "lora_rank=2,4"]) == 0
    cell = tmp_path / "sweep" / "lora_rank=2"
    before = snapshot(cell)
    assert cli.main(["sweep", config, "lora_rank=2,4", "lora_target=no_such_module"]) == 1  # every retry fails
    assert snapshot(cell) == before
    capsys.readouterr()
    assert cli.main(["sweep", config, "lora_rank=2,4"]) == 0  # the cells still hold their results
    assert capsys.readouterr().out.count("skipped (done)") == 2


@pytest.mark.slow
def test_a_full_run_over_a_lora_run_is_read_as_the_full_model(tmp_path, finished, student_dir, capsys):
    """A full run into a LoRA run's folder keeps the old adapter files (not its kind), so eval and export must
    go by the saved config: eval scores the new full model, export refuses to merge the stale adapter."""
    out, values, _ = finished
    assert (out / "adapter_config.json").is_file()
    assert train(tmp_path, {**values, "finetuning_type": "full", "overwrite_output_dir": True}, "full.yaml") == 0
    assert (out / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    scored = {}
    for name, model in (("folder", out), ("copy", tmp_path / "full_copy")):
        if name == "copy":  # the same full model without the stale adapter files beside it
            shutil.copytree(out, model, ignore=shutil.ignore_patterns("adapter_*", "checkpoint-*"))
        assert cli.main(["eval", f"model_name_or_path={model}", f"dataset={values['dataset']}",
                         "cutoff_len=64", f"output_dir={tmp_path / ('eval_' + name)}"]) == 0
        scored[name] = json.loads((tmp_path / f"eval_{name}" / "eval_results.json").read_text())["ce_loss"]
    assert scored["folder"] == scored["copy"]
    capsys.readouterr()
    assert cli.main(["export", f"adapter_name_or_path={out}", f"model_name_or_path={student_dir}",
                     f"export_dir={tmp_path / 'merged'}"]) == 2
    assert "full model, not an adapter" in capsys.readouterr().err
