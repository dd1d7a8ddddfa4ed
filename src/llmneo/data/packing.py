"""Packing: many tokenized examples into fewer sequences of at most cutoff_len tokens (LLaMA-Factory's `packing`).

Two ways, as in LLaMA-Factory:
- raw text (`stage: pt`): every example's tokens (each text already ends with EOS) are concatenated
  into one stream and cut into blocks of exactly cutoff_len; nothing is dropped: the stream's remainder
  becomes a last, shorter block (LLaMA-Factory drops it), unless it is a single token, which has no
  next token to predict.
- supervised examples (`stage: sft` with `packing: true`): whole examples, each already cut to
  cutoff_len, are put into as few blocks as fit (best fit, longest first), so no reply is split across
  blocks; the labels travel with their tokens.
With `packing`, packed examples attend to each other within a block, as in LLaMA-Factory's `packing`. With
`neat` (LLaMA-Factory's `neat_packing`, TRL's `padding_free`) each block also carries `position_ids` that
restart at 0 where each example (for raw text: each text, or the piece of it the block holds) starts, which is
how transformers' masking keeps attention inside one example (llmneo.models.inputs); and the first token of each
example after the block's first is no target, since predicting it would need the example before. So a packed
row scores exactly the tokens the same examples score padded in a batch, and sees only what they see.
"""

from __future__ import annotations

import bisect

from llmneo.data.labels import IGNORE_INDEX


def concatenate(examples: list[dict], block: int, neat: bool = False) -> list[dict]:
    """One token stream cut into `block`-sized pieces; labels are cut the same way. `neat`: positions restart
    at each text's start within a piece."""
    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    positions = [p for example in examples for p in range(len(example["input_ids"]))]
    blocks = []
    for start in range(0, len(ids), block):
        piece = {"input_ids": ids[start:start + block], "labels": labels[start:start + block]}
        if neat:
            piece = _isolated(piece, positions[start:start + block])
        blocks.append(piece)
    if blocks and len(blocks[-1]["input_ids"]) < 2:
        blocks.pop()  # one token alone trains nothing: position t predicts token t+1
    return blocks


def _isolated(piece: dict, positions: list[int]) -> dict:
    """`piece` with position ids restarting at each example's start (its first token, and the block's first,
    at 0), and no target on an example's first token (`positions` are the tokens' places in their examples)."""
    restarted, at = [], 0
    labels = list(piece["labels"])
    for t, position in enumerate(positions):
        if t and position == 0:
            labels[t] = IGNORE_INDEX
        at = 0 if t == 0 or position == 0 else at + 1
        restarted.append(at)
    return {**piece, "labels": labels, "position_ids": restarted}


def best_fit(examples: list[dict], block: int, neat: bool = False) -> list[dict]:
    """Whole examples (each at most `block` tokens) in as few blocks as fit, longest examples first. `neat`:
    positions restart at each example."""
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
    blocks = [{"input_ids": [t for i in members for t in examples[i]["input_ids"]],
               "labels": [t for i in members for t in examples[i]["labels"]]} for members in bins]
    if not neat:
        return blocks
    return [_isolated(piece, [p for i in members for p in range(len(examples[i]["input_ids"]))])
            for piece, members in zip(blocks, bins)]
