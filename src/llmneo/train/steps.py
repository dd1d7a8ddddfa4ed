"""Where an optimizer step's sequences come from: the first seam of the training loop.

A step source hands the loop each step's micro-batches (dicts of `input_ids`, `attention_mask`, `labels`
and, for dataset rows, `index`) as a `Step`, and the loss never knows where they came from:

    next_step() -> Step      the micro-batches of the next optimizer step on this rank, and who wrote the replies

- `DatasetSteps` (off-policy): the next `gradient_accumulation_steps` batches of the training split, and
  what is left of the epoch at its end (a shorter step, as in HF Trainer: no step spans two epochs);
  resumable from a checkpoint's micro-batch count.
- `PrefetchSteps`: dataset steps for a served teacher, whose rows are requested a step ahead.
- `RolloutSteps` (lmbda > 0 or seq_kd): the same dataset batches, whose replies are replaced, per step, by
  the student's own continuations of their prompts (with probability lmbda: on-policy) or else, under
  seq_kd, by the teacher's (models/generate.py). The draw depends on the seed and the step number only, so every
  rank makes the same one and a resumed run makes the same draws. The student's replies come from `StudentReplies`:
  HF generate here (`LocalReplies`, sampling from torch's RNG, which checkpoints save per rank), or a vLLM server
  of the base model with the adapter synced to it (rollout_endpoint: models/served_rollouts.py, a seed per row).
  With rollout_ahead the next on-policy step's dataset batches are read one step early and their replies written
  while this step trains; a checkpoint keeps the replies of the step after it (`save`: those written ahead, or
  those of a step that failed after its replies came), so a resumed run trains on the same replies. Under DDP
  the ranks agree on whether every rank's replies came (`raise_together`), so a server failing only some
  ranks' requests stops all of them together, instead of one checkpointing while the others wait in the step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmneo.data import dataset as data
from llmneo.data.labels import response_positions
from llmneo.endpoint import EndpointGone
from llmneo.errors import LlmneoError
from llmneo.models import engines
from llmneo.models import generate as rollout
from llmneo.models import served_rollouts


@dataclass
class Step:
    micro: list[dict]
    replies: str = "dataset"  # who wrote the labelled replies: dataset | student (on-policy) | teacher (seq_kd)
    staleness: int | None = None  # rollout_endpoint: steps between the replies' adapter and the weights trained

    @property
    def on_policy(self) -> bool:
        return self.replies == "student"


class StepSource(Protocol):
    """Step sources subclass it: `save` and `close` default to nothing to keep or stop."""

    def next_step(self) -> Step: ...

    def save(self, directory: Path, step: int) -> None:
        """Into the folder of checkpoint `step` (every rank): what step `step` + 1 uses besides the dataset
        position."""

    def close(self) -> None:
        """The run ends (or fails): stop what works in the background."""


def steps_per_epoch(per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of `per_epoch` micro-batches: the last one is short when `accumulation`
    does not divide the epoch (HF Trainer's count)."""
    return max(1, math.ceil(per_epoch / accumulation))


def total_steps(config, per_epoch: int) -> int:
    """The run's optimizer steps: max_steps when > 0, else num_train_epochs (fractions allowed) of epochs that
    each end with their own short step."""
    if config.max_steps > 0:
        return config.max_steps
    # the tolerance keeps a product like 0.1 × 30 = 3.0000000000000004 from adding a step
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch(per_epoch, config.gradient_accumulation_steps)
                            - 1e-9))


def step_size(position: int, per_epoch: int, accumulation: int) -> int:
    """Micro-batches of the step that starts at micro-batch `position` (counted across epochs): `accumulation`,
    or what is left of the epoch."""
    return min(accumulation, per_epoch - position % per_epoch)


class DatasetSteps(StepSource):
    """Each step: the next `accumulation` dataset micro-batches, or the rest of the epoch when fewer are left
    (every rank has as many micro-batches per epoch, so all ranks take steps of one size); from micro-batch
    `start` on (per rank)."""

    def __init__(self, loader, accelerator, accumulation: int, start: int = 0):
        self.accumulation, self.per_epoch = accumulation, len(loader)
        self.position = start  # micro-batches handed out, across epochs
        self._stream = data.micro_batches(loader, accelerator, start=start)

    def next_step(self) -> Step:
        size = step_size(self.position, self.per_epoch, self.accumulation)
        self.position += size
        return Step([next(self._stream) for _ in range(size)])


