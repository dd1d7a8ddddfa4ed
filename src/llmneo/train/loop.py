"""One explicit training loop on accelerate for all four arms (Neo, KD, LoRA, SFT).

The arms differ only in what trains (adapters or every weight) and whether a teacher signal is
present. Per optimizer step:

    loss = (1 - kd_ratio) * CE + kd_ratio * KD

where both terms are *sums* over response tokens divided by the number of response tokens in the
whole optimizer step, across gradient-accumulation micro-batches and data-parallel ranks. So one
batch of 8 and four accumulated batches of 2 give the same gradient.

`run` reads top to bottom: set up (train/setup.py), one `optimizer_step` per step (its micro-batches
from the step source, the teacher's rows through the aligner into the fused loss), logging and
checkpoints between steps, then `finish` (held-out scores, the final model, results).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmneo import plot, run_dir
from llmneo.config.schema import Config
from llmneo.data.labels import response_count, response_positions, targets_at
from llmneo.endpoint import EndpointGone
from llmneo.errors import LlmneoError
from llmneo.loss.chunked import fused_loss, unfused_loss
from llmneo.loss.divergences import SAMPLED_KINDS
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, engines, heads, inputs
from llmneo.teachers.aligner import IdentityAligner
from llmneo.teachers.signal import Group, sub_batch
from llmneo.train import checkpoint, memory, periodic_eval, preemption
from llmneo.train import setup as training_setup
from llmneo.train import tracking
from llmneo.train.setup import TrainingSetup, writable
from llmneo.train.window import Window


def run(config: Config) -> dict:
    """Train as configured; return (and write) train_results."""
    setup = training_setup.prepare(config)
    try:
        return finish(setup, train(setup))
    finally:  # however it ends: nothing of the run is left on a server, and no request holds the exit
        close(setup)


def train(setup: TrainingSetup) -> dict:
    """The steps, with their logging, held-out evaluation and checkpoints; the last step's results."""
    progress, config = setup.progress, setup.config
    bar = tqdm(total=setup.total_steps, initial=progress.step, desc=f"llmneo {config.method}",
               disable=not setup.main, dynamic_ncols=True)
    clock = Clock()
    last: dict = {}
    try:
        evaluation = periodic_eval.Periodic(setup, bar, clock)  # eval_strategy's held-out rows
        setup.model.train()
        with preemption.StopRequests() as stop:
            saved = setup.resume_from  # the newest checkpoint of this run
            for step in range(progress.step + 1, setup.total_steps + 1):
                rng = checkpoint.rng_state()  # as step - 1 left it, for a checkpoint of that step (endpoint_gone)
                try:
                    last = optimizer_step(setup, step)
                except EndpointGone as exc:
                    raise endpoint_gone(setup, clock, exc, rng, saved) from None
                bar.update(1)
                if step % config.logging_steps == 0 or step == setup.total_steps:
                    log_window(setup, step, last["grad_norm"], clock, bar)
                last["held_out"] = evaluation.after_step(step)
                stopping = preemption.stop_agreed(setup.accelerator, stop.signal_name is not None)
                if step % config.save_steps == 0 or step == setup.total_steps or stopping:
                    saved = save_checkpoint(setup, clock)
                if stopping:
                    raise preemption.Preempted(stop.signal_name or "SIGTERM", step, saved)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on its own
    progress.runtime += clock.lap()
    return last


def close(setup: TrainingSetup) -> None:
    """Stop a served teacher's requests, and the served rollouts' (their adapter unloaded, its folder deleted).
    Safe to repeat: finish closes before train_results.json is written, run's finally again on every path."""
    if setup.teacher is not None:
        setup.teacher.close()
    setup.steps.close()


class Clock:
    """Wall time since the last checkpoint (the run's runtime) and since the last logged row (throughput)."""

    def __init__(self):
        self.started = self.window_start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed

    def window(self) -> float:
        now = time.perf_counter()
        elapsed, self.window_start = now - self.window_start, now
        return elapsed

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (held-out evaluation) counts in the runtime, not in the window's throughput."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - started


class NonFiniteLoss(Exception):
    """The step's loss is not finite; raised before the update (see `accumulate`)."""

    def __init__(self, loss: float):
        super().__init__(loss)
        self.loss = loss


