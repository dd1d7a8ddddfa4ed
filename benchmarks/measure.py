"""Shared helpers for the benchmarks: peak RSS and peak live tensor bytes above a baseline, timing, fresh processes.

Two memory measures, because they answer different questions:
- peak RSS (`measure`) is what the OS sees. For buffers under 32 MiB it also measures glibc: its mmap
  threshold rises to the size of each mmapped block freed (up to 32 MiB), after which such blocks come
  from the heap, where freed space is kept and reused in an order that varies from run to run, more so
  with several arenas. `MALLOC_ARENA_MAX=1` narrows the spread; a fixed `MALLOC_MMAP_THRESHOLD_=131072`
  removes it (every block of 128 KiB or more is mmapped and returned at free).
- peak live tensor bytes (`tensor_peak`) counts every allocation and free of torch's CPU allocator,
  autograd's saved tensors and kernels' temporaries included, and nothing of malloc's caching. It is the
  same in every run, and can be checked by hand against the code. (On CUDA, `measure_cuda`'s
  max-allocated is already this figure.)
"""

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


def tensor_peak(step) -> dict:
    """Peak of live tensor bytes during one call of `step`, above those alive when it starts.

    The profiler's memory events (`profile_memory=True`) carry one signed size per allocation and free
    made through torch's CPU allocator, on every thread the profiler follows (autograd's included); their
    running sum in time order is the live bytes. The profiler drops the free of a block allocated before it
    started, so `step` runs twice under it and only the second call is measured: whatever the second frees
    (last step's gradients) was allocated by the first, and counts. Memory outside torch's allocator
    (BLAS workspaces, malloc's caching) is not counted.
    """
    import gc

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        gc.collect()
        with record_function("measured step"):
            step()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured step")
    memory = [e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    memory.sort(key=lambda e: e.start_ns())  # stable: same-timestamp events keep their recorded order
    live = peak = at_start = 0
    for event in memory:
        if event.start_ns() < window.start_ns():
            at_start = live = live + event.nbytes()
            continue
        if event.start_ns() > window.end_ns():
            break
        live += event.nbytes()
        peak = max(peak, live - at_start)
    return {"tensor_peak_bytes": peak, "tensor_end_bytes": live - at_start}


def in_fresh_process(script: str, args: list[str], timeout: int = 1800, env: dict | None = None) -> dict:
    """Run `script` with `args` in a new interpreter; it prints one JSON line last. `env`: extra variables."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())), **(env or {})}
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
