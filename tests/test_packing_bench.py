"""The packing benchmark's inputs and counts (benchmarks/packing_bench.py): the synthetic rows have the word
counts of LLaMA-Factory's alpaca demo, and the per-step counts are what the training loader's batches hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import packing_bench  # noqa: E402

from llmneo.data.labels import IGNORE_INDEX  # noqa: E402


def test_the_lengths_file_holds_counts_only_and_the_synthetic_rows_have_them():
    lengths = json.loads(packing_bench.LENGTHS.read_text())["rows"]
    assert len(lengths) == 999
    assert all(len(row) == 2 and all(isinstance(n, int) for n in row) for row in lengths)
    rows = packing_bench.synthetic_rows()
    assert [[len(r["instruction"].split()), len(r["output"].split())] for r in rows] == lengths
    assert rows == packing_bench.synthetic_rows()  # the same text on every machine, from the seed


def _example(prompt: int, response: int, start: int) -> dict:
    ids = list(range(start, start + prompt + response))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def test_step_counts_are_the_batches_positions_tokens_and_responses_over_epochs():
    # lengths 3, 5, 9, 17, 33: every set of rows has its own token sum, so a step's rows can be told from it
    shapes = [(1, 2), (2, 3), (4, 5), (8, 9), (16, 17)]  # (prompt, response) tokens
    examples = [_example(prompt, response, 100 * i) for i, (prompt, response) in enumerate(shapes)]
    per_row = [1, 2, 3, 4, 5]
    # 5 rows in batches of 2: 2, 2 and 1 rows per epoch; 5 steps run into the second epoch
    counts = packing_bench.step_counts(examples, per_row, batch=2, steps=5, seed=0, pad_id=0)
    assert [len(c) for c in counts] == [4] * 5
    by_tokens = {}
    for a in range(5):
        by_tokens[sum(shapes[a])] = [a]
        for b in range(a + 1, 5):
            by_tokens[sum(shapes[a]) + sum(shapes[b])] = [a, b]
    steps = [by_tokens[c["tokens"]] for c in counts]
    assert sorted(i for rows in steps[:3] for i in rows) == [0, 1, 2, 3, 4]  # an epoch reads every row once
    assert [len(rows) for rows in steps] == [2, 2, 1, 2, 2]
    for rows, c in zip(steps, counts):
        assert c["positions"] == len(rows) * max(sum(shapes[i]) for i in rows)  # padded to the longest
        # response positions after the first, as the loss scores them (labels.response_count)
        assert c["trained"] == sum(shapes[i][1] for i in rows)
        assert c["examples"] == sum(per_row[i] for i in rows)