def optimizer_step(setup: TrainingSetup, step: int) -> dict:
    """One optimizer step: the step's micro-batches from the step source, forward and backward over them,
    clipping, the non-finite guard, the update. Returns the step's loss, ce, kd and grad_norm."""
    accelerator = setup.accelerator
    batches = setup.steps.next_step()
    loss_spec = setup.loss_spec.kd_only() if batches.on_policy else setup.loss_spec  # GKD on the student's replies
    try:
        ce_sum, kd_sum, seen, n_global = accumulate(
            accelerator, setup.model, setup.teacher, batches.micro, loss_spec, aligner=setup.aligner,
            check_before_boundary=setup.steps_in_backward and setup.guards_non_finite)
    except NonFiniteLoss as exc:
        raise _non_finite(setup, step, exc.loss, float("nan")) from None
    norm = accelerator.clip_grad_norm_(setup.params, setup.config.max_grad_norm or float("inf"))
    grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside its engine
    totals = accelerator.reduce(torch.stack([ce_sum, kd_sum, seen.float()]), "sum")
    step_ce, step_kd, step_loss = step_losses(totals, n_global, loss_spec.kd_ratio, setup.teacher is not None)
    finite = math.isfinite(step_loss) and (norm is None or math.isfinite(grad_norm))
    if not finite and setup.guards_non_finite:
        raise _non_finite(setup, step, step_loss, grad_norm)
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)

    progress = setup.progress
    # the micro-batches this step consumed: fewer than gradient_accumulation_steps at an epoch's end
    progress.step, progress.micro_seen = step, progress.micro_seen + len(batches.micro)
    # several teachers: each one's KD sum and positions, over all ranks (a lone teacher keeps none)
    per_teacher = setup.teacher.take_sums() if setup.teacher is not None else None
    if per_teacher is not None:
        per_teacher = accelerator.reduce(per_teacher, "sum").tolist()
    aligned = setup.aligner.take_counts()
    if aligned is not None:  # cross-tokenizer KD: the positions the aligner could align, over all ranks
        aligned = accelerator.reduce(torch.tensor(aligned, dtype=torch.float64, device=accelerator.device),
                                     "sum").tolist()
        for i, value in enumerate(aligned):
            progress.aligned[i] += int(value)
    progress.window.add(float(totals[0]), float(totals[1]), n_global, int(totals[2]), on_policy=batches.on_policy,
                        per_teacher=per_teacher, aligned=aligned)
    if batches.staleness is not None:  # rollout_endpoint: the window's most stale replies
        progress.rollout_staleness = max(progress.rollout_staleness or 0, batches.staleness)
    progress.train_tokens += int(totals[2])
    if batches.replies != "dataset":
        progress.generated_steps[batches.replies] += 1
    return {"loss": step_loss, "ce": None if batches.on_policy else step_ce, "kd": step_kd, "grad_norm": grad_norm,
            "replies": batches.replies}


def step_losses(totals: torch.Tensor, n_global: int, kd_ratio: float, has_teacher: bool):
    """(ce, kd | None, loss) per response token of the step, from the step's global (ce_sum, kd_sum, ...)."""
    step_ce = float(totals[0]) / max(n_global, 1)
    step_kd = float(totals[1]) / max(n_global, 1) if has_teacher else None
    return step_ce, step_kd, step_ce if step_kd is None else (1 - kd_ratio) * step_ce + kd_ratio * step_kd


def _non_finite(setup: TrainingSetup, step: int, loss: float, grad_norm: float) -> LlmneoError:
    kept = run_dir.checkpoints(setup.out) if setup.claimed else []  # before, they are an earlier run's
    return LlmneoError(f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm}); "
                       f"lower learning_rate or use bf16 instead of fp16"
                       + (f"; the last good checkpoint is {kept[-1][1]}" if kept else ""))


def endpoint_gone(setup: TrainingSetup, clock: Clock, exc: EndpointGone, rng: dict,
                  saved: Path | None) -> LlmneoError:
    """A server (served teacher, rollouts) stayed down through its retries in the middle of a step: checkpoint
    the last completed step, with the RNG as it left it (the half-accumulated gradients are dropped), so that
    resuming once the server is back continues exactly; the error, as one line saying where and how."""
    progress = setup.progress
    setup.optimizer.zero_grad(set_to_none=True)
    if progress.step == 0:
        return LlmneoError(f"{exc}; no step had completed, so no checkpoint was written: run again once the "
                           f"server is back")
    if saved is None or saved.name != f"checkpoint-{progress.step}":
        checkpoint.set_rng_state(rng)
        saved = save_checkpoint(setup, clock)
    return LlmneoError(f"{exc}; stopped after step {progress.step}, checkpoint written to {saved}. Once the server "
                       f"is back, resume with the same command plus resume_from_checkpoint=auto")


