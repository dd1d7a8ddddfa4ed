"""Everything a training run sets up before its first optimizer step, in one object.

`prepare(config)` is a short sequence of named steps: precision, checks (output_dir, writing nothing), models,
data, student, loader and optimizer, teacher, schedule, progress (resumed from a checkpoint when asked), and
the three seams of the loop, each chosen once from the config:
  - `steps`: where each step's micro-batches come from (train.steps);
  - `teacher`: where the teacher signal comes from (teachers.choose: live, cache, served, mixture, routed, or None);
  - `aligner`: how teacher positions meet student positions (teachers.aligner).
train.loop then runs one function per optimizer step over this object, and finishes.

Nothing is written into output_dir until set-up has succeeded (and a resumed checkpoint is accepted): then
`claim` makes the folder this run's (its llmneo_config.yaml, initial adapter, metrics so far). A folder that
holds an earlier run's results is claimed only once this run has its own, at its first complete checkpoint
(or its end): a run that fails before leaves the earlier results as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

from llmneo import run_dir
from llmneo.config.checks import shown_url
from llmneo.config.schema import SAVED_CONFIG, Config, input_paths, report_to, to_yaml
from llmneo.crosstok import offsets
from llmneo.data import dataset, templates
from llmneo.errors import LlmneoError
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, engines, generate, loading, plain_lora
from llmneo.teachers import aligner as alignment
from llmneo.teachers import cached
from llmneo.teachers import choose as teacher
from llmneo.teachers import several
from llmneo.teachers.signal import TeacherSignal
from llmneo.train import checkpoint, memory, recorded_config
from llmneo.train import steps as step_source
from llmneo.train import tracking

INITIAL_ADAPTER = "initial_adapter"  # PiSSA / OLoRA only


@dataclasses.dataclass
class TrainingSetup:
    config: Config  # as run: kd_chunk_size is 0 under a sharded engine
    accelerator: object
    precision: loading.Precision
    out: Path
    resume_from: Path | None
    loaded: loading.Loaded  # tokenizer and vocab_size; the student as loaded, before adapters
    splits: dataset.Splits
    collate: object
    model: torch.nn.Module  # the prepared (wrapped) student
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: checkpoint.Progress
    total_steps: int
    trainable: int
    total: int
    steps: step_source.StepSource
    teacher: TeacherSignal | None  # teacher.choose's: live, cache, served, mixture, routed, or None (CE alone)
    aligner: alignment.Aligner
    loss_spec: LossSpec  # the student's vocabulary, kd_ratio (0 without a teacher signal), KD settings, chunk size
    params: list  # what the optimizer trains, for clipping
    output: run_dir.Output  # output_dir as checked, with the earlier results this run replaces when it claims it
    recorded: str = ""  # llmneo_config.yaml: the config as given, local paths absolute
    initial_adapter: dict | None = None  # PiSSA / OLoRA: the adapter's weights as initialised
    claimed: bool = False  # output_dir is this run's (see claim)

    def record(self, row: dict) -> None:
        """A metrics.jsonl row (training or eval): into the progress history and, once output_dir is this run's,
        into metrics.jsonl; until then it waits in the history, which `claim` writes."""
        self.progress.history.append(row)
        if self.main and self.claimed:
            with writable(self.out / "metrics.jsonl"):
                run_dir.append_jsonl(self.out / "metrics.jsonl", row)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    @property
    def kd_ratio(self) -> float:
        """The run's KD weight, 0 without a teacher signal (an on-policy step's loss is KD alone: LossSpec.kd_only)."""
        return self.loss_spec.kd_ratio

    @property
    def guards_non_finite(self) -> bool:
        """fp16 has its loss scaler skip steps with non-finite gradients; every other precision stops."""
        return self.precision.mixed_precision != "fp16"

    @property
    def steps_in_backward(self) -> bool:
        """accelerate's DeepSpeed backward also steps the engine on the step's last micro-batch."""
        return self.accelerator.distributed_type == "DEEPSPEED"


@contextlib.contextmanager
def writable(what):
    """Turn a failed write of the run's results (disk full, read-only) into a one-line user error."""
    try:
        yield
    except Exception as exc:
        reason = run_dir.write_failure(exc)
        if reason is None:
            raise
        raise checkpoint.unwritable(what, reason) from None


