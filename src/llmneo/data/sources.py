"""Finding and reading datasets: each name of `dataset` (or `eval_dataset`) to its rows, as conversations or text.

`dataset` is a comma-separated list; each name is, in this order of lookup, an entry of
`dataset_dir/dataset_info.json` (LLaMA-Factory's format, column and tag mappings included), a local
file or folder (as given, then under `dataset_dir`), or a Hugging Face Hub id (`owner/name`).
Files: .json (a list of objects, or JSON lines), .jsonl, .parquet, .csv, .txt (one `text` row per
non-empty line); a folder means all such files in it, sorted by name.

Formats, detected per file from its columns (or given by dataset_info's `formatting`):
  alpaca    instruction, input (optional), output, system (optional), history (optional [user, reply] pairs)
  sharegpt  conversations: [{from: human|gpt|system|function_call|observation, value}]; system, tools (optional)
  messages  messages: [{role: system|user|assistant|tool, content, tool_calls?}] (OpenAI / TRL style)
  prompt/completion  prompt, completion: strings, or lists of messages (TRL style)
  text      text (or a registry entry with `columns: {prompt: text}`): raw text, every token trained
Every conversation becomes [system?, user, assistant, user, assistant, ...]; a row that cannot, or
that holds data llmneo cannot train on (multimodal, preference, KTO), is an error naming the file,
the row and the field (`llmneo.data.formats`). `stage: pt` trains on raw text only (conversations are
refused). Tokenizing the rows into examples: `llmneo.data.dataset`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmneo import hub
from llmneo.config.schema import looks_like_hub_id
from llmneo.data import formats
from llmneo.errors import LlmneoError

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".txt")


def load_rows(config, datasets: str | None = None, key: str = "dataset") -> list[tuple[str, list[dict]]]:
    """(source, rows) per dataset of `datasets` (default: config.dataset); rows are {"messages": [...],
    "tools"?: [...]} or {"text": str}."""
    names = [n.strip() for n in ((config.dataset if datasets is None else datasets) or "").split(",") if n.strip()]
    if not names:
        raise LlmneoError(f"{key} is not set; give a file, folder, dataset_info.json name or Hub id, "
                          f"e.g. {key}=data/train.jsonl")
    loaded = []
    for name in names:
        source, parts, layout = _read_dataset(name, config.dataset_dir, config.max_samples, key)
        rows: list[dict] = []
        for part_source, part_rows in parts:
            if config.max_samples is not None:
                part_rows = part_rows[:config.max_samples - len(rows)]
            rows += formats.normalise(part_source, part_rows, layout, getattr(config, "teacher_column", None))
            if config.max_samples is not None and len(rows) >= config.max_samples:
                break
        if not rows:
            raise LlmneoError(f"{key} '{name}' ({source}) has no rows; check that the file holds data")
        if config.stage == "pt" and any("messages" in row for row in rows):
            raise LlmneoError(f"stage: pt trains on raw text, but {key} '{name}' ({source}) holds conversations; "
                              f"give text rows (a text column, a .txt file, or dataset_info columns: {{prompt: "
                              f"text}}) or use stage: sft")
        loaded.append((source, rows))
    return loaded


def _read_dataset(name: str, dataset_dir: str, limit: int | None,
                  key: str = "dataset") -> tuple[str, list[tuple[str, list]], formats.Layout]:
    """(source, [(file, raw rows)], layout) for one dataset name; `limit` spares reading a whole Hub dataset."""
    entry = registered(name, Path(dataset_dir))
    if entry is not None:
        return _read_registered(name, entry, Path(dataset_dir), limit)
    if (found := local_dataset(name, dataset_dir)) is not None:
        return str(found), _read_path(found), formats.Layout()
    if looks_like_hub_id(name) and Path(name).suffix.lower() not in FILE_TYPES:
        return name, [(name, _read_hub(name, dataset_dir, limit))], formats.Layout()
    raise LlmneoError(f"{key} '{name}' not found: no file {name}, no file {Path(dataset_dir) / name}, and no "
                      f"'{name}' entry in {Path(dataset_dir) / 'dataset_info.json'}; check the name or dataset_dir")


def local_dataset(name: str, dataset_dir: str) -> Path | None:
    """The file or folder a dataset name (not a dataset_info.json entry) means: as given, else under dataset_dir."""
    return next((p for p in (Path(name).expanduser(), Path(dataset_dir) / name) if p.exists()), None)


def registered(name: str, dataset_dir: Path) -> dict | None:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(_read_text(info_path))
    except json.JSONDecodeError as exc:
        raise LlmneoError(f"{info_path} line {exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
    entry = info.get(name) if isinstance(info, dict) else None
    if entry is not None and not isinstance(entry, dict):
        raise LlmneoError(f"{info_path}: entry '{name}' must be an object with file_name or hf_hub_url")
    return entry


def _read_registered(name: str, entry: dict, dataset_dir: Path, limit: int | None) -> tuple[str, list, formats.Layout]:
    where = f"{dataset_dir / 'dataset_info.json'} entry '{name}'"
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise LlmneoError(f"{where}: formatting '{formatting}' is not supported; use alpaca or sharegpt")
    if entry.get("ranking"):
        raise LlmneoError(f"{where} is a ranking (preference) dataset; llmneo distils on supervised rows, so "
                          f"register a dataset without ranking: true")
    if entry.get("num_samples") is not None:
        raise LlmneoError(f"{where}: num_samples (sampling rows of one dataset) is not supported; use max_samples "
                          f"(the first rows of each dataset) or remove num_samples")
    layout = formats.Layout(formatting, dict(entry.get("columns") or {}), dict(entry.get("tags") or {}))
    layout.check(where)
    if "file_name" in entry:
        path = dataset_dir / entry["file_name"]
        if not path.exists():
            raise LlmneoError(f"{where}: file {path} not found; fix file_name or dataset_dir")
        return str(path), _read_path(path), layout
    if "hf_hub_url" in entry:
        url = entry["hf_hub_url"]
        rows = _read_hub(url, str(dataset_dir), limit, subset=entry.get("subset"),
                         split=entry.get("split", "train"), folder=entry.get("folder"))
        return url, [(url, rows)], layout
    raise LlmneoError(f"{where} has neither file_name nor hf_hub_url (other sources such as ms_hub_url or "
                      f"script_url are not supported); add one of them")


def _read_path(path: Path) -> list[tuple[str, list]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES)
        if not files:
            raise LlmneoError(f"folder {path} has no {', '.join(FILE_TYPES)} files; put the data files there")
        return [(str(f), _read_file(f)) for f in files]
    return [(str(path), _read_file(path))]


def _read_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{"text": line} for line in _read_text(path).splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    if suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    raise LlmneoError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_TYPES)}")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # no newline translation: csv needs its own
    except UnicodeDecodeError as exc:
        raise LlmneoError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8 "
                          f"(or give columnar data as .parquet)") from None


def _read_json(path: Path) -> list:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):
                raise LlmneoError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
        else:
            if isinstance(data, list):
                return data
            raise LlmneoError(f"{path} holds one JSON object, not rows; make it a list of objects or "
                              f"JSON lines (one object per line)")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LlmneoError(f"{path} line {lineno}: invalid JSON ({exc.msg}); write one JSON object "
                                  f"per line") from None
    return rows


def _read_hub(name: str, dataset_dir: str, limit: int | None, subset=None, split="train", folder=None) -> list:
    hub.require(name, "dataset", "dataset")  # one line, not the library's retries, when the Hub cannot be reached
    try:
        import datasets

        rows = datasets.load_dataset(name, name=subset, split=split, data_dir=folder)
        return rows.select(range(min(limit, len(rows)))).to_list() if limit else rows.to_list()
    except Exception as exc:  # the Hub, the network and dataset scripts fail in many ways; all mean "not found"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LlmneoError(f"dataset '{name}' was not found locally (nor under dataset_dir={dataset_dir}) or "
                          f"on the Hugging Face Hub ({reason}); check the name or give a local path") from None
