"""Evaluate a student: perplexity over response tokens, KL to the teacher, top-1 agreement; lm-eval bridge.

All metrics are over the same response positions training scores (the next-token shift): perplexity
is exp of the mean CE per response token; `kl_to_teacher` is the mean forward KL(p_T ‖ p_S) per
response token over the real vocabulary; `top1_agreement` is the fraction of those positions where the
student's argmax equals the teacher's. `tasks=...` hands the same in-memory model to
lm-evaluation-harness through its HF wrapper.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from llmneo import data, heads, models, run_dir
from llmneo.config import Config
from llmneo.errors import LlmneoError
from llmneo.losses import response_positions, token_cross_entropy, token_divergence


@torch.no_grad()
def response_metrics(model, examples: list[dict], pad_token_id: int, vocab_size: int, *, teacher=None,
                     batch_size: int = 8, device: torch.device | str = "cpu", chunk_size: int = 256) -> dict:
    """Perplexity (and, with a teacher, KL and top-1 agreement) over the response tokens of `examples`.

    Like training, it projects only the response positions, `chunk_size` at a time, through each
    model's own head, so a 128k vocabulary never needs [batch, seq, V] logits.
    """
    if not examples:
        raise LlmneoError("nothing to evaluate: the dataset has no example with a response token")
    student_head, _ = heads.output_head(model)
    teacher_head = heads.output_head(teacher)[0] if teacher is not None else None
    ce_sum, kl_sum, agree, tokens = 0.0, 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = data.collate(examples[start:start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        positions, targets = response_positions(batch["labels"])
        hidden = heads.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[positions]
        if teacher is not None:
            teacher_hidden = heads.final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])[positions]
        for first in range(0, len(targets), chunk_size):
            rows = slice(first, first + chunk_size)
            student = student_head(hidden[rows])[:, :vocab_size]  # (C, V)
            ce_sum += float(token_cross_entropy(student, targets[rows]).sum())
            if teacher is not None:
                reference = teacher_head(teacher_hidden[rows])[:, :vocab_size]  # (C, V)
                kl_sum += float(token_divergence(student, reference, "fkl").sum())
                agree += int((student.argmax(-1) == reference.argmax(-1)).sum())
        tokens += targets.numel()
    ce = ce_sum / tokens
    out = {"perplexity": math.exp(ce) if ce < 700 else math.inf, "ce_loss": ce, "tokens": tokens}
    if teacher is not None:
        out.update(kl_to_teacher=kl_sum / tokens, top1_agreement=agree / tokens)
    return out


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


def run(config: Config) -> dict:
    """`llmneo eval`: metrics on `dataset` (the held-out split when val_size > 0 or eval_dataset is set)
    and/or lm-eval `tasks`."""
    if not config.dataset and not config.tasks:
        raise LlmneoError("nothing to evaluate: set dataset=... (perplexity, KL, agreement) and/or tasks=...")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # auto: bf16 where a GPU supports it (an 8B teacher in fp32 would double the memory), else fp32.
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    auto = torch.bfloat16 if bf16_gpu else torch.float32
    dtype = auto if config.torch_dtype == "auto" else models.DTYPES[config.torch_dtype]
    model, tokenizer = models.load_trained(config, dtype)
    model.to(device)
    results: dict = {"model": config.model_name_or_path}
    if config.dataset:
        teacher = None
        if config.teacher_model_name_or_path:
            teacher = models.load_teacher(config, tokenizer, dtype).to(device)
        splits = data.build(config, tokenizer)
        held_out = config.val_size > 0 or bool(config.eval_dataset)
        if held_out and not splits.eval:
            given = f"eval_dataset={config.eval_dataset}" if config.eval_dataset else f"val_size={config.val_size}"
            raise LlmneoError(f"{given} but no held-out example has a response token within "
                              f"cutoff_len={config.cutoff_len}; raise cutoff_len or check the held-out data")
        examples = splits.eval if held_out else splits.train
        results.update(response_metrics(model, examples, tokenizer.pad_token_id, len(tokenizer), teacher=teacher,
                                        batch_size=config.per_device_eval_batch_size, device=device))
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
