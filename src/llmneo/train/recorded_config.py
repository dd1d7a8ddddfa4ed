"""The config as llmneo_config.yaml records it: every local path absolute.

`llmneo train out/run/llmneo_config.yaml` (and eval, export of the run) may run from another directory than
the run did; a relative `models/student` read there would be a missing folder, or a Hub id. Hub ids,
names registered in dataset_info.json and lm-eval task names stay as given.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from llmneo.config.schema import Config, looks_local
from llmneo.data import sources

MODEL_KEYS = ("model_name_or_path", "teacher_model_name_or_path", "adapter_name_or_path")  # comma lists allowed
FOLDER_KEYS = ("teacher_cache", "dataset_dir", "output_dir", "logging_dir", "export_dir",  # always local
               "rollout_adapter_dir")
DATASET_KEYS = ("dataset", "eval_dataset")


def recorded(config: Config) -> Config:
    """`config` with its local paths made absolute (relative to the current directory)."""
    changes: dict = {}
    for key in MODEL_KEYS:
        changes[key] = _each(getattr(config, key), lambda item: _absolute(item) if looks_local(item) else item)
    for key in FOLDER_KEYS:
        changes[key] = _absolute(getattr(config, key)) if getattr(config, key) else getattr(config, key)
    for key in DATASET_KEYS:
        changes[key] = _each(getattr(config, key), lambda item: _dataset(item, config.dataset_dir))
    if config.resume_from_checkpoint not in (None, "auto"):
        changes["resume_from_checkpoint"] = _absolute(config.resume_from_checkpoint)
    changes["tasks"] = _each(config.tasks, lambda item: _absolute(item) if os.path.exists(item) else item)
    return dataclasses.replace(config, **changes)


def _each(value: str | None, change) -> str | None:
    """`change` applied to every entry of a comma-separated value."""
    if not value:
        return value
    return ",".join(change(item.strip()) for item in value.split(",") if item.strip())


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _dataset(name: str, dataset_dir: str) -> str:
    """A dataset entry as data.sources resolves it: a dataset_info.json name first (kept), then a file or folder as
    given, then under dataset_dir (made absolute); anything else (a Hub id) as it is."""
    if sources.registered(name, Path(dataset_dir)) is not None:
        return name
    found = sources.local_dataset(name, dataset_dir)
    return os.path.abspath(found) if found is not None else name
