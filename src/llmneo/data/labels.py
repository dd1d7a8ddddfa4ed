"""The label of untrained positions and the next-token shift, decided once for every module that scores tokens.

Examples hold unshifted `labels`: the token itself where it is trained (a response token), IGNORE_INDEX on prompt
and padding positions. The logits at position t predict token t+1, so position t is a *response position* when
labels[t+1] is trained; labels[0] is never scored. CE and KD score exactly these positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the label of prompt and padding positions, as in HF (torch's cross_entropy default)


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits predict a response token (bool, like `labels` [B, T]), and those tokens (N,) in
    position order: position t is selected when labels[t+1] is a response token."""
    positions = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]  # (N,)
    return positions, targets


def targets_at(labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The tokens the `chosen` positions (bool [B, T], a subset of the response positions) predict, in position
    order: labels[t+1] for each chosen t."""
    following = torch.zeros_like(chosen)
    following[:, 1:] = chosen[:, :-1]
    return labels[following]


def response_count(labels: torch.Tensor) -> int:
    """How many response positions a batch of labels [B, T] has (one host sync)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def has_response(labels: Sequence[int]) -> bool:
    """Whether one example has a response position (a response token after its first), stopping at the first."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def response_indices(labels: Sequence[int]) -> list[int]:
    """One example's response positions as a list: each t whose labels[t+1] is a response token."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