def prepare(config: Config) -> TrainingSetup:
    """Set up the run `config` describes, up to its first optimizer step, one named step per concern. The order is
    part of the run: the seed is set before the adapters are initialised, the teacher is chosen from the config as
    given, and output_dir is claimed only once everything else has succeeded."""
    from accelerate.utils import set_seed

    precision, accelerator = _precision(config)
    output, resume_from, recorded = _checked(config, accelerator)
    set_seed(config.seed)
    memory.reset_peak(accelerator.device)
    loaded = loading.load(config, precision, with_teacher=config.loads_model)
    crossing = _crossing(config, loaded)
    splits, teacher_side = _data(config, loaded, crossing, accelerator.is_main_process)
    model, initial_adapter = _student(config, loaded)
    trainable, total = adapters.count_params(model)
    collate = partial(dataset.collate, pad_token_id=loaded.tokenizer.pad_token_id)
    loader = _loader(config, splits.train, collate)
    model, optimizer, loader = accelerator.prepare(model, _optimizer(model, config), loader)
    signal = teacher.choose(config, loaded, splits.train, accelerator,
                            cache_teacher_tokenizer=crossing.teacher_tokenizer if crossing else None)
    steps = None
    try:  # from here a served teacher's pool, then the served rollouts' adapter, are closed if set-up fails
        config = _as_run(config, accelerator)
        total_steps, scheduler = _schedule(config, optimizer, len(loader))
        progress = _progress(config, resume_from, accelerator, model, optimizer, scheduler, total_steps)
        stop_ids, retokenizer = _reply_ends(config, loaded, splits, teacher_side)
        steps = step_source.choose(config, loader, accelerator, progress.micro_seen, model=model, teacher=signal,
                                   tokenizer=loaded.tokenizer, step=progress.step, last=total_steps,
                                   stop_ids=stop_ids, retokenizer=retokenizer, initial_adapter=initial_adapter,
                                   resume_from=resume_from)
        setup = TrainingSetup(
            config=config, accelerator=accelerator, precision=precision, out=output.path, resume_from=resume_from,
            loaded=loaded, splits=splits, collate=collate, model=model, loader=loader, optimizer=optimizer,
            scheduler=scheduler, progress=progress, total_steps=total_steps, trainable=trainable, total=total,
            steps=steps, teacher=signal,
            aligner=alignment.choose(crossing.vocab if crossing else None, accelerator.device, config.kd_unaligned),
            loss_spec=LossSpec.from_config(config, loaded.vocab_size, has_teacher=signal is not None),
            params=[p for p in model.parameters() if p.requires_grad], output=output, recorded=recorded,
            initial_adapter=initial_adapter)
        _begin(setup)
    except BaseException:
        if signal is not None:
            signal.close()
        if steps is not None:
            steps.close()
        raise
    return setup


def _precision(config: Config) -> tuple[loading.Precision, object]:
    """The run's precision and the accelerator that runs at it: CPU when there is no GPU; FSDP2 when launched for it,
    also on CPU."""
    from accelerate.utils import InitProcessGroupKwargs

    precision = loading.resolve_precision(config)
    accelerator = engines.create_accelerator(
        mixed_precision=precision.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
        **tracking.accelerator_kwargs(config),
    )
    return precision, accelerator


