"""Teacher caches as other tools' logit datasets: `llmneo cache export|import FORMAT [CONFIG.yaml] FILE`.

FORMAT `axolotl`: the pre-tokenized dataset that axolotl's knowledge-distillation plugin
(`axolotl.integrations.kd`, v0.10 and later) trains from, as .jsonl or .parquet. One row per training
example of L tokens:
  input_ids, attention_mask, labels  (L,)    labels unshifted, -100 where not trained
  target_token_ids                   (L, k)  the teacher's top-k token ids for the token after position t
  target_logprobs                    (L, k)  their log-probs at kd_temperature, renormalized over the k
  target_mask                        (L, k)  1 where row t is trained on, else 0
Row t belongs to the token *after* t: axolotl's KD trainer puts the student's hidden state at t through
its head and pairs it with target row t, while its cross-entropy shifts the labels by one
(integrations/kd/kernels/liger.py). Row t is therefore used exactly at llmneo's response positions
(labels[t + 1] != -100); the others are padding as axolotl's KD chat-template loader pads them (ids
0..k-1, log-probs -inf, mask 0). A zero probability on a trained row is written as -1e9, not -inf (see
ZERO_LOGPROB). axolotl's target log-probs are a distribution over the k tokens (its loader renormalizes
them, and its loss exponentiates them as one), so:
  export  target_logprobs = log_softmax(cache log-probs / kd_temperature) over the k: the tail mass
          the cache keeps outside the top-k is dropped (the summary says how much there was);
  import  cache log-probs = log_softmax(kd_temperature x target_logprobs) over the k, tail mass 0.
With kd_temperature 1 and a top-k that holds all the teacher's mass (k = V), a round trip gives the
cache's rows back to float32 rounding. A file is imported only when its input_ids are the examples this
config tokenizes, in order: the cache is keyed to them (its fingerprint is the one `llmneo cache` writes,
with the teacher unknown, so never compared). Bad input is refused before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from llmneo.cache import write as cache
from llmneo.cache.fingerprint import fingerprint
from llmneo.cache.shards import make_index, save_shard, shard_name, staged
from llmneo.config.schema import Config, input_paths
from llmneo.data import dataset
from llmneo.data.labels import response_indices, response_positions
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.teachers import cached

FORMATS = ("axolotl",)
SUFFIXES = (".jsonl", ".parquet")
COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
TARGETS = ("target_token_ids", "target_logprobs", "target_mask")
PARQUET_ROWS = 256  # examples per parquet row group
# A top-k entry with probability 0 (a k beyond the teacher's support) is written as this log-prob, not -inf:
# axolotl's loss multiplies p·(log p - log q) on trained rows, where 0·-inf is NaN; exp(-1e9) is 0 exactly.
ZERO_LOGPROB = -1e9


def export_cache(config: Config, fmt: str, path: str) -> dict:
    """`llmneo cache export`: the cache at teacher_cache as a FORMAT dataset file at `path`."""
    check_format(fmt, "export")
    out = _data_file(path)
    if out.is_dir():
        raise LlmneoError(f"'{out}' is a directory; give the file to write, e.g. {out / 'kd.jsonl'}")
    if out.exists() and not config.overwrite_output_dir:
        raise LlmneoError(f"'{out}' exists; set overwrite_output_dir=true to replace it, or choose another file")
    for key, value in input_paths(config).items():
        for item in str(value or "").split(","):
            if item and Path(item).exists() and Path(item).resolve() == out.resolve():
                raise LlmneoError(f"'{out}' is the run's {key}; write the export to another file")
    if not config.teacher_cache:
        raise LlmneoError("teacher_cache is not set; give the cache to export, e.g. teacher_cache=cache/teacher")
    tokenizer, examples = _tokenized(config)
    teacher = cached.CachedTeacher(config.teacher_cache, fingerprint(config, tokenizer, examples),
                                   torch.device("cpu"))
    if config.effective_neat_packing:
        raise LlmneoError(f"teacher_cache '{config.teacher_cache}' holds neat-packed rows (position ids restarting at "
                          f"each example), which {fmt}'s dataset columns cannot carry; export a cache built with "
                          f"neat_packing: false")
    if teacher.cross:
        raise LlmneoError(f"teacher_cache '{config.teacher_cache}' is a cross-tokenizer cache: its ids are the "
                          f"teacher's own tokens, aligned to the student's positions, which {fmt}'s format has no "
                          f"place for")
    temperature = config.kd_temperature
    tail_mass, rows_written = 0.0, 0
    with _Writer(out) as writer:
        for number, example in enumerate(examples):
            positions, _ = response_positions(torch.tensor([example["labels"]]))  # (1, L)
            rows = teacher.rows({"index": torch.tensor([number])}, positions)
            writer.add(_axolotl_row(example, positions[0], rows, teacher.k, temperature))
            tail_mass += float(rows.tail.exp().sum())
            rows_written += len(rows)
    return {"file": str(out), "examples": len(examples), "tokens": rows_written, "k": teacher.k,
            "temperature": temperature, "tail_mass": tail_mass / max(rows_written, 1)}


def import_cache(config: Config, fmt: str, path: str) -> dict:
    """`llmneo cache import`: a FORMAT dataset file at `path` as an llmneo cache in teacher_cache."""
    check_format(fmt, "import")
    source = _data_file(path)
    if not source.is_file():
        raise LlmneoError(f"'{source}' does not exist; give the {fmt} dataset file to import")
    target = cache.cache_dir_to_write(config, example="cache/imported")
    tokenizer, examples = _tokenized(config)
    vocab, temperature = len(tokenizer), config.kd_temperature
    dtype = torch.float32  # the file's teacher and precision are unknown here: keep what it holds
    with staged(target) as staging:
        offsets, shards, buffer, k = [0], [], [], None
        count = 0
        for count, row in enumerate(_read_rows(source), start=1):
            if count > len(examples):
                raise LlmneoError(f"{source} has more rows than the {len(examples)} training examples this config "
                                  f"tokenizes; the file must hold exactly those examples, in order")
            rows, k = _cache_rows(row, examples[count - 1], f"{source} row {count}", k, vocab, temperature)
            buffer.append(rows)
            offsets.append(offsets[-1] + len(rows))
            if offsets[-1] - (shards[-1]["end"] if shards else 0) >= config.cache_shard_size:
                _flush(staging, buffer, shards, offsets[-1], dtype)
        if count != len(examples):
            raise LlmneoError(f"{source} has {count} rows but this config tokenizes {len(examples)} training "
                              f"examples; the file must hold exactly those examples, in order")
        _flush(staging, buffer, shards, offsets[-1], dtype)
        recorded = {**fingerprint(config, tokenizer, examples), "teacher": None}  # unknown here
        index = make_index(k, offsets, shards, recorded, dtype)
        index["tail"] = "none"  # axolotl keeps no tail: training refuses kd_loss: rkl on it (infinite)
        (staging / "index.json").write_text(json.dumps(index, indent=1))
    return cache.summary(target, index, k, len(examples))


# --- axolotl rows ---------------------------------------------------------------------------------------

def _axolotl_row(example: dict, positions: torch.Tensor, rows: SparseRows, k: int, temperature: float) -> dict:
    """One axolotl KD row for a tokenized example and its cache rows (one per True in `positions` (L,))."""
    length = len(example["input_ids"])
    token_ids = torch.arange(k).repeat(length, 1)  # (L, k): padding as axolotl's loader pads
    logprobs = torch.full((length, k), -math.inf)
    mask = torch.zeros(length, k, dtype=torch.long)
    token_ids[positions] = rows.ids
    logprobs[positions] = torch.log_softmax(rows.logprobs.float() / temperature, dim=-1).clamp(min=ZERO_LOGPROB)
    mask[positions] = 1
    return {"input_ids": list(example["input_ids"]), "attention_mask": [1] * length,
            "labels": list(example["labels"]), "target_token_ids": token_ids.tolist(),
            "target_logprobs": logprobs.tolist(), "target_mask": mask.tolist()}


def _cache_rows(row: dict, example: dict, where: str, k: int | None, vocab: int,
                temperature: float) -> tuple[SparseRows, int]:
    """The cache rows of one axolotl row, checked against the tokenized example it must be."""
    if not isinstance(row, dict):
        raise LlmneoError(f"{where} is not an object with the columns {', '.join(COLUMNS)}")
    missing = [c for c in ("input_ids", *TARGETS) if c not in row]
    if missing:
        raise LlmneoError(f"{where} has no {', '.join(missing)} column; an axolotl KD row holds "
                          f"{', '.join(COLUMNS)}")
    ids = example["input_ids"]
    if row["input_ids"] != ids:
        raise LlmneoError(f"{where}: its input_ids are not the training example this config tokenizes there "
                          f"({_first_difference(row['input_ids'], ids)}); the file must hold the examples of this "
                          f"dataset, tokenizer, template, cutoff_len and packing, in order")
    for column in TARGETS:
        if not isinstance(row[column], list) or len(row[column]) != len(ids):
            found = len(row[column]) if isinstance(row[column], list) else type(row[column]).__name__
            raise LlmneoError(f"{where}: {column} has {found} positions but input_ids has {len(ids)}; "
                              f"there must be one row of top-k per token")
    used = response_indices(example["labels"])
    for t in used:
        entries = [row[column][t] for column in TARGETS]
        if not all(isinstance(e, list) for e in entries) or len({len(e) for e in entries}) != 1:
            raise LlmneoError(f"{where} position {t}: target_token_ids, target_logprobs and target_mask must be "
                              f"lists of the same length (top-k entries)")
        k = k or len(entries[0])
        if len(entries[0]) != k or k == 0:
            raise LlmneoError(f"{where} position {t}: {len(entries[0])} top-k entries where the rows before have "
                              f"{k}; an llmneo cache keeps the same k at every position")
        if any(m != 1 for m in entries[2]):
            raise LlmneoError(f"{where} position {t}: target_mask is 0 where the config trains on the next token; "
                              f"the file has no teacher distribution there")
    try:
        token_ids = torch.tensor([row["target_token_ids"][t] for t in used]).reshape(len(used), k or 0)
        logprobs = torch.tensor([row["target_logprobs"][t] for t in used], dtype=torch.float64)
        logprobs = logprobs.reshape(token_ids.shape)
    except (TypeError, ValueError, RuntimeError):
        token_ids = logprobs = None
    if token_ids is None or token_ids.dtype != torch.long:
        raise LlmneoError(f"{where}: target_token_ids must hold integers and target_logprobs numbers")
    _check_ids(token_ids, used, vocab, where)
    bad = torch.isnan(logprobs) | torch.isposinf(logprobs) | (logprobs > 1e-3)
    if bad.any() or torch.isneginf(logprobs).all(-1).any():
        t = used[int((bad.any(-1) | torch.isneginf(logprobs).all(-1)).nonzero()[0])]
        raise LlmneoError(f"{where} position {t}: target_logprobs must be log-probabilities (at most 0, not NaN, "
                          f"at least one finite), got {row['target_logprobs'][t][:4]}...")
    values = torch.log_softmax(temperature * logprobs, dim=-1).float()  # (n, k): back to T = 1
    return SparseRows(token_ids, values, torch.full((len(used),), -math.inf)), k


def _check_ids(token_ids: torch.Tensor, used: list[int], vocab: int, where: str) -> None:
    outside = (token_ids < 0) | (token_ids >= vocab)
    if outside.any():
        row, col = (int(i) for i in outside.nonzero()[0])
        raise LlmneoError(f"{where} position {used[row]}: token id {int(token_ids[row, col])} is outside the "
                          f"tokenizer's vocabulary (ids 0..{vocab - 1}); the file was made with another tokenizer")
    ordered = token_ids.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if repeated.any():
        row = int(repeated.nonzero()[0])
        raise LlmneoError(f"{where} position {used[row]}: a token id appears twice among its top-k; each entry "
                          f"must be a different token")


def _first_difference(found: list, expected: list) -> str:
    if not isinstance(found, list):
        return f"not a list of token ids but {type(found).__name__}"
    for t, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            return f"first difference at token {t}: {a} vs {b}"
    return f"{len(found)} tokens vs {len(expected)}"


# --- files ---------------------------------------------------------------------------------------------

def check_format(fmt: str, verb: str) -> None:
    if fmt not in FORMATS:
        raise LlmneoError(f"unknown format '{fmt}' for llmneo cache {verb}; known: {', '.join(FORMATS)}")


def _data_file(path: str) -> Path:
    file = Path(path)
    if file.suffix not in SUFFIXES:
        raise LlmneoError(f"'{path}' is neither a .jsonl nor a .parquet file; name the dataset file with one of "
                          f"those extensions")
    return file


def _read_rows(source: Path):
    """The rows of a .jsonl or .parquet file, one dict at a time."""
    if source.suffix == ".jsonl":
        try:
            with source.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise LlmneoError(f"{source} line {number} is not JSON: {exc.msg}") from None
        except UnicodeDecodeError as exc:
            raise LlmneoError(f"{source} is not UTF-8 text (byte {exc.start} of a line cannot be decoded); save it "
                              f"as UTF-8") from None
        return
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(source).iter_batches(batch_size=PARQUET_ROWS)
        for batch in batches:
            yield from batch.to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise LlmneoError(f"{source} is not a readable parquet file: {str(exc).splitlines()[0]}") from None


class _Writer:
    """Rows into a staging file next to `out`, renamed to `out` only when every row is written."""

    def __init__(self, out: Path):
        self.out = out
        self.staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        self.pending: list[dict] = []
        self.parquet = None

    def __enter__(self) -> "_Writer":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.file = None if self.out.suffix == ".parquet" else self.staged.open("w", encoding="utf-8")
        except OSError as exc:
            raise LlmneoError(f"cannot write '{self.out}': {exc.strerror or exc}") from None
        return self

    def add(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")  # -inf as -Infinity, which pyarrow and HF datasets read
            return
        self.pending.append(row)
        if len(self.pending) >= PARQUET_ROWS:
            self._write_parquet()

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
        schema = pa.schema([("input_ids", ints), ("attention_mask", ints), ("labels", ints),
                            ("target_token_ids", pa.list_(ints)), ("target_logprobs", pa.list_(floats)),
                            ("target_mask", pa.list_(ints))])
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.staged, schema)
        if self.pending:
            self.parquet.write_table(pa.Table.from_pylist(self.pending, schema=schema))
        self.pending = []

    def __exit__(self, kind, error, trace) -> None:
        complete = False
        try:
            if kind is None and self.file is None:
                self._write_parquet()  # the last rows; an empty file still gets its schema
            complete = kind is None
        finally:
            for handle in (self.file, self.parquet):
                if handle is not None:
                    handle.close()
            if complete:
                os.replace(self.staged, self.out)
            else:
                self.staged.unlink(missing_ok=True)


# --- shared with llmneo cache -------------------------------------------------------------------------------

def _tokenized(config: Config):
    """The tokenizer and training examples exactly as `llmneo cache` and training build them."""
    tokenizer = cache.cache_tokenizer(config)
    return tokenizer, dataset.build(config, tokenizer).train


def _flush(staging: Path, buffer: list[SparseRows], shards: list[dict], end: int, dtype: torch.dtype) -> None:
    if not buffer:
        return
    name = shard_name(len(shards))
    save_shard(staging / name, buffer, dtype)
    shards.append({"file": name, "start": shards[-1]["end"] if shards else 0, "end": end})
    buffer.clear()
