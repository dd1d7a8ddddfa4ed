"""Offline teacher cache: run the teacher once, keep its top-k per response position, train from that.

`llmneo cache CONFIG.yaml` writes into `teacher_cache`:
  shard-00000.safetensors ...  `ids` (M, k) int32, `logprobs` (M, k) float16 or float32, `tail` (M,) float32:
                               the teacher's top-k token ids and log-probs (T = 1) at each response
                               position, and the log of the probability mass outside the top-k
  index.json                   format, k, logprobs_dtype, per-example row offsets, shard row ranges, and
                               the fingerprint
Rows are the response positions of the training split, example by example, in position order.
Training opens the shards lazily (safetensors `safe_open`) and reads each batch's rows, so a cache
larger than RAM works, and DDP ranks do not each hold a full copy.

Log-probs are stored in float16 (6 bytes per top-k entry with its id, not 8) when the teacher computes in
16 bits (bf16 / fp16, or torch_dtype bfloat16 / float16; for a served teacher, the run's precision): its
logits are then already rounded at least as coarsely (8 or 11 significant bits) as float16 rounds a
log-prob. A float32 teacher's are stored in float32, so nothing is lost. Rows are read back as float32
either way; caches written before `logprobs_dtype` was recorded in index.json hold float32. Every writer
stores shards through `save_shard` and the index through `make_index`.

The fingerprint ties the cache to the teacher (its config and weight files), the tokenizer vocabulary,
the chat template, stage, packing, cutoff_len and the tokenized dataset rows; training refuses a cache
whose fingerprint differs from the run's and names the part that differs (settings before rows). k is
recorded beside it in index.json: any k trains, so it is not compared.

Reading: cache_reader.CachedTeacher. A teacher with another tokenizer (cross-tokenizer KD) gets its own
rows, over its own vocabulary, with `aligned` and its tokenizer: cache_cross.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmneo import run_dir
from llmneo.config.schema import Config, input_paths
from llmneo.data import dataset
from llmneo.data.labels import response_positions
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.models import heads, loading

FORMAT = "llmneo-teacher-topk-v1"
SHARD_ROWS = 1 << 18  # rows per shard file: 256k positions, ~100 MB at k = 64


def logprobs_dtype(config: Config) -> torch.dtype:
    """The dtype a cache's log-probs are stored in: float16 when the teacher computes in 16 bits, else float32.

    A bf16 logit keeps 8 significant bits, so a bf16 teacher's log-probs are already off by up to
    |logit| x 2^-9; float16 rounds a log-prob by at most |log-prob| x 2^-11 (measured on training:
    docs/benchmarks.md section 5). A float32 teacher's log-probs are kept exactly.
    """
    return torch.float32 if loading.weight_dtype(config, "teacher") == torch.float32 else torch.float16


def save_shard(path: Path, rows: list[SparseRows], logprobs_dtype: torch.dtype,
               aligned: list[torch.Tensor] | None = None) -> None:
    """One shard file of `rows` (in order): ids int32, logprobs in `logprobs_dtype`, tail float32; and for a
    cross-tokenizer cache `aligned` uint8 (which rows hold a teacher span)."""
    from safetensors.torch import save_file

    tensors = {"ids": torch.cat([r.ids for r in rows]).to(torch.int32).contiguous(),
               "logprobs": torch.cat([r.logprobs for r in rows]).to(logprobs_dtype).contiguous(),
               "tail": torch.cat([r.tail for r in rows]).float().contiguous()}
    if aligned is not None:
        tensors["aligned"] = torch.cat(aligned).to(torch.uint8).contiguous()
    save_file(tensors, str(path))


def make_index(k: int, offsets: list[int], shards: list[dict], fingerprint: dict, logprobs_dtype: torch.dtype) -> dict:
    """index.json's contents for a cache whose shards `save_shard` wrote with `logprobs_dtype`."""
    return {"k": k, "rows": offsets[-1], "offsets": offsets, "shards": shards, "format": FORMAT,
            "logprobs_dtype": str(logprobs_dtype).removeprefix("torch."), "fingerprint": fingerprint}


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def teacher_identity(path: str) -> str:
    """A content-based id of a teacher: its config plus the names and sizes of its weight files."""
    root = Path(path)
    if not root.is_dir():
        return f"hub:{path}"
    parts = [(root / "config.json").read_bytes() if (root / "config.json").is_file() else b""]
    for weight in sorted(root.glob("*.safetensors")):
        parts.append(f"{weight.name}:{weight.stat().st_size}".encode())
    return _sha(b"\n".join(parts))


