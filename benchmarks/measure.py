"""Shared helpers for the benchmarks: peak RSS above a baseline, and timing, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure(step, repeats: int = 2, baseline_before_warmup: bool = False) -> dict:
    """Run `step` once to warm up, then `repeats` times: median time, peak RSS above the baseline RSS.

    With `baseline_before_warmup`, the baseline is taken before the warm-up step, so state a step
    allocates once (optimizer moments) counts as the step's memory.
    """
    import gc

    gc.collect()
    if baseline_before_warmup:
        baseline = rss_bytes()
        reset_peak()
    step()
    gc.collect()
    if not baseline_before_warmup:
        baseline = rss_bytes()
        reset_peak()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    times.sort()
    seconds = times[len(times) // 2]  # the median: robust to a noisy neighbour on a shared CPU
    return {"seconds": seconds, "peak_above_baseline_bytes": max(peak_rss_bytes() - baseline, 0),
            "baseline_bytes": baseline, "times": times}


def in_fresh_process(script: str, args: list[str], timeout: int = 1800) -> dict:
    """Run `script` with `args` in a new interpreter; it prints one JSON line last."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    try:
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        reason = "killed (out of memory?)" if done.returncode in (-9, 137) else (tail[-1] if tail else "failed")
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_cuda(step, repeats: int = 3) -> dict:
    """GPU version of `measure`: mean time after a warm-up, max allocated above the post-warm-up baseline."""
    import torch

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - started) / repeats,
            "peak_above_baseline_bytes": torch.cuda.max_memory_allocated() - base}
