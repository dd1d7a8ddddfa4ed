"""Evaluate a student on held-out data: CE and perplexity, KL to the teacher, top-1 agreement, the KD
objective; and the lm-eval bridge.

`held_out` is the one held-out evaluator: `llmneo train` (val_size / eval_dataset: eval_strategy's rows and
the final scores, train/periodic_eval.py), `llmneo eval` and `llmneo sweep` (through train's results) all
score with it. Every metric is over the response positions training scores (the next-token shift): `ce_loss`
is the mean CE per response token and `perplexity` its exp (inf where that overflows a float); with a teacher,
`kl_to_teacher` is the mean forward KL(p_T ‖ p_S) at T = 1 over the real vocabulary, `top1_agreement` the
fraction of positions where the two argmaxes agree, and `kd_loss` the mean of the run's configured divergence
(kd_loss, kd_temperature, ...), so training's KD objective is reported on held-out rows too. `tasks=...` hands
the same in-memory model to lm-evaluation-harness through its HF wrapper.

`greedy_teacher_logprob` scores what a model *writes* rather than how it predicts the references: it
continues each held-out prompt greedily and reports the teacher's mean log-prob per token of those replies,
the measure that fits on-policy distillation (which trains on the student's own replies).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from llmneo import run_dir
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.data.labels import response_positions
from llmneo.errors import LlmneoError
from llmneo.loss.divergences import KDSettings, token_cross_entropy, token_divergence
from llmneo.models import generate as rollout
from llmneo.models import heads, inputs, loading
from llmneo.process import is_main_process

KD_SETTING_NAMES = ("kind", "temperature", "beta", "skew")


def perplexity(ce_loss: float) -> float:
    """exp(mean CE): inf where exp overflows a float (CE above ~709.78), NaN for a NaN CE."""
    try:
        return math.exp(ce_loss)
    except OverflowError:
        return math.inf


def kd_settings(kd) -> dict | None:
    """The divergence's keyword arguments from KD settings: a losses.KDSettings (or any object with
    .kind/.temperature/.beta/.skew), or a dict with those keys; None stays None. Held-out data has no
    sampled tokens, so `sampled_rkl` is scored as the exact reverse KL it estimates (`rkl`)."""
    if kd is None:
        return None
    if isinstance(kd, dict):
        settings = {name: kd[name] for name in KD_SETTING_NAMES}
    else:
        settings = {name: getattr(kd, name) for name in KD_SETTING_NAMES}
    if settings["kind"] == "sampled_rkl":
        settings["kind"] = "rkl"
    return settings


def _response_logits(model, batch: dict, positions: torch.Tensor, vocab_size: int, full_logits: bool):
    """A function rows (a slice of the N response positions) → logits (C, V) over the real vocabulary.

    By default the model's final hidden states are kept at the response positions and projected through its
    own head one slice at a time (heads.py), so a large vocabulary never needs [B, T, V] logits. With
    `full_logits`, the logits come from the model's forward (the reference path, and what sharded engines
    need: their head exists whole only inside forward).
    """
    if full_logits:
        logits = model(**inputs.forward_inputs(batch), use_cache=False).logits
        logits = logits[positions][:, :vocab_size]  # (N, V): padded vocab rows dropped
        return lambda rows: logits[rows]
    final = heads.final_states(model, batch, vocab_size)
    hidden = final.hidden[positions]  # (N, H)
    return lambda rows: final.logits(hidden[rows])  # (C, V)


@contextlib.contextmanager
def _eval_mode(*modules):
    """Eval mode (no dropout, LoRA dropout included) for the duration; each module's own mode restored after."""
    modules = [m for m in modules if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)


