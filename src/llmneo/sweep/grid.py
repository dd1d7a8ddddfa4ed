"""`llmneo sweep CONFIG.yaml lora_rank=16,64,128 learning_rate=1e-4,2e-4`: train and score a grid of settings.

An override whose value holds a grid separator is an *axis*; every other `key=value` is fixed and
applies to every cell. Values are separated by `,`, except for keys whose values are comma lists by
nature (`lora_target`, `dataset`, `tasks`, `keep_layers`), which use `;`:

    llmneo sweep neo.yaml lora_target="q_proj,v_proj;all" lora_rank=16,64

The grid is the cartesian product of the axes, in the order given. Every cell's config is built and
validated before anything trains. Each cell trains in-process, one after another, in its own folder
`output_dir/<key>=<value>_<key2>=<value2>`. Training itself scores the cell on the held-out split
(`val_size` > 0 or `eval_dataset`) with the one held-out evaluator (evaluate.held_out) against its
teacher, while both models are still loaded: train_results.json's eval_* keys. Every cell sees the same
rows, and no cell loads a model twice. A cell that does not distil from a live teacher (kd_ratio 0, or a
teacher_cache) has no teacher to compare with: its KL and agreement stay empty, so sweep_metric must
then be perplexity.

A failing cell is recorded (status `failed`, the error's first line) and the sweep goes on. Running
the same command again skips finished cells (train_results.json with held-out scores present, and
the config unchanged) and retries the rest. The sweep folder (`output_dir`) gets sweep.csv (rewritten
after every cell, so a crash leaves a useful table), sweep.md and, for two axes, heatmap.png of
`sweep_metric`. lm-eval `tasks` are not run per cell: evaluate the best cell with `llmneo eval`.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import itertools
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmneo import run_dir
from llmneo.config import llamafactory
from llmneo.config import schema as config_mod
from llmneo.config.schema import SAVED_CONFIG, Config
from llmneo.errors import LlmneoError
from llmneo.models import loading
from llmneo.sweep.report import (METRICS, RESULT_COLUMNS, Axis, best, describe, write_csv, write_heatmap,
                                 write_markdown)
from llmneo.train import loop, preemption

LIST_KEYS = ("lora_target", "dataset", "tasks", "keep_layers")  # comma lists by nature: ';' separates values
SEPARATORS = "values are separated by ',' (by ';' for lora_target, dataset, tasks, keep_layers)"
# Files of a training run's own output_dir; a sweep folder has none of them at its top.
RUN_MARKERS = ("train_results.json", "adapter_config.json", "model.safetensors", SAVED_CONFIG)
NOT_SWEEPABLE = {"output_dir": "it is the sweep folder", "sweep_metric": "it ranks the cells",
                 "overwrite_output_dir": "each cell always overwrites its own folder"}
# Keys that change how a run is logged, saved or resumed but not what it learns: a finished cell
# stays finished when only these differ (e.g. the resume_from_checkpoint=auto the CLI suggests).
RUN_CONTROL_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "save_steps",
                    "save_total_limit", "plot_loss", "ddp_timeout", "sweep_metric", "per_device_eval_batch_size",
                    "tasks", "num_fewshot", "eval_limit", "export_dir", "report_to", "logging_dir", "run_name",
                    "eval_strategy", "eval_steps", "evaluation_strategy")
CELL_FILE = "sweep_cell.json"


@dataclass
class Cell:
    settings: dict[str, str]  # axis key -> value text
    config: Config  # output_dir is the cell folder

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)


# --- parsing and validation (nothing is written before all of it passes) ---------------------------

def split_axes(overrides: list[str]) -> tuple[list[Axis], dict[str, str]]:
    """(axes, fixed overrides) from the command line's key=value items."""
    axes, fixed = [], {}
    for key, value in config_mod.parse_overrides(overrides).items():
        separator = ";" if key in LIST_KEYS else ","
        if separator not in value:
            if separator == "," and ";" in value and key in config_mod.FIELDS:
                _check_not_semicolon_list(key, value)
            fixed[key] = value
            continue
        axis = Axis(key, [part.strip() for part in value.split(separator)])
        _check_axis(axis, value)
        axes.append(axis)
    if not axes:
        raise LlmneoError("llmneo sweep needs at least one axis, a key with several values, e.g. "
                          "lora_rank=16,64 learning_rate=1e-4,2e-4; " + SEPARATORS)
    return axes, fixed


def _check_not_semicolon_list(key: str, value: str) -> None:
    try:
        config_mod.coerce(key, value)
    except LlmneoError:
        raise LlmneoError(f"{key}={value}: {SEPARATORS}, e.g. {key}={value.replace(';', ',')}") from None


