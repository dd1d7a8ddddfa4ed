"""Packing: many tokenized examples into fewer sequences of at most cutoff_len tokens (LLaMA-Factory's `packing`).

Two ways, as in LLaMA-Factory:
- raw text (`stage: pt`): every example's tokens (each text already ends with EOS) are concatenated
  into one stream and cut into blocks of exactly cutoff_len; nothing is dropped: the stream's remainder
  becomes a last, shorter block (LLaMA-Factory drops it), unless it is a single token, which has no
  next token to predict.
- supervised examples (`stage: sft` with `packing: true`): whole examples, each already cut to
  cutoff_len, are put into as few blocks as fit (best fit, longest first), so no reply is split across
  blocks; the labels travel with their tokens.
Packed examples attend to each other within a block (no attention masking between them), as in
LLaMA-Factory's `packing` (its `neat_packing` is not supported).
"""

from __future__ import annotations

import bisect


def concatenate(examples: list[dict], block: int) -> list[dict]:
    """One token stream cut into `block`-sized pieces; labels are cut the same way."""
    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    blocks = [{"input_ids": ids[start:start + block], "labels": labels[start:start + block]}
              for start in range(0, len(ids), block)]
    if blocks and len(blocks[-1]["input_ids"]) < 2:
        blocks.pop()  # one token alone trains nothing: position t predicts token t+1
    return blocks


def best_fit(examples: list[dict], block: int) -> list[dict]:
    """Whole examples (each at most `block` tokens) in as few blocks as fit, longest examples first."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted: the tightest bin that fits comes first
    for i in order:
        length = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            room, number = free.pop(at)
        else:
            room, number = block, len(bins)
            bins.append([])
        bins[number].append(i)
        bisect.insort(free, (room - length, number))
    return [{"input_ids": [t for i in members for t in examples[i]["input_ids"]],
             "labels": [t for i in members for t in examples[i]["labels"]]} for members in bins]
