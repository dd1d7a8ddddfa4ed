"""Training data: find the datasets, normalise every row to a conversation, tokenize with label masks.

`dataset` is a comma-separated list; each name is, in this order of lookup, an entry of
`dataset_dir/dataset_info.json` (LLaMA-Factory's format, column and tag mappings included), a local
file or folder (as given, then under `dataset_dir`), or a Hugging Face Hub id (`owner/name`).
Files: .json (a list of objects, or JSON lines), .jsonl, .parquet, .csv, .txt (one `text` row per
non-empty line); a folder means all such files in it, sorted by name.

Formats, detected per file from its columns (or given by dataset_info's `formatting`):
  alpaca    instruction, input (optional), output, system (optional), history (optional [user, reply] pairs)
  sharegpt  conversations: [{from: human|gpt|system, value}]; system (optional)
  messages  messages: [{role: system|user|assistant, content}] (OpenAI / TRL style)
  prompt/completion  prompt, completion: strings, or lists of messages (TRL style)
  text      text: pretraining style, every token trained
Tool turns (observation / tool) count as user turns and function_call as an assistant turn.
Every conversation becomes [system?, user, assistant, user, assistant, ...]; a row that cannot is
an error naming the file, the row and the field. See `llmneo.templates` for rendering and masks.

Examples hold `input_ids` and unshifted `labels` (the token itself where trained, -100 elsewhere);
the training loop shifts them. `val_size` rows are held out by a shuffle seeded with `seed`; both
splits keep the original row order.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmneo import formats, templates
from llmneo.config import looks_like_hub_id
from llmneo.errors import LlmneoError

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
IGNORE_INDEX = templates.IGNORE_INDEX


@dataclass
class Splits:
    train: list[dict]  # {"input_ids": list[int], "labels": list[int]}; labels -100 except on reply tokens
    eval: list[dict] | None  # the held-out examples when val_size > 0, else None


# --- building --------------------------------------------------------------------------------

def build(config, tokenizer) -> Splits:
    """Load `config.dataset`, hold out `val_size` rows, and tokenize both splits with label masks."""
    template, own = templates.resolve(tokenizer, config.template)
    if own and config.template:
        warnings.warn(f"the tokenizer has its own chat template, which is used; template='{config.template}' "
                      f"is ignored", stacklevel=2)
    rows = [(source, n, row) for source, dataset in load_rows(config) for n, row in enumerate(dataset, 1)]
    train_rows, eval_rows = _split(rows, config.val_size, config.seed)
    train, dropped = _encode(train_rows, tokenizer, template, config.cutoff_len)
    evaluation, eval_dropped = _encode(eval_rows, tokenizer, template, config.cutoff_len)
    if not train:
        raise LlmneoError(f"no trainable tokens: every example's prompt is longer than cutoff_len="
                          f"{config.cutoff_len} (or every response is masked); raise cutoff_len")
    if dropped + eval_dropped:
        warnings.warn(f"dropped {dropped + eval_dropped} of {len(rows)} examples with no trainable token "
                      f"within cutoff_len={config.cutoff_len}; raise cutoff_len to keep them", stacklevel=2)
    return Splits(train=train, eval=evaluation if eval_rows and evaluation else None)


def _split(rows: list, val_size: float, seed: int) -> tuple[list, list]:
    if not val_size:
        return rows, []
    held_out = int(val_size) if val_size >= 1 else max(1, round(val_size * len(rows)))
    if held_out >= len(rows):
        raise LlmneoError(f"val_size={val_size} holds out {held_out} of {len(rows)} rows, leaving none to "
                          f"train on; lower val_size or add data")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def _encode(rows: list, tokenizer, template: str, cutoff_len: int) -> tuple[list[dict], int]:
    import jinja2

    examples, dropped = [], 0
    for source, n, row in rows:
        if "text" in row:
            ids, labels = templates.encode_text(tokenizer, row["text"])
        else:
            try:
                ids, labels = templates.encode_conversation(tokenizer, template, row["messages"])
            except jinja2.TemplateError as exc:
                raise LlmneoError(f"{source} row {n}: the chat template failed: {exc}; fix the row or "
                                  f"the template") from None
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        # labels[0] is never scored: the loop predicts token t+1 from position t.
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
        else:
            dropped += 1
    return examples, dropped


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_token_id, attention_mask 0 and labels -100 on padding."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:  # (B, width)
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    batch = {"input_ids": pad([list(e["input_ids"]) for e in examples], pad_token_id),
             "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
             "labels": pad([list(e["labels"]) for e in examples], IGNORE_INDEX)}
    if "index" in examples[0]:  # position in the split: how a teacher cache finds the example's rows
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


# --- finding and reading datasets ------------------------------------------------------------

def load_rows(config) -> list[tuple[str, list[dict]]]:
    """(source, rows) per dataset; each row is {"messages": [...]} or {"text": str}."""
    names = [n.strip() for n in (config.dataset or "").split(",") if n.strip()]
    if not names:
        raise LlmneoError("dataset is not set; give a file, folder, dataset_info.json name or Hub id, "
                          "e.g. dataset=data/train.jsonl")
    loaded = []
    for name in names:
        source, parts, layout = _read_dataset(name, config.dataset_dir, config.max_samples)
        rows: list[dict] = []
        for part_source, part_rows in parts:
            if config.max_samples is not None:
                part_rows = part_rows[:config.max_samples - len(rows)]
            rows += formats.normalise(part_source, part_rows, layout)
            if config.max_samples is not None and len(rows) >= config.max_samples:
                break
        if not rows:
            raise LlmneoError(f"dataset '{name}' ({source}) has no rows; check that the file holds data")
        loaded.append((source, rows))
    return loaded


def _read_dataset(name: str, dataset_dir: str, limit: int | None) -> tuple[str, list[tuple[str, list]], formats.Layout]:
    """(source, [(file, raw rows)], layout) for one dataset name; `limit` spares reading a whole Hub dataset."""
    entry = _registered(name, Path(dataset_dir))
    if entry is not None:
        return _read_registered(name, entry, Path(dataset_dir), limit)
    for candidate in (Path(name).expanduser(), Path(dataset_dir) / name):
        if candidate.exists():
            return str(candidate), _read_path(candidate), formats.Layout()
    if looks_like_hub_id(name) and Path(name).suffix.lower() not in FILE_TYPES:
        return name, [(name, _read_hub(name, dataset_dir, limit))], formats.Layout()
    raise LlmneoError(f"dataset '{name}' not found: no file {name}, no file {Path(dataset_dir) / name}, and no "
                      f"'{name}' entry in {Path(dataset_dir) / 'dataset_info.json'}; check the name or dataset_dir")


def _registered(name: str, dataset_dir: Path) -> dict | None:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
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
    layout = formats.Layout(formatting, dict(entry.get("columns") or {}), dict(entry.get("tags") or {}))
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
        return [{"text": line} for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    raise LlmneoError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_TYPES)}")


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
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
    try:
        import datasets

        rows = datasets.load_dataset(name, name=subset, split=split, data_dir=folder)
        return rows.select(range(min(limit, len(rows)))).to_list() if limit else rows.to_list()
    except Exception as exc:  # the Hub, the network and dataset scripts fail in many ways; all mean "not found"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LlmneoError(f"dataset '{name}' was not found locally (nor under dataset_dir={dataset_dir}) or "
                          f"on the Hugging Face Hub ({reason}); check the name or give a local path") from None


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run can rebuild any epoch's order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def micro_batches(loader, accelerator, start: int = 0):
    """Micro-batches across epochs from micro-batch number `start` on (per rank), reshuffled each epoch.

    Resuming mid-epoch skips the consumed batches of that epoch by index only: nothing before them is
    read or collated.
    """
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            yield batch
        epoch, skip = epoch + 1, 0