def _check_axis(axis: Axis, value: str) -> None:
    key = axis.key
    llamafactory.check_supported({key: None})
    if key not in config_mod.FIELDS:
        if key in llamafactory.IGNORED_KEYS:
            raise LlmneoError(f"llmneo ignores '{key}' (accepted for LLaMA-Factory compatibility), "
                              f"so sweeping it changes nothing; drop {key}={value}")
        close = difflib.get_close_matches(key, list(config_mod.FIELDS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else "; run `llmneo sweep --help` for the keys"
        raise LlmneoError(f"unknown config key '{key}' in sweep axis {key}={value}{hint}")
    if key in NOT_SWEEPABLE:
        raise LlmneoError(f"{key} cannot be a sweep axis ({NOT_SWEEPABLE[key]}); give one value, not {key}={value}")
    seen: dict = {}
    for text in axis.texts:
        if not text:
            raise LlmneoError(f"sweep axis {key}={value} has an empty value; {SEPARATORS}")
        try:
            coerced = config_mod.coerce(key, text)
        except LlmneoError as exc:
            raise LlmneoError(f"{exc} (in sweep axis {key}={value}; {SEPARATORS})") from None
        if repr(coerced) in seen:
            raise LlmneoError(f"sweep axis {key}={value} lists the same value twice ({seen[repr(coerced)]} "
                              f"and {text}); give each value once")
        seen[repr(coerced)] = text


def plan(path: str | None, overrides: list[str]) -> tuple[Path, list[Axis], list[Cell], str]:
    """(sweep folder, axes, cells, sweep_metric), with every cell's config loaded and checked."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise LlmneoError("llmneo sweep runs its cells one after another in one process; run it without "
                          "accelerate launch / torchrun")
    axes, fixed = split_axes(overrides)
    settings = [dict(zip([a.key for a in axes], texts)) for texts in itertools.product(*(a.texts for a in axes))]
    configs = []
    for i, cell in enumerate(settings):
        with warnings.catch_warnings():
            if i:  # the same config warnings (ignored keys...) for every cell: say them once
                warnings.simplefilter("ignore")
            cfg = config_mod.load(path, {**fixed, **cell})
        _check_cell(cfg, cell)
        configs.append(cfg)
    sweep_dir = Path(configs[0].output_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise LlmneoError(f"output_dir '{sweep_dir}' is a file, not a directory; choose another output_dir")
    run_files = [name for name in RUN_MARKERS if (sweep_dir / name).exists()]
    if run_files:  # e.g. the YAML's output_dir, the Neo run it trained: the cells would land beside its results
        raise LlmneoError(f"output_dir '{sweep_dir}' holds a training run ({run_files[0]}), not a sweep; the sweep "
                          f"writes a folder per cell into its output_dir, so give it its own, e.g. "
                          f"output_dir={sweep_dir}-sweep")
    names = cell_names(settings)
    cells = [Cell(s, dataclasses.replace(c, output_dir=str(sweep_dir / n), overwrite_output_dir=True))
             for s, c, n in zip(settings, configs, names)]
    return sweep_dir, axes, cells, configs[0].sweep_metric


def _check_cell(cfg: Config, cell: dict[str, str]) -> None:
    where = " ".join(f"{k}={v}" for k, v in cell.items())
    if not cfg.output_dir:
        raise LlmneoError("output_dir is not set; give the sweep folder, e.g. output_dir=out/sweep1")
    if not (cfg.val_size > 0 or cfg.eval_dataset):
        raise LlmneoError(f"llmneo sweep scores each cell on the held-out split, but val_size is {cfg.val_size}"
                          f" (cell {where}); set e.g. val_size=0.1 (a fraction), val_size=50 (rows) or "
                          f"eval_dataset=NAME (held-out data)")
    if cfg.sweep_metric != "perplexity" and not cfg.teacher_model_name_or_path:
        raise LlmneoError(f"sweep_metric={cfg.sweep_metric} compares the student with a teacher, but "
                          f"teacher_model_name_or_path is not set (cell {where}); set it or use "
                          f"sweep_metric=perplexity")
    if cfg.sweep_metric != "perplexity" and (not cfg.uses_kd or cfg.uses_cache):
        # Training scores the held-out rows against the teacher model it distils from; without one loaded
        # there is nothing to compare with (a cache holds the training rows only).
        reason = "trains from teacher_cache" if cfg.uses_cache else f"has kd_ratio={cfg.kd_ratio}"
        raise LlmneoError(f"sweep_metric={cfg.sweep_metric} compares each cell with the teacher it distils from "
                          f"live, but cell {where} {reason}; use sweep_metric=perplexity, then score the cells you "
                          f"pick with llmneo eval teacher_model_name_or_path=...")
    if cfg.sweep_metric != "perplexity" and loading.config_crosses_tokenizers(cfg):
        raise LlmneoError(f"sweep_metric={cfg.sweep_metric} compares the student with the teacher token by token, but "
                          f"cell {where} distils across tokenizers; use sweep_metric=perplexity")


def cell_names(settings: list[dict[str, str]]) -> list[str]:
    """Folder names `key=value_key2=value2`, safe on any file system, distinct, the same on every run."""
    names = []
    for cell in settings:
        name = "_".join(f"{k}={re.sub(r'[^A-Za-z0-9_.,+=-]', '-', v)}" for k, v in cell.items())
        if len(name) > 120:  # file systems cap names at 255 bytes; long paths as values get near that
            name = name[:100] + "-" + _digest(cell)
        names.append(name)
    clashing = {n for n in names if names.count(n) > 1}  # e.g. a/b and a:b both become a-b
    return [f"{n}-{_digest(c)}" if n in clashing else n for n, c in zip(names, settings)]


def _digest(cell: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]


# --- one cell ------------------------------------------------------------------------------------

def _fingerprint(cfg: Config) -> dict:
    """What a cell learns from: its config without the keys that only steer logging, saving, resuming."""
    values = {k: v for k, v in config_mod.to_dict(cfg).items() if k not in RUN_CONTROL_KEYS}
    return json.loads(json.dumps(values, default=str))


def finished(cell: Cell) -> tuple[bool, str | None]:
    """(done, why not reused): done when the cell's results hold its held-out scores and its config is unchanged."""
    if "eval_perplexity" not in _read_json(cell.dir / "train_results.json"):
        return False, None
    stored = _read_json(cell.dir / CELL_FILE).get("config")
    if stored is None:  # no record of the config it ran with: trust the results
        return True, None
    now = _fingerprint(cell.config)
    changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    return (False, "config changed since the last run (" + ", ".join(changed) + ")") if changed else (True, None)


def train_and_score(cell: Cell) -> None:
    """Train the cell; training scores it on the held-out split (train_results.json in cell.dir).

    A retry keeps the cell's earlier results until its own replace them (train.run), and the cell's config
    is recorded only once it succeeded: a failed retry leaves the cell as it was, still to be retried."""
    try:
        loop.run(cell.config)
    finally:
        _release()
    run_dir.write_json(cell.dir / CELL_FILE, {"settings": cell.settings, "config": _fingerprint(cell.config)})


def _release() -> None:
    """Free the cell's models and let the next cell set its own precision (accelerate keeps one global state)."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # single process: safe, and needed for e.g. a bf16=true,false axis
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row(cell: Cell, status: str, error: str = "") -> dict:
    """The cell's CSV row: its axis values, status, held-out metrics and training summary."""
    out = {**cell.settings, "status": status, "cell_dir": str(cell.dir), "error": error}
    if status == "ok":
        trained = _read_json(cell.dir / "train_results.json")
        out.update({k: trained.get(f"eval_{k}") for k in METRICS})
        out.update({k: trained.get(k) for k in ("final_loss", "train_runtime", "trainable_params")})
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, LlmneoError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the command ---------------------------------------------------------------------------------

def run(path: str | None, overrides: list[str]) -> int:
    """`llmneo sweep`: train and score every cell; 0 when at least one cell finished, 1 when all failed."""
    sweep_dir, axes, cells, metric = plan(path, overrides)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmneoError(f"cannot create output_dir '{sweep_dir}': {exc.strerror or exc}") from None
    rows = [row(cell, "pending") for cell in cells]
    csv_path = sweep_dir / "sweep.csv"
    write_csv(csv_path, axes, rows)
    for n, cell in enumerate(cells):
        tag = f"[sweep {n + 1}/{len(cells)}] {cell.label}"
        done, why = finished(cell)
        if done:
            rows[n] = row(cell, "ok")
            print(f"{tag}: skipped (done); {describe(rows[n], metric)}".rstrip("; "), flush=True)
            continue
        print(f"{tag}: training in {cell.dir}" + (f"; {why}" if why else ""), flush=True)
        try:
            train_and_score(cell)
            rows[n] = row(cell, "ok")
            print(f"{tag}: {describe(rows[n], metric)}", flush=True)
        except preemption.Preempted:
            raise  # a stop request ends the sweep; the CLI says how to resume
        except Exception as exc:  # noqa: BLE001 -- one bad cell must not cost the others
            rows[n] = row(cell, "failed", first_line(exc))
            print(f"{tag}: failed: {rows[n]['error']}", flush=True)
        write_csv(csv_path, axes, rows)
    heatmap = len(axes) == 2 and write_heatmap(sweep_dir / "heatmap.png", axes, rows, metric)
    write_markdown(sweep_dir / "sweep.md", axes, rows, metric, heatmap)
    return _report(rows, metric, sweep_dir)


def _report(rows: list[dict], metric: str, sweep_dir: Path) -> int:
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"llmneo sweep: {ok} of {len(rows)} cells finished, {len(rows) - ok} failed; "
          f"table in {sweep_dir / 'sweep.csv'}", flush=True)
    top = best(rows, metric)
    if top is not None:
        setting = " ".join(f"{k}={top[k]}" for k in rows[0] if k not in RESULT_COLUMNS)
        print(f"llmneo sweep: best {metric} {top[metric]:.4g} at {setting} ({top['cell_dir']})", flush=True)
    return 0 if ok else 1
