"""The teacher signal behind one interface.

Training asks the teacher for its logits at the response positions of a batch. Today the signal
comes from a live model; an offline top-k cache slots in behind the same `signal` call.
"""

from __future__ import annotations

import torch


class LiveTeacher:
    """A frozen teacher model run in eval mode under no_grad, in the dtype it was loaded in."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    def to(self, device: torch.device) -> "LiveTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def signal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Teacher logits at `positions` (bool [B, T]), over the real vocabulary: (N, V)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[positions][:, : self.vocab_size]  # (N, V); padded vocab rows dropped
