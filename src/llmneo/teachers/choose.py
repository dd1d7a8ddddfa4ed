"""The teacher signal behind one interface: `rows(batch, positions)`, the teacher's rows (rows.py) at the
response positions of a batch.

- `LiveTeacher`: a teacher model run under no_grad; `DenseRows` (its final hidden states and its head,
  projected one slice at a time, never [B, T, V] logits), or `LogitRows` from its own forward when its
  weights are sharded;
- `cache_reader.CachedTeacher`: an offline top-k cache (`llmneo cache`), `SparseRows`;
- `served.ServedTeacher`: a teacher on an inference server (vLLM), `SparseRows` (or `SampledRows`).
`choose` picks one of them (or none) from the config, once per run.
"""

from __future__ import annotations

import torch

from llmneo.loss.rows import DenseRows, LogitRows
from llmneo.models import heads


class LiveTeacher:
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
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            return LogitRows(logits[positions][:, : self.vocab_size])
        hidden = heads.final_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        head, _ = heads.output_head(self.model)
        return DenseRows(hidden[positions], head, self.vocab_size)


class _SeveralTeachers:
    """Teachers in config order, and each one's (KD sum, positions) since the metrics last took them."""

    def __init__(self, teachers: list, device):
        self.teachers = teachers
        self.sums = torch.zeros(len(teachers), 2, dtype=torch.float64, device=device)

    def take_sums(self) -> torch.Tensor:
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums


class MixtureTeacher(_SeveralTeachers):
    """Several teachers mixed in probability (teacher_weights): their rows become MixtureRows, which add
    the student's divergence from each teacher alone to `sums`."""

    def __init__(self, teachers: list, weights: list[float], device):
        super().__init__(teachers, device)
        self.log_weights = torch.tensor(weights, dtype=torch.float32).log()

    def rows(self, batch: dict, positions: torch.Tensor):
        from llmneo.loss.rows import MixtureRows

        return MixtureRows([t.rows(batch, positions) for t in self.teachers], self.log_weights, self.sums)


class RoutedTeacher(_SeveralTeachers):
    """Several teachers, each row scored by one (teacher_column): the loop splits each micro-batch by
    `batch["teacher"]` and runs the loss once per teacher, so each KD sum is that teacher's exactly."""

    def groups(self, batch: dict) -> list[tuple[int, torch.Tensor]]:
        """(teacher, bool row mask) for every teacher with rows in `batch`."""
        route = batch["teacher"]
        return [(i, route == i) for i in range(len(self.teachers)) if bool((route == i).any())]

    def add(self, i: int, kd_sum: torch.Tensor, positions: int) -> None:
        self.sums[i, 0] += kd_sum.detach().double()
        self.sums[i, 1] += positions


def route_index(value, entries: list[str]) -> int | None:
    """A teacher_column value as a teacher's index: an int (or its text) in range, an entry, or an entry's last
    part (a model folder's name, a URL's host:port/path end); None when nothing matches."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        return index if 0 <= index < len(entries) else None
    for i, entry in enumerate(entries):
        if text in (entry, entry.rstrip("/").rsplit("/", 1)[-1]):
            return i
    return None


def uses_cache(config) -> bool:
    """KD from an offline top-k cache: no teacher model is loaded."""
    return config.uses_kd and config.teacher_cache is not None


def uses_endpoint(config) -> bool:
    """KD online from a served teacher (teacher_endpoint): no teacher model is loaded."""
    return config.uses_kd and config.teacher_endpoint is not None and config.teacher_cache is None


def loads_model(config) -> bool:
    """Whether the run loads a teacher model in-process."""
    return config.uses_kd and not uses_cache(config) and not uses_endpoint(config)


def choose(config, loaded, train_examples: list[dict], accelerator, cache_teacher_tokenizer=None):
    """The run's teacher signal, chosen once: a cache (teacher_cache), the loaded teacher model, or None
    (CE alone). The live teacher is placed by the engine (replicated, or sharded with full logits).
    `cache_teacher_tokenizer`: the teacher tokenizer a cross-tokenizer cache stored (its fingerprint covers it)."""
    from llmneo.cache import write
    from llmneo.models import engines
    from llmneo.teachers import cached as cache_reader

    if uses_cache(config) and len(config.teachers) > 1:  # one cache per teacher, routed
        parts = []
        for i in range(len(config.teachers)):
            alone = write.one_teacher(config, i)
            expected = write.fingerprint(alone, loaded.tokenizer, train_examples)
            parts.append(cache_reader.CachedTeacher(alone.teacher_cache, expected, accelerator.device))
        return RoutedTeacher(parts, accelerator.device)
    if uses_cache(config):
        expected = write.fingerprint(config, loaded.tokenizer, train_examples,
                                     teacher_tokenizer=cache_teacher_tokenizer)
        cached = cache_reader.CachedTeacher(config.teacher_cache, expected, accelerator.device)
        if not cached.has_tail and cached.k < loaded.vocab_size and config.kd_loss == "rkl":
            from llmneo.errors import LlmneoError

            raise LlmneoError(f"teacher_cache '{config.teacher_cache}' keeps no tail mass (imported from a format "
                              f"without one), so kd_loss: rkl is infinite wherever the student puts mass outside the "
                              f"teacher's top {cached.k}; use fkl, jsd, tvd, skew_fkl or skew_rkl")
        return cached
    if uses_endpoint(config):
        from llmneo.loss.divergences import SAMPLED_KINDS
        from llmneo.teachers import served

        signals = []
        for url in config.teachers:
            endpoint = served.Endpoint(url, config.teacher_endpoint_model, config.teacher_api_key_env)
            served.check_endpoint(endpoint, loaded.tokenizer, config.teacher_topk)
            signals.append(served.ServedTeacher(endpoint, config.teacher_topk, loaded.vocab_size,
                                                sampled=config.kd_loss in SAMPLED_KINDS))
    elif loaded.teachers:
        # a teacher with its own tokenizer scores over its own vocabulary (alignment.CrossTokenizerAligner)
        vocab = len(loaded.teacher_tokenizer) if loaded.teacher_tokenizer is not None else loaded.vocab_size
        signals = [LiveTeacher(engines.place_teacher(t, accelerator), vocab,
                               full_logits=engines.sharded(accelerator)) for t in loaded.teachers]
    else:
        return None
    if len(signals) == 1:
        return signals[0]
    if config.mixture_weights:
        return MixtureTeacher(signals, config.mixture_weights, accelerator.device)
    return RoutedTeacher(signals, accelerator.device)