@torch.no_grad()
def held_out(model, teacher, examples: list[dict], *, pad_token_id: int, vocab_size: int, kd=None,
             batch_size: int = 8, chunk_size: int = 256, device: torch.device | str = "cpu",
             autocast=contextlib.nullcontext, show_progress: bool = True, leave_progress: bool = True) -> dict:
    """ce_loss, perplexity and tokens over the response tokens of `examples`; with a `teacher` model also
    kl_to_teacher, top1_agreement and (given `kd` settings) kd_loss under the run's divergence. Metrics
    not measured are None.

    `chunk_size` response positions at a time go through each model's own head, as in training's fused
    loss; 0 takes full logits from each forward (the reference path; sharded engines). `autocast` is a
    context factory for the forwards (e.g. accelerator.autocast, so mixed precision matches training).
    `kd`: an object with .kind/.temperature/.beta/.skew or a dict with those keys. `show_progress`: a progress
    bar on stderr (off on all but the main process), left on screen when done unless `leave_progress` is false.
    """
    if not examples:
        raise LlmneoError("nothing to evaluate: the dataset has no example with a response token")
    settings = kd_settings(kd) if teacher is not None else None
    # ce, kl, kd, agreeing positions; summed on the device and read once at the end
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    tokens = 0
    starts = range(0, len(examples), batch_size)
    with _eval_mode(model, teacher), tqdm(starts, desc="llmneo held-out eval", unit="batch", leave=leave_progress,
                                          disable=not show_progress, dynamic_ncols=True) as bar:
        for start in bar:
            batch = data.collate(examples[start:start + batch_size], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            positions, targets = response_positions(batch["labels"])
            step = chunk_size if chunk_size > 0 else max(targets.numel(), 1)
            with autocast():
                student = _response_logits(model, batch, positions, vocab_size, chunk_size <= 0)
                reference = None if teacher is None else _response_logits(teacher, batch, positions, vocab_size,
                                                                          chunk_size <= 0)
                for first in range(0, targets.numel(), step):
                    rows = slice(first, first + step)
                    logits = student(rows)  # (C, V)
                    sums[0] += token_cross_entropy(logits, targets[rows]).sum()
                    if reference is None:
                        continue
                    teacher_logits = reference(rows)  # (C, V)
                    sums[1] += token_divergence(logits, teacher_logits, "fkl").sum()
                    if settings is not None:
                        sums[2] += token_divergence(logits, teacher_logits, **settings).sum()
                    sums[3] += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
            tokens += targets.numel()
    if tokens == 0:
        raise LlmneoError("nothing to evaluate: the dataset has no example with a response token")
    ce, kl, kd_sum, agree = (float(x) for x in sums.cpu())
    return {
        "ce_loss": ce / tokens,
        "perplexity": perplexity(ce / tokens),
        "tokens": tokens,
        "kl_to_teacher": None if teacher is None else kl / tokens,
        "top1_agreement": None if teacher is None else agree / tokens,
        "kd_loss": None if settings is None else kd_sum / tokens,
    }


@torch.no_grad()
def greedy_teacher_logprob(model, teacher, examples: list[dict], tokenizer, *, max_new_tokens: int,
                           batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """The teacher's log-prob of `model`'s own greedy replies to the prompts of `examples`.

    Each example's prompt (its tokens before its last reply, models.generate.prompts) is continued greedily by
    `model` (models.generate.HFGenerator at temperature 0: up to `max_new_tokens`, cut after the first EOS of the
    tokenizer or the model's generation_config), and the teacher scores prompt + reply under teacher forcing.
    Returns `teacher_logprob`, the mean log p_T per generated token (EOS included, log-softmax over the
    tokenizer's vocabulary), `generated_tokens`, and `replies_ended`, the fraction of replies that reached
    an EOS within `max_new_tokens`. With `teacher` = `model`, it is the model scoring its own greedy answers.
    """
    if not examples:
        raise LlmneoError("nothing to evaluate: no held-out example")
    generator = rollout.HFGenerator(model, tokenizer, rollout.Sampling(max_new_tokens, temperature=0.0))
    vocab_size = len(tokenizer)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = ended = replies_seen = 0
    with _eval_mode(model, teacher):
        for start in range(0, len(examples), batch_size):
            batch = data.collate(examples[start:start + batch_size], tokenizer.pad_token_id)
            prompt_ids = rollout.prompts({k: v.to(device) for k, v in batch.items()})
            replies = generator.generate(prompt_ids)
            scored = rollout.with_replies(prompt_ids, replies, tokenizer.pad_token_id, device)
            positions, targets = response_positions(scored["labels"])
            logits = _response_logits(teacher, scored, positions, vocab_size, False)(slice(None))  # (N, V)
            total += torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None]).sum()
            tokens += targets.numel()
            ended += sum(1 for r in replies if len(r) and int(r[-1]) in generator.eos)
            replies_seen += len(replies)
    if tokens == 0:
        raise LlmneoError("nothing to score: every greedy reply was empty (max_new_tokens must be > 0)")
    return {"teacher_logprob": float(total) / tokens, "generated_tokens": tokens,
            "replies_ended": ended / replies_seen}


def _task_names(spec: str) -> tuple[list[str], list[str]]:
    """Split `tasks` into task names and include paths (local task YAML files or folders)."""
    names, include = [], []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            task = (yaml.safe_load(path.read_text()) or {}).get("task")
            if not task:
                raise LlmneoError(f"task file {path} has no 'task:' name")
            names.append(task)
            include.append(str(path.parent.resolve()))
        elif path.is_dir():
            include.append(str(path.resolve()))
            names.extend(
                (yaml.safe_load(f.read_text()) or {}).get("task") for f in sorted(path.glob("*.y*ml"))
            )
        else:
            names.append(item)
    return [n for n in names if n], include


