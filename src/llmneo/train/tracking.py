"""Experiment tracking (`report_to`): accelerate's trackers receive the rows metrics.jsonl receives.

llmneo writes no tracker file itself. The trackers are chosen when the Accelerator is made
(`accelerator_kwargs`: accelerate's `log_with` and a `ProjectConfiguration` whose logging_dir holds
file-based trackers such as TensorBoard, in `logging_dir/run_name`); `start` opens the run with the
config's scalar values as hyperparameters; `log` sends one metrics row at its optimizer step; the
loop's `accelerator.end_training()` closes them.

On resume, TensorBoard is told to purge what the interrupted run logged after the checkpoint
(`purge_step`), since those steps are logged again: readers then see each step once.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmneo.config.schema import Config, report_to, to_dict
from llmneo.errors import LlmneoError

# report_to name -> the pip package that provides it
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def logging_dir(config: Config) -> str:
    return config.logging_dir or os.path.join(config.output_dir, "runs")


def run_name(config: Config) -> str:
    """The run's name in the trackers: run_name, else the output_dir folder's name (stable across resumes)."""
    return config.run_name or Path(config.output_dir).resolve().name or "llmneo"


def accelerator_kwargs(config: Config) -> dict:
    """`Accelerator(**...)` arguments for the trackers in report_to ({} for none)."""
    names = report_to(config)
    if not names or not config.output_dir:
        return {}
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name != "all" and name not in available:
            raise LlmneoError(f"report_to={name} needs the {PACKAGES[name]} package, which is not installed: "
                              f"pip install {PACKAGES[name]} (or drop {name} from report_to)")
    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=config.output_dir, logging_dir=logging_dir(config))}


def hyperparameters(config: Config) -> dict:
    """The config's scalar values (what every tracker can store); unset (null) keys are left out."""
    return {k: v for k, v in to_dict(config).items() if isinstance(v, (bool, int, float, str))}


def start(accelerator, config: Config, resumed_step: int) -> None:
    """Open the run in every tracker (main process only, as accelerate does)."""
    if not report_to(config):
        return
    init_kwargs = {"tensorboard": {"purge_step": resumed_step + 1}} if resumed_step else {}
    accelerator.init_trackers(run_name(config), config=hyperparameters(config), init_kwargs=init_kwargs)


def log(accelerator, values: dict, step: int) -> None:
    """Send one row (a metrics.jsonl row, or held-out results) at `step`; missing (None) values are left out."""
    if not accelerator.trackers:
        return
    accelerator.log({k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))}, step=step)