def _checked(config: Config, accelerator) -> tuple[run_dir.Output, Path | None, str]:
    """The checks before anything loads: the teacher warnings, output_dir (nothing is written yet) and the checkpoint
    to resume from; and llmneo_config.yaml's text, every key of this run (eval and export read it)."""
    main = accelerator.is_main_process
    if main:
        _warn_about_teacher(config)
    if config.rollout_endpoint:  # a continued adapter's own settings too (the served rollouts sync a plain LoRA)
        plain_lora.check_servable(config)
    output, resume_from = _output_dir(config, main)
    recorded = to_yaml(recorded_config.recorded(config))
    accelerator.wait_for_everyone()
    return output, resume_from, recorded


def _data(config: Config, loaded: loading.Loaded, crossing: Crossing | None,
          main: bool) -> tuple[dataset.Splits, offsets.TeacherSide | None]:
    """The splits, each training example numbered (a teacher cache finds its rows by it) and routed (teacher_column);
    and for a cross-tokenizer run with a live teacher, the teacher's view of every example (else None)."""
    teacher_side = None
    if crossing is not None and loaded.teacher_tokenizer is not None:
        teacher_side = offsets.TeacherSide(loaded.teacher_tokenizer, config.teacher_template or config.template)
    splits = dataset.build(config, loaded.tokenizer, teacher_side)
    if crossing is not None and main:
        source = f"teacher {config.teacher_model_name_or_path}" if teacher_side is not None else (
            f"teacher cache {config.teacher_cache}")
        print(offsets.announce(crossing.vocab, loaded.tokenizer, crossing.teacher_tokenizer, source,
                                offsets.aligned_share(splits.train) if teacher_side is not None else None), flush=True)
    if config.generates:
        generate.check_prompts(splits.train)
    if config.teacher_column:
        _route(splits, config)
    for i, example in enumerate(splits.train):
        example["index"] = i
    return splits, teacher_side


def _loader(config: Config, train: list, collate) -> torch.utils.data.DataLoader:
    """The training loader, with its own generator: creating an iterator (each epoch, or on resume) must not draw from
    the global RNG that dropout uses, or a resumed run would drift from an uninterrupted one."""
    return torch.utils.data.DataLoader(train, batch_size=config.per_device_train_batch_size,
                                       sampler=dataset.EpochSampler(len(train), config.seed), collate_fn=collate,
                                       generator=torch.Generator().manual_seed(config.seed))


def _as_run(config: Config, accelerator) -> Config:
    """The config as run: FSDP / ZeRO-3 shard the output head outside forward, so kd_chunk_size is 0 under them."""
    if not (engines.sharded(accelerator) and config.kd_chunk_size):
        return config
    if accelerator.is_main_process:
        warnings.warn("FSDP / ZeRO-3 shard the output head outside forward: using full logits at the response "
                      "positions (kd_chunk_size=0) under this engine")
    return dataclasses.replace(config, kd_chunk_size=0)


def _schedule(config: Config, optimizer: torch.optim.Optimizer, loader_length: int) -> tuple[int, object]:
    """The run's number of optimizer steps and its learning-rate schedule (warmup_steps, else warmup_ratio of them)."""
    from transformers import get_scheduler

    total_steps = step_source.total_steps(config, loader_length)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return total_steps, get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                      num_training_steps=total_steps)


def _progress(config: Config, resume_from: Path | None, accelerator, model, optimizer, scheduler,
              total_steps: int) -> checkpoint.Progress:
    """A new run's progress, or the checkpoint's (with the weights, optimizer, schedule and RNG it restores)."""
    if resume_from is None:
        return checkpoint.Progress()
    progress = checkpoint.load(resume_from, accelerator, model, optimizer, scheduler, config)
    if accelerator.is_main_process:
        print(f"llmneo: resuming from {resume_from} (step {progress.step} of {total_steps})", flush=True)
    return progress


