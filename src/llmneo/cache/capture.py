"""`llmneo cache` from a served teacher (teacher_endpoint): many requests in flight, resumable shard by shard.

Examples go out `batch_size` per request, up to IN_FLIGHT requests at once (a bounded window, answered in
order); each answer's prompt log-probs become top-k rows (served.sparse_rows), and a position without
them is an error naming the example, never a gap. Rows are written as shards of `shard_size` positions
(whole examples) into `.NAME.partial` next to the cache, each shard atomically, and `progress.json` there
records the shards done, the examples they hold and the fingerprint and k they were made with. A capture
that stops (kill -9, a server that dies) is resumed by running the same command: it keeps the recorded
shards, requests the examples after them, and only when every example is in renames the folder to the
cache. A partial capture for another fingerprint or k is discarded, with a line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmneo import run_dir
from llmneo.cache.shards import SHARD_ROWS, make_index, save_shard, shard_name
from llmneo.data.labels import response_indices
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.teachers import served

IN_FLIGHT = 8  # requests in flight at once
PROGRESS = "progress.json"


def _targets(example: dict) -> list[int]:
    """Indices of the tokens the example's response positions predict (labels[t + 1] is a response token)."""
    return [t + 1 for t in response_indices(example["labels"])]


def _sequences(example: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) of each sequence the server scores for `example`: the example itself, or each example of a
    neat-packed row (position_ids restart at each), which the server would otherwise read with cross-talk."""
    starts = None
    if "position_ids" in example:
        starts = [t for t, position in enumerate(example["position_ids"]) if position == 0]
    return list(served.packed_examples(list(example["input_ids"]), _targets(example), starts))


def _resume(partial: Path, fingerprint: dict, k: int, dtype: str) -> dict:
    """The recorded progress of an earlier capture of the same cache, or a fresh start."""
    fresh = {"k": k, "fingerprint": fingerprint, "logprobs_dtype": dtype, "examples": 0, "offsets": [0], "shards": []}
    state_file = partial / PROGRESS
    if partial.is_dir() and state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError:
            state = None
        if state and state.get("k") == k and state.get("fingerprint") == fingerprint and state.get(
                "logprobs_dtype") == dtype and all(
                (partial / shard["file"]).is_file() for shard in state["shards"]):
            if state["examples"]:
                print(f"llmneo cache: resuming an interrupted capture after {state['examples']} examples", flush=True)
            return state
        print(f"llmneo cache: discarding an interrupted capture in {partial} (another teacher, data, k or "
              f"log-prob dtype)", flush=True)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return fresh


def capture(target: Path, endpoint, examples: list[dict], k: int, vocab: int, fingerprint: dict, *,
            batch_size: int = 8, shard_size: int = SHARD_ROWS, logprobs_dtype: torch.dtype = torch.float32,
            compact: bool = True) -> dict:
    """Capture the cache for `examples` from `endpoint` into `target` (compact rows unless `compact` is False);
    returns its index."""
    layout_vocab = vocab if compact else None
    partial = target.parent / f".{target.name}.partial"
    try:
        layout = "compact" if compact else str(logprobs_dtype).removeprefix("torch.")  # never mixed in one cache
        state = _resume(partial, fingerprint, k, layout)
    except OSError as exc:
        raise LlmneoError(f"cannot write teacher_cache '{target}': {exc.strerror or exc}") from None
    buffer: list[SparseRows] = []
    counts: list[int] = []  # rows per buffered example

    def flush() -> None:
        if not counts:
            return
        start = state["offsets"][-1]
        name = shard_name(len(state["shards"]))
        staged = partial / f"{name}.tmp"
        save_shard(staged, buffer, logprobs_dtype, vocab=layout_vocab)
        os.replace(staged, partial / name)
        for count in counts:
            state["offsets"].append(state["offsets"][-1] + count)
        state["shards"].append({"file": name, "start": start, "end": state["offsets"][-1]})
        state["examples"] += len(counts)
        run_dir.write_json(partial / PROGRESS, state)  # the shard is on disk before progress names it
        buffer.clear()
        counts.clear()

    def ask(first: int):
        part = examples[first:first + batch_size]
        return endpoint.prompt_logprobs([ids for e in part for ids, _ in _sequences(e)], k)

    bar = tqdm(total=len(examples), initial=state["examples"], desc="llmneo cache", unit="ex", dynamic_ncols=True)
    starts = iter(range(state["examples"], len(examples), batch_size))
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="llmneo-cache") as pool:
        try:
            for first in starts:
                window.append((first, pool.submit(ask, first)))
                if len(window) >= IN_FLIGHT:
                    _take(window, examples, batch_size, k, vocab, buffer, counts, bar, shard_size, flush)
            while window:
                _take(window, examples, batch_size, k, vocab, buffer, counts, bar, shard_size, flush)
            flush()
        except BaseException:
            endpoint.stop()  # no further attempts: the error (or Ctrl-C) ends the capture promptly
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    index = make_index(k, state["offsets"], state["shards"], fingerprint, logprobs_dtype, layout_vocab)
    (partial / "index.json").write_text(json.dumps(index, indent=1))
    (partial / PROGRESS).unlink()
    run_dir.plain_modes(partial)  # safetensors writes 0600 shards
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return index


def _take(window: deque, examples, batch_size, k, vocab, buffer, counts, bar, shard_size, flush) -> None:
    """The oldest request's answer, as rows per example, into the buffer, a shard written whenever it holds
    `shard_size` rows (requests finish out of order; rows are kept in example order)."""
    first, future = window.popleft()
    entries = iter(future.result())  # one per sequence: an example, or each example of a neat-packed row
    part = examples[first:first + batch_size]
    for offset, example in enumerate(part):
        where = f"training example {first + offset + 1}"
        rows = [served.sparse_rows(next(entries), wanted, k, vocab, where) for _, wanted in _sequences(example)]
        rows = rows or [SparseRows(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))]
        buffer.append(SparseRows(torch.cat([r.ids for r in rows]), torch.cat([r.logprobs for r in rows]),
                                 torch.cat([r.tail for r in rows])))
        counts.append(len(buffer[-1].tail))
        if sum(counts) >= shard_size:
            flush()
    bar.update(len(part))
