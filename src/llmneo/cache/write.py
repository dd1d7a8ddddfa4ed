"""`llmneo cache CONFIG.yaml`: run the teacher once, keep its top-k per response position, train from that.

`write` checks the config and the target folder, tokenizes the training split exactly as training will and
writes the cache (shards.py says its format, fingerprint.py what it is keyed to) with the writer that fits the
teacher: a teacher model loaded here (`write_examples`), a served teacher (capture.py), or a teacher with
another tokenizer (cross-tokenizer KD: cross.py, rows over its own vocabulary, with `aligned` and its
tokenizer). Several teachers get one cache each. Reading: teachers.cached.CachedTeacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmneo import run_dir
from llmneo.cache import capture, cross
from llmneo.cache.fingerprint import fingerprint, one_teacher, served_identity
from llmneo.cache.shards import SHARD_ROWS, logprobs_dtype, staged, topk_rows, write_rows
from llmneo.config.schema import Config, input_paths
from llmneo.data import dataset
from llmneo.errors import LlmneoError
from llmneo.models import heads, loading
from llmneo.teachers import served


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
                if not loading.tokenizers_match(student, own):
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
    if config.teacher_endpoint is None:  # a teacher loaded here (one with another tokenizer: cross.py)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = loading.weight_dtype(config, "teacher")
        teacher, own = loading.load_teacher(config, tokenizer, dtype, with_tokenizer=True)
        if own is not tokenizer:
            index, examples = cross.write(config, target, tokenizer, own, teacher.to(device), k, device)
            return {**summary(target, index, k, examples), "aligned_fraction": index["aligned_fraction"]}
    if k > vocab:
        raise LlmneoError(f"teacher_topk={k} is larger than the vocabulary ({vocab}); use at most {vocab}")
    examples = dataset.build(config, tokenizer).train
    if config.teacher_endpoint:
        endpoint = served.Endpoint(config.teacher_endpoint, config.teacher_endpoint_model, config.teacher_api_key_env)
        served.check_endpoint(endpoint, tokenizer, k)
        expected = fingerprint(config, tokenizer, examples, teacher=served_identity(endpoint.model))
        index = capture.capture(target, endpoint, examples, k, vocab, expected,
                                batch_size=config.per_device_eval_batch_size,
                                shard_size=config.cache_shard_size, logprobs_dtype=logprobs_dtype(config),
                                compact=config.cache_format == "compact")
        return summary(target, index, k, len(examples))
    teacher = teacher.to(device)
    chunk = config.kd_chunk_size or 1024
    with staged(target) as staging:
        index = write_examples(staging, teacher, examples, tokenizer.pad_token_id, vocab, k,
                               fingerprint(config, tokenizer, examples), chunk=chunk,
                               batch_size=config.per_device_eval_batch_size, device=device,
                               shard_size=config.cache_shard_size, logprobs_dtype=logprobs_dtype(config),
                               compact=config.cache_format == "compact")
    return summary(target, index, k, len(examples))


def summary(target: Path, index: dict, k: int, examples: int) -> dict:
    """What `llmneo cache` (and `cache import`) reports of the cache written at `target`."""
    size = sum(f.stat().st_size for f in target.iterdir())
    return {"dir": str(target), "tokens": index["rows"], "bytes": size,
            "bytes_per_token": size / max(index["rows"], 1), "k": k, "examples": examples}


def write_examples(directory: Path, teacher, examples: list[dict], pad_id: int, vocab: int, k: int, fingerprint: dict,
                   *, chunk: int = 1024, batch_size: int = 8, device: torch.device | None = None,
                   shard_size: int = SHARD_ROWS, logprobs_dtype: torch.dtype = torch.float32,
                   compact: bool = True) -> dict:
    """Shards and index.json for tokenized `examples` (input_ids, labels) into an existing `directory`.

    The core of `llmneo cache` (which adds the config checks and the atomic rename); the step benchmark
    calls it to measure training from real shards. `compact`: the compact layout (ids below `vocab`), else
    exact. Returns the index.
    """
    def rows_of(batch, positions):
        final = heads.final_states(teacher, batch, vocab)
        hidden = final.hidden[positions]  # (N, H)
        for start in range(0, hidden.shape[0], chunk):
            yield topk_rows(final.logits(hidden[start:start + chunk]), k), None

    return write_rows(Path(directory), rows_of, examples, pad_id, k, fingerprint, batch_size=batch_size,
                      device=device or torch.device("cpu"), shard_size=shard_size, logprobs_dtype=logprobs_dtype,
                      vocab=vocab if compact else None)
