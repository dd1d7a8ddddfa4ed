"""Cached Neo against LoRA-SFT through the real CLI: `llmneo cache`, then `llmneo train` per arm.

Builds a Llama-style pair with `llmneo.demo.tiny` (vocabulary 32,000 from a byte-level BPE trained on
synthetic words): a 58M teacher (hidden 512, 8 layers) and a 45M student (hidden 512, 4 layers), writes
an alpaca dataset whose examples fill `--seq` tokens, writes a top-`--topk` cache with `llmneo cache`, and
then runs `llmneo train` as a subprocess for each arm, alternating them (A B A B ...):
  lora_sft    LoRA (rank --lora-rank, all linear layers), CE only, no teacher
  neo_cache   the same LoRA + KD (kd_ratio 0.5, forward KL) from the cache; no teacher model is loaded
Both arms see the same examples in the same order (same seed) for the same steps.

Throughput comes from each run's metrics.jsonl (logging_steps 1): tokens of the steps after the first
`--warmup` steps ÷ their time. The first steps are excluded because both arms pay one-off costs there
(allocator growth, first touch of weights and shard pages, thread-pool start-up) that say nothing about
the steady state; the whole-run figure from train_results.json (every step, plus the final checkpoint
save) is reported next to it. Per pair, the ratio is cached Neo's time per token ÷ LoRA-SFT's; the
table gives the median of the pairs and their spread (min–max).

Next to wall time, the script reads each process's CPU time (/proc) whenever a metrics.jsonl row appears,
which gives the CPU seconds of the steps after the warm-up. On a shared, busy machine that figure moves far
less than wall time, above all with `--threads 1` (no OpenMP threads spinning or waiting on a descheduled
sibling); on a quiet machine the wall-time ratio is the one that counts.

    python benchmarks/cache_bench.py                # 3 pairs of 20-step runs
    python benchmarks/cache_bench.py --quick        # 2 pairs of 8-step runs, a smoke test
    python benchmarks/cache_bench.py --compare-src /path/to/old/src   # and an older llmneo, interleaved
    python benchmarks/cache_bench.py --threads 1    # one thread per process: CPU time measures the work
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("lora_sft", "neo_cache")
VOCAB = 32000


def build_inputs(root: Path, examples: int, seq: int, seed: int = 0) -> dict:
    """Tokenizer, teacher, student and dataset under `root`; returns their paths."""
    import torch

    from llmneo.demo import tiny

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    corpus = [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)]
    tokenizer = tiny.build_tokenizer(corpus, vocab_size=VOCAB)
    assert len(tokenizer) == VOCAB, len(tokenizer)
    shape = {"hidden_size": 512, "num_heads": 8, "intermediate_size": 1408}
    teacher = tiny.build_model(tokenizer, num_layers=8, seed=1, **shape)
    with torch.no_grad():  # a peaked teacher, as a trained one is (its top-k then holds most of the mass)
        teacher.get_output_embeddings().weight.mul_(8.0)
    student = tiny.build_model(tokenizer, num_layers=4, seed=2, **shape)
    paths = {"teacher": tiny.save_pair(teacher, tokenizer, root / "teacher"),
             "student": tiny.save_pair(student, tokenizer, root / "student")}
    # Replies long enough to be cut at `seq`, so every step holds exactly batch × seq tokens.
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(20)), "input": "",
             "output": " ".join(rng.choice(words) for _ in range(seq))} for _ in range(examples)]
    paths["data"] = root / "train.jsonl"
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _llmneo(args: list[str], log: Path, src: str | None = None, threads: int | None = None,
            watch: Path | None = None) -> dict:
    """Run the llmneo CLI (same interpreter; llmneo from `src` if given); output goes to `log`.

    Returns its wall and CPU seconds, and with `watch` (a metrics.jsonl) the process's CPU time at the
    moment each row appeared: per-step CPU time, which a busy machine disturbs far less than wall time.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    stamps: list[float] = []
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "llmneo", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env=env)
        while child.poll() is None:
            time.sleep(0.02)
            if watch is not None and watch.is_file():
                rows = watch.read_bytes().count(b"\n")
                if rows > len(stamps):
                    cpu = _cpu_seconds(child.pid)
                    if cpu is not None:
                        stamps.extend([cpu] * (rows - len(stamps)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise SystemExit(f"llmneo {' '.join(args[:2])} failed (exit {child.returncode}); see {log}")
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "cpu_at_rows": stamps}


def run_arm(arm: str, base: dict, warmup: int, out: Path, log: Path, src: str | None = None,
            threads: int | None = None) -> dict:
    import yaml

    shutil.rmtree(out, ignore_errors=True)  # no metrics.jsonl of an earlier run to be mistaken for this one's
    out.parent.mkdir(parents=True, exist_ok=True)
    values = {**base, "output_dir": str(out), "overwrite_output_dir": True}
    if arm == "lora_sft":
        values.pop("teacher_cache")
        values["kd_ratio"] = 0.0
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(values))
    process = _llmneo(["train", str(config)], log, src, threads, watch=out / "metrics.jsonl")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "train_results.json").read_text())
    per_step_tokens = results["train_tokens"] / results["global_step"]
    steady = rows[warmup:]
    stamps = process["cpu_at_rows"]
    steady_cpu = (stamps[-1] - stamps[warmup - 1]) if len(stamps) == len(rows) and warmup >= 1 else float("nan")
    return {"arm": arm, "wall_seconds": process["wall"], "cpu_seconds": process["cpu"],
            "steady_tokens_per_second": len(steady) * per_step_tokens / sum(per_step_tokens / r["tokens_per_second"]
                                                                            for r in steady),
            "steady_tokens_per_cpu_second": len(steady) * per_step_tokens / steady_cpu,
            "run_tokens_per_second": results["tokens_per_second"],
            "step_tokens_per_second": [round(r["tokens_per_second"], 1) for r in rows],
            "final_loss": results["final_loss"]}


