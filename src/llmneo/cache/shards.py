"""A teacher cache folder on disk: its format, how every writer stores it, and how training opens it.

`teacher_cache` holds:
  shard-00000.safetensors ...  the teacher's top-k token ids and log-probs (T = 1) at each response position,
                               and `tail` (M,) float32, the log of the probability mass outside the top-k;
                               a cross-tokenizer cache also `aligned` (M,) uint8. In one of two layouts:
                               compact (the default, `cache_format: compact`): `ids` (M, B) uint8 Elias–Fano
                                 codes, `logprobs` (M, k) uint8 codes, `scale` (M,) float16 (compact.py);
                               exact (`cache_format: exact`, and every cache of format v1): `ids` (M, k)
                                 int32, `logprobs` (M, k) float16 or float32
  index.json                   format (v2: with `layout`, and `vocab` for compact codes; v1: exact), k,
                               logprobs_dtype (exact), per-example row offsets, shard row ranges, and the
                               fingerprint (fingerprint.py)
  teacher_tokenizer/           a cross-tokenizer cache only: the teacher's tokenizer (TEACHER_TOKENIZER)
Rows are the response positions of the training split, example by example, in position order.
Training opens the shards lazily (safetensors `safe_open`, `open_shards`) and reads each batch's rows, so a
cache larger than RAM works, and DDP ranks do not each hold a full copy.

In the exact layout, log-probs are stored in float16 (6 bytes per top-k entry with its id, not 8) when the teacher
computes in 16 bits (bf16 / fp16, or torch_dtype bfloat16 / float16; for a served teacher, the run's precision): its
logits are then already rounded at least as coarsely (8 or 11 significant bits) as float16 rounds a
log-prob. A float32 teacher's are stored in float32, so nothing is lost. Rows are read back as float32
either way; caches written before `logprobs_dtype` was recorded in index.json hold float32. Every writer
stores shards through `save_shard` (named by `shard_name`) and the index through `make_index`, in a
`staged` folder that becomes the cache only when it is complete; `compact_vocab` says which layout a config
asks for, and `read_rows` turns a row range of a shard back into SparseRows, in either layout.

This module knows nothing of teachers: the writers above it (write.py, capture.py, cross.py, axolotl.py)
give it rows, and teachers.cached reads through `read_index` and `open_shards`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmneo import run_dir
from llmneo.cache import compact
from llmneo.config.schema import Config
from llmneo.data import dataset
from llmneo.data.labels import response_positions
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.models import loading

FORMAT = "llmneo-teacher-topk-v2"
FORMAT_V1 = "llmneo-teacher-topk-v1"  # exact rows only; still read
LAYOUTS = ("compact", "exact")
SHARD_ROWS = 1 << 18  # rows per shard file: 256k positions, ~100 MB at k = 64
TEACHER_TOKENIZER = "teacher_tokenizer"  # a cross-tokenizer cache keeps the teacher's tokenizer here


def logprobs_dtype(config: Config) -> torch.dtype:
    """The dtype a cache's log-probs are stored in: float16 when the teacher computes in 16 bits, else float32.

    A bf16 logit keeps 8 significant bits, so a bf16 teacher's log-probs are already off by up to
    |logit| x 2^-9; float16 rounds a log-prob by at most |log-prob| x 2^-11 (measured on training:
    docs/benchmarks.md section 5). A float32 teacher's log-probs are kept exactly.
    """
    return torch.float32 if loading.weight_dtype(config, "teacher") == torch.float32 else torch.float16


@torch.no_grad()
def topk_rows(logits: torch.Tensor, k: int) -> SparseRows:
    """Top-k ids and log-probs of (C, V) logits, and the log-mass of the other V - k tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    values, ids = logp.topk(k, dim=-1)  # (C, k)
    rest = logp.scatter(-1, ids, -math.inf)  # (C, V): top-k removed
    tail = torch.logsumexp(rest, dim=-1) if k < logp.shape[-1] else torch.full_like(values[:, 0], -math.inf)
    return SparseRows(ids, values, tail)


def compact_vocab(config: Config, vocab_size: int) -> int | None:
    """The vocabulary the compact layout codes ids below, or None when the config asks for the exact layout."""
    return vocab_size if config.cache_format == "compact" else None


def shard_name(number: int) -> str:
    """The file name of a cache's shard `number` (0, 1, ...)."""
    return f"shard-{number:05d}.safetensors"


