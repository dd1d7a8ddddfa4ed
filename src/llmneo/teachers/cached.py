"""Reading a teacher cache (`llmneo cache` writes it, cache/shards.py says the format): `CachedTeacher` checks the
fingerprint (cache/fingerprint.py), opens the shards lazily and returns each batch's rows (SparseRows) in position
order; for a cross-tokenizer cache also which positions are aligned, and `cross_tokenizer` gives the teacher
tokenizer it stored."""

from __future__ import annotations

import bisect
from pathlib import Path

import torch

from llmneo.cache import shards
from llmneo.cache.fingerprint import refuse_mismatch
from llmneo.config.schema import Config
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SparseRows
from llmneo.models import loading
from llmneo.teachers.signal import TeacherSignal


def cross_tokenizer(config: Config):
    """The teacher tokenizer a cross-tokenizer cache stored, or None for a cache over the student's tokenizer."""
    folder = Path(config.teacher_cache) / shards.TEACHER_TOKENIZER
    if len(config.teachers) > 1 or not folder.is_dir():
        return None
    return loading.load_tokenizer(str(folder), "teacher_cache", config.trust_remote_code)


class CachedTeacher(TeacherSignal):
    """Teacher rows read from a `llmneo cache` directory (no teacher model is loaded); `cross`: a cross-tokenizer
    cache, whose rows sit on the student's positions already, with `aligned` saying which have a teacher span."""

    def __init__(self, directory: str, expected: dict, device: torch.device):
        root = Path(directory)
        index = shards.read_index(root)
        refuse_mismatch(root, index["fingerprint"], expected)
        self.index = index
        self.offsets = index["offsets"]
        self.k = index["k"]
        self.has_tail = index.get("tail") != "none"  # an imported axolotl cache has no tail mass
        self.cross = bool(index.get("cross_tokenizer"))  # rows over the teacher's own vocabulary, with `aligned`
        self.device = device
        self.shard_starts, self.handles = shards.open_shards(root, index)

    def _read(self, start: int, end: int) -> list[torch.Tensor]:
        """The stored tensors of rows [start, end) of the cache; an example's rows never straddle two shards."""
        shard = bisect.bisect_right(self.shard_starts, start) - 1
        handle, base = self.handles[shard], self.shard_starts[shard]
        return [handle.get_slice(name)[start - base:end - base] for name in shards.stored_tensors(self.index)]

    def read(self, start: int, end: int) -> SparseRows:
        """Rows [start, end) of the cache, decoded on the training device."""
        return shards.read_rows([self._read(start, end)], self.index, self.device)

    def _ranges(self, batch: dict, positions: torch.Tensor) -> list[tuple[int, int]]:
        """The cache row ranges of the examples of `batch` (by their `index`) that have response positions."""
        ranges = []
        for example, count in zip(batch["index"].tolist(), positions.sum(dim=1).tolist()):
            start, end = self.offsets[example], self.offsets[example + 1]
            if end - start != count:
                raise LlmneoError(f"teacher_cache rows for example {example} do not match its response tokens "
                                  f"({end - start} vs {count}); the cache is stale, rebuild it with llmneo cache")
            if count:
                ranges.append((start, end))
        return ranges

    def aligned(self, batch: dict, positions: torch.Tensor) -> torch.Tensor:
        """A cross-tokenizer cache: whether each response position of `batch` has a teacher span (bool (N,))."""
        pieces = []
        for start, end in self._ranges(batch, positions):
            shard = bisect.bisect_right(self.shard_starts, start) - 1
            base = self.shard_starts[shard]
            pieces.append(self.handles[shard].get_slice("aligned")[start - base:end - base].bool())
        return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)).to(self.device)

    def rows(self, batch: dict, positions: torch.Tensor) -> SparseRows:
        """Cache rows for the examples of `batch` (by their `index`), in position order, decoded on the training
        device; log-probs float32 whatever the layout (compact codes, float16 or float32)."""
        pieces = [self._read(start, end) for start, end in self._ranges(batch, positions)]
        if not pieces:
            empty = torch.zeros(0, self.k)
            return SparseRows(empty.long(), empty, torch.zeros(0)).to(self.device)
        return shards.read_rows(pieces, self.index, self.device)