def micro_batch_sums(model, teacher, batch: dict, loss_spec: LossSpec, *, aligner=None):
    """(loss_sum, ce_sum, kd_sum | None, n_tokens) for one micro-batch; loss_sum carries the gradient.

    With a chunk size > 0 (kd_chunk_size, the default) the fused chunked loss projects only the response
    positions through the student's head, chunk by chunk; with 0, full logits are materialised (the reference
    path, kept for checking). `aligner` defaults to the identity. A routed teacher (several teachers,
    teacher_column) splits the positions by row: one student forward, then the loss once per teacher.
    """
    positions, targets = response_positions(batch["labels"])
    fused = loss_spec.chunk_size > 0
    if fused:
        final = heads.final_states(model, batch, loss_spec.vocab_size)
    else:
        logits = model(**inputs.forward_inputs(batch), use_cache=False).logits

    def part(chosen, chosen_targets, rows):
        """(loss_sum, ce_sum, kd_sum | None) at the `chosen` positions (bool [B, T]), against their teacher rows."""
        if fused:
            return fused_loss(final.hidden[chosen], chosen_targets, final.head, final.head_params, rows, loss_spec)
        student = logits[chosen][:, :loss_spec.vocab_size]  # (N, V): padded vocab rows dropped
        return unfused_loss(student, chosen_targets, rows, loss_spec)

    loss = ce = kd = None
    for group in (teacher.groups(batch) if teacher is not None else [Group(None)]):
        if group.rows is None:
            chosen, chosen_targets, sub, sub_positions = positions, targets, batch, positions
        else:  # this teacher's rows only
            chosen = positions & group.rows[:, None]
            chosen_targets = targets_at(batch["labels"], chosen)
            sub, sub_positions = sub_batch(batch, group.rows), positions[group.rows]
        rows = None
        if group.signal is not None:
            rows = (aligner or IdentityAligner()).rows(group.signal, sub, sub_positions)
            if loss_spec.settings.kind in SAMPLED_KINDS:  # the teacher's log-prob of each sampled token is all it needs
                rows = rows.sampled(chosen_targets)
        part_loss, part_ce, part_kd = part(chosen, chosen_targets, rows)
        if teacher is not None:  # several teachers note each one's KD sum; a lone one keeps none
            teacher.add(group, part_kd, len(chosen_targets))
        loss = part_loss if loss is None else loss + part_loss
        ce = part_ce if ce is None else ce + part_ce
        kd = part_kd if kd is None else kd + part_kd
    return loss, ce, kd, targets.numel()


def accumulate(accelerator, model, teacher, micro: list[dict], loss_spec: LossSpec, *, aligner=None,
               check_before_boundary: bool = False):
    """Forward and backward over one optimizer step's micro-batches; gradients are left in `.grad`.

    Returns the step's local (ce_sum, kd_sum, non-pad tokens) and the global response-token count.
    `check_before_boundary`: the engine updates the weights inside the last micro-batch's backward
    (DeepSpeed), so the step's loss sums are all-reduced after that micro-batch's forward and a non-finite
    loss raises NonFiniteLoss before the backward, and so before the update.
    """
    local_tokens = sum(response_count(b["labels"]) for b in micro)
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
            loss, ce, kd, _ = micro_batch_sums(model, teacher, batch, loss_spec, aligner=aligner)
            ce_sum += ce.detach()
            kd_sum += kd.detach() if kd is not None else 0.0
            if sync and check_before_boundary:
                totals = accelerator.reduce(torch.stack([ce_sum, kd_sum]), "sum")
                step_loss = step_losses(totals, n_global, loss_spec.kd_ratio, kd is not None)[2]
                if not math.isfinite(step_loss):
                    raise NonFiniteLoss(step_loss)
            accelerator.backward(loss * scale)
        seen += batch["attention_mask"].sum()
    return ce_sum, kd_sum, seen, n_global


def log_window(setup: TrainingSetup, step: int, grad_norm: float, clock: Clock, bar) -> None:
    """The logging window's row: into metrics.jsonl, the progress bar and report_to's trackers; then a new window."""
    progress = setup.progress
    row = progress.window.row(step, progress.micro_seen / len(setup.loader),
                              learning_rate=setup.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              elapsed=clock.window(), kd_ratio=setup.kd_ratio if setup.teacher is not None else None,
                              generates=setup.config.generates)
    if progress.rollout_staleness is not None:
        row["rollout_staleness"] = progress.rollout_staleness
    setup.record(row)
    if setup.main:
        bar.set_postfix(loss=f"{row['loss']:.4f}", ce="-" if row["ce_loss"] is None else f"{row['ce_loss']:.4f}",
                        kd="-" if row["kd_loss"] is None else f"{row['kd_loss']:.4f}",
                        lr=f"{row['learning_rate']:.2e}", tok_s=f"{row['tokens_per_second']:.0f}")
    tracking.log(setup.accelerator, row, step)  # the same row to report_to's trackers
    progress.window, progress.rollout_staleness = Window(), None


