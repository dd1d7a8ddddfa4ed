"""Training data: find the datasets, normalise every row to a conversation, tokenize with label masks.

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
the row and the field (`llmneo.data.formats`). Tool schemas, calls and results: `llmneo.data.tool_calls`. Rendering
and label masks: `llmneo.data.templates`.

`stage: pt` trains on raw text only (conversations are refused). Examples hold `input_ids` and
unshifted `labels` (the token itself where trained, -100 elsewhere); the training loop shifts them.
Held-out data is `eval_dataset` (resolved like `dataset`) or `val_size` rows, held out by a shuffle
seeded with `seed` (both splits keep the original row order). Each split is tokenized, then packed
when `config.effective_packing` (`llmneo.data.packing`).
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmneo import hub
from llmneo.config.schema import looks_like_hub_id
from llmneo.data import formats, packing, templates
from llmneo.data import tool_calls as tool_data
from llmneo.errors import LlmneoError

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
IGNORE_INDEX = templates.IGNORE_INDEX


@dataclass
class Splits:
    train: list[dict]  # {"input_ids": list[int], "labels": list[int]}; labels -100 except on reply tokens
    eval: list[dict] | None  # the held-out examples (eval_dataset, or val_size > 0), else None


# --- building --------------------------------------------------------------------------------

def build(config, tokenizer, teacher_side=None) -> Splits:
    """Load `config.dataset` and the held-out data, tokenize both with label masks, and pack them if asked.

    `teacher_side` (crosstok.TeacherSide, cross-tokenizer KD): each training example also gets the teacher's
    tokens of its conversation and, per student token, the teacher span covering the same text."""
    template, own = templates.resolve(tokenizer, config.template)
    if own and config.template:
        warnings.warn(f"the tokenizer has its own chat template, which is used; template='{config.template}' "
                      f"is ignored", stacklevel=2)
    rows = _numbered(load_rows(config))
    train_rows, eval_rows = ((rows, _numbered(load_rows(config, config.eval_dataset, "eval_dataset")))
                             if config.eval_dataset else _split(rows, config.val_size, config.seed))
    if any("messages" in row for _, _, row in train_rows + eval_rows):
        templates.check_for_conversations(tokenizer, config.template)
    # Packed text is cut into blocks after concatenation, so it is not truncated first.
    cutoff = None if config.effective_packing and config.stage == "pt" else config.cutoff_len
    encoder = _Encoder(tokenizer, template, own, cutoff)
    train, evaluation = encoder.encode(train_rows, teacher_side), encoder.encode(eval_rows, split="held-out")
    if not train:
        raise LlmneoError(f"no trainable tokens: every example's prompt is longer than cutoff_len="
                          f"{config.cutoff_len} (or every response is masked); raise cutoff_len")
    if config.eval_dataset and not evaluation:
        raise LlmneoError(f"eval_dataset '{config.eval_dataset}' has no example with a response token within "
                          f"cutoff_len={config.cutoff_len}; raise cutoff_len or choose other held-out data")
    if encoder.dropped:
        warnings.warn(f"dropped {encoder.dropped} of {len(train_rows) + len(eval_rows)} examples with no trainable "
                      f"token within cutoff_len={config.cutoff_len}; raise cutoff_len to keep them", stacklevel=2)
    cut = [f"{n} of {total} {split} examples ({lost:,} {'response ' if config.stage == 'sft' else ''}tokens lost)"
           for split, (n, lost, total) in encoder.cut.items() if n]
    if cut:
        warnings.warn(f"cutoff_len={config.cutoff_len} cut {'the replies of ' if config.stage == 'sft' else ''}"
                      f"{' and '.join(cut)}; raise cutoff_len to keep them", stacklevel=2)
    if encoder.tools_as_text:
        warnings.warn(f"the tokenizer's chat template ignores tool schemas, tool calls or tool results in "
                      f"{encoder.tools_as_text} examples; those are rendered as text instead (schemas in the "
                      f"system prompt, calls as 'Action: ... / Action Input: ...')", stacklevel=2)
    if config.effective_packing:
        pack = packing.concatenate if config.stage == "pt" else packing.best_fit
        train, evaluation = pack(train, config.cutoff_len), pack(evaluation, config.cutoff_len)
    return Splits(train=train, eval=evaluation if eval_rows and evaluation else None)


def _numbered(loaded: list[tuple[str, list[dict]]]) -> list[tuple[str, int, dict]]:
    return [(source, n, row) for source, dataset in loaded for n, row in enumerate(dataset, 1)]


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


class _Encoder:
    """Rows → examples; counts what it drops, what cutoff_len cuts (per split: examples kept but cut, trained tokens
    they lost, rows) and the tool rows its chat template could not render."""

    def __init__(self, tokenizer, template: str, own: bool, cutoff_len: int | None):
        self.tokenizer, self.template, self.own, self.cutoff_len = tokenizer, template, own, cutoff_len
        self.dropped = self.tools_as_text = 0
        self.cut: dict[str, tuple[int, int, int]] = {}

    def encode(self, rows: list, teacher_side=None, split: str = "training") -> list[dict]:
        import jinja2

        examples, cut, lost = [], 0, 0
        if teacher_side is not None:
            from llmneo.crosstok.offsets import require_fast

            require_fast(self.tokenizer, "student")
        for source, n, row in rows:
            rendered = None
            if "text" in row:
                if teacher_side is not None:
                    raise LlmneoError(f"{source} row {n} is plain text; cross-tokenizer KD aligns the replies of "
                                      f"conversations, so give conversation rows (or a teacher with the student's "
                                      f"tokenizer)")
                ids, labels = templates.encode_text(self.tokenizer, row["text"])
            else:
                try:
                    messages, tools = self._tools_rendered(row)
                    if teacher_side is None:
                        ids, labels = templates.encode_conversation(self.tokenizer, self.template, messages, tools)
                    else:
                        rendered, ids, labels = self._rendered(messages, tools)
                except jinja2.TemplateError as exc:
                    raise LlmneoError(f"{source} row {n}: the chat template failed: {exc}; fix the row or "
                                      f"the template") from None
            beyond = 0 if self.cutoff_len is None else sum(label != IGNORE_INDEX for label in labels[self.cutoff_len:])
            ids, labels = ids[:self.cutoff_len], labels[:self.cutoff_len]  # [:None] keeps all
            # labels[0] is never scored: the loop predicts token t+1 from position t.
            if any(label != IGNORE_INDEX for label in labels[1:]):
                example = {"input_ids": ids, "labels": labels, **({"route": row["route"]} if "route" in row else {})}
                if rendered is not None:
                    try:
                        example.update(teacher_side.view(messages, tools, rendered, len(ids)))
                    except LlmneoError as exc:
                        raise LlmneoError(f"{source} row {n}: {exc}") from None
                examples.append(example)
                cut, lost = cut + (beyond > 0), lost + beyond
            else:
                self.dropped += 1
        self.cut[split] = (cut, lost, len(rows))
        return examples

    def _rendered(self, messages, tools):
        """(crosstok.Rendered, ids, labels): the student's rendering with its token offsets (cross-tokenizer KD)."""
        from llmneo.crosstok.offsets import Rendered

        text, replies = templates.render_replies(self.tokenizer, self.template, messages, tools)
        ids, labels, offsets = templates.encode_by_offsets(self.tokenizer, text, [(a, b) for _, a, b in replies])
        return Rendered(text, offsets, replies), ids, labels

    def _tools_rendered(self, row: dict) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) for the template: as they are when it renders them, else in the text form."""
        import jinja2

        messages, tools = row["messages"], row.get("tools")
        if not tool_data.involved(messages, tools):
            return messages, None
        if self.own:
            def render(m, t):
                return templates.render(self.tokenizer, self.template, m, t)

            try:
                if tool_data.honoured(render, messages, tools):
                    return messages, tools
            except jinja2.TemplateError:
                pass  # e.g. a template that raises on the `tool` role: the text form has none
            self.tools_as_text += 1
        return tool_data.as_text(messages, tools), None


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
    if "teacher" in examples[0]:  # which teacher scores the example (teacher_column routing)
        batch["teacher"] = torch.tensor([e["teacher"] for e in examples], dtype=torch.long)
    if "teacher_input_ids" in examples[0]:  # cross-tokenizer KD: the teacher's tokens and the alignment
        from llmneo.crosstok.offsets import collate_teacher

        batch.update(collate_teacher(examples, width))
    return batch


# --- finding and reading datasets ------------------------------------------------------------

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
