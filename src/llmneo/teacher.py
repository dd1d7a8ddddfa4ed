"""The teacher signal behind one interface: rows at the response positions of a batch.

`rows(batch, positions)` returns something the loss slices by position range, chunk by chunk:
- `DenseRows` from a live teacher model: its final hidden states at the positions, projected through
  its own output head one slice at a time (never [B, T, V] logits);
- `SparseRows` from an offline top-k cache (`llmneo cache`): top-k token ids, their log-probs and the
  log of the remaining tail mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmneo import heads


@dataclass
class DenseRows:
    """Teacher logits for the response positions, computed per slice from cached hidden states."""

    hidden: torch.Tensor  # (N, H_teacher)
    head: object  # hidden → logits
    vocab_size: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @torch.no_grad()
    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.head(self.hidden[rows])[:, : self.vocab_size]  # (C, V): padded vocab rows dropped


@dataclass
class SparseRows:
    """A sparse teacher distribution per position: top-k ids and log-probs plus the tail's log-mass."""

    ids: torch.Tensor  # (N, k) int64
    logprobs: torch.Tensor  # (N, k)
    tail: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> "SparseRows":
        return SparseRows(self.ids[rows], self.logprobs[rows], self.tail[rows])

    def to(self, device: torch.device) -> "SparseRows":
        return SparseRows(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))


@dataclass
class LogitRows:
    """Teacher logits already computed for the response positions (sharded engines: see engines.py)."""

    logits: torch.Tensor  # (N, V)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.logits[rows]


class LiveTeacher:
    """A frozen teacher model run in eval mode under no_grad, in the dtype it was loaded in.

    `full_logits`: take the logits from the teacher's own forward (required when its weights are
    sharded, since the head then exists whole only inside forward); otherwise hidden states are kept
    and projected one slice at a time.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, full_logits: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.full_logits = full_logits

    @torch.no_grad()
    def rows(self, batch: dict, positions: torch.Tensor) -> DenseRows | LogitRows:
        """The teacher's signal at `positions` (bool [B, T])."""
        if self.full_logits:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            return LogitRows(logits[positions][:, : self.vocab_size])
        hidden = heads.final_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        head, _ = heads.output_head(self.model)
        return DenseRows(hidden[positions], head, self.vocab_size)