def save_shard(path: Path, rows: list[SparseRows], logprobs_dtype: torch.dtype,
               extra: dict[str, list[torch.Tensor]] | None = None, vocab: int | None = None) -> None:
    """One shard file of `rows` (in order), compact when `vocab` is given (ids below it), else exact: ids int32,
    logprobs in `logprobs_dtype`, tail float32; and per-row tensors `extra` as given (a cross-tokenizer cache:
    `aligned` uint8, which rows hold a teacher span, and `shift` float32, the span's continuation log-prob)."""
    from safetensors.torch import save_file

    if vocab is not None:
        tensors = compact.encode(SparseRows(torch.cat([r.ids for r in rows]), torch.cat([r.logprobs for r in rows]),
                                            torch.cat([r.tail for r in rows])), vocab)
    else:
        tensors = {"ids": torch.cat([r.ids for r in rows]).to(torch.int32).contiguous(),
                   "logprobs": torch.cat([r.logprobs for r in rows]).to(logprobs_dtype).contiguous(),
                   "tail": torch.cat([r.tail for r in rows]).float().contiguous()}
    for name, parts in (extra or {}).items():
        tensors[name] = torch.cat(parts).contiguous()
    save_file(tensors, str(path))


def make_index(k: int, offsets: list[int], shards: list[dict], fingerprint: dict, logprobs_dtype: torch.dtype,
               vocab: int | None = None) -> dict:
    """index.json's contents for a cache whose shards `save_shard` wrote with `logprobs_dtype` and `vocab`."""
    layout = {"layout": "compact", "vocab": vocab} if vocab is not None else {
        "layout": "exact", "logprobs_dtype": str(logprobs_dtype).removeprefix("torch.")}
    return {"k": k, "rows": offsets[-1], "offsets": offsets, "shards": shards, "format": FORMAT, **layout,
            "fingerprint": fingerprint}


def layout_of(index: dict) -> tuple[str, int | None]:
    """(layout, the compact codes' vocabulary or None) of a cache's index."""
    return index.get("layout", "exact"), index.get("vocab")


def stored_tensors(index: dict) -> tuple[str, ...]:
    """The names of the row tensors `read_rows` takes from a shard of this cache (`aligned` is read apart)."""
    names = ("ids", "logprobs", "scale", "tail") if layout_of(index)[0] == "compact" else ("ids", "logprobs", "tail")
    return names + (("shift",) if index.get("span_shift") else ())


def read_rows(pieces: list[list[torch.Tensor]], index: dict, device: torch.device) -> SparseRows:
    """SparseRows on `device` (log-probs float32, rank order) from row ranges read from shards, each a list of
    the `stored_tensors`: compact rows are moved as bytes and decoded there, in one pass for all pieces."""
    joined = [torch.cat(parts).to(device) for parts in zip(*pieces)]
    shift = joined.pop() if index.get("span_shift") else None
    layout, vocab = layout_of(index)
    if layout == "compact":
        rows = compact.decode(*joined, vocab)
    else:
        ids, logprobs, tail = joined
        rows = SparseRows(ids.long(), logprobs.float(), tail.float())
    if shift is None:
        return rows
    # a cross-tokenizer span's continuation: its log-prob moves the whole row, top-k and tail alike (the codes
    # keep the top-k mass at 1 - exp(tail), so the move is stored apart)
    return SparseRows(rows.ids, rows.logprobs + shift[:, None], rows.tail + shift)