def on_policy_draw(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step `step` (1-based) is on-policy: a draw from (seed, step) alone."""
    return lmbda > 0 and random.Random(f"llmneo-lmbda-{seed}-{step}").random() < lmbda


class StudentReplies(Protocol):
    """Who writes the student's replies: `LocalReplies` (HF generate) or served_rollouts.ServedRollouts (vLLM).
    `submit(step, trained, micro, prompts)` starts step `step`'s replies while the optimizer holds step `trained`'s
    weights; `ahead`: the next step's are written while this one trains (`resumed`: those a checkpoint kept)."""

    ahead: bool

    def submit(self, step: int, trained: int, micro: list[dict], prompts: list) -> served_rollouts.Pending: ...

    def resumed(self, step: int) -> served_rollouts.Pending | None: ...

    def save(self, directory: Path, pending: served_rollouts.Pending | None, step: int | None) -> None: ...

    def close(self) -> None: ...


class LocalReplies:
    """HF generate on the student in this process (HFGenerator: one LoRA merge per step), written when asked."""

    ahead = False

    def __init__(self, generator: rollout.Generator):
        self.generator = generator

    def submit(self, step: int, trained: int, micro: list[dict], prompts: list) -> served_rollouts.Pending:
        return served_rollouts.Pending(self.generator.generate_many(prompts), None)

    def resumed(self, step: int) -> None:
        return None

    def save(self, directory: Path, pending, step) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Ahead:
    """rollout_ahead: step `step`'s replies, being written while the step before it trains. `batches` and `prompts`
    are None for replies a checkpoint kept: the dataset batches are read when the step comes."""

    step: int
    batches: Step | None
    prompts: list | None
    pending: served_rollouts.Pending


class RolloutSteps(StepSource):
    """Dataset steps whose replies are generated: by the student with probability `lmbda` (the `student` generator
    here, or `served`: a vLLM server), else by the teacher when `teacher` is given (seq_kd), else kept from the
    dataset. `last`: the run's last step (nothing is written ahead past it)."""

    def __init__(self, dataset: DatasetSteps, student: rollout.Generator | None, teacher: rollout.Generator | None,
                 lmbda: float, seed: int, pad_token_id: int, device, step: int = 0, retokenizer=None, *,
                 served: served_rollouts.ServedRollouts | None = None, last: int = 0, accelerator=None):
        self.dataset, self.teacher, self.accelerator = dataset, teacher, accelerator  # accelerator: DDP's ranks
        self.student: StudentReplies = served if served is not None else LocalReplies(student)
        self.lmbda, self.seed, self.pad_token_id, self.device = lmbda, seed, pad_token_id, device
        self.step, self.last = step, last  # the last step handed out
        self.retokenizer = retokenizer  # cross-tokenizer KD: crosstok.Retokenizer
        self._ahead: Ahead | None = None
        self._current: Ahead | None = None  # rollout_ahead: the replies of the step handed out, until the next one
        if self.student.ahead:  # resumed: the replies the checkpoint kept, or else written now as they were then
            kept = self.student.resumed(step + 1)
            if kept is not None:
                self._ahead = Ahead(step + 1, None, None, kept)
            elif step > 0:
                self._write_ahead()

    def next_step(self) -> Step:
        self.step += 1
        ahead, self._ahead, self._current = self._ahead, None, None
        if ahead is not None:
            step = ahead.batches or self.dataset.next_step()
            prompts = ahead.prompts or [rollout.prompts(batch) for batch in step.micro]
            replies_of, staleness = self._replies(ahead.pending)
            rows, wanted = [len(r) for r in replies_of], [len(p) for p in prompts]
            if rows != wanted:
                raise LlmneoError(f"the checkpoint's rollout replies for step {self.step} do not fit its batches "
                                  f"({rows} rows, the batches have {wanted}); resume with the run's own settings")
            current = self._student_step(step, prompts, replies_of, staleness)
        else:
            current = self._generated(self.dataset.next_step())
        self._write_ahead()
        return current

    def _generated(self, step: Step) -> Step:
        if on_policy_draw(self.seed, self.step, self.lmbda):
            prompts = [rollout.prompts(batch) for batch in step.micro]
            replies_of, staleness = self._replies(self.student.submit(self.step, self.step - 1, step.micro, prompts))
            return self._student_step(step, prompts, replies_of, staleness)
        if self.teacher is not None:
            prompts = [rollout.prompts(batch) for batch in step.micro]
            return self._rebuilt(step, prompts, self.teacher.generate_many(prompts), "teacher", None)
        return step

    def _write_ahead(self) -> None:
        """rollout_ahead: start the next step's replies now, before step `self.step` trains, when it is on-policy."""
        following = self.step + 1
        if not self.student.ahead or following > self.last or not on_policy_draw(self.seed, following, self.lmbda):
            return
        step = self.dataset.next_step()
        prompts = [rollout.prompts(batch) for batch in step.micro]
        pending = self.student.submit(following, self.step - 1, step.micro, prompts)
        self._ahead = Ahead(following, step, prompts, pending)

    def _replies(self, pending: served_rollouts.Pending) -> tuple[list, int | None]:
        """`pending`'s replies, once every rank has its own; when any rank's failed, every rank raises together."""
        error = replies = None
        try:
            replies = pending.result()
        except Exception as exc:
            error = exc
        raise_together(self.accelerator, error)
        return replies

    def _student_step(self, step: Step, prompts: list, replies_of: list, staleness: int | None) -> Step:
        """An on-policy step from its replies, which are kept (`_current`) until the next step: a failure while it
        trains checkpoints the step before, which then keeps them (`save`)."""
        self._current = Ahead(self.step, None, None, served_rollouts.Pending(replies_of, staleness))
        return self._rebuilt(step, prompts, replies_of, "student", staleness)

    def _rebuilt(self, step: Step, prompts: list, replies_of: list, replies: str, staleness: int | None) -> Step:
        """The step's micro-batches again: each row's prompt and its generated reply."""
        micro = [rollout.with_replies(p, r, self.pad_token_id, self.device) for p, r in zip(prompts, replies_of)]
        for rebuilt, batch, prompt, reply in zip(micro, step.micro, prompts, replies_of):
            if "teacher" in batch:  # routing: each row keeps its teacher
                rebuilt["teacher"] = batch["teacher"]
            if self.retokenizer is not None:  # the teacher reads the replies in its own tokens
                rebuilt.update(rollout.teacher_fields(self.retokenizer, batch, prompt, reply, rebuilt, self.device))
        return Step(micro, replies, staleness)

    def save(self, directory: Path, step: int) -> None:
        """Checkpoint `step` keeps the replies of step `step` + 1 when they are written already (rollout_ahead):
        those written ahead while step `step` trained, or, when the step after it failed once its replies came
        (loop.endpoint_gone checkpoints the step before), that step's. The server's adapter is saved as it is:
        the one the step after those replies writes ahead with. Replies that failed on any rank are kept by none,
        so the resumed run writes them again on every rank (the same adapter and seeds)."""
        kept = None
        if self.student.ahead:
            kept = next((a for a in (self._current, self._ahead) if a is not None and a.step == step + 1), None)
        pending = None
        if kept is not None:
            try:
                pending = served_rollouts.Pending(*kept.pending.result())
            except LlmneoError:
                pass
            if 0 in _flags(self.accelerator, int(pending is not None)):
                pending = None
        self.student.save(directory, pending, step + 1 if pending is not None else None)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.pending.cancel()
        self.student.close()


class PrefetchSteps(StepSource):
    """Dataset steps whose teacher rows are requested one step ahead (a served teacher's `prefetch`), so
    the endpoint works on step s+1 while the student trains on step s. Steps past `last` are not requested."""

    def __init__(self, source: StepSource, teacher, step: int, last: int):
        self.source, self.teacher, self.step, self.last = source, teacher, step, last
        self._ahead: Step | None = None

    def _fetch(self) -> Step:
        step = self.source.next_step()
        for batch in step.micro:
            self.teacher.prefetch(batch, response_positions(batch["labels"])[0])
        return step

    def next_step(self) -> Step:
        self.step += 1
        step = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = self._fetch() if self.step < self.last else None
        return step


def choose(config, loader, accelerator, micro_seen: int, *, model=None, teacher=None, tokenizer=None,
           step: int = 0, last: int = 0, stop_ids: set[int] | None = None, retokenizer=None,
           initial_adapter: dict | None = None, resume_from: Path | None = None) -> StepSource:
    """The run's step source, chosen once from the config: dataset batches, or rollouts when the config
    generates (lmbda > 0 or seq_kd; then `model` is the student, `teacher` the live teacher, `step` the
    last completed step). The student's replies come from rollout_endpoint when it is set (its adapter loaded
    there now: the server's errors come before training), else from HF generate here; seq_kd's teacher writes
    here either way."""
    dataset = DatasetSteps(loader, accelerator, config.gradient_accumulation_steps, start=micro_seen)
    if not config.generates:
        if teacher is not None and teacher.prefetches:
            return PrefetchSteps(dataset, teacher, step, last)
        return dataset
    if engines.sharded(accelerator):
        engine = "the model's own generate" if not config.rollout_endpoint else "an adapter synced from one process"
        raise LlmneoError(f"lmbda > 0 / seq_kd generate with {engine}, which FSDP and ZeRO-3 shard; train on-policy "
                          f"under DDP (accelerate launch without an FSDP/DeepSpeed config)")
    sampling = rollout.Sampling.from_config(config)
    student = served = None
    if config.rollout_endpoint:
        served = served_rollouts.ServedRollouts(config, model, tokenizer, accelerator, stop_ids=stop_ids,
                                                initial_adapter=initial_adapter, step=step, resume_from=resume_from)
    else:
        student = rollout.HFGenerator(model, tokenizer, sampling, stop_ids=stop_ids)
    try:
        writer = rollout.HFGenerator(teacher.model, tokenizer, sampling, stop_ids=stop_ids) if config.seq_kd else None
        return RolloutSteps(dataset, student, writer, config.lmbda, config.seed, tokenizer.pad_token_id,
                            accelerator.device, step=step, retokenizer=retokenizer, served=served, last=last,
                            accelerator=accelerator)
    except BaseException:  # RolloutSteps may already write ahead (a sync): nothing else could close the engine now
        if served is not None:
            served.close()
        raise


def _flags(accelerator, flag: int) -> list[int]:
    """Every rank's `flag`, on every rank (one all-gather of an int); [flag] in one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return [flag]
    import torch
    from accelerate.utils import gather

    return gather(torch.tensor([flag], device=accelerator.device)).tolist()


GONE, REFUSED, FAILED = 1, 2, 3  # how a rank's replies failed: a gone server, an LlmneoError, anything else


def raise_together(accelerator, error: Exception | None) -> None:
    """Raise on every rank when any rank has an `error` (its replies failed), all of one kind: EndpointGone only
    when every failing rank's server was gone (then every rank checkpoints, loop.endpoint_gone), else an error
    that stops the run. A rank whose error is of that kind raises its own, the others the line of the first rank
    that had one (`shared_error`). Each rank sends its own requests, so a server dying mid-step can fail only
    some; were only those to raise, they would checkpoint while the others wait in the step's all-reduce, until
    ddp_timeout. One all-gather of a flag per call; the line travels only on failure."""
    kind = 0 if error is None else GONE if isinstance(error, EndpointGone) else \
        REFUSED if isinstance(error, LlmneoError) else FAILED
    flags = _flags(accelerator, kind)
    worst = max(flags)
    if not worst:
        return
    first = flags.index(worst)
    line = [str(error) if kind == worst else None]
    if len(flags) > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(line, from_process=first)
    if kind == worst:
        raise error
    raise shared_error(worst, first, line[0])


def shared_error(kind: int, rank: int, line: str) -> LlmneoError:
    """What a rank whose replies came raises when rank `rank`'s failed with `line`: EndpointGone for a gone server,
    so every rank checkpoints together, else rank `rank`'s error as one line."""
    if kind == GONE:
        return EndpointGone(line)
    if kind == REFUSED:
        return LlmneoError(line)
    return LlmneoError(f"rank {rank} could not write its rollout replies ({line})")
