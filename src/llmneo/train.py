"""One explicit training loop on accelerate for all four arms (Neo, KD, LoRA, SFT).

The arms differ only in what trains (adapters or every weight) and whether a teacher signal is
present. Per optimizer step:

    loss = (1 - kd_ratio) * CE + kd_ratio * KD

where both terms are *sums* over response tokens divided by the number of response tokens in the
whole optimizer step, across gradient-accumulation micro-batches and data-parallel ranks. So one
batch of 8 and four accumulated batches of 2 give the same gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmneo import adapters, cache, checkpoint, data, engines, heads, memory, models, plot, preemption, run_dir
from llmneo import tracking
from llmneo.chunked import fused_loss, kd_values
from llmneo.config import SAVED_CONFIG, Config, input_paths, to_yaml
from llmneo.errors import LlmneoError
from llmneo.losses import response_positions, token_cross_entropy
from llmneo.teacher import LiveTeacher


def micro_batch_sums(model, teacher, batch: dict, config: Config, vocab_size: int, kd_ratio: float):
    """(loss_sum, ce_sum, kd_sum | None, n_tokens) for one micro-batch; loss_sum carries the gradient.

    With kd_chunk_size > 0 (the default) the fused chunked loss projects only the response positions,
    chunk by chunk; with 0, full logits are materialised (the reference path, kept for checking).
    """
    positions, targets = response_positions(batch["labels"])
    teacher_rows = teacher.rows(batch, positions) if teacher is not None else None
    settings = {"kind": config.kd_loss, "temperature": config.kd_temperature, "beta": config.kd_beta,
                "skew": config.kd_skew}
    if config.kd_chunk_size > 0:
        hidden = heads.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[positions]  # (N, H)
        head, head_params = heads.output_head(model)
        loss, ce, kd = fused_loss(hidden, targets, head, head_params, teacher_rows, vocab_size=vocab_size,
                                  kd_ratio=kd_ratio, settings=settings, chunk_size=config.kd_chunk_size)
        return loss, ce, kd, targets.numel()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    student = logits[positions][:, :vocab_size]  # (N, V): padded vocab rows dropped
    ce = token_cross_entropy(student, targets).sum()
    kd = None if teacher_rows is None else kd_values(student, teacher_rows[0:len(teacher_rows)], settings).sum()
    return combine(ce, kd, kd_ratio), ce, kd, targets.numel()


def combine(ce: torch.Tensor, kd: torch.Tensor | None, kd_ratio: float) -> torch.Tensor:
    return ce if kd is None else (1.0 - kd_ratio) * ce + kd_ratio * kd


def accumulate(accelerator, model, teacher, micro: list[dict], config: Config, vocab_size: int, kd_ratio: float):
    """Forward and backward over one optimizer step's micro-batches; gradients are left in `.grad`.

    Returns the step's local (ce_sum, kd_sum, non-pad tokens) and the global response-token count.
    """
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_global = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    # DDP averages gradients over ranks; multiplying by the world size turns that mean back into
    # the sum over ranks, so the step's loss is a mean over the *global* response tokens.
    scale = accelerator.num_processes / max(n_global, 1)
    ce_sum = torch.zeros((), device=accelerator.device)
    kd_sum = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device)
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        if deepspeed:  # accelerate's DeepSpeed backward steps the engine unless told this is not a boundary
            accelerator.gradient_state._set_sync_gradients(sync)
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, ce, kd, _ = micro_batch_sums(model, teacher, batch, config, vocab_size, kd_ratio)
            accelerator.backward(loss * scale)
        ce_sum += ce.detach()
        kd_sum += kd.detach() if kd is not None else 0.0
        seen += batch["attention_mask"].sum()
    return ce_sum, kd_sum, seen, n_global


def _optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    params = adapters.trainable_parameters(model)
    # No weight decay on biases and norm gains (1-D tensors), as in HF Trainer.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.effective_learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)


def _warn_about_teacher(config: Config) -> None:
    if config.has_teacher and config.kd_ratio == 0:
        warnings.warn(f"kd_ratio is 0: the teacher is not loaded and this is plain {config.method} training")
    elif not config.has_teacher:
        warnings.warn(f"no teacher_model_name_or_path: training on CE alone ({config.method}); "
                      f"kd_ratio={config.kd_ratio} is ignored. Set a teacher for Neo/KD")


INITIAL_ADAPTER = "initial_adapter"  # PiSSA / OLoRA only


@contextlib.contextmanager
def _writable(what):
    """Turn a failed write of the run's results (disk full, read-only) into a one-line user error."""
    try:
        yield
    except Exception as exc:
        reason = run_dir.write_failure(exc)
        if reason is None:
            raise
        raise checkpoint.unwritable(what, reason) from None