def _reply_ends(config: Config, loaded: loading.Loaded, splits: dataset.Splits,
                teacher_side: offsets.TeacherSide | None) -> tuple[set[int] | None, offsets.Retokenizer | None]:
    """What generated replies need (None, None when nothing is generated): the ids that end the student's turn, and
    for a live cross-tokenizer teacher the retokenizer that turns the student's replies into the teacher's tokens."""
    if not config.generates:
        return None, None
    stop_ids = generate.turn_end_ids(splits.train, loaded.tokenizer)
    retokenizer = None
    if teacher_side is not None:
        retokenizer = offsets.Retokenizer(loaded.tokenizer, loaded.teacher_tokenizer, stop_ids,
                                           offsets.turn_end(loaded.teacher_tokenizer, teacher_side.template))
    return stop_ids, retokenizer


def _begin(setup: TrainingSetup) -> None:
    """Start report_to's trackers, say what trains on what, and claim output_dir now unless it holds an earlier run's
    results (then the first complete checkpoint claims it)."""
    tracking.start(setup.accelerator, setup.config, resumed_step=setup.progress.step)
    if setup.main:
        _announce(setup.config, setup.trainable, setup.total, len(setup.splits.train), setup.loaded.tokenizer)
    if not setup.output.stale:  # a new or empty folder, or a resume: nothing to replace, the folder is this run's now
        claim(setup)


def claim(setup: TrainingSetup) -> None:
    """Make output_dir this run's (once): remove the earlier run's results, write this run's llmneo_config.yaml,
    initial adapter and metrics so far (on resume: up to the checkpoint, as the later steps are logged again)."""
    if setup.claimed:
        return
    if setup.main:
        out = setup.output.create()
        with writable(out):
            setup.output.replace_stale()
            run_dir.write_text(out / SAVED_CONFIG, setup.recorded)
            if setup.initial_adapter is not None:  # to convert the final adapter into a LoRA on the original base
                with run_dir.replacing(run_dir.Output(out)) as staging:
                    setup.accelerator.unwrap_model(setup.model).save_pretrained(
                        staging / INITIAL_ADAPTER, safe_serialization=True, state_dict=setup.initial_adapter)
            run_dir.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in setup.progress.history))
    setup.claimed = True


@dataclasses.dataclass
class Crossing:
    """A cross-tokenizer run: the teacher's tokenizer (the loaded teacher's, or the one a cache stored) and the
    vocabulary map."""

    teacher_tokenizer: object
    vocab: object  # crosstok.vocab.VocabMap


def _crossing(config: Config, loaded: loading.Loaded) -> Crossing | None:
    """The cross-tokenizer part of the run, when the teacher (or the cache's teacher) has another tokenizer."""
    own = loaded.teacher_tokenizer
    if own is None and config.uses_cache:
        own = cached.cross_tokenizer(config)
        if own is not None and config.cross_tokenizer == "false":
            raise LlmneoError(f"teacher_cache '{config.teacher_cache}' was written by a teacher with another "
                              f"tokenizer (cross-tokenizer KD), which kd_cross_tokenizer: false refuses; set it to "
                              f"auto, or cache a teacher that shares the student's tokenizer")
    if own is None:
        return None
    offsets.check_supported(config)
    return Crossing(own, offsets.vocab_for(config, loaded.tokenizer, own))


def _route(splits: dataset.Splits, config: Config) -> None:
    """Each example's teacher index from its teacher_column value; a value naming no teacher is an error."""
    for name, examples in (("training", splits.train), ("held-out", splits.eval or [])):
        for n, example in enumerate(examples, 1):
            index = several.route_index(example.get("route"), config.teachers)
            if index is None:
                raise LlmneoError(f"{name} example {n}: {config.teacher_column}={example.get('route')!r} names none of "
                                  f"the {len(config.teachers)} teachers; use 0..{len(config.teachers) - 1} or a "
                                  f"teacher's entry in teacher_model_name_or_path")
            example["teacher"] = index


