"""Preemption: SIGINT/SIGTERM finish the current optimizer step, write a checkpoint, and stop.

The signal handler only sets a flag; the training loop checks it after each optimizer step (all ranks
agree on the step), writes a checkpoint and raises `Preempted`, which the CLI turns into a message
saying where the checkpoint is and how to resume, and a non-zero exit code (130 for SIGINT, 143 for
SIGTERM, as a shell would report).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class Preempted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was written and the run stopped after a whole step."""

    def __init__(self, signal_name: str, step: int, checkpoint_dir: Path):
        super().__init__(f"{signal_name} at step {step}")
        self.signal_name, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir
        self.exit_code = 130 if signal_name == "SIGINT" else 143


class StopRequests:
    """SIGINT/SIGTERM set a flag the loop checks after each optimizer step; a second SIGINT quits at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_agreed(accelerator, requested: bool) -> bool:
    """Every rank stops at the same step if any rank was signalled."""
    if accelerator.num_processes == 1:
        return requested
    import torch

    flag = torch.tensor(1.0 if requested else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(flag, "max") > 0)


