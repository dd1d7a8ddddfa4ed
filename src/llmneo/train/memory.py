"""Peak memory of a run: CUDA max allocated on GPU, the process's RSS high-water mark on CPU."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (CUDA stats; the kernel's RSS high-water mark on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets VmHWM (Linux >= 4.0), so several runs in one process are measured separately
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; the process's peak RSS on CPU (since the last reset where supported)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