def _output_dir(config: Config, main: bool) -> tuple[run_dir.Output, Path | None]:
    """The output directory, checked (nothing is written yet), and the checkpoint to resume from."""
    if not config.output_dir:
        raise LlmneoError("output_dir is not set; give a directory for the results, e.g. output_dir=out/run1")
    resume_from = checkpoint.resolve(config)
    if resume_from is not None or not main:  # resuming continues in the run's own output_dir: nothing replaced
        return run_dir.Output(Path(config.output_dir)), resume_from
    overwrite = config.overwrite_output_dir or config.resume_from_checkpoint == "auto"
    output = run_dir.check(config.output_dir, overwrite, _writes(config), inputs=input_paths(config))
    trackers = Path(tracking.logging_dir(config), tracking.run_name(config))
    if report_to(config) and not config.logging_dir and trackers.is_dir():  # the earlier run's tracker files
        output.stale += sorted(trackers.iterdir())  # new runs add entries of new names (event files, hparams)
    return output, None


def _writes(config: Config) -> tuple[str, ...]:
    """What a training run writes into output_dir: only these kinds of earlier results does it replace (a LoRA
    run never removes a model.safetensors, a full run never an adapter)."""
    return (*run_dir.TRAIN_FILES, *(run_dir.ADAPTER_FILES if config.finetuning_type == "lora" else run_dir.MODEL_FILES),
            *(("training_loss.png",) if config.plot_loss else ()),
            *((INITIAL_ADAPTER,) if adapters.rewrites_base(config) else ()))


def _student(config: Config, loaded: loading.Loaded) -> tuple[torch.nn.Module, dict | None]:
    """The student with its adapters (or every weight) trainable, and for PiSSA / OLoRA the initial adapter's
    weights (written by `claim`, to convert the final adapter into a LoRA on the original base)."""
    model = adapters.apply(loaded.student, config)
    for adapter_config in getattr(model, "peft_config", {}).values():
        # The base as loaded (absolute for a local path): adapters saved here then merge from any directory.
        adapter_config.base_model_name_or_path = loaded.student.name_or_path
    initial = None
    if adapters.rewrites_base(config):
        initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if "lora_" in k}
    return model, initial


def _optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    params = adapters.trainable_parameters(model)
    # No weight decay on biases and norm gains (1-D tensors), as in HF Trainer.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.effective_learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)


def _warn_about_teacher(config: Config) -> None:
    if config.kd_loss == "sampled_rkl" and (config.temperature != 1 or config.top_p != 1):
        warnings.warn(f"kd_loss: sampled_rkl estimates KL(p_S || p_T) from samples of p_S itself; sampling at "
                      f"temperature={config.temperature}, top_p={config.top_p} draws from another distribution, so "
                      f"the estimate is biased (temperature: 1 and top_p: 1 make it unbiased)")
    if config.has_teacher and config.kd_ratio == 0:
        warnings.warn(f"kd_ratio is 0: the teacher is not loaded and this is plain {config.method} training")
    elif not config.has_teacher:
        warnings.warn(f"no teacher_model_name_or_path: training on CE alone ({config.method}); "
                      f"kd_ratio={config.kd_ratio} is ignored. Set a teacher for Neo/KD")
    if config.uses_kd and config.teacher_model_name_or_path and any(
            loading.same_model(path, config.model_name_or_path) for path in config.teachers):
        warnings.warn(f"the teacher is the student itself ('{config.model_name_or_path}'): KD then only pulls the "
                      f"student back to where it started; give a larger teacher_model_name_or_path")


def _announce(config: Config, trainable: int, total: int, examples: int, tokenizer) -> None:
    source = ("teacher cache " + str(config.teacher_cache)) if config.uses_cache else (
        "teacher " + str(config.teacher_model_name_or_path or shown_url(config.teacher_endpoint)) if config.uses_kd
        else "no teacher")
    print(f"llmneo: {config.method} | trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%) | {source} | {examples} training examples"
          + (f" | {templates.describe(tokenizer, config.template)}" if config.stage == "sft" else ""), flush=True)
