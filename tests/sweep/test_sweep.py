"""llmneo sweep: grid parsing, cells trained and scored, failures recorded, re-runs skip finished cells."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.errors import LlmneoError
from llmneo.sweep import grid, report


@pytest.fixture
def sweep_yaml(tmp_path, base_overrides) -> Path:
    """A fast Neo config with a held-out split; output_dir is the sweep folder."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**base_overrides, "val_size": 2, "max_steps": 2,
                                    "output_dir": str(tmp_path / "sweep")}))
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def sweep_cli(yaml_path: Path, *args: str) -> int:
    return cli.main(["sweep", str(yaml_path), *args])


def _counting(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call is recorded and then made as usual."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.slow
def test_two_by_two_grid_end_to_end(sweep_yaml, tmp_path, capsys, monkeypatch):
    from llmneo.models import loading

    loads = {name: _counting(monkeypatch, loading, name) for name in ("load", "load_teacher", "load_trained")}
    assert sweep_cli(sweep_yaml, "lora_rank=2,4", "learning_rate=1e-3,1e-2") == 0
    # Each cell loads its student and teacher once, for training; the held-out scores come from training.
    assert [len(loads[name]) for name in ("load", "load_teacher", "load_trained")] == [4, 4, 0]
    out = capsys.readouterr().out
    folder = tmp_path / "sweep"
    rows = read_csv(folder / "sweep.csv")
    assert [(r["lora_rank"], r["learning_rate"]) for r in rows] == [
        ("2", "1e-3"), ("2", "1e-2"), ("4", "1e-3"), ("4", "1e-2")]
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    for r in rows:
        cell = folder / f"lora_rank={r['lora_rank']}_learning_rate={r['learning_rate']}"
        assert Path(r["cell_dir"]) == cell
        assert (cell / "train_results.json").is_file() and (cell / "adapter_config.json").is_file()
        trained = json.loads((cell / "train_results.json").read_text())
        for metric in ("perplexity", "kl_to_teacher", "top1_agreement"):
            assert float(r[metric]) == pytest.approx(trained[f"eval_{metric}"])
        assert 0.0 <= float(r["top1_agreement"]) <= 1.0 and float(r["kl_to_teacher"]) > 0
        assert json.loads((cell / "sweep_cell.json").read_text())["config"]["learning_rate"] == float(
            r["learning_rate"])
    # The axes reach training: rank 4 trains twice the LoRA parameters of rank 2, and the rate changes the result.
    assert int(rows[2]["trainable_params"]) == 2 * int(rows[0]["trainable_params"])
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    assert (folder / "heatmap.png").stat().st_size > 5000
    assert "| lora_rank | learning_rate | status |" in (folder / "sweep.md").read_text()
    assert len(re.findall(r"^\[sweep [1-4]/4\] lora_rank=\d learning_rate=1e-\d: perplexity ", out, re.MULTILINE)) == 4
    best = min(rows, key=lambda r: float(r["perplexity"]))
    printed = re.search(r"best perplexity (\S+) at lora_rank=(\S+) learning_rate=(\S+) \((.+)\)$", out, re.MULTILINE)
    assert printed is not None, out
    assert (printed.group(2), printed.group(3), printed.group(4)) == (
        best["lora_rank"], best["learning_rate"], best["cell_dir"])
    assert float(printed.group(1)) == pytest.approx(float(best["perplexity"]), rel=1e-3)


@pytest.mark.slow
def test_failed_cell_is_recorded_and_retried_while_finished_cells_are_skipped(sweep_yaml, tmp_path, capsys):
    args = ("lora_target=q_proj;no_such_module",)
    assert sweep_cli(sweep_yaml, *args) == 0
    out = capsys.readouterr().out
    good, bad = tmp_path / "sweep" / "lora_target=q_proj", tmp_path / "sweep" / "lora_target=no_such_module"
    rows = read_csv(tmp_path / "sweep" / "sweep.csv")
    assert [(r["lora_target"], r["status"]) for r in rows] == [("q_proj", "ok"), ("no_such_module", "failed")]
    assert rows[0]["error"] == "" and float(rows[0]["perplexity"]) > 1
    assert "no_such_module" in rows[1]["error"] and rows[1]["perplexity"] == ""
    assert "[sweep 2/2] lora_target=no_such_module: failed: " in out
    assert not (tmp_path / "sweep" / "heatmap.png").exists()  # one axis: no heatmap
    trained = (good / "train_results.json").stat().st_mtime_ns

    assert sweep_cli(sweep_yaml, *args) == 0
    again = capsys.readouterr().out
    assert "[sweep 1/2] lora_target=q_proj: skipped (done)" in again
    assert (good / "train_results.json").stat().st_mtime_ns == trained
    assert "[sweep 2/2] lora_target=no_such_module: training" in again
    assert "[sweep 2/2] lora_target=no_such_module: failed: " in again
    assert not (bad / "train_results.json").exists()
    rows = read_csv(tmp_path / "sweep" / "sweep.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"] and float(rows[0]["perplexity"]) > 1
    assert "best perplexity" in again and "lora_target=q_proj" in again.splitlines()[-1]


@pytest.mark.slow
def test_changed_config_retrains_a_finished_cell(sweep_yaml, tmp_path, capsys):
    assert sweep_cli(sweep_yaml, "lora_rank=2,4", "max_steps=1") == 0
    capsys.readouterr()
    assert sweep_cli(sweep_yaml, "lora_rank=2,4", "max_steps=1", "logging_steps=5") == 0  # run control only
    assert capsys.readouterr().out.count("skipped (done)") == 2
    assert sweep_cli(sweep_yaml, "lora_rank=2,4", "max_steps=2") == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and out.count("config changed since the last run (max_steps)") == 2
    results = json.loads((tmp_path / "sweep" / "lora_rank=2" / "train_results.json").read_text())
    assert results["global_step"] == 2


@pytest.mark.slow
def test_every_cell_failing_exits_1(sweep_yaml, tmp_path, capsys):
    assert sweep_cli(sweep_yaml, "lora_target=no_such_module;nor_this") == 1
    out = capsys.readouterr().out
    assert out.count(": failed: ") == 2 and "best" not in out
    assert [r["status"] for r in read_csv(tmp_path / "sweep" / "sweep.csv")] == ["failed", "failed"]


# --- parsing and up-front validation: nothing trains, nothing is written -----------------------------

def test_numeric_axes_split_on_commas_and_list_keys_on_semicolons():
    axes, fixed = grid.split_axes(["lora_rank=16,64,128", "learning_rate=1e-4,2e-4", "kd_ratio=0.5",
                                    "lora_target=q_proj,v_proj;all", "dataset=a.json,b.json", "bf16=true,false"])
    assert [(a.key, a.texts) for a in axes] == [
        ("lora_rank", ["16", "64", "128"]), ("learning_rate", ["1e-4", "2e-4"]),
        ("lora_target", ["q_proj,v_proj", "all"]), ("bf16", ["true", "false"])]
    assert fixed == {"kd_ratio": "0.5", "dataset": "a.json,b.json"}


def test_cells_are_the_product_in_order_with_safe_distinct_folders(sweep_yaml, tmp_path):
    folder, _, cells, metric = grid.plan(str(sweep_yaml), ["lora_rank=2,4", "lora_target=q_proj,v_proj;all"])
    assert metric == "perplexity" and folder == tmp_path / "sweep" and not folder.exists()
    assert [c.label for c in cells] == ["lora_rank=2 lora_target=q_proj,v_proj", "lora_rank=2 lora_target=all",
                                        "lora_rank=4 lora_target=q_proj,v_proj", "lora_rank=4 lora_target=all"]
    assert [c.config.lora_rank for c in cells] == [2, 2, 4, 4] and cells[0].config.lora_target == "q_proj,v_proj"
    assert all(c.config.overwrite_output_dir and c.dir.parent == folder for c in cells)
    assert [c.dir.name for c in cells][:2] == ["lora_rank=2_lora_target=q_proj,v_proj", "lora_rank=2_lora_target=all"]
    assert grid.cell_names([{"dataset": "a/b.json"}, {"dataset": "a:b.json"}, {"dataset": "c d"}]) == [
        "dataset=a-b.json-" + grid._digest({"dataset": "a/b.json"}),
        "dataset=a-b.json-" + grid._digest({"dataset": "a:b.json"}), "dataset=c-d"]


@pytest.mark.parametrize("args, needle", [
    (["lora_rank=16,abc"], "'lora_rank' expects int, got 'abc'"),
    (["lora_rank=16,,32"], "has an empty value"),
    (["lora_rank=16;64"], "separated by ','"),
    (["lora_rnak=2,4"], "did you mean 'lora_rank'"),
    (["kd_ratio=0.5,2"], "kd_ratio must be in [0, 1]"),  # valid type, invalid config: caught before training
    (["learning_rate=1e-3,0.001"], "same value twice"),
    (["output_dir=a,b"], "cannot be a sweep axis"),
    (["kd_ratio=0.5"], "at least one axis"),
    (["lora_rank=2,4", "val_size=0"], "set e.g. val_size=0.1"),
    (["lora_rank=2,4", "sweep_metric=kl_to_teacher", "teacher_model_name_or_path=null"], "teacher"),
    (["kd_ratio=0,0.5", "sweep_metric=top1_agreement"], "kd_ratio=0 has kd_ratio=0.0; use sweep_metric=perplexity"),
    (["lora_rank=2,4", "sweep_metric=kl_to_teacher", "teacher_cache=cache"], "trains from teacher_cache"),
    (["lora_rank=2,4", "sweep_metric=kl_to_teacher", "kd_cross_tokenizer=true"], "distils across tokenizers"),
])
def test_bad_sweeps_fail_in_one_line_before_anything_runs(sweep_yaml, tmp_path, capsys, args, needle):
    assert sweep_cli(sweep_yaml, *args) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("llmneo: error: ")]
    assert len(errors) == 1 and needle in errors[0], captured.err
    assert "Traceback" not in captured.err and "[sweep" not in captured.out
    assert not (tmp_path / "sweep").exists()