def served_identity(model: str) -> str:
    """The fingerprint's teacher part for a served teacher: the served model's name."""
    return f"endpoint-model:{model}"


def fingerprint(config: Config, tokenizer, examples: list[dict], teacher: str | None = None,
                teacher_tokenizer=None) -> dict:
    """What a cache's rows depend on that training compares, config-level parts first (k is not one).

    The order is the order of comparison: a changed setting that changes tokenization (cutoff_len, stage,
    packing, template) also changes the tokenized rows, so the settings are compared, and named, before the
    rows, whose difference is then only reported when no named setting explains it.
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    template = str(getattr(tokenizer, "chat_template", None) or config.template or "default").encode()
    rows = hashlib.sha256()
    for example in examples:
        rows.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    if teacher is None and config.teacher_model_name_or_path:
        teacher = teacher_identity(config.teacher_model_name_or_path)
    elif teacher is None and config.teacher_endpoint and config.teacher_endpoint_model:
        teacher = served_identity(config.teacher_endpoint_model)
    found = {
        "teacher": teacher,  # None: not known to this run (then not compared)
        "tokenizer vocabulary": _sha(vocab),
        "template": _sha(template),
        "stage": config.stage,
        "packing": config.effective_packing,
        "cutoff_len": config.cutoff_len,
    }
    if teacher_tokenizer is not None:  # a cross-tokenizer cache: the alignment depends on the teacher's side too
        from llmneo.data import templates

        found["teacher tokenizer vocabulary"] = _sha(json.dumps(sorted(teacher_tokenizer.get_vocab().items())).encode())
        found["teacher template"] = _sha(templates.resolve(teacher_tokenizer, config.teacher_template
                                                           or config.template)[0].encode())
    found["dataset rows"] = rows.hexdigest()[:16]
    return found


@torch.no_grad()
def topk_rows(logits: torch.Tensor, k: int) -> SparseRows:
    """Top-k ids and log-probs of (C, V) logits, and the log-mass of the other V - k tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    values, ids = logp.topk(k, dim=-1)  # (C, k)
    rest = logp.scatter(-1, ids, -math.inf)  # (C, V): top-k removed
    tail = torch.logsumexp(rest, dim=-1) if k < logp.shape[-1] else torch.full_like(values[:, 0], -math.inf)
    return SparseRows(ids, values, tail)


def cache_dir_to_write(config: Config, example: str) -> Path:
    """teacher_cache, checked before anything is written into it (`llmneo cache`, `llmneo cache import`): set,
    a directory, empty or an llmneo cache that overwrite_output_dir may replace, not holding an input."""
    if not config.teacher_cache:
        raise LlmneoError(f"teacher_cache is not set; give the cache directory, e.g. teacher_cache={example}")
    target = Path(config.teacher_cache)
    if target.exists() and not target.is_dir():
        raise LlmneoError(f"teacher_cache '{target}' is a file, not a directory; choose another teacher_cache")
    if target.exists() and any(target.iterdir()):
        if not config.overwrite_output_dir:
            raise LlmneoError(f"teacher_cache '{target}' is not empty; set overwrite_output_dir=true or choose another")
        if not (target / "index.json").is_file():
            raise LlmneoError(f"teacher_cache '{target}' holds files that are not an llmneo cache; choose an empty "
                              f"or new directory")
    run_dir.refuse_inputs_inside(target, {k: v for k, v in input_paths(config).items() if k != "teacher_cache"},
                                 key="teacher_cache")
    return target