def save_checkpoint(setup: TrainingSetup, clock: Clock) -> Path:
    setup.progress.runtime += clock.lap()
    # The run's first checkpoint, once complete, replaces an earlier run's results (training_setup.claim).
    return checkpoint.save(setup.accelerator, setup.model, setup.loaded.tokenizer, setup.optimizer, setup.scheduler,
                           setup.out, setup.progress, setup.config,
                           before_commit=None if setup.claimed else lambda: training_setup.claim(setup),
                           extra=setup.steps.save)


def finish(setup: TrainingSetup, last: dict) -> dict:
    """Held-out scores, the final adapter or model, the loss plot and train_results.json; end the trackers."""
    config, progress, accelerator, out = setup.config, setup.progress, setup.accelerator, setup.out
    runtime = progress.runtime
    results = {
        "method": config.method,
        "train_runtime": runtime,
        "train_tokens": progress.train_tokens,
        "tokens_per_second": progress.train_tokens / runtime if runtime > 0 else 0.0,
        "trainable_params": setup.trainable,
        "total_params": setup.total,
        "peak_memory_bytes": memory.peak_bytes(accelerator.device),
        "final_loss": last.get("loss", next((r["loss"] for r in reversed(progress.history) if "loss" in r), None)),
        "final_ce_loss": last.get("ce"),
        "final_kd_loss": last.get("kd"),
        "global_step": setup.total_steps,
        "epoch": progress.micro_seen / len(setup.loader),
        "kd_ratio": setup.kd_ratio,
        "kd_loss_kind": config.kd_loss if setup.teacher is not None else None,
        "resumed_from": str(setup.resume_from) if setup.resume_from is not None else None,
    }
    if config.generates:  # the fraction of steps trained on the student's (on-policy) or teacher's replies
        done = max(progress.step, 1)
        results["on_policy_fraction"] = progress.generated_steps["student"] / done
        results["seq_kd_fraction"] = progress.generated_steps["teacher"] / done
    if progress.aligned[1]:
        results["kd_aligned_fraction"] = progress.aligned[0] / progress.aligned[1]
    if setup.splits.eval:
        # The one held-out evaluator (llmneo eval's), while both models are loaded: sweep reads these scores.
        # An eval row at the last step (eval_strategy) has them already, and has sent them to the trackers.
        scores = last.get("held_out") or periodic_eval.scores(setup)
        results.update(scores)
        if not last.get("held_out"):
            tracking.log(accelerator, scores, setup.total_steps)
    accelerator.wait_for_everyone()
    state_dict = engines.state_dict_for_saving(accelerator, setup.model)  # every rank takes part when sharded
    training_setup.claim(setup)  # already done at the last checkpoint, unless no step ran
    if setup.main:
        with writable(out):
            with run_dir.replacing(run_dir.Output(out)) as staging:  # moved in whole, with plain permissions
                _save_model(accelerator, setup.model, setup.loaded.tokenizer, staging, out, config, state_dict)
                if config.plot_loss:
                    plot.training_loss(progress.history, staging / "training_loss.png",
                                       title=f"llmneo {config.method}")
            close(setup)  # before the results, which are written last (the other ranks close below)
            run_dir.write_json(out / "train_results.json", results)
    close(setup)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _save_model(accelerator, model, tokenizer, directory: Path, out: Path, config: Config,
                state_dict: dict | None = None) -> None:
    """The final adapter (LoRA arms) or full model, in safetensors, plus the tokenizer, into `directory` (a
    staging folder in output_dir `out`, which holds the initial adapter that PiSSA / OLoRA convert against).

    MoSLoRA is saved folded (A ← M·A) and PiSSA / OLoRA converted to a LoRA on the original base, so
    the result is a plain PEFT adapter whatever the variant (see models/adapters.py).
    """
    unwrapped = accelerator.unwrap_model(model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    folded = adapters.folded_state_dict(unwrapped, state_dict)
    if folded is not None:
        extra["state_dict"] = folded
    if adapters.rewrites_base(config):
        extra["path_initial_model_for_weight_conversion"] = str(out / training_setup.INITIAL_ADAPTER)
    unwrapped.save_pretrained(directory, safe_serialization=True, **extra)
    tokenizer.save_pretrained(directory)
