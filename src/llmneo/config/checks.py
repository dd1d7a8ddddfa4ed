"""The checks on a built Config that do not touch the disk (ranges, choices, keys that contradict each
other), and the choices themselves. `config.load` runs `validate` on every config it builds."""

from __future__ import annotations

import math
import os
import re

from llmneo.errors import LlmneoError

LORA_VARIANTS = ("lora", "dora", "rslora", "pissa", "olora", "moslora")
# Divergences over the teacher's whole distribution (loss/divergences.py), and estimators scored on sampled tokens only.
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
SAMPLED_KD_LOSSES = ("sampled_rkl",)
KD_LOSSES = DIVERGENCES + SAMPLED_KD_LOSSES
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
STAGES = ("sft", "pt")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The trackers accelerate can log to (accelerate.utils.LoggerType), besides "none" and "all".
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


# Range rules: key -> (the check on a set value, how the error names the range). Null values pass.
_RANGES = {
    **dict.fromkeys(("kd_temperature", "lora_rank", "lora_alpha", "cutoff_len", "max_samples", "learning_rate",
                     "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "save_total_limit", "ddp_timeout", "teacher_topk", "num_layers",
                     "eval_limit", "max_new_tokens", "cache_shard_size", "eval_steps", "rollout_sync_steps"),
                    (lambda v: v > 0, "> 0")),
    **dict.fromkeys(("warmup_steps", "weight_decay", "max_grad_norm", "num_fewshot"), (lambda v: v >= 0, ">= 0")),
    "kd_chunk_size": (lambda v: v >= 0, ">= 0 (0 = unchunked)"),
    **dict.fromkeys(("kd_ratio", "kd_beta", "kd_skew", "lmbda", "kd_uld_weight"),
                    (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")),
    "temperature": (lambda v: 0.0 <= v < math.inf, ">= 0 and finite (0 = greedy)"),
    "top_p": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "rollout_ahead": (lambda v: v in (0, 1), "0 or 1"),
    **dict.fromkeys(("lora_dropout", "warmup_ratio"), (lambda v: 0.0 <= v < 1.0, "in [0, 1)")),
}
_CHOICES = {"kd_loss": KD_LOSSES, "lora_variant": LORA_VARIANTS, "lr_scheduler_type": SCHEDULERS, "torch_dtype": DTYPES,
            "kd_unaligned": ("ce", "skip"), "cache_format": ("compact", "exact")}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LlmneoError(message)


def validate(c) -> None:
    """Range and choice checks that do not touch the disk."""
    _require(c.stage in STAGES, f"stage '{c.stage}' is not supported; llmneo trains stage: sft (supervised "
             f"distillation) or pt (raw text)")
    _require(c.finetuning_type in ("lora", "full"),
             f"finetuning_type must be lora or full, got '{c.finetuning_type}'")
    for name, choices in _CHOICES.items():
        value = getattr(c, name)
        _require(value in choices, f"{name} must be one of {', '.join(choices)}, got '{value}'")
    for name, (within, allowed) in _RANGES.items():
        value = getattr(c, name)
        _require(value is None or within(value), f"{name} must be {allowed}, got {value}")
    _require(c.cross_tokenizer in ("auto", "true", "false"),
             f"kd_cross_tokenizer must be auto, true or false, got '{c.kd_cross_tokenizer}'")
    flags = [name for name, on in (("dora", c.use_dora), ("rslora", c.use_rslora), ("pissa", c.pissa_init)) if on]
    _require(len(flags) <= 1, f"use_dora, use_rslora and pissa_init pick one variant each; got {', '.join(flags)}")
    _require(not flags or c.lora_variant in ("lora", flags[0]),
             f"lora_variant={c.lora_variant} contradicts the {flags[0] if flags else ''} flag; set one of them")
    _require(c.sweep_metric in ("perplexity", "kl_to_teacher", "top1_agreement"),
             f"sweep_metric must be perplexity, kl_to_teacher or top1_agreement, got '{c.sweep_metric}'")
    _require(c.val_size >= 0 and (c.val_size < 1 or float(c.val_size).is_integer()),
             f"val_size must be a fraction in [0, 1) or a whole row count, got {c.val_size}")
    _require(not (c.eval_dataset and c.val_size),
             "eval_dataset and val_size are both set; hold out data one way: eval_dataset=NAME or val_size=0.05")
    _require(c.num_train_epochs > 0 or c.max_steps > 0, "set num_train_epochs > 0 or max_steps > 0")
    _require(not (c.bf16 and c.fp16), "bf16 and fp16 are both true; pick one")
    _require(not (c.teacher_endpoint and c.teacher_model_name_or_path),
             "teacher_endpoint and teacher_model_name_or_path are both set; the teacher is either served or loaded here: "
             "drop one of them")
    _require(names_a_variable(c.teacher_api_key_env),
             "teacher_api_key_env must be the NAME of an environment variable, and its value is not one (it is not "
             "shown, in case it is the key itself); export OPENAI_API_KEY=... and set teacher_api_key_env: "
             "OPENAI_API_KEY")
    _require(not c.teacher_endpoint or c.teacher_endpoint.startswith(("http://", "https://")),
             f"teacher_endpoint must be an http(s) URL such as http://localhost:8000/v1, got "
             f"'{shown_url(c.teacher_endpoint)}'")
    _check_generation(c)
    _check_rollouts(c)
    _check_teachers(c)
    _check_evaluation(c)
    unknown = [t for t in report_to(c) if t not in TRACKERS and t != "all"]
    _require(not unknown, f"report_to: unknown tracker '{unknown[0] if unknown else ''}'; use none, all or a comma "
             f"list of {', '.join(TRACKERS)}")


def shown_url(url: str | None) -> str | None:
    """`url` as messages show it: credentials in it (http://user:password@host/...) replaced by ***."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", url) if url else url


def names_a_variable(name: str | None) -> bool:
    """Whether teacher_api_key_env looks like what it must be, an environment variable's name: upper case (as such
    names are by convention) or set here. Anything else may be the API key itself, so no error shows it."""
    if not name:
        return True
    return bool(re.fullmatch(r"[A-Z_][A-Z0-9_]*", name)) or (
        name in os.environ and bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)))


def report_to(c) -> list[str]:
    """The trackers named by report_to ([] for none)."""
    names = [t.strip().lower() for t in (c.report_to or "").split(",") if t.strip()]
    return [t for t in names if t != "none"]


EVAL_STRATEGIES = ("no", "steps", "epoch")


def strategy_name(value) -> str:
    """An eval_strategy value as written; YAML reads a bare `no` as the boolean false."""
    text = str(value).strip().lower()
    return "no" if text in ("false", "none") else text


def _check_evaluation(c) -> None:
    """eval_strategy (or HF's older evaluation_strategy): a known strategy, one of them, and held-out data."""
    given = {name: strategy_name(getattr(c, name)) for name in ("eval_strategy", "evaluation_strategy")
             if getattr(c, name) is not None}
    for name, value in given.items():
        _require(value in EVAL_STRATEGIES, f"{name} must be one of {', '.join(EVAL_STRATEGIES)}, got '{value}'")
    _require(len(set(given.values()) - {"no"}) <= 1, f"eval_strategy={given.get('eval_strategy')} and "
             f"evaluation_strategy={given.get('evaluation_strategy')} disagree; evaluation_strategy is HF's older name "
             f"for eval_strategy: set one of them")
    strategy = c.effective_eval_strategy
    _require(strategy == "no" or c.val_size > 0 or bool(c.eval_dataset), f"eval_strategy: {strategy} evaluates the "
             f"held-out split, but there is none; set val_size (e.g. 0.05) or eval_dataset, or eval_strategy: no")


def _check_generation(c) -> None:
    """On-policy distillation and seq_kd: what they need, and sampled_rkl's place."""
    if c.kd_loss in SAMPLED_KD_LOSSES:
        _require(c.lmbda == 1, f"kd_loss: {c.kd_loss} is scored on the student's own samples, so every step must "
                 f"be on-policy; set lmbda: 1 (got {c.lmbda}), or use kd_loss: rkl for the exact reverse KL")
        _require(c.kd_temperature == 1, f"kd_loss: {c.kd_loss} uses the sampled tokens' log-probs at temperature 1; "
                 f"set kd_temperature: 1 (got {c.kd_temperature})")
    if not c.generates:
        return
    what = "lmbda > 0 (on-policy distillation)" if c.lmbda > 0 else "seq_kd"
    _require(c.stage == "sft", f"{what} needs prompts to continue, but stage: pt trains on raw text; use "
             f"conversation data with stage: sft, or lmbda: 0 and seq_kd: false")
    packed = "neat_packing" if c.effective_neat_packing else "packing"
    _require(not c.effective_packing, f"{what} continues one prompt per row, but {packed}: true puts several examples "
             f"in a row (a rollout replaces one reply per row, so the others would get none); set {packed}: false")
    _require(c.teacher_cache is None, f"{what} trains on newly generated tokens, which a teacher cache cannot "
             f"score; set teacher_model_name_or_path instead of teacher_cache, or lmbda: 0 and seq_kd: false")
    _require((c.teacher_model_name_or_path or c.teacher_endpoint) and c.kd_ratio > 0,
             f"{what} needs a teacher to score (or write) the generated replies; set teacher_model_name_or_path "
             f"(or teacher_endpoint) and kd_ratio > 0")
    _require(not (c.seq_kd and c.teacher_endpoint), "seq_kd generates with the teacher model here; a served teacher "
             "only scores (use teacher_model_name_or_path, or lmbda > 0 without seq_kd)")


ROLLOUT_KEYS = {"rollout_endpoint_model": None, "rollout_api_key_env": None, "rollout_adapter_dir": None,
                "rollout_sync_steps": 1, "rollout_ahead": 0}  # rollout_endpoint's settings, at their defaults


def _check_rollouts(c) -> None:
    """rollout_endpoint: on-policy replies from a vLLM server of the student's base, with the LoRA adapter synced
    to it (plain_lora.check_servable also reads a continued adapter's own config, at set-up)."""
    if not c.rollout_endpoint:
        given = [key for key, default in ROLLOUT_KEYS.items() if getattr(c, key) != default]
        _require(not given, f"{given[0] if given else ''} configures the student's rollouts from a vLLM server; set "
                 f"rollout_endpoint (its /v1 URL), or drop the key")
        return
    _require(c.rollout_endpoint.startswith(("http://", "https://")), f"rollout_endpoint must be an http(s) URL "
             f"such as http://localhost:8000/v1, got '{shown_url(c.rollout_endpoint)}'")
    _require(names_a_variable(c.rollout_api_key_env), "rollout_api_key_env must be the NAME of an environment "
             "variable, and its value is not one (it is not shown, in case it is the key itself); export "
             "OPENAI_API_KEY=... and set rollout_api_key_env: OPENAI_API_KEY")
    _require(c.lmbda > 0, "rollout_endpoint generates the student's on-policy replies, but lmbda is 0 (no step is "
             "on-policy); set lmbda > 0 (e.g. lmbda: 1), or drop rollout_endpoint")
    _require(c.finetuning_type == "lora", "rollout_endpoint syncs a LoRA adapter to a server of the base model; "
             "with finetuning_type: full there is none: use finetuning_type: lora, or drop rollout_endpoint")
    _require(c.variant != "dora", "rollout_endpoint syncs a plain LoRA adapter, and DoRA's is not one (vLLM does not "
             "serve DoRA): use another lora_variant (lora, rslora, pissa, olora, moslora), or drop rollout_endpoint")
    _require(c.temperature <= 2, f"rollout_endpoint: vLLM samples at temperature <= 2, got {c.temperature}; lower "
             f"temperature, or drop rollout_endpoint")
    _require(not 0 < c.temperature < 0.01, f"rollout_endpoint: vLLM raises a temperature below 0.01 to 0.01 (HF "
             f"does not), got {c.temperature}; use temperature 0 (greedy) or >= 0.01, or drop rollout_endpoint")


def _check_teachers(c) -> None:
    """Several teachers: mixed by teacher_weights or routed by teacher_column, live or served."""
    n = len(c.teachers)
    if n <= 1:
        _require(not c.teacher_weights and not c.teacher_column, "teacher_weights and teacher_column combine several "
                 "teachers; list them in teacher_model_name_or_path (or teacher_endpoint), or drop the key")
        return
    _require(bool(c.teacher_weights) != bool(c.teacher_column), f"{n} teachers are given: combine them with "
             f"teacher_weights (a mixture of their probabilities) or teacher_column (each row to one teacher), one of "
             f"the two")
    _require(c.teacher_cache is None or c.teacher_column is not None, "teacher_weights mixes the teachers' full "
             "distributions, which a cache does not keep (only each one's top-k); route cached teachers with "
             "teacher_column instead")
    _require(not c.seq_kd, "seq_kd writes replies with one teacher; use a single teacher for it")
    if c.teacher_weights:
        try:
            weights = [float(w) for w in c.teacher_weights.split(",") if w.strip()]
        except ValueError:
            weights = []
        _require(len(weights) == n and all(w >= 0 and math.isfinite(w) for w in weights) and sum(weights) > 0,
                 f"teacher_weights must be {n} numbers >= 0 (one per teacher) with a positive sum, got "
                 f"'{c.teacher_weights}'")
        _require(c.teacher_endpoint is None, "teacher_weights mixes the teachers' full distributions, which a served "
                 "teacher does not return (only its top-k); route served teachers with teacher_column instead")
    else:
        _require(not c.effective_packing, "teacher_column routes each row to one teacher, but packing puts several "
                 "rows in one; set packing: false (and neat_packing: false)")