def cache_tokenizer(config: Config):
    """The tokenizer a cache's rows follow: the student's when there is one (its chat template may differ
    from the teacher's even when the vocabulary is the same), else the teacher's."""
    source, key = ((config.model_name_or_path, "model_name_or_path") if config.model_name_or_path
                   else (config.teacher_model_name_or_path, "teacher_model_name_or_path"))
    if not source:
        raise LlmneoError("model_name_or_path is not set; the cache's rows follow the student's tokenization")
    return loading.load_tokenizer(source, key, config.trust_remote_code)


def one_teacher(config: Config, i: int) -> Config:
    """The config of teacher `i` of several alone, with its own cache folder (teacher_cache/teacher-i)."""
    import dataclasses

    key = "teacher_model_name_or_path" if config.teacher_model_name_or_path else "teacher_endpoint"
    return dataclasses.replace(config, **{key: config.teachers[i]}, teacher_weights=None, teacher_column=None,
                               teacher_cache=str(Path(config.teacher_cache) / f"teacher-{i}"))


def write(config: Config) -> dict:
    """`llmneo cache`: run the teacher over the training split and write the top-k cache. Several teachers:
    one cache each, in teacher_cache/teacher-0, teacher-1, ... (each with its own rows and fingerprint)."""
    if len(config.teachers) > 1:
        if not config.teacher_cache:
            raise LlmneoError("teacher_cache is not set; give the cache directory, e.g. teacher_cache=cache/teachers")
        if config.teacher_model_name_or_path:  # routed caches are read over the student's vocabulary
            student = cache_tokenizer(config)
            for path in config.teachers:
                own = loading.load_tokenizer(path, "teacher_model_name_or_path", config.trust_remote_code)
                if own.get_vocab() != student.get_vocab():
                    raise LlmneoError(f"teacher '{path}' has another tokenizer than the student; several teachers "
                                      f"must share the student's tokenizer (cross-tokenizer KD takes one teacher)")
        parts = [write(one_teacher(config, i)) for i in range(len(config.teachers))]
        return {**parts[0], "dir": config.teacher_cache, "teachers": len(parts),
                "bytes": sum(p["bytes"] for p in parts), "tokens": parts[0]["tokens"],
                "bytes_per_token": sum(p["bytes"] for p in parts) / max(parts[0]["tokens"], 1)}
    if not config.teacher_model_name_or_path and not config.teacher_endpoint:
        raise LlmneoError("teacher_model_name_or_path is not set; llmneo cache runs the teacher (or asks "
                          "teacher_endpoint) to cache it")
    if config.teacher_endpoint and not config.model_name_or_path:
        raise LlmneoError("llmneo cache from teacher_endpoint tokenizes with the student's tokenizer; set "
                          "model_name_or_path")
    target = cache_dir_to_write(config, example="cache/teacher")
    tokenizer = cache_tokenizer(config)  # tokenize exactly as training will
    vocab = len(tokenizer)
    k = config.teacher_topk
    if config.teacher_endpoint is None:  # a teacher loaded here (one with another tokenizer: cache_cross)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = loading.weight_dtype(config, "teacher")
        teacher, own = loading.load_teacher(config, tokenizer, dtype, with_tokenizer=True)
        if own is not tokenizer:
            from llmneo.cache import cross

            index, examples = cross.write(config, target, tokenizer, own, teacher.to(device), k, device)
            return {**_summary(target, index, k, examples), "aligned_fraction": index["aligned_fraction"]}
    if k > vocab:
        raise LlmneoError(f"teacher_topk={k} is larger than the vocabulary ({vocab}); use at most {vocab}")
    examples = dataset.build(config, tokenizer).train
    if config.teacher_endpoint:
        from llmneo.cache import capture as cache_capture
        from llmneo.teachers import served

        endpoint = served.Endpoint(config.teacher_endpoint, config.teacher_endpoint_model, config.teacher_api_key_env)
        served.check_endpoint(endpoint, tokenizer, k)
        expected = fingerprint(config, tokenizer, examples, teacher=served_identity(endpoint.model))
        index = cache_capture.capture(target, endpoint, examples, k, vocab, expected,
                                 batch_size=config.per_device_eval_batch_size,
                                 shard_size=config.cache_shard_size, logprobs_dtype=logprobs_dtype(config))
        return _summary(target, index, k, len(examples))
    teacher = teacher.to(device)
    chunk = config.kd_chunk_size or 1024
    with staged(target) as staging:
        index = write_examples(staging, teacher, examples, tokenizer.pad_token_id, vocab, k,
                               fingerprint(config, tokenizer, examples), chunk=chunk,
                               batch_size=config.per_device_eval_batch_size, device=device,
                               shard_size=config.cache_shard_size, logprobs_dtype=logprobs_dtype(config))
    return _summary(target, index, k, len(examples))


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


