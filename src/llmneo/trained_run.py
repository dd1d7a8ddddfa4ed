"""What `llmneo eval` and `llmneo export` take from the trained run that model_name_or_path (or
adapter_name_or_path) points at: its saved llmneo_config.yaml, for the keys the user did not give.

Both take the run's RUN_KEYS: scoring or shipping a run with another template, cutoff or stage would measure
(or render) other tokens than it trained on. `llmneo eval` also takes the run's KD settings (KD_KEYS: its
kd_loss is the run's own divergence) and, when no dataset or eval_dataset is given, the run's data and
held-out split (HELD_OUT_KEYS: the same rows split by the same seed and val_size, or its eval_dataset), so
that by default it scores exactly the rows the run held out, the rows of train_results.json's eval_* scores.
A run that held out nothing has no such rows: eval then asks for a dataset in one line rather than score the
rows the run trained on and call that held-out (LLaMA-Factory's do_eval, too, scores eval_dataset or the
val_size split).
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import Any

from llmneo import config as config_mod
from llmneo.config import SAVED_CONFIG, Config
from llmneo.errors import LlmneoError

RUN_KEYS = ("template", "cutoff_len", "stage", "packing")
KD_KEYS = ("kd_loss", "kd_temperature", "kd_beta", "kd_skew")
HELD_OUT_KEYS = ("dataset", "dataset_dir", "eval_dataset", "val_size", "max_samples", "seed")
# command -> what it takes from the run
COMMANDS = {"export": RUN_KEYS, "eval": RUN_KEYS + KD_KEYS}


def load(path: str | Path | None, overrides: list[str] | dict[str, Any] | None, command: str) -> Config:
    """config.load for `command` (eval, export): keys not given default to the trained run's."""
    return config_mod.load(path, overrides, defaults=partial(defaults, command=command))


def saved_config_of(model_dir: str | None) -> Path | None:
    """The llmneo_config.yaml of the run that wrote `model_dir` (its output_dir or a checkpoint-STEP in it)."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    here = Path(model_dir)
    for folder in (here, here.parent) if re.fullmatch(r"checkpoint-\d+", here.name) else (here,):
        if (folder / SAVED_CONFIG).is_file():
            return folder / SAVED_CONFIG
    return None


def finetuning_type(model_dir: str | None) -> str | None:
    """The finetuning_type of the run that last wrote `model_dir`, from its saved config; None without one."""
    saved = saved_config_of(model_dir)
    return config_mod.read_yaml(saved).get("finetuning_type") if saved is not None else None


def defaults(values: dict[str, Any], command: str) -> dict[str, Any]:
    """The keys `command` takes from the saved config of the run the adapter (or model) path points at."""
    for key in ("adapter_name_or_path", "model_name_or_path"):
        saved = saved_config_of(values.get(key))
        if saved is not None:
            break
    else:
        return {}
    stored = config_mod.read_yaml(saved)
    keys = COMMANDS[command]
    if command == "eval" and not (values.get("dataset") or values.get("eval_dataset")):
        if stored.get("val_size") or stored.get("eval_dataset") or "val_size" in values:  # given: the user's split
            keys += HELD_OUT_KEYS
        elif not values.get("tasks"):
            trained_on = f" (dataset={stored['dataset']} scores the rows it trained on)" if stored.get("dataset") \
                else ""
            raise LlmneoError(f"the run in {saved.parent} held out no data (val_size: 0 and no eval_dataset), so there "
                              f"are no held-out rows to score; give dataset=...{trained_on}, or train with val_size "
                              f"or eval_dataset")
    return {k: config_mod.coerce(k, stored[k]) for k in keys if k in stored}
