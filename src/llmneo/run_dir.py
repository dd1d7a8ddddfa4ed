"""The output directory of a run: checked before anything is written, earlier results replaced only once
the run has its own, atomic writes with a plain open()'s permissions, checkpoint staging and rotation.

A command first `check`s its folder (nothing written: a refused or failed command changes nothing), which
names the earlier results it will replace (`Output.stale`: only files of the kinds it writes; a user's files
and files of other kinds stay). They are removed when the command has produced its own results: a
training run's first complete checkpoint (or its end), an export's or prune's saved model (`replacing`).
A finished run is marked by its results file (`train_results.json`, `eval_results.json`), written last;
anything written before is either append-only (metrics.jsonl) or moved into place by rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmneo.config.schema import SAVED_CONFIG
from llmneo.errors import LlmneoError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What each kind of output writes (names or globs at the folder's top level; CHECKPOINTS: checkpoint-STEP).
CHECKPOINTS = "checkpoint-STEP"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*-of-*.safetensors", *TOKENIZER_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES)
TRAIN_FILES = ("metrics.jsonl", "train_results.json", SAVED_CONFIG, CHECKPOINTS)


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


@dataclasses.dataclass
class Output:
    """A checked output folder and its earlier results (`stale`), which go only when this command replaces them."""

    path: Path
    key: str = "output_dir"
    stale: list[Path] = dataclasses.field(default_factory=list)

    def create(self) -> Path:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.path, self.key, exc) from None
        return self.path

    def replace_stale(self) -> None:
        """Remove the earlier results: this command now has its own."""
        for path in self.stale:
            if path.is_dir() and not path.is_symlink():
                _remove(path)
            else:
                path.unlink(missing_ok=True)
        self.stale = []


def check(path: str | None, overwrite: bool, writes: tuple[str, ...], key: str = "output_dir",
          inputs: dict[str, str | None] | None = None) -> Output:
    """The folder for a command's results, checked without writing anything: set, not a file, not holding an
    input, empty unless `overwrite`, writable. Its entries of the kinds in `writes` are its earlier results."""
    if not path:
        raise LlmneoError(f"{key} is not set; give a directory for the results, e.g. {key}=out/run1")
    out = Path(path)
    refuse_inputs_inside(out, inputs or {}, key)
    if out.exists() and not out.is_dir():
        raise LlmneoError(f"{key} '{out}' is a file, not a directory; choose another {key}")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise LlmneoError(f"{key} '{out}' is not empty; set overwrite_output_dir=true or choose another {key}")
    existing = out if out.is_dir() else next((p for p in out.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LlmneoError(f"{key} '{out}' lies under '{existing}', which is a file; choose another {key}")
    try:  # a probe that leaves nothing behind: can this process create files there?
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".llmneo-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _unwritable(out, key, exc) from None
    stale = [child for child in sorted(out.iterdir()) if _kind_of(child.name, writes)] if out.is_dir() else []
    return Output(out, key, stale)


def _kind_of(name: str, writes: tuple[str, ...]) -> bool:
    return any(bool(_CHECKPOINT.match(name)) if pattern == CHECKPOINTS else fnmatch.fnmatchcase(name, pattern)
               for pattern in writes)


def _unwritable(out: Path, key: str, exc: OSError) -> LlmneoError:
    return LlmneoError(f"cannot write to {key} '{out}': {exc.strerror or exc}; check permissions and free space")


@contextlib.contextmanager
def replacing(output: Output):
    """A staging folder inside output_dir for a command's results. When the block ends well they get a plain
    open()'s permissions, the earlier results go and the staged entries move in; otherwise the staging folder
    (and an output folder made for it) is removed, so output_dir is as it was."""
    made = not output.path.exists()
    out = output.create()
    try:
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-"))
    except OSError as exc:
        raise _unwritable(out, output.key, exc) from None
    try:
        yield staging
        plain_modes(staging)
        output.replace_stale()
        for child in sorted(staging.iterdir()):
            target = out / child.name
            if target.is_dir() and not target.is_symlink():
                _remove(target)
            os.replace(child, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and setting it back (0o077 meanwhile,
    never looser, but for that instant another thread's new files would get it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_modes(root: Path) -> None:
    """Give `root` and everything in it the modes a plain open() / mkdir() would (0o666 / 0o777 less the umask).

    mkstemp, mkdtemp and safetensors (which writes through a temp file) create 0600 files and 0700 folders,
    which a serving container under another uid or a group sharing a cache cannot read."""
    mask = umask()
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


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
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write text through a temp file and a rename, with the mode a plain open() would leave: the existing
    file's, else 0o666 less the umask (mkstemp alone makes it 0600)."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
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


def commit_checkpoint(out: Path, staged: Path, step: int, keep: int | None, before=None) -> Path:
    """Rename a fully written staging folder into place, then drop the oldest beyond `keep`.

    `before()` runs once the staged checkpoint is complete and before its rename: a new run's first
    checkpoint replaces the earlier run's results there (so none of its checkpoints is counted for `keep`).
    """
    final = out / f"checkpoint-{step}"
    for stray in out.glob(".trash-*"):  # left by a kill during an earlier removal
        shutil.rmtree(stray, ignore_errors=True)
    plain_modes(staged)
    if before is not None:
        before()
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