def run(config: Config) -> dict:
    """Train as configured; return (and write) train_results."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    precision = models.resolve_precision(config)
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision, cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
        **tracking.accelerator_kwargs(config),
    )
    main = accelerator.is_main_process
    if main:
        _warn_about_teacher(config)
    if not config.output_dir:
        raise LlmneoError("output_dir is not set; give a directory for the results, e.g. output_dir=out/run1")
    resume_from = checkpoint.resolve(config)
    out = Path(config.output_dir)
    if main:
        # Resuming continues in the run's own output_dir: no overwrite flag needed, nothing cleared.
        overwrite = config.overwrite_output_dir or config.resume_from_checkpoint == "auto"
        if resume_from is None:
            run_dir.prepare(config.output_dir, overwrite, inputs=input_paths(config))
        else:
            with _writable(out):
                out.mkdir(parents=True, exist_ok=True)
        with _writable(out / SAVED_CONFIG):  # every key of this run; eval and export read its template, cutoff
            run_dir.write_text(out / SAVED_CONFIG, to_yaml(config))
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    memory.reset_peak(accelerator.device)

    cached = config.uses_kd and config.teacher_cache is not None
    loaded = models.load(config, precision, with_teacher=config.uses_kd and not cached)
    splits = data.build(config, loaded.tokenizer)
    for i, example in enumerate(splits.train):
        example["index"] = i  # lets a teacher cache find the example's rows
    model = adapters.apply(loaded.student, config)
    for adapter_config in getattr(model, "peft_config", {}).values():
        # The base as loaded (absolute for a local path): adapters saved here then merge from any directory.
        adapter_config.base_model_name_or_path = loaded.student.name_or_path
    if adapters.rewrites_base(config) and main:
        # PiSSA / OLoRA: keep the initial adapter, to convert the final one into a LoRA on the original base.
        with _writable(out / INITIAL_ADAPTER):
            model.save_pretrained(out / INITIAL_ADAPTER, safe_serialization=True)
    trainable, total = adapters.count_params(model)
    collate = partial(data.collate, pad_token_id=loaded.tokenizer.pad_token_id)
    # The loader's own generator: creating an iterator (each epoch, or on resume) must not draw from the
    # global RNG that dropout uses, or a resumed run would drift from an uninterrupted one.
    loader = torch.utils.data.DataLoader(splits.train, batch_size=config.per_device_train_batch_size,
                                         sampler=data.EpochSampler(len(splits.train), config.seed), collate_fn=collate,
                                         generator=torch.Generator().manual_seed(config.seed))
    optimizer = _optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cached:
        expected = cache.fingerprint(config, loaded.tokenizer, splits.train, k=0)
        teacher = cache.CachedTeacher(config.teacher_cache, expected, accelerator.device)
    elif loaded.teacher is not None:
        teacher = LiveTeacher(engines.place_teacher(loaded.teacher, accelerator), loaded.vocab_size,
                              full_logits=engines.sharded(accelerator))
    else:
        teacher = None
    if engines.sharded(accelerator) and config.kd_chunk_size:
        if main:
            warnings.warn("FSDP / ZeRO-3 shard the output head outside forward: using full logits at the response "
                          "positions (kd_chunk_size=0) under this engine")
        config = dataclasses.replace(config, kd_chunk_size=0)

    accum = config.gradient_accumulation_steps
    if config.max_steps > 0:
        total_steps = config.max_steps
    else:
        total_steps = max(1, math.ceil(config.num_train_epochs * len(loader) / accum))
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    progress = checkpoint.Progress()
    if resume_from is not None:
        progress = checkpoint.load(resume_from, accelerator, model, optimizer, scheduler, config)
        if main:
            with _writable(out / "metrics.jsonl"):  # the steps after the checkpoint will be logged again
                (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in progress.history))
            print(f"llmneo: resuming from {resume_from} (step {progress.step} of {total_steps})", flush=True)
    tracking.start(accelerator, config, resumed_step=progress.step)
    if main:
        _announce(config, trainable, total, len(splits.train), cached)
    params = [p for p in model.parameters() if p.requires_grad]
    kd_ratio = config.kd_ratio if teacher is not None else 0.0
    stream = data.micro_batches(loader, accelerator, start=progress.micro_seen)
    window_start = started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"llmneo {config.method}", disable=not main,
               dynamic_ncols=True)
    model.train()
    last: dict = {}
    try:
        with preemption.StopRequests() as stop:
            for step in range(progress.step + 1, total_steps + 1):
                micro = [next(stream) for _ in range(accum)]
                ce_sum, kd_sum, seen, n_global = accumulate(accelerator, model, teacher, micro, config,
                                                            loaded.vocab_size, kd_ratio)
                norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
                grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside its engine
                totals = accelerator.reduce(torch.stack([ce_sum, kd_sum, seen.float()]), "sum")
                step_ce = float(totals[0]) / max(n_global, 1)
                step_kd = float(totals[1]) / max(n_global, 1) if teacher is not None else None
                step_loss = step_ce if step_kd is None else (1 - kd_ratio) * step_ce + kd_ratio * step_kd
                finite = math.isfinite(step_loss) and (norm is None or math.isfinite(grad_norm))
                if not finite and precision.mixed_precision != "fp16":
                    kept = run_dir.checkpoints(out)
                    raise LlmneoError(
                        f"non-finite loss or gradient at step {step} (loss={step_loss}, grad_norm={grad_norm}); "
                        f"lower learning_rate or use bf16 instead of fp16"
                        + (f"; the last good checkpoint is {kept[-1][1]}" if kept else ""))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                progress.step, progress.micro_seen = step, progress.micro_seen + accum
                window = progress.window
                window["ce"] += float(totals[0])
                window["kd"] += float(totals[1])
                window["tokens"] += n_global
                window["seen"] += int(totals[2])
                progress.train_tokens += int(totals[2])
                last = {"loss": step_loss, "ce": step_ce, "kd": step_kd}
                bar.update(1)
                if step % config.logging_steps == 0 or step == total_steps:
                    row = _log_row(step, progress.micro_seen / len(loader), window, kd_ratio, teacher is not None,
                                   scheduler.get_last_lr()[0], grad_norm, time.perf_counter() - window_start)
                    progress.history.append(row)
                    if main:
                        with _writable(out / "metrics.jsonl"):
                            run_dir.append_jsonl(out / "metrics.jsonl", row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", ce=f"{row['ce_loss']:.4f}",
                                        kd="-" if row["kd_loss"] is None else f"{row['kd_loss']:.4f}",
                                        lr=f"{row['learning_rate']:.2e}", tok_s=f"{row['tokens_per_second']:.0f}")
                    tracking.log(accelerator, row, step)  # the same row to report_to's trackers
                    progress.window = {"ce": 0.0, "kd": 0.0, "tokens": 0, "seen": 0}
                    window_start = time.perf_counter()
                stopping = preemption.stop_agreed(accelerator, stop.signal_name is not None)
                if step % config.save_steps == 0 or step == total_steps or stopping:
                    progress.runtime += time.perf_counter() - started
                    started = time.perf_counter()
                    saved = checkpoint.save(accelerator, model, loaded.tokenizer, optimizer, scheduler, out, progress,
                                            config)
                if stopping:
                    raise preemption.Preempted(stop.signal_name or "SIGTERM", step, saved)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on its own
    progress.runtime += time.perf_counter() - started
    runtime = progress.runtime

    results = {
        "method": config.method,
        "train_runtime": runtime,
        "train_tokens": progress.train_tokens,
        "tokens_per_second": progress.train_tokens / runtime if runtime > 0 else 0.0,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_bytes": memory.peak_bytes(accelerator.device),
        "final_loss": last.get("loss", progress.history[-1]["loss"] if progress.history else None),
        "final_ce_loss": last.get("ce"),
        "final_kd_loss": last.get("kd"),
        "global_step": total_steps,
        "epoch": progress.micro_seen / len(loader),
        "kd_ratio": kd_ratio,
        "kd_loss_kind": config.kd_loss if teacher is not None else None,
        "resumed_from": str(resume_from) if resume_from is not None else None,
    }
    if splits.eval:
        # A cache holds the training split only, so held-out KD needs a live teacher.
        eval_teacher = None if cached else teacher
        results.update(evaluate_split(model, eval_teacher, splits.eval, collate, config, loaded.vocab_size,
                                      accelerator))
        tracking.log(accelerator, {k: v for k, v in results.items() if k.startswith("eval_")}, total_steps)
    accelerator.wait_for_everyone()
    state_dict = engines.state_dict_for_saving(accelerator, model)  # every rank takes part when sharded
    if main:
        with _writable(out):
            _save_model(accelerator, model, loaded.tokenizer, out, config, state_dict)
            if config.plot_loss:
                plot.training_loss(progress.history, out / "training_loss.png", title=f"llmneo {config.method}")
            run_dir.write_json(out / "train_results.json", results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _announce(config: Config, trainable: int, total: int, examples: int, cached: bool) -> None:
    source = ("teacher cache " + str(config.teacher_cache)) if cached else (
        "teacher " + str(config.teacher_model_name_or_path) if config.uses_kd else "no teacher")
    print(f"llmneo: {config.method} | trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%) | {source} | {examples} training examples", flush=True)


def _log_row(step, epoch, window, kd_ratio, has_teacher, lr, grad_norm, elapsed) -> dict:
    tokens = max(window["tokens"], 1)
    ce = window["ce"] / tokens
    kd = window["kd"] / tokens if has_teacher else None
    return {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": ce if kd is None else (1 - kd_ratio) * ce + kd_ratio * kd,
        "ce_loss": ce,
        "kd_loss": kd,
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_second": window["seen"] / elapsed if elapsed > 0 else 0.0,
    }


@torch.no_grad()
def evaluate_split(model, teacher, examples, collate, config: Config, vocab_size: int, accelerator) -> dict:
    """Held-out CE (and KD) per response token, the same objective as training."""
    model.eval()
    ce_total, kd_total, n_total = 0.0, 0.0, 0
    for start in range(0, len(examples), config.per_device_eval_batch_size):
        batch = collate(examples[start:start + config.per_device_eval_batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, ce, kd, n = micro_batch_sums(model, teacher, batch, config, vocab_size, config.kd_ratio)
        ce_total += float(ce)
        kd_total += float(kd) if kd is not None else 0.0
        n_total += n
    model.train()
    out = {"eval_ce_loss": ce_total / max(n_total, 1), "eval_tokens": n_total}
    out["eval_kd_loss"] = kd_total / max(n_total, 1) if teacher is not None else None
    out["eval_perplexity"] = math.exp(min(out["eval_ce_loss"], 50.0))
    return out


def _save_model(accelerator, model, tokenizer, directory: Path, config: Config, state_dict: dict | None = None) -> None:
    """The final adapter (LoRA arms) or full model, in safetensors, plus the tokenizer.

    MoSLoRA is saved folded (A ← M·A) and PiSSA / OLoRA converted to a LoRA on the original base, so
    the result is a plain PEFT adapter whatever the variant (see adapters.py).
    """
    unwrapped = accelerator.unwrap_model(model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    folded = adapters.folded_state_dict(unwrapped, state_dict)
    if folded is not None:
        extra["state_dict"] = folded
    if adapters.rewrites_base(config):
        extra["path_initial_model_for_weight_conversion"] = str(directory / INITIAL_ADAPTER)
    unwrapped.save_pretrained(directory, safe_serialization=True, **extra)
    tokenizer.save_pretrained(directory)
