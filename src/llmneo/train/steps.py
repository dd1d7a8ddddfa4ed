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
  rank makes the same one and a resumed run makes the same draws; the sampling itself draws from torch's
  RNG, which checkpoints save per rank.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

from llmneo.data import dataset as data
from llmneo.data.labels import response_positions
from llmneo.errors import LlmneoError
from llmneo.models import engines
from llmneo.models import generate as rollout


@dataclass
class Step:
    micro: list[dict]
    replies: str = "dataset"  # who wrote the labelled replies: dataset | student (on-policy) | teacher (seq_kd)

    @property
    def on_policy(self) -> bool:
        return self.replies == "student"


class StepSource(Protocol):
    def next_step(self) -> Step: ...


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


class DatasetSteps:
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


class RolloutSteps:
    """Dataset steps whose replies are generated: by the student with probability `lmbda`, else by the
    teacher when `teacher` is given (seq_kd), else kept from the dataset."""

    def __init__(self, dataset: DatasetSteps, student: rollout.Generator, teacher: rollout.Generator | None,
                 lmbda: float, seed: int, pad_token_id: int, device, step: int = 0, retokenizer=None):
        self.dataset, self.student, self.teacher = dataset, student, teacher
        self.lmbda, self.seed, self.pad_token_id, self.device = lmbda, seed, pad_token_id, device
        self.step = step  # the last step handed out
        self.retokenizer = retokenizer  # cross-tokenizer KD: crosstok.Retokenizer

    def next_step(self) -> Step:
        self.step += 1
        step = self.dataset.next_step()
        if on_policy_draw(self.seed, self.step, self.lmbda):
            writer, replies = self.student, "student"
        elif self.teacher is not None:
            writer, replies = self.teacher, "teacher"
        else:
            return step
        prompts = [rollout.prompts(batch) for batch in step.micro]
        replies_of = writer.generate_many(prompts)  # HFGenerator: one LoRA merge for the whole step
        micro = [rollout.with_replies(p, r, self.pad_token_id, self.device) for p, r in zip(prompts, replies_of)]
        for rebuilt, batch, prompt, reply in zip(micro, step.micro, prompts, replies_of):
            if "teacher" in batch:  # routing: each row keeps its teacher
                rebuilt["teacher"] = batch["teacher"]
            if self.retokenizer is not None:  # the teacher reads the replies in its own tokens
                rebuilt.update(rollout.teacher_fields(self.retokenizer, batch, prompt, reply, rebuilt, self.device))
        return Step(micro, replies)


class PrefetchSteps:
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
           step: int = 0, last: int = 0, stop_ids: set[int] | None = None, retokenizer=None) -> StepSource:
    """The run's step source, chosen once from the config: dataset batches, or rollouts when the config
    generates (lmbda > 0 or seq_kd; then `model` is the student, `teacher` the live teacher, `step` the
    last completed step)."""
    dataset = DatasetSteps(loader, accelerator, config.gradient_accumulation_steps, start=micro_seen)
    if not config.generates:
        if teacher is not None and teacher.prefetches:
            return PrefetchSteps(dataset, teacher, step, last)
        return dataset
    if engines.sharded(accelerator):
        raise LlmneoError("lmbda > 0 / seq_kd generate with the model's own generate, which FSDP and ZeRO-3 "
                          "shard; train on-policy under DDP (accelerate launch without an FSDP/DeepSpeed config)")
    sampling = rollout.Sampling.from_config(config)
    student = rollout.HFGenerator(model, tokenizer, sampling, stop_ids=stop_ids)
    writer = rollout.HFGenerator(teacher.model, tokenizer, sampling, stop_ids=stop_ids) if config.seq_kd else None
    return RolloutSteps(dataset, student, writer, config.lmbda, config.seed, tokenizer.pad_token_id,
                        accelerator.device, step=step, retokenizer=retokenizer)
