"""`llmneo cache` for a teacher with another tokenizer: the rows training needs, with nothing left to re-tokenize.

The teacher reads each conversation in its own rendering (crosstok.offsets.TeacherSide) once, here. For every
student response position the cache keeps what teachers.aligner.teacher_spans gives: the teacher's top-k over
*its* vocabulary for the span's first token, with the span's continuation log-prob added to the top-k and
to the tail (GOLD's span probability), and `aligned` (uint8: whether the position has a span). Rows sit in
the student's position order, like a same-tokenizer cache, so training reads them by example without the
teacher's tokens. The teacher's tokenizer is kept in `teacher_tokenizer/` (training builds the vocabulary map
from it), and the fingerprint also covers the teacher's vocabulary and template. write.py calls `write` when
the loaded teacher's tokenizer differs from the student's; the shards go through shards.py.
"""

from __future__ import annotations

import json
import math

import torch

from llmneo.cache import shards
from llmneo.cache.fingerprint import fingerprint
from llmneo.crosstok import offsets
from llmneo.data import dataset
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.teachers.aligner import teacher_spans
from llmneo.teachers.live import LiveTeacher


def span_topk(first, shift: torch.Tensor, aligned: torch.Tensor, k: int, chunk: int):
    """(SparseRows, {"aligned", "shift"}) chunks: the top-k of the distribution of each aligned position's span's
    first token (zeros elsewhere), and the span's continuation log-prob, which the reader adds to the row."""
    for start in range(0, aligned.shape[0], chunk):
        part = slice(start, start + chunk)
        flags = aligned[part]
        count = flags.shape[0]
        ids = torch.zeros(count, k, dtype=torch.long, device=flags.device)
        logprobs = torch.zeros(count, k, device=flags.device)
        tail = torch.full((count,), -math.inf, device=flags.device)
        move = torch.zeros(count, device=flags.device)
        if first is not None and bool(flags.any()):
            found = shards.topk_rows(first[part].logits, k)  # (C, k) over the teacher's vocabulary
            move = torch.where(flags, shift[part].float(), move)
            ids = torch.where(flags[:, None], found.ids, ids)
            logprobs = torch.where(flags[:, None], found.logprobs, logprobs)
            tail = torch.where(flags, found.tail, tail)
        yield SparseRows(ids, logprobs, tail), {"aligned": flags.to(torch.uint8), "shift": move}


def write(config, target, tokenizer, teacher_tokenizer, teacher, k: int, device) -> tuple[dict, int]:
    """Write the cross-tokenizer cache of `config`'s training split into `target`; (index, examples)."""
    offsets.check_supported(config)
    if k > len(teacher_tokenizer):
        raise LlmneoError(f"teacher_topk={k} is larger than the teacher's vocabulary ({len(teacher_tokenizer)}); "
                          f"use at most {len(teacher_tokenizer)}")
    side = offsets.TeacherSide(teacher_tokenizer, config.teacher_template or config.template)
    examples = dataset.build(config, tokenizer, side).train
    signal = LiveTeacher(teacher, len(teacher_tokenizer))
    chunk = config.kd_chunk_size or 1024

    counted = [0, 0]  # aligned positions, all positions

    def rows_of(batch, positions):
        first, shift, aligned = teacher_spans(signal, batch, positions)
        counted[0] += int(aligned.sum())
        counted[1] += aligned.numel()
        yield from span_topk(first, shift, aligned, k, chunk)

    expected = fingerprint(config, tokenizer, examples, teacher_tokenizer=teacher_tokenizer)
    with shards.staged(target) as staging:
        index = shards.write_rows(staging, rows_of, examples, tokenizer.pad_token_id, k, expected,
                                  batch_size=config.per_device_eval_batch_size, device=device,
                                  shard_size=config.cache_shard_size, logprobs_dtype=shards.logprobs_dtype(config),
                                  vocab=shards.compact_vocab(config, len(teacher_tokenizer)),
                                  extra={"cross_tokenizer": True, "span_shift": True})
        index["aligned_fraction"] = counted[0] / max(counted[1], 1)
        (staging / "index.json").write_text(json.dumps(index, indent=1))
        teacher_tokenizer.save_pretrained(staging / shards.TEACHER_TOKENIZER)
    return index, len(examples)
