"""The logging window: the sums of the steps since the last metrics.jsonl row, and that row.

Every optimizer step `add`s its global sums; every `logging_steps` the loop writes `row` and starts a new
window. A checkpoint saves the window with the progress (plain JSON fields), so a run resumed between two
logged rows writes the same next row as the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Window:
    """The window's sums, over all ranks, since its last row."""

    ce: float = 0.0  # CE sum of the steps on dataset (or teacher-written) replies
    kd: float = 0.0  # their KD sum
    tokens: int = 0  # their response tokens
    seen: int = 0  # every non-pad token the steps read
    op_kd: float = 0.0  # on-policy steps: the KD sum alone, over the student's own tokens
    op_tokens: int = 0  # those tokens
    op_steps: int = 0  # how many on-policy steps
    steps: int = 0  # all steps
    per_teacher: list | None = None  # several teachers: each one's [KD sum, positions scored]; None for one
    aligned: list | None = None  # cross-tokenizer KD: [positions aligned, positions]; None for one tokenizer

    def add(self, ce: float, kd: float, tokens: int, seen: int, *, on_policy: bool,
            per_teacher: list | None = None, aligned: list | None = None) -> None:
        """One optimizer step's sums over all ranks: CE and KD over its `tokens` response tokens, its `seen` non-pad
        tokens; `per_teacher`: each teacher's (KD sum, positions); `aligned`: (positions aligned, positions)."""
        if on_policy:  # the student's own replies: no labels to learn, the KD term alone
            self.op_kd += kd
            self.op_tokens += tokens
            self.op_steps += 1
        else:
            self.ce += ce
            self.kd += kd
            self.tokens += tokens
        self.steps += 1
        self.seen += seen
        if per_teacher is not None:
            if self.per_teacher is None:
                self.per_teacher = [[0.0, 0] for _ in per_teacher]
            for sums, (kd_sum, count) in zip(self.per_teacher, per_teacher):
                sums[0] += kd_sum
                sums[1] += int(count)
        if aligned is not None:
            if self.aligned is None:
                self.aligned = [0, 0]
            for i, value in enumerate(aligned):
                self.aligned[i] += int(value)

    def row(self, step: int, epoch: float, *, learning_rate: float, grad_norm: float, elapsed: float,
            kd_ratio: float | None, generates: bool = False) -> dict:
        """The window's metrics.jsonl row: its means per response token. `kd_ratio`: None without a teacher signal
        (kd_loss None). With generated replies (`generates`) the row also says how many of its steps were on-policy
        (`on_policy`: all of them); their tokens count in kd_loss and loss (as KD alone), not in ce_loss (None when
        every step was on-policy). `elapsed`: the window's seconds, for its throughput."""
        ce = self.ce / max(self.tokens, 1)
        kd = self.kd / max(self.tokens, 1) if kd_ratio is not None else None
        row = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": ce if kd is None else (1 - kd_ratio) * ce + kd_ratio * kd,
            "ce_loss": ce,
            "kd_loss": kd,
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_second": self.seen / elapsed if elapsed > 0 else 0.0,
        }
        if generates:
            if self.op_tokens:
                both = self.tokens + self.op_tokens
                row["loss"] = ((1 - kd_ratio) * self.ce + kd_ratio * self.kd + self.op_kd) / both
                row["kd_loss"] = (self.kd + self.op_kd) / both
                row["ce_loss"] = ce if self.tokens else None
            row["on_policy"] = self.op_steps == self.steps > 0
            row["on_policy_steps"] = self.op_steps
        if self.aligned is not None:  # cross-tokenizer KD: the fraction of response positions with a teacher span
            row["kd_aligned_fraction"] = self.aligned[0] / max(self.aligned[1], 1)
        if self.per_teacher is not None:  # several teachers: each one's KD per position it scored (mixture: each)
            row["kd_loss_per_teacher"] = [kd_sum / count if count else None for kd_sum, count in self.per_teacher]
        return row

    @classmethod
    def from_state(cls, saved: dict) -> Window:
        """The window a checkpoint's trainer_state.json holds. Checkpoints written before this class hold a dict of
        the same sums, with `teachers` for per_teacher and without the keys their run never set."""
        saved = dict(saved)
        if "teachers" in saved:
            saved["per_teacher"] = saved.pop("teachers")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})