def _summary(target: Path, index: dict, k: int, examples: int) -> dict:
    size = sum(f.stat().st_size for f in target.iterdir())
    return {"dir": str(target), "tokens": index["rows"], "bytes": size,
            "bytes_per_token": size / max(index["rows"], 1), "k": k, "examples": examples}


def write_examples(directory: Path, teacher, examples: list[dict], pad_id: int, vocab: int, k: int, fingerprint: dict,
                   *, chunk: int = 1024, batch_size: int = 8, device: torch.device | None = None,
                   shard_size: int = SHARD_ROWS, logprobs_dtype: torch.dtype = torch.float32) -> dict:
    """Shards and index.json for tokenized `examples` (input_ids, labels) into an existing `directory`.

    The core of `llmneo cache` (which adds the config checks and the atomic rename); the step benchmark
    calls it to measure training from real shards. Returns the index.
    """
    head, _ = heads.output_head(teacher)

    def rows_of(batch, positions):
        hidden = heads.final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])[positions]
        for start in range(0, hidden.shape[0], chunk):
            yield topk_rows(head(hidden[start:start + chunk])[:, :vocab], k), None

    return write_rows(Path(directory), rows_of, examples, pad_id, k, fingerprint, batch_size=batch_size,
                      device=device or torch.device("cpu"), shard_size=shard_size, logprobs_dtype=logprobs_dtype)


def write_rows(directory: Path, rows_of, examples: list[dict], pad_id: int, k: int, fingerprint: dict, *,
               batch_size: int, device: torch.device, shard_size: int, logprobs_dtype: torch.dtype,
               extra: dict | None = None) -> dict:
    """Shards and index.json from `rows_of(batch, positions)`, which yields (SparseRows, aligned | None) chunks
    in position order for each collated batch of `examples`; `extra` goes into the index. Returns the index."""
    offsets, shards = _write_shards(directory, rows_of, examples, pad_id, batch_size, device, shard_size,
                                    logprobs_dtype)
    written = {**make_index(k, offsets, shards, fingerprint, logprobs_dtype), **(extra or {})}
    (directory / "index.json").write_text(json.dumps(written, indent=1))
    return written


@torch.inference_mode()
def _write_shards(staging: Path, rows_of, examples, pad_id, batch_size, device, shard_size: int,
                  logprobs_dtype: torch.dtype) -> tuple[list[int], list[dict]]:
    offsets = [0]
    shards: list[dict] = []
    buffer: list[SparseRows] = []
    flags: list[torch.Tensor] = []
    buffered = 0

    def flush():
        nonlocal buffer, flags, buffered
        if not buffered:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        start = shards[-1]["end"] if shards else 0
        save_shard(staging / name, buffer, logprobs_dtype, flags or None)
        shards.append({"file": name, "start": start, "end": start + buffered})
        buffer, flags, buffered = [], [], 0

    bar = tqdm(total=len(examples), desc="llmneo cache", unit="ex", dynamic_ncols=True)
    for first in range(0, len(examples), batch_size):
        part = examples[first:first + batch_size]
        batch = {key: value.to(device) for key, value in dataset.collate(part, pad_id).items()}
        positions, _ = response_positions(batch["labels"])
        for rows, aligned in rows_of(batch, positions):
            buffer.append(SparseRows(rows.ids.cpu(), rows.logprobs.cpu(), rows.tail.cpu()))
            if aligned is not None:
                flags.append(aligned.cpu())
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


TEACHER_TOKENIZER = "teacher_tokenizer"  # a cross-tokenizer cache keeps the teacher's tokenizer here
