"""Held-out evaluation inside a training run: eval_strategy's rows during it, and the final eval_* scores.

Both score the held-out split (val_size / eval_dataset) with the one held-out evaluator, evaluate.held_out
(llmneo eval's), against the run's teacher where it can score token by token. An eval row follows HF's
log rows and the training rows' names with an eval_ prefix: {"step", "epoch", "eval_loss", "eval_ce_loss",
"eval_kd_loss", "eval_perplexity", "eval_kl_to_teacher", "eval_top1_agreement", "eval_tokens"}, where
eval_loss is the run's objective, (1 - kd_ratio)·CE + kd_ratio·KD, on the held-out rows (CE where no
teacher scores them). It goes into metrics.jsonl (after the step's training row), the console and
report_to's trackers, and into the progress history, so a resumed run rewrites it as it was.

Evaluation draws no random numbers and puts every model back in its mode (evaluate.held_out), so a run
with eval rows trains exactly as one without, and a resumed run exactly as an uninterrupted one.
"""

from __future__ import annotations

from llmneo import evaluate
from llmneo.errors import LlmneoError
from llmneo.loss.divergences import KDSettings
from llmneo.train import tracking
from llmneo.train.setup import TrainingSetup


def scores(setup: TrainingSetup) -> dict:
    """The held-out split's eval_* scores, with the teacher where it can score them: a cache holds the
    training split only, and a teacher with another tokenizer cannot compare token by token."""
    config, accelerator = setup.config, setup.accelerator
    crossing = setup.aligner.crosses
    teacher_model = None if config.uses_cache or crossing or setup.teacher is None else setup.teacher.model
    found = evaluate.held_out(setup.model, teacher_model, setup.splits.eval,
                              pad_token_id=setup.loaded.tokenizer.pad_token_id, vocab_size=setup.vocab_size,
                              kd=KDSettings.from_config(config), batch_size=config.per_device_eval_batch_size,
                              chunk_size=config.kd_chunk_size, device=accelerator.device,
                              autocast=accelerator.autocast, show_progress=setup.main,
                              leave_progress=False)  # below the training bar, cleared when done
    kd = found["kd_loss"]
    objective = found["ce_loss"] if kd is None else (1 - setup.kd_ratio) * found["ce_loss"] + setup.kd_ratio * kd
    return {"eval_loss": objective, **{f"eval_{k}": v for k, v in found.items()}}


class Periodic:
    """eval_strategy: steps (every eval_steps, by default logging_steps) or epoch (each step that ends an
    epoch, and the last step, as HF Trainer); no: never."""

    def __init__(self, setup: TrainingSetup, bar, clock):
        self.setup, self.bar, self.clock = setup, bar, clock
        self.strategy = setup.config.effective_eval_strategy
        if self.strategy != "no" and not setup.splits.eval:  # refused before the first step, not at the first eval
            raise LlmneoError(f"eval_strategy: {self.strategy}, but no held-out example has a response token within "
                              f"cutoff_len={setup.config.cutoff_len}; raise cutoff_len or check the held-out data")
        self.every = setup.config.eval_steps or setup.config.logging_steps
        self.epochs = self._epochs_done()

    def _epochs_done(self) -> int:
        return self.setup.progress.micro_seen // len(self.setup.loader)

    def _due(self, step: int) -> bool:
        before, self.epochs = self.epochs, self._epochs_done()
        if self.strategy == "steps":
            return step % self.every == 0
        return self.strategy == "epoch" and (self.epochs > before or step == self.setup.total_steps)

    def after_step(self, step: int) -> dict | None:
        """The step's eval row, when one is due: written, shown and tracked; its scores (finish reuses the last
        step's). The time it takes is not counted in the training throughput."""
        if not self._due(step):
            return None
        setup = self.setup
        with self.clock.paused():
            found = scores(setup)
        row = {"step": step, "epoch": round(setup.progress.micro_seen / len(setup.loader), 4), **found}
        setup.record(row)
        if setup.main:
            self.bar.write(f"llmneo: step {step} held-out " + ", ".join(
                f"{k[5:]} {v:.4g}" for k, v in found.items() if isinstance(v, float)))
        tracking.log(setup.accelerator, row, step)
        return found
