"""A teacher model run in this process: the live teacher signal.

`LiveTeacher.rows` gives `DenseRows` (the teacher's final hidden states and its own head, projected one slice
at a time, never [B, T, V] logits), or `LogitRows` from its own forward when its weights are sharded.
"""

from __future__ import annotations

import torch

from llmneo.loss.rows import DenseRows, LogitRows
from llmneo.models import heads, inputs
from llmneo.teachers.signal import TeacherSignal


class LiveTeacher(TeacherSignal):
    """A teacher model run under no_grad, in the dtype it was loaded in; models.load_teacher froze it.

    `full_logits`: take the logits from the teacher's own forward (required when its weights are
    sharded, since the head then exists whole only inside forward); otherwise hidden states are kept
    and projected one slice at a time.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, full_logits: bool = False):
        self.model = model
        self.vocab_size = vocab_size
        self.full_logits = full_logits

    @torch.no_grad()
    def rows(self, batch: dict, positions: torch.Tensor) -> DenseRows | LogitRows:
        """The teacher's signal at `positions` (bool [B, T])."""
        if self.full_logits:
            logits = self.model(**inputs.forward_inputs(batch), use_cache=False).logits
            return LogitRows(logits[positions][:, : self.vocab_size])
        final = heads.final_states(self.model, batch, self.vocab_size)
        return DenseRows(final.hidden[positions], final.head, final.vocab_size)