def test_a_teacher_metric_with_a_teacher_of_another_tokenizer_fails_before_anything_runs(sweep_yaml, tmp_path, capsys,
                                                                                         alien_teacher_dir):
    assert sweep_cli(sweep_yaml, "lora_rank=2,4", "sweep_metric=top1_agreement",
                     f"teacher_model_name_or_path={alien_teacher_dir}") == 2
    assert "distils across tokenizers; use sweep_metric=perplexity" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_into_a_training_runs_folder_is_refused_and_touches_nothing(sweep_yaml, tmp_path, capsys):
    """The README's sweep once wrote its cells next to the Neo adapter of neo.yaml's output_dir."""
    run = tmp_path / "sweep"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "train_results.json").write_text("{}")
    before = sorted(p.name for p in run.iterdir())
    assert sweep_cli(sweep_yaml, "lora_rank=2,4") == 2
    err = capsys.readouterr().err
    assert "holds a training run (train_results.json), not a sweep" in err and f"output_dir={tmp_path / 'sweep'}-sweep" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_missing_val_size_is_a_clear_error(tmp_path, base_overrides):
    path = tmp_path / "no_val.yaml"
    path.write_text(yaml.safe_dump(base_overrides))
    with pytest.raises(LlmneoError, match=r"held-out split, but val_size is 0.0 .*set e.g. val_size=0.1"):
        grid.run(str(path), ["lora_rank=2,4"])
    assert not Path(base_overrides["output_dir"]).exists()


