"""One typed config for every command: YAML plus `key=value` overrides, validated with clear errors.

Keys follow HF `TrainingArguments` / LLaMA-Factory names so the official LLM-Neo YAML runs unchanged
(apart from paths). Defaults are the paper's guidelines. Each field's `help` is the reference doc: it
feeds `llmneo <cmd> --help` and `docs/config.md`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from llmneo.config import peer_keys
from llmneo.config import values as config_values
from llmneo.config.checks import (DIVERGENCES, DTYPES, KD_LOSSES,  # noqa: F401  (the choices are part of config's API)
                                  LORA_VARIANTS, SAMPLED_KD_LOSSES, SCHEDULERS, STAGES, TRACKERS, report_to,
                                  strategy_name, validate)
from llmneo.config.llamafactory import IGNORED_KEYS, check_supported
from llmneo.errors import LlmneoError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` as on the Hugging Face Hub (not a relative path such as ./x/y)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def looks_local(name: str) -> bool:
    """A path meant on this machine, so never looked up on the Hub, even when it is missing.

    Absolute, ./, ../, ~, more than one '/', a backslash, or `dir/name` whose `dir` exists here
    (`models/student` next to a `models/` folder is a local path, not the Hub repo `models/student`).
    """
    if not looks_like_hub_id(name):
        return True
    return os.path.isdir(name.split("/", 1)[0])


# What `llmneo train` saves in output_dir: every key, loadable again with `llmneo train llmneo_config.yaml`.
# `llmneo eval` / `llmneo export` of a trained run take some of its keys (models/trained_run.py).
SAVED_CONFIG = "llmneo_config.yaml"


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- models -----------------------------------------------------------------------------
    model_name_or_path: str | None = _f(None, "The student: a local HF model dir or a Hub id.")
    teacher_model_name_or_path: str | None = _f(None, "The teacher: a local HF model dir or a Hub id. Another "
        "tokenizer than the student's: see kd_cross_tokenizer. Several teachers (sharing the student's tokenizer): a "
        "YAML list or comma-separated, with teacher_weights (a mixture) or teacher_column (routing).")
    adapter_name_or_path: str | None = _f(None, "A trained PEFT adapter dir (export, eval; in train: continue "
        "training this adapter).")
    trust_remote_code: bool = _f(False, "Allow model/tokenizer code from the model repo. Off unless you ask.")
    torch_dtype: str = _f("auto", "Weight dtype: auto|float32|bfloat16|float16. auto: the teacher (and a LoRA "
        "student's frozen base) in the compute dtype (bf16/fp16 when enabled), a fully trained student in float32.")
    # --- method -----------------------------------------------------------------------------
    stage: str = _f("sft", "Training stage: sft (supervised distillation: replies are the targets) or pt "
        "(distillation on raw text, Minitron style: every token is a target). dpo, kto, rm, ppo are not supported.")
    do_train: bool = _f(True, "Accepted for LLaMA-Factory compatibility; `llmneo train` always trains.")
    finetuning_type: str = _f("lora", "lora (train adapters only) or full (train every weight).")
    kd_ratio: float = _f(0.5, "Weight of the KD term: loss = (1 - kd_ratio)*CE + kd_ratio*KD. 0 = plain SFT/LoRA. "
        "Ignored (with a warning) when no teacher is given.")
    kd_loss: str = _f(
        "fkl", "Divergence for KD: " + "|".join(KD_LOSSES) + ". fkl = KL(p_teacher || p_student). sampled_rkl "
        "(on-policy only, lmbda: 1): the reverse KL estimated from the student's sampled tokens, "
        "-sg[logp_T(x) - logp_S(x)] * logp_S(x) per token (needs only the teacher's log-prob of each token).")
    kd_temperature: float = _f(1.0, "Softmax temperature T for KD; the divergence is scaled by T^2.")
    kd_beta: float = _f(0.5, "Mixture weight beta of jsd: m = beta*p_T + (1-beta)*p_S (0 = fkl, 1 = rkl).")
    kd_skew: float = _f(0.1, "Skew alpha of skew_fkl / skew_rkl (DistiLLM).")
    kd_chunk_size: int = _f(256, "Response positions per chunk of the fused CE+KD loss: at most this many x vocab "
        "logits are alive per model. 0 materialises full logits (the reference path; more memory).")
    teacher_cache: str | None = _f(None, "Offline teacher top-k cache dir. `llmneo cache` writes it; `llmneo train` "
        "reads it instead of loading the teacher.")
    teacher_topk: int = _f(64, "How many top tokens per position a cache keeps (plus a tail bucket), or a served "
        "teacher returns (vLLM allows up to its --max-logprobs, 20 by default).")
    cache_format: str = _f("compact", "How `llmneo cache` stores rows: compact (ids coded by their gaps in id order, "
        "8-bit log-probs; about 174 B/token at k = 64, V = 128k) or exact (int32 ids and float16/float32 log-probs, "
        "as caches before format v2).")
    teacher_endpoint: str | None = _f(None, "A teacher served by vLLM's OpenAI-compatible server, "
        "e.g. http://host:8000/v1: "
        "its top-k prompt log-probs (teacher_topk) train the student online, "
        "or `llmneo cache` captures them.")
    teacher_endpoint_model: str | None = _f(None, "The served model's name at teacher_endpoint (default: the one "
        "model it serves).")
    teacher_api_key_env: str | None = _f(None, "The name of the environment variable holding teacher_endpoint's API "
        "key (the key never goes in a config or a log).")
    teacher_weights: str | None = _f(None, "Several teachers, mixed: one weight per teacher (YAML list or "
        "comma-separated, normalised to sum 1); the student learns from the weighted mixture of the teachers' "
        "probabilities (not their logits).")
    teacher_column: str | None = _f(None, "Several teachers, routed: the dataset column naming each row's teacher, by "
        "0-based index or by the teacher's entry (its path or URL, or the last part of it).")
    kd_cross_tokenizer: str = _f("auto", "A teacher with another tokenizer: auto (when the vocabularies differ, "
        "distil across tokenizers: each side renders with its own template, tokens aligned by their text, GOLD's "
        "hybrid loss; said in one line), true (that path even for one tokenizer) or false (another tokenizer is an "
        "error).")
    kd_uld_weight: float | None = _f(None, "Cross-tokenizer KD: the weight w of ULD's sorted-probability term on the "
        "tokens the vocabularies do not share; KD = (1-w)*divergence over the shared tokens + w*ULD. Default: 1 - the "
        "vocabulary overlap.")
    kd_unaligned: str = _f("ce", "Cross-tokenizer KD, a reply token no teacher span covers: ce (its KD term is its "
        "CE, so it trains on full CE) or skip (no KD: (1 - kd_ratio)*CE only). The student's own replies (on-policy) "
        "always skip.")
    teacher_template: str | None = _f(None, "Cross-tokenizer KD: the built-in template for a teacher tokenizer "
        "without a chat template (default: template). The teacher's own chat template wins when it has one.")
    cache_shard_size: int = _f(262144, "llmneo cache: response positions per shard file. Capture from an endpoint "
        "resumes shard by shard after a crash, so smaller shards lose less.")
    # --- on-policy distillation (TRL GKD's names) -------------------------------------------------
    lmbda: float = _f(0.0, "On-policy fraction: each optimizer step, with this probability (drawn from the seed and "
        "the step number, so a resumed run is exact) the student generates the replies to the step's prompts and "
        "learns the KD term alone on them, scored by the teacher. 0 = the dataset's replies (off-policy).")
    seq_kd: bool = _f(False, "Sequence-level KD: on the steps that are not on-policy, the teacher generates the "
        "replies and they are the targets (CE + KD as usual).")
    max_new_tokens: int = _f(128, "On-policy / seq_kd: the most tokens generated per reply.")
    temperature: float = _f(1.0, "On-policy / seq_kd: the sampling temperature; 0 = greedy.")
    top_p: float = _f(1.0, "On-policy / seq_kd: nucleus sampling's top-p (1 = off).")
    rollout_endpoint: str | None = _f(None, "On-policy replies from vLLM instead of HF generate: the /v1 URL of a "
        "vLLM server of the student's BASE model (model_name_or_path), started with --enable-lora --max-lora-rank R "
        "(R >= lora_rank; 2*lora_rank for pissa/olora) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True. Only the adapter "
        "travels: it is synced as a plain LoRA (rollout_sync_steps) and the replies are sampled with it, as HF would "
        "(max_new_tokens, temperature, top_p; a seed per row, so a resumed run draws the same). Needs lmbda > 0 and "
        "finetuning_type: lora (not DoRA). seq_kd's teacher still generates here.")
    rollout_endpoint_model: str | None = _f(None, "The base model's served name at rollout_endpoint (default: the one "
        "base model it serves).")
    rollout_api_key_env: str | None = _f(None, "The name of the environment variable holding rollout_endpoint's API "
        "key (the key never goes in a config or a log).")
    rollout_sync_steps: int = _f(1, "rollout_endpoint: sync the adapter to the server every this many optimizer "
        "steps (at the first on-policy step after); 1 = every step's replies come from the weights it trains.")
    rollout_adapter_dir: str | None = _f(None, "rollout_endpoint: where each synced adapter is written for the server "
        "to load: a folder the server can read (a shared filesystem when it runs elsewhere). Only the adapter in use "
        "is kept. Default: output_dir/rollout_adapters.")
    rollout_ahead: int = _f(0, "rollout_endpoint: 1 = generate the next step's replies while this step trains, from "
        "the adapter synced before it: generation and training overlap, and the replies are one step staler "
        "(rollout_staleness in metrics.jsonl). 0 = each step's replies are generated before it trains.")
    # --- LoRA -------------------------------------------------------------------------------
    lora_rank: int = _f(128, "LoRA rank r (paper: large ranks such as 128 work best).")
    lora_alpha: int | None = _f(None, "LoRA alpha. Default: 2 * lora_rank.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    lora_variant: str = _f("lora", "LoRA variant: lora|dora|rslora|pissa|olora|moslora (the booleans use_dora / "
        "use_rslora / pissa_init set the same thing, LLaMA-Factory style).")
    use_dora: bool = _f(False, "LLaMA-Factory name for lora_variant: dora.")
    use_rslora: bool = _f(False, "LLaMA-Factory name for lora_variant: rslora.")
    pissa_init: bool = _f(False, "LLaMA-Factory name for lora_variant: pissa.")
    lora_target: str = _f("all", "Modules to adapt: 'all' = every linear layer except lm_head, or comma-separated "
        "module names (e.g. q_proj,v_proj; add lm_head explicitly to adapt the output head), each of which must match "
        "a module: a name that matches none is an error.")
    # --- data -------------------------------------------------------------------------------
    dataset: str | None = _f(None, "Comma-separated datasets: local files (json, jsonl, parquet, csv, txt) or "
        "folders, Hub ids, or names registered in dataset_dir/dataset_info.json.")
    dataset_dir: str = _f("data", "Folder holding dataset_info.json and relative dataset files.")
    template: str | None = _f(None, "Prompt template when the tokenizer has no chat template: default, llama3, qwen, "
        "chatml, mistral, llama2, gemma, alpaca, vicuna. The tokenizer's own chat template wins when it has one. The "
        "template's special tokens (chatml/qwen: im_start, im_end; llama3: eot_id and the header tokens; gemma: "
        "start_of_turn, end_of_turn) must be tokens of the tokenizer: a run is refused without them, except full "
        "fine-tuning without a teacher, which adds them (rows at the mean embedding; the end of turn becomes EOS).")
    cutoff_len: int = _f(2048, "Maximum tokens per example; longer examples are truncated (a warning counts the "
        "replies cut and the tokens lost).")
    packing: bool | None = _f(None, "Concatenate the tokenized examples and cut them into cutoff_len blocks "
        "(LLaMA-Factory's packing). Default: true for stage: pt, false for sft.")
    neat_packing: bool = _f(False, "Pack without cross-talk (LLaMA-Factory's neat_packing; TRL's padding_free): "
        "implies packing, and each packed row's position ids restart at every example, so attention never crosses "
        "an example boundary, for the student and the teacher alike.")
    padding_free: bool = _f(False, "TRL's name for neat_packing.")
    max_samples: int | None = _f(None, "Use at most this many rows of each dataset.")
    val_size: float = _f(0.0, "Held-out split: a fraction in (0, 1) or a row count >= 1. 0 = none.")
    eval_dataset: str | None = _f(None, "Held-out data by name (LLaMA-Factory's key), resolved like `dataset`; used "
        "instead of val_size.")
    # --- training ---------------------------------------------------------------------------
    output_dir: str | None = _f(None, "Where the adapter/model, metrics and checkpoints go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir (export_dir, teacher_cache). "
        "The earlier results of the kinds this command writes are replaced once it has its own (a run's first "
        "checkpoint); other files stay.")
    per_device_train_batch_size: int = _f(8, "Micro-batch size per device.")
    per_device_eval_batch_size: int = _f(8, "Batch size for held-out evaluation.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float | None = _f(None, "Peak learning rate. Default: 2e-4 for lora, 2e-5 for full (paper: LoRA "
        "wants ~10x).")
    num_train_epochs: float = _f(3.0, "Epochs over the training split (fractions allowed).")
    max_steps: int = _f(-1, "Optimizer steps; overrides num_train_epochs when > 0.")
    lr_scheduler_type: str = _f("cosine", "Schedule: " + "|".join(SCHEDULERS) + ".")
    warmup_ratio: float = _f(0.1, "Fraction of steps for linear warmup.")
    warmup_steps: int = _f(0, "Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    bf16: bool = _f(False, "bf16 mixed precision. Falls back to fp32 with a warning where bf16 is unsupported.")
    fp16: bool = _f(False, "fp16 mixed precision (CUDA only; falls back to fp32 with a warning elsewhere).")
    gradient_checkpointing: bool = _f(False, "Recompute student activations in backward to save memory.")
    seed: int = _f(42, "Random seed (data order, adapter init, dropout).")
    logging_steps: int = _f(10, "Write a metrics.jsonl row every this many optimizer steps.")
    eval_strategy: str = _f("no", "Held-out evaluation during training (HF's and LLaMA-Factory's key): no, steps "
        "(every eval_steps) or epoch (at each epoch's end and the last step). Each writes an eval row (step, epoch, "
        "eval_loss, eval_ce_loss, eval_perplexity, ...) to metrics.jsonl, the console and report_to. Needs val_size "
        "or eval_dataset; train_results.json's final eval_* scores are written either way.")
    eval_steps: int | None = _f(None, "eval_strategy: steps: evaluate every this many optimizer steps. Default: "
        "logging_steps.")
    evaluation_strategy: str | None = _f(None, "HF's older name for eval_strategy.")
    save_steps: int = _f(500, "Write output_dir/checkpoint-STEP every this many optimizer steps.")
    save_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "Continue a run exactly: 'auto' (the newest "
        "output_dir/checkpoint-STEP; a fresh start if there is none) or a checkpoint path. No overwrite flag needed.")
    plot_loss: bool = _f(False, "Write training_loss.png (needs matplotlib: pip install llmneo[plot]).")
    report_to: str | None = _f(
        None, "Experiment trackers, through accelerate: none (null), all (every installed one) or a comma list of "
        + ", ".join(TRACKERS) + ". They receive the same rows as metrics.jsonl, and the config as hyperparameters.")
    logging_dir: str | None = _f(None, "Where file-based trackers (tensorboard, ...) write, in logging_dir/run_name. "
        "Default: output_dir/runs.")
    run_name: str | None = _f(None, "The run's name in the trackers. Default: the name of the output_dir folder.")
    ddp_timeout: int = _f(1800, "Distributed process-group timeout in seconds.")
    # --- evaluation ---------------------------------------------------------------------------
    tasks: str | None = _f(None, "llmneo eval: comma-separated lm-evaluation-harness tasks (e.g. arc_easy,mmlu), "
        "or paths to task YAML files/folders for local tasks. "
        "Needs `pip install llmneo[eval]`.")
    num_fewshot: int | None = _f(None, "llmneo eval: few-shot examples for the lm-eval tasks (task default if null).")
    eval_limit: int | None = _f(None, "llmneo eval: evaluate at most this many documents per lm-eval task.")
    sweep_metric: str = _f("perplexity", "llmneo sweep: the held-out metric that picks the best cell: perplexity or "
        "kl_to_teacher (lower is better), top1_agreement (higher is better).")
    # --- pruning ------------------------------------------------------------------------------
    keep_layers: str | None = _f(None, "llmneo prune: comma-separated 0-based decoder layers to keep (e.g. 0,1,2,7).")
    num_layers: int | None = _f(None, "llmneo prune: target depth; the least influential blocks on `dataset` are "
        "removed.")
    # --- export -----------------------------------------------------------------------------
    export_dir: str | None = _f(None, "Where `llmneo export` writes the merged, plain HF model.")

    # ---------------------------------------------------------------------------------------
    @property
    def has_teacher(self) -> bool:
        """A teacher signal exists: a live teacher model or an offline cache."""
        return any(v is not None for v in (self.teacher_model_name_or_path, self.teacher_cache, self.teacher_endpoint))

    @property
    def uses_kd(self) -> bool:
        return self.has_teacher and self.kd_ratio > 0

    @property
    def uses_cache(self) -> bool:
        """KD from an offline top-k cache: no teacher model is loaded."""
        return self.uses_kd and self.teacher_cache is not None

    @property
    def uses_endpoint(self) -> bool:
        """KD online from a served teacher (teacher_endpoint): no teacher model is loaded."""
        return self.uses_kd and self.teacher_endpoint is not None and self.teacher_cache is None

    @property
    def loads_model(self) -> bool:
        """Whether the run loads a teacher model in-process."""
        return self.uses_kd and not self.uses_cache and not self.uses_endpoint

    @property
    def teachers(self) -> list[str]:
        """The teacher models (or, for a served teacher, endpoints), one entry per teacher."""
        value = self.teacher_model_name_or_path or self.teacher_endpoint or ""
        return [item.strip() for item in value.split(",") if item.strip()]

    @property
    def mixture_weights(self) -> list[float] | None:
        """teacher_weights, normalised to sum 1 (None without them)."""
        if not self.teacher_weights:
            return None
        weights = [float(w) for w in self.teacher_weights.split(",") if w.strip()]
        return [w / sum(weights) for w in weights]

    @property
    def cross_tokenizer(self) -> str:
        """kd_cross_tokenizer as auto, true or false (YAML's booleans arrive as True / False)."""
        return str(self.kd_cross_tokenizer).strip().lower()

    @property
    def generates(self) -> bool:
        """Some steps train on generated replies (on-policy, or the teacher's under seq_kd)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def method(self) -> str:
        """The paper's four arms: neo (LoRA+KD), kd (full+KD), lora, sft."""
        if self.finetuning_type == "lora":
            return "neo" if self.uses_kd else "lora"
        return "kd" if self.uses_kd else "sft"

    @property
    def effective_eval_strategy(self) -> str:
        """eval_strategy, or HF's older evaluation_strategy; YAML's bare `no` (a boolean false) reads as no."""
        given = [strategy_name(v) for v in (self.eval_strategy, self.evaluation_strategy) if v is not None]
        return next((v for v in given if v != "no"), "no")

    @property
    def effective_packing(self) -> bool:
        """LLaMA-Factory's default: pack for pretraining, not for SFT."""
        return self.effective_neat_packing or (self.packing if self.packing is not None else self.stage == "pt")

    @property
    def effective_neat_packing(self) -> bool:
        """neat_packing, or TRL's padding_free: packed rows whose examples do not attend to each other."""
        return self.neat_packing or self.padding_free

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.finetuning_type == "lora" else 2e-5

    @property
    def variant(self) -> str:
        """The LoRA variant, from lora_variant or the LLaMA-Factory booleans."""
        for name, on in (("dora", self.use_dora), ("rslora", self.use_rslora), ("pissa", self.pissa_init)):
            if on:
                return name
        return self.lora_variant

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Config)


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise a one-line error."""
    return config_values.coerce(name, FIELD_TYPES[name], value)


def check_key(key: str) -> None:
    """Raise the one-line error for a key that is neither a Config field nor an ignored LLaMA-Factory key: another
    tool's name for one of ours (peer_keys), or the key it most likely meant."""
    check_supported({key: None})
    if key not in FIELDS and key not in IGNORED_KEYS:
        raise LlmneoError(peer_keys.unknown_key(key, [*FIELDS, *sorted(IGNORED_KEYS)]))


