"""Which process this is under torchrun / accelerate launch, read from the launcher's environment.

Torch-free, so the CLI can ask before anything loads torch (its warnings and messages print on rank 0 alone).
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 (RANK, else LOCAL_RANK), or a process that no launcher started."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
