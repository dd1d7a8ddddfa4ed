"""The output directory of a run: refuse to clobber, write atomically, rotate checkpoints.

A finished run is marked by its results file (`train_results.json`, `eval_results.json`), written
last; anything written before is either append-only (metrics.jsonl) or moved into place by rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmneo.config import SAVED_CONFIG
from llmneo.errors import LlmneoError

# Files llmneo itself writes into output_dir; only these are cleared by overwrite_output_dir.
OWN_FILES = ("metrics.jsonl", "train_results.json", "training_loss.png", "eval_results.json",
             "adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
             "model.safetensors.index.json", "generation_config.json", "prune_results.json", SAVED_CONFIG)
OWN_DIRS = ("initial_adapter", "runs")  # runs: the trackers' default logging_dir
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a training run writes before its set-up is done. A run refused during set-up (a stale cache, a bad
# dataset) leaves only these, and the corrected command must not then fail with "not empty".
SETUP_LEFTOVERS = (SAVED_CONFIG, "initial_adapter")


def refuse_inputs_inside(out: Path, inputs: dict[str, str | None], key: str = "output_dir") -> None:
    """An output folder must not be, or contain, one of the run's inputs: clearing it would destroy them."""
    target = out.resolve()
    for name, value in inputs.items():
        for part in (value or "").split(","):
            if not part.strip() or not Path(part.strip()).exists():
                continue
            source = Path(part.strip()).resolve()
            if source == target or target in source.parents:
                raise LlmneoError(f"{key} '{out}' holds an input of this run ({name}={part.strip()}); writing there "
                                  f"would overwrite it, so choose another {key}")


def prepare(path: str | None, overwrite: bool, key: str = "output_dir",
            inputs: dict[str, str | None] | None = None) -> Path:
    """Create `path`, refusing a non-empty one unless `overwrite`; then clear llmneo's stale results."""
    if not path:
        raise LlmneoError(f"{key} is not set; give a directory for the results, e.g. {key}=out/run1")
    out = Path(path)
    refuse_inputs_inside(out, inputs or {}, key)
    if out.exists() and not out.is_dir():
        raise LlmneoError(f"{key} '{out}' is a file, not a directory; choose another {key}")
    if out.is_dir() and not overwrite and any(child.name not in SETUP_LEFTOVERS for child in out.iterdir()):
        raise LlmneoError(f"{key} '{out}' is not empty; set overwrite_output_dir=true or choose another {key}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        for child in out.iterdir():
            if child.is_dir() and (_CHECKPOINT.match(child.name) or child.name in OWN_DIRS):
                shutil.rmtree(child)
        probe = out / ".llmneo-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LlmneoError(f"cannot write to {key} '{out}': {exc.strerror or exc}; "
                          "check permissions and free space") from None
    return out


def write_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` is a failed write (disk full, read-only...), else None.

    safetensors and torch.save report a full disk as their own exception types, not OSError.
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and "write" in text.lower()):
        for known in ("No space left on device", "Read-only file system", "Permission denied"):
            if known in text:
                return known
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write text through a temp file and a rename, like write_json."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of finished checkpoints, oldest first."""
    found = []
    for child in out.iterdir() if out.is_dir() else []:
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def staging_dir(out: Path, step: int) -> Path:
    tmp = out / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(out: Path, staged: Path, step: int, keep: int | None) -> Path:
    """Rename a fully written staging folder into place, then drop the oldest beyond `keep`."""
    final = out / f"checkpoint-{step}"
    for stray in out.glob(".trash-*"):  # left by a kill during an earlier removal
        shutil.rmtree(stray, ignore_errors=True)
    if final.exists():
        _remove(final)
    os.replace(staged, final)
    if keep is not None:
        for _, old in checkpoints(out)[:-keep]:
            _remove(old)
    return final


def _remove(checkpoint_dir: Path) -> None:
    """Rename first (atomic), then delete: a kill -9 mid-delete never leaves a half-empty checkpoint-STEP."""
    trash = checkpoint_dir.with_name(f".trash-{checkpoint_dir.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