def parse_overrides(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        if "=" not in item:
            given = items[i + 1] if item in FIELDS and i + 1 < len(items) and "=" not in items[i + 1] else None
            example = f"{item}={given}" if given and not item.endswith("_api_key_env") else "learning_rate=1e-4"
            # A lone word that is no key may be a pasted value (an API key): not echoed.
            shown = f"'{item}'" if re.fullmatch(r"[a-z][a-z0-9_]{0,40}", item) else f"{i + 1} (not shown: no key name)"
            raise LlmneoError(f"override {shown} is not key=value; e.g. {example}")
        key, value = item.split("=", 1)
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LlmneoError(f"config file not found: {path}; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        # A parse error says where and what went wrong; a reader error (a character YAML refuses) says neither.
        mark, problem = (exc.problem_mark, exc.problem) if isinstance(exc, yaml.MarkedYAMLError) else (None, None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LlmneoError(f"YAML syntax error in {path}{where}: {problem or 'invalid YAML'}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlmneoError(f"{path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
         *, defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Config:
    """Build a Config from an optional YAML file plus overrides (later wins).

    An unsupported stage or feature key is reported first, then unknown keys (naming the closest key);
    ignored LLaMA-Factory keys give one warning. `defaults(values)` gives values for keys not given (eval and
    export of a trained run: trained_run.defaults, from the run's saved config).
    """
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    if isinstance(overrides, dict):
        raw.update(overrides)
    elif overrides:
        raw.update(parse_overrides(overrides))
    check_supported(raw)
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        key = str(key)
        check_key(key)
        if key in FIELDS:
            values[key] = coerce(key, value)
        else:
            ignored.append(key)
    if ignored:
        warnings.warn(f"llmneo ignores these keys (accepted for LLaMA-Factory compatibility): "
                      f"{', '.join(sorted(ignored))}", stacklevel=2)
    for key, value in (defaults(values) if defaults else {}).items():
        values.setdefault(key, value)
    config = Config(**values)
    validate(config)
    return config


def to_yaml(config: Config) -> str:
    """Every key of `config` as YAML, in field order: what `llmneo train` saves as llmneo_config.yaml."""
    header = "# Written by llmneo train: every key of this run; `llmneo train llmneo_config.yaml` loads it.\n"
    return header + yaml.safe_dump(to_dict(config), sort_keys=False)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def input_paths(config: "Config") -> dict[str, str | None]:
    """The paths a command reads, so an output folder can refuse to overwrite them."""
    return {key: getattr(config, key) for key in ("model_name_or_path", "adapter_name_or_path",
                                                   "teacher_model_name_or_path", "teacher_cache", "dataset")}