def lm_eval_tasks(model, tokenizer, spec: str, *, num_fewshot: int | None = None, limit: int | None = None,
                  batch_size: int = 8, device: str = "cpu") -> dict:
    """Run lm-evaluation-harness tasks on an in-memory model; returns {task: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LlmneoError("tasks=... needs lm-evaluation-harness: pip install 'llmneo[eval]'") from None
    names, include = _task_names(spec)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LlmneoError(f"unknown lm-eval task(s): {', '.join(unknown)}; check the names "
                          f"(lm-eval --tasks list) or give the path of a task YAML")
    tasks = [task for name in names for task in _built_task(manager, name)]
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0)
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
    return out


def _built_task(manager, name: str) -> list:
    """The task (or group, or a tag's tasks) `name`, built: building it loads its data, which fails without
    network when the data set is not in the Hugging Face cache. That failure becomes one line."""
    try:
        loaded = manager.load(name)
    except Exception as exc:
        if not _while_loading_data(exc):
            raise
        raise LlmneoError(
            f"lm-eval task {name}: its data could not be loaded ({_first_line(exc)}); it is not in the Hugging Face "
            f"cache and the Hub cannot be reached (offline?). Run once with network access (and without "
            f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) to cache it, point HF_HOME at a cache that has it, or give "
            f"a local task YAML whose dataset_path is a local folder") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: the tasks it names


def _while_loading_data(exc: BaseException) -> bool:
    """Whether `exc` was raised inside `datasets.load_dataset` (a missing, unreachable or uncached data set)."""
    import traceback

    for error in (exc, exc.__cause__, exc.__context__):
        if error is None:
            continue
        for frame in traceback.extract_tb(error.__traceback__):
            if frame.name in ("load_dataset", "load_dataset_builder") and "datasets" in Path(frame.filename).parts:
                return True
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table; `columns` is [(key, header)], floats shown to 4 significant digits."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _same_vocabulary(config: Config, tokenizer) -> bool:
    """Whether the teacher can score token by token. A teacher with another tokenizer (cross-tokenizer KD) cannot:
    a warning says so and the scores are CE and perplexity; kd_cross_tokenizer: false keeps that an error."""
    path = config.teacher_model_name_or_path
    own = loading.load_tokenizer(path, "teacher_model_name_or_path", config.trust_remote_code)
    if loading.tokenizers_match(tokenizer, own) or config.cross_tokenizer == "false":
        return True  # load_teacher refuses a different tokenizer in one line
    warnings.warn(f"teacher '{path}' has another tokenizer than the model; KL to teacher, top-1 agreement and kd_loss "
                  f"compare the two token by token, so only ce_loss and perplexity are reported", stacklevel=2)
    return False


def run(config: Config) -> dict:
    """`llmneo eval`: metrics on `dataset` (the held-out split when val_size > 0 or eval_dataset is set)
    and/or lm-eval `tasks`."""
    if not config.dataset and not config.tasks:
        raise LlmneoError("nothing to evaluate: set dataset=... (perplexity, KL, agreement) and/or tasks=...")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = loading.weight_dtype(config, "eval")  # bf16 on a bf16 GPU under auto (models/loading.py says why)
    model, tokenizer = loading.load_trained(config, dtype)
    model.to(device)
    results: dict = {"model": config.model_name_or_path}
    if config.dataset:
        teacher = None
        if config.teacher_model_name_or_path and _same_vocabulary(config, tokenizer):
            teacher = loading.load_teacher(config, tokenizer, dtype).to(device)
        splits = data.build(config, tokenizer)
        split_off = config.val_size > 0 or bool(config.eval_dataset)
        if split_off and not splits.eval:
            given = f"eval_dataset={config.eval_dataset}" if config.eval_dataset else f"val_size={config.val_size}"
            raise LlmneoError(f"{given} but no held-out example has a response token within "
                              f"cutoff_len={config.cutoff_len}; raise cutoff_len or check the held-out data")
        examples = splits.eval if split_off else splits.train
        results.update(held_out(model, teacher, examples, pad_token_id=tokenizer.pad_token_id,
                                vocab_size=len(tokenizer), kd=KDSettings.from_config(config),
                                batch_size=config.per_device_eval_batch_size, chunk_size=config.kd_chunk_size,
                                device=device, show_progress=is_main_process()))
    if config.tasks:
        results["lm_eval"] = lm_eval_tasks(model, tokenizer, config.tasks, num_fewshot=config.num_fewshot,
                                           limit=config.eval_limit, batch_size=config.per_device_eval_batch_size,
                                           device=str(device))
    if config.output_dir:
        out = Path(config.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            run_dir.write_json(out / "eval_results.json", results)
        except OSError as exc:
            raise LlmneoError(f"cannot write eval_results.json to '{out}': {exc.strerror or exc}") from None
    return results


def summary(results: dict) -> str:
    """What `llmneo eval` prints: the response metrics table, then lm-eval metrics."""
    parts = []
    if "perplexity" in results:
        columns = [("perplexity", "perplexity"), ("kl_to_teacher", "KL to teacher"),
                   ("top1_agreement", "top-1 agreement"), ("tokens", "response tokens")]
        parts.append(format_table([results], columns))
    for task, metrics in results.get("lm_eval", {}).items():
        shown = ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items())
        parts.append(f"{task}: {shown}")
    return "\n".join(parts)
