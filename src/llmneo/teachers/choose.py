"""Which teacher signal a run has, chosen once from the config (`choose`): live, cache, served, mixture,
routed or none. Each is a `signal.TeacherSignal` whose `rows(batch, positions)` are the teacher's rows
(loss.rows) at the response positions of a batch:

- `live.LiveTeacher`: a teacher model run under no_grad; `DenseRows`, or `LogitRows` when its weights are sharded;
- `cached.CachedTeacher`: an offline top-k cache (`llmneo cache`), `SparseRows`;
- `served.ServedTeacher`: a teacher on an inference server (vLLM), `SparseRows` (or `SampledRows`);
- `several.MixtureTeacher` / `several.RoutedTeacher`: several of these, mixed in probability or routed per row.
"""

from __future__ import annotations

from llmneo.cache.fingerprint import fingerprint, one_teacher
from llmneo.errors import LlmneoError
from llmneo.loss.divergences import SAMPLED_KINDS
from llmneo.models import engines
from llmneo.teachers import cached as cache_reader
from llmneo.teachers import served
from llmneo.teachers.live import LiveTeacher
from llmneo.teachers.several import MixtureTeacher, RoutedTeacher
from llmneo.teachers.signal import TeacherSignal


def choose(config, loaded, train_examples: list[dict], accelerator,
           cache_teacher_tokenizer=None) -> TeacherSignal | None:
    """The run's teacher signal, chosen once: a cache (teacher_cache; one per teacher, routed), a served
    teacher, the loaded teacher model, several of the last two (mixed or routed), or None (CE alone). The live
    teacher is placed by the engine (replicated, or sharded with full logits).
    `cache_teacher_tokenizer`: the teacher tokenizer a cross-tokenizer cache stored (its fingerprint covers it)."""
    if config.uses_cache and len(config.teachers) > 1:  # one cache per teacher, routed
        parts = []
        for i in range(len(config.teachers)):
            alone = one_teacher(config, i)
            expected = fingerprint(alone, loaded.tokenizer, train_examples)
            parts.append(cache_reader.CachedTeacher(alone.teacher_cache, expected, accelerator.device))
        return RoutedTeacher(parts, accelerator.device)
    if config.uses_cache:
        expected = fingerprint(config, loaded.tokenizer, train_examples, teacher_tokenizer=cache_teacher_tokenizer)
        cached = cache_reader.CachedTeacher(config.teacher_cache, expected, accelerator.device)
        if not cached.has_tail and cached.k < loaded.vocab_size and config.kd_loss == "rkl":
            raise LlmneoError(f"teacher_cache '{config.teacher_cache}' keeps no tail mass (imported from a format "
                              f"without one), so kd_loss: rkl is infinite wherever the student puts mass outside the "
                              f"teacher's top {cached.k}; use fkl, jsd, tvd, skew_fkl or skew_rkl")
        return cached
    if config.uses_endpoint:
        signals = []
        for url in config.teachers:
            endpoint = served.Endpoint(url, config.teacher_endpoint_model, config.teacher_api_key_env)
            served.check_endpoint(endpoint, loaded.tokenizer, config.teacher_topk)
            signals.append(served.ServedTeacher(endpoint, config.teacher_topk, loaded.vocab_size,
                                                sampled=config.kd_loss in SAMPLED_KINDS))
    elif loaded.teachers:
        # a teacher with its own tokenizer scores over its own vocabulary (aligner.CrossTokenizerAligner)
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