def _spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of tokens/s")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 pairs of 8-step runs")
    parser.add_argument("--workdir", help="keep models, cache and runs here (default: a temporary directory)")
    parser.add_argument("--compare-src", metavar="DIR",
                        help="also run cached Neo with llmneo imported from DIR (e.g. an older checkout's src/), "
                             "interleaved with the other arms, to measure a change")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for the llmneo processes (default: torch's own choice); 1 makes the "
                             "process CPU time a measure of work that a busy machine disturbs little")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs = 8, 2
    with tempfile.TemporaryDirectory(prefix="llmneo-cache-bench-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        built = root / "inputs.json"  # a --workdir from an earlier run with the same sizes is reused
        sizes = {"examples": args.steps * args.batch, "seq": args.seq, "topk": args.topk}
        reuse = built.is_file() and json.loads(built.read_text())["sizes"] == sizes
        paths = ({k: Path(v) for k, v in json.loads(built.read_text())["paths"].items()} if reuse
                 else build_inputs(root, args.steps * args.batch, args.seq))
        base = {"model_name_or_path": str(paths["student"]), "dataset": str(paths["data"]),
                "teacher_cache": str(root / "cache"), "finetuning_type": "lora", "lora_rank": args.lora_rank,
                "per_device_train_batch_size": args.batch, "cutoff_len": args.seq, "max_steps": args.steps,
                "logging_steps": 1, "save_steps": 10**6, "plot_loss": False, "seed": 0, "kd_ratio": 0.5}
        import yaml

        cache_yaml = root / "cache.yaml"
        cache_yaml.write_text(yaml.safe_dump({**base, "teacher_model_name_or_path": str(paths["teacher"]),
                                              "teacher_topk": args.topk, "output_dir": str(root / "unused"),
                                              "overwrite_output_dir": True}))
        if not reuse:
            seconds = _llmneo(["cache", str(cache_yaml)], root / "cache.log")["wall"]
            print(f"llmneo cache: {seconds:.1f}s", file=sys.stderr, flush=True)
            built.write_text(json.dumps({"sizes": sizes, "paths": {k: str(v) for k, v in paths.items()}}))
        arms = {arm: None for arm in ARMS}
        if args.compare_src:
            arms["neo_cache_compared"] = str(Path(args.compare_src).resolve())
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for pair in range(args.pairs):
            for arm, src in arms.items():
                run = run_arm(arm.removesuffix("_compared"), base, args.warmup, root / "runs" / f"{arm}-{pair}",
                              root / "runs" / f"{arm}-{pair}.log", src, args.threads)
                results[arm].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
        _report(args, results)


def _report(args, results: dict[str, list[dict]]) -> None:
    rounds = "rounds (LoRA-SFT, cached Neo, compared cached Neo)" if len(results) > 2 else \
        "pairs (LoRA-SFT, cached Neo)"
    print(f"\ncache benchmark: {args.pairs} {rounds} of {args.steps}-step `llmneo train` runs, "
          f"{args.batch} x {args.seq} tokens per step, LoRA rank {args.lora_rank}, top-{args.topk} cache, "
          f"V = {VOCAB}" + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")
          + "; median (min–max) over the runs\n")
    print(f"| arm | tokens/s after {args.warmup} warm-up steps | tokens/s, whole run | tokens per CPU second "
          f"after warm-up | process wall (s) | process CPU (s) |")
    print("|---|---|---|---|---|---|")
    for arm, runs in results.items():
        print(f"| {arm} | {_spread([r['steady_tokens_per_second'] for r in runs], 1)} | "
              f"{_spread([r['run_tokens_per_second'] for r in runs], 1)} | "
              f"{_spread([r['steady_tokens_per_cpu_second'] for r in runs], 1)} | "
              f"{_spread([r['wall_seconds'] for r in runs], 1)} | {_spread([r['cpu_seconds'] for r in runs], 1)} |")
    print(f"\n| time ÷ LoRA-SFT's, per pair (run next to each other) | wall, after {args.warmup} warm-up steps | "
          f"wall, whole run (train_results.json) | CPU, after warm-up | target |")
    print("|---|---|---|---|---|")
    sft = results["lora_sft"]
    for arm in [a for a in results if a != "lora_sft"]:
        pairs = list(zip(sft, results[arm]))
        steady = [s["steady_tokens_per_second"] / n["steady_tokens_per_second"] for s, n in pairs]
        whole = [s["run_tokens_per_second"] / n["run_tokens_per_second"] for s, n in pairs]
        cpu = [s["steady_tokens_per_cpu_second"] / n["steady_tokens_per_cpu_second"] for s, n in pairs]
        print(f"| {arm} | {_spread(steady)} | {_spread(whole)} | {_spread(cpu)} | <= 1.10 (wall) |")


if __name__ == "__main__":
    main()