@contextlib.contextmanager
def staged(target: Path):
    """A staging directory beside `target` that replaces it when the block ends well, and is removed otherwise."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        raise LlmneoError(f"cannot write teacher_cache '{target}': {exc.strerror or exc}") from None
    try:
        yield staging
        run_dir.plain_modes(staging)  # mkdtemp and safetensors make 0700 / 0600: a shared cache must be readable
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_rows(directory: Path, rows_of, examples: list[dict], pad_id: int, k: int, fingerprint: dict, *,
               batch_size: int, device: torch.device, shard_size: int, logprobs_dtype: torch.dtype,
               vocab: int | None = None, extra: dict | None = None) -> dict:
    """Shards and index.json from `rows_of(batch, positions)`, which yields (SparseRows, extra | None) chunks
    (extra: per-row tensors to store by name, see `save_shard`)
    in position order for each collated batch of `examples`, compact with ids below `vocab` when given; `extra`
    goes into the index. Returns the index."""
    offsets, shards = _write_shards(directory, rows_of, examples, pad_id, batch_size, device, shard_size,
                                    logprobs_dtype, vocab)
    written = {**make_index(k, offsets, shards, fingerprint, logprobs_dtype, vocab), **(extra or {})}
    (directory / "index.json").write_text(json.dumps(written, indent=1))
    return written


@torch.inference_mode()
def _write_shards(staging: Path, rows_of, examples, pad_id, batch_size, device, shard_size: int,
                  logprobs_dtype: torch.dtype, vocab: int | None) -> tuple[list[int], list[dict]]:
    offsets = [0]
    shards: list[dict] = []
    buffer: list[SparseRows] = []
    extras: dict[str, list[torch.Tensor]] = {}
    buffered = 0

    def flush():
        nonlocal buffer, extras, buffered
        if not buffered:
            return
        name = shard_name(len(shards))
        start = shards[-1]["end"] if shards else 0
        save_shard(staging / name, buffer, logprobs_dtype, extras or None, vocab)
        shards.append({"file": name, "start": start, "end": start + buffered})
        buffer, extras, buffered = [], {}, 0

    bar = tqdm(total=len(examples), desc="llmneo cache", unit="ex", dynamic_ncols=True)
    for first in range(0, len(examples), batch_size):
        part = examples[first:first + batch_size]
        batch = {key: value.to(device) for key, value in dataset.collate(part, pad_id).items()}
        positions, _ = response_positions(batch["labels"])
        for rows, extra in rows_of(batch, positions):
            buffer.append(SparseRows(rows.ids.cpu(), rows.logprobs.cpu(), rows.tail.cpu()))
            for key, value in (extra or {}).items():
                extras.setdefault(key, []).append(value.cpu())
            buffered += rows.ids.shape[0]
        for count in positions.sum(dim=1).tolist():
            offsets.append(offsets[-1] + count)
        if buffered >= shard_size:
            flush()
        bar.update(len(part))
        bar.set_postfix(tokens=offsets[-1])
    flush()
    bar.close()
    return offsets, shards


def read_index(root: Path) -> dict:
    """index.json of the cache at `root`, refused when missing, corrupt, of another format or incomplete."""
    index_file = root / "index.json"
    if not index_file.is_file():
        raise LlmneoError(f"teacher_cache '{root}' has no index.json; build it with llmneo cache CONFIG.yaml")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError:
        raise LlmneoError(f"teacher_cache '{root}/index.json' is corrupt; rebuild it with llmneo cache") from None
    if index.get("format") not in (FORMAT, FORMAT_V1):
        raise LlmneoError(f"teacher_cache '{root}' has format {index.get('format')!r}, expected {FORMAT} (or "
                          f"{FORMAT_V1}); rebuild it with llmneo cache")
    layout, vocab = layout_of(index)
    if layout not in LAYOUTS or (layout == "compact" and not (isinstance(vocab, int) and vocab > 0)) or (
            index["format"] == FORMAT_V1 and layout != "exact"):
        raise LlmneoError(f"teacher_cache '{root}/index.json' has layout {layout!r} (vocab {vocab!r}), which this "
                          f"llmneo does not read; rebuild it with llmneo cache")
    if not isinstance(index.get("fingerprint"), dict) or "offsets" not in index or "shards" not in index:
        raise LlmneoError(f"teacher_cache '{root}/index.json' is incomplete; rebuild it with llmneo cache")
    return index


def all_rows(root: Path) -> tuple[dict, SparseRows]:
    """(index, every row) of the cache at `root`, decoded on the CPU whatever the layout: for inspecting a cache
    (tests, benchmarks); training reads per batch through `open_shards`."""
    index = read_index(root)
    _, handles = open_shards(root, index)
    pieces = [[handle.get_tensor(name) for name in stored_tensors(index)] for handle in handles]
    return index, read_rows(pieces, index, torch.device("cpu"))


def _widths(index: dict) -> dict[str, int]:
    """The width of each 2-D row tensor of this cache's shards."""
    layout, vocab = layout_of(index)
    return {"ids": compact.id_bytes(index["k"], vocab) if layout == "compact" else index["k"], "logprobs": index["k"]}


def open_shards(root: Path, index: dict) -> tuple[list[int], list]:
    """Every shard of the cache at `root` opened lazily (rows are read per batch, so a cache larger than RAM
    still trains): (first row of each shard, its safe_open handle), checked against `index`."""
    from safetensors import safe_open

    starts, handles = [], []
    expected = 0
    for shard in index["shards"]:
        file = root / shard["file"]
        if not file.is_file():
            raise LlmneoError(f"teacher_cache shard {file} is missing; rebuild the cache with llmneo cache")
        try:
            handle = safe_open(str(file), framework="pt")
            rows = handle.get_slice("ids").get_shape()[0]
            if any(handle.get_slice(name).get_shape()[0] != rows for name in stored_tensors(index)) or any(
                    handle.get_slice(name).get_shape()[1:] != [width] for name, width in _widths(index).items()):
                rows = -1  # a tensor of another length or width (a missing one raises, caught below)
        except Exception:  # safetensors raises its own error type for a damaged file
            rows, handle = -1, None
        if shard["start"] != expected or rows != shard["end"] - shard["start"]:
            raise LlmneoError(f"teacher_cache shard {file} is truncated or does not match index.json; "
                              f"rebuild the cache with llmneo cache")
        starts.append(shard["start"])
        handles.append(handle)
        expected = shard["end"]
    if expected != index["offsets"][-1]:
        raise LlmneoError("teacher_cache shards do not add up to the index; rebuild the cache with llmneo cache")
    return starts, handles
