"""What `llmneo eval` and `llmneo export` take from the trained run that model_name_or_path (or
adapter_name_or_path) points at: its saved llmneo_config.yaml, for the keys the user did not give, and
whether the folder is an adapter and on which base (adapter_base, recorded_base).

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

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

from llmneo.config import schema as config_mod
from llmneo.config.schema import SAVED_CONFIG, Config, looks_like_hub_id, looks_local
from llmneo.errors import LlmneoError

RUN_KEYS = ("template", "cutoff_len", "stage", "packing", "neat_packing", "padding_free")
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


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter dir records, or None when `adapter_dir` is not an adapter.

    The output_dir of a full fine-tune is no adapter even where it holds adapter files: they are an earlier
    LoRA run's, which a full run into that folder leaves in place (it removes only files of its own kinds)."""
    config_file = Path(adapter_dir, "adapter_config.json")
    if not config_file.is_file() or finetuning_type(adapter_dir) == "full":
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise LlmneoError(f"{config_file} does not name its base model; set model_name_or_path to the base "
                          f"and adapter_name_or_path={adapter_dir}")
    return base


def not_an_adapter(adapter_dir: str) -> LlmneoError:
    if Path(adapter_dir, "adapter_config.json").is_file():  # a full fine-tune's folder (see adapter_base)
        return LlmneoError(f"adapter_name_or_path: '{adapter_dir}' holds a full fine-tune (its {SAVED_CONFIG} says "
                           f"finetuning_type: full), a plain model; its adapter files are an earlier run's. Use "
                           f"model_name_or_path={adapter_dir}")
    return LlmneoError(f"adapter_name_or_path: '{adapter_dir}' has no adapter_config.json; give a PEFT adapter dir")


def recorded_base(adapter_dir: str) -> str:
    """The base model an adapter records, checked here: a missing local path is one line, not a Hub lookup."""
    base = adapter_base(adapter_dir)
    if base is None:
        raise not_an_adapter(adapter_dir)
    if not os.path.exists(base) and (looks_local(base) or not looks_like_hub_id(base)):
        raise LlmneoError(f"the base model '{base}' recorded in {Path(adapter_dir, 'adapter_config.json')} does "
                          f"not exist here; set model_name_or_path to the base model")
    return base