# --- ranking and the heatmap on hand-made rows -------------------------------------------------------

ROWS = [
    {"rank": "2", "lr": "1", "status": "ok", "perplexity": 9.0, "top1_agreement": 0.2, "cell_dir": "a"},
    {"rank": "2", "lr": "2", "status": "failed", "perplexity": None, "top1_agreement": None, "cell_dir": "b"},
    {"rank": "4", "lr": "1", "status": "ok", "perplexity": 7.5, "top1_agreement": 0.1, "cell_dir": "c"},
    {"rank": "4", "lr": "2", "status": "ok", "perplexity": 8.0, "top1_agreement": 0.4, "cell_dir": "d"},
]


def test_best_is_min_for_perplexity_and_max_for_agreement():
    assert report.best(ROWS, "perplexity")["cell_dir"] == "c"
    assert report.best(ROWS, "top1_agreement")["cell_dir"] == "d"
    assert report.best([ROWS[1]], "perplexity") is None


def test_heatmap_with_a_failed_cell(tmp_path):
    axes = [report.Axis("rank", ["2", "4"]), report.Axis("lr", ["1", "2"])]
    assert report.write_heatmap(tmp_path / "h.png", axes, ROWS, "perplexity")
    assert (tmp_path / "h.png").stat().st_size > 5000


def test_cells_may_differ_in_mixed_precision():
    """accelerate keeps one global state that refuses a new precision; a sweep resets it between cells."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="no", cpu=True)
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="bf16", cpu=True)
    grid._release()
    try:
        assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    finally:
        grid._release()  # leave the default state for the tests that follow
