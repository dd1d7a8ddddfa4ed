"""Padded batches, `packing` and `neat_packing` on alpaca-length data, through the real CLI (`llmneo train`).

The data has the length spread of LLaMA-Factory's `data/alpaca_en_demo.json` (999 rows): the file
`alpaca_en_demo_lengths.json` next to this script holds each row's word counts (instruction + input, output),
no text, and the script writes rows of those word counts drawn from a list of 30,000 synthetic words (Zipf
weights), so it runs without a network. `--data PATH` uses a real alpaca-format file instead. Either way a
byte-level BPE (`llmneo.demo.tiny`, vocabulary `--vocab`) is trained on the rows' own text, and a Llama-style
teacher and student are built from it.

Three arms, the same Neo run otherwise (LoRA, kd_ratio 0.5, forward KL, live teacher, `--steps` steps):
  padded        packing: false; each batch right-padded to its longest example
  packing       packing: true; whole examples best-fit into cutoff_len rows, attending to each other
  neat_packing  neat_packing: true; the same rows, position ids restarting per example, so transformers'
                masking keeps attention inside each example (sdpa with a dense block mask, where `packing`
                with one full row per batch gets sdpa's is_causal path)
The packed arms take `--rows` rows per step; the padded arm takes as many examples per step as those rows
hold on average (examples ÷ packed rows × `--rows`, rounded), so the three see about the same trained tokens
per step. The arms alternate over `--rounds` rounds (A B C A B C ...), so load drift hits all three.

What a step holds is not guessed: the script builds each arm's dataset with llmneo's own `dataset.build`, and
its batches with the training loader's shuffle (`dataset.EpochSampler`) and `dataset.collate`, and counts per
step the positions (rows × width, padding included), the non-pad tokens and the trained (response) tokens.
Each step's time is its non-pad tokens ÷ the `tokens_per_second` metrics.jsonl logs for it (train/window.py:
non-pad tokens over the step's seconds, logging_steps 1); the sum of the counted non-pad tokens is checked
against train_results.json's `train_tokens`. Throughput leaves out the first `--warmup` steps (one-off costs).
CPU time is the llmneo process's, read from /proc as each metrics row appears (see cache_bench.py). Memory is
the process's peak RSS (train_results.json `peak_memory_bytes`), weights and runtime included.

    python benchmarks/packing_bench.py           # 3 rounds of 3 arms, 60 steps of 2 packed rows (padded: 10 examples)
    python benchmarks/packing_bench.py --quick   # 1 round of 4-step runs on 2-layer models: a smoke test
    python benchmarks/packing_bench.py --stats-only --data PATH/alpaca_en_demo.json   # token lengths only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from cache_bench import _llmneo  # the CLI as a subprocess, with its CPU time at each metrics row

ARMS = {"padded": {"packing": False}, "packing": {"packing": True}, "neat_packing": {"neat_packing": True}}
LENGTHS = Path(__file__).with_name("alpaca_en_demo_lengths.json")
WORDS = 30000  # with Zipf weights, a BPE of 8,000 then cuts a word into 1.43 tokens, as it cuts alpaca's English


def synthetic_rows(seed: int = 0) -> list[dict]:
    """Alpaca rows with the word counts of LLaMA-Factory's demo file, the words drawn from a synthetic list."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(WORDS)]
    weights = [1 / (rank + 1) for rank in range(WORDS)]
    lengths = json.loads(LENGTHS.read_text())["rows"]
    return [{"instruction": " ".join(rng.choices(words, weights, k=prompt)), "input": "",
             "output": " ".join(rng.choices(words, weights, k=output))} for prompt, output in lengths]


def build_inputs(root: Path, rows: list[dict], sizes: dict) -> dict:
    """Tokenizer (trained on the rows), teacher, student and the alpaca file under `root`; their paths."""
    from llmneo.demo import tiny

    texts = [" ".join(filter(None, (r["instruction"], r.get("input", ""), r["output"]))) for r in rows]
    tokenizer = tiny.build_tokenizer(texts, vocab_size=sizes["vocab"])
    shape = {"hidden_size": sizes["hidden"], "num_heads": sizes["heads"], "intermediate_size": sizes["intermediate"],
             "max_position_embeddings": max(2048, sizes["cutoff"])}
    teacher = tiny.build_model(tokenizer, num_layers=sizes["teacher_layers"], seed=1, **shape)
    student = tiny.build_model(tokenizer, num_layers=sizes["student_layers"], seed=2, **shape)
    paths = {"teacher": tiny.save_pair(teacher, tokenizer, root / "teacher"),
             "student": tiny.save_pair(student, tokenizer, root / "student"), "data": root / "alpaca.json"}
    paths["data"].write_text(json.dumps(rows))
    return {k: str(v) for k, v in paths.items()}


def arm_values(arm: str, base: dict, batch: int) -> dict:
    return {**base, **ARMS[arm], "per_device_train_batch_size": batch}


def dataset_of(values: dict, tokenizer) -> list[dict]:
    """The training examples (or packed rows) `llmneo train` builds from these config values."""
    from llmneo.config import schema
    from llmneo.data import dataset

    return dataset.build(schema.load(overrides=dict(values)), tokenizer).train


def step_counts(train: list[dict], per_row: list[int], batch: int, steps: int, seed: int,
                pad_id: int) -> list[dict]:
    """Per optimizer step (gradient_accumulation_steps 1): positions, non-pad and trained tokens and examples
    (`per_row`: each row's), as the training loader batches them (its shuffle, epoch after epoch, its collate)."""
    from llmneo.data import dataset
    from llmneo.data.labels import response_count

    sampler, counts, epoch = dataset.EpochSampler(len(train), seed), [], 0
    while len(counts) < steps:
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        for start in range(0, len(order), batch):
            collated = dataset.collate([train[i] for i in order[start:start + batch]], pad_id)
            counts.append({"positions": collated["input_ids"].numel(),
                           "tokens": int(collated["attention_mask"].sum()),
                           "trained": response_count(collated["labels"]),
                           "examples": sum(per_row[i] for i in order[start:start + batch])})
            if len(counts) == steps:
                break
        epoch += 1
    return counts


def length_stats(examples: list[dict]) -> dict:
    """Tokens per (unpacked) example: all and response, median / p90 / max."""
    from llmneo.data.labels import IGNORE_INDEX

    def summary(values: list[int]) -> dict:
        values = sorted(values)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                "max": values[-1], "mean": statistics.mean(values)}

    return {"examples": len(examples), "tokens": summary([len(e["input_ids"]) for e in examples]),
            "response": summary([sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples])}


def run_arm(arm: str, values: dict, counts: list[dict], warmup: int, out: Path, threads: int | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**values, "output_dir": str(out), "overwrite_output_dir": True}))
    process = _llmneo(["train", str(config)], out.parent / f"{out.name}.log", threads=threads,
                      watch=out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if "tokens_per_second" in line]
    results = json.loads((out / "train_results.json").read_text())
    if len(rows) != len(counts) or results["train_tokens"] != sum(c["tokens"] for c in counts):
        raise SystemExit(f"{arm}: the counted steps ({len(counts)}, {sum(c['tokens'] for c in counts)} non-pad "
                         f"tokens) are not the run's ({len(rows)}, {results['train_tokens']}); see {out}")
    seconds = [c["tokens"] / r["tokens_per_second"] for c, r in zip(counts, rows)]
    steady, steady_seconds = counts[warmup:], sum(seconds[warmup:])
    stamps = process["cpu_at_rows"]
    steady_cpu = stamps[-1] - stamps[warmup - 1] if len(stamps) == len(rows) and warmup >= 1 else math.nan
    trained, positions = sum(c["trained"] for c in steady), sum(c["positions"] for c in steady)
    return {"arm": arm, "trained_per_s": trained / steady_seconds, "positions_per_s": positions / steady_seconds,
            "trained_per_cpu_s": trained / steady_cpu, "wall": process["wall"], "cpu": process["cpu"],
            "peak_rss": results["peak_memory_bytes"], "final_loss": results["final_loss"],
            "step_seconds": [round(s, 3) for s in seconds]}


def _spread(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a real alpaca-format json / jsonl file instead of the synthetic rows")
    parser.add_argument("--stats-only", action="store_true", help="print the token lengths and packing, train nothing")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of throughput")
    parser.add_argument("--cutoff", type=int, default=1024, help="cutoff_len")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step (the packed arms' batch size)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the llmneo processes")
    parser.add_argument("--quick", action="store_true", help="1 round of 4-step runs on 2-layer models")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup, args.hidden, args.vocab = 4, 1, 1, 64, 2000
        args.student_layers = args.teacher_layers = 2
    sizes = {"vocab": args.vocab, "hidden": args.hidden, "heads": max(args.hidden // 64, 1),
             "intermediate": args.hidden * 11 // 4, "student_layers": args.student_layers,
             "teacher_layers": args.teacher_layers, "cutoff": args.cutoff, "data": args.data}
    if args.data:
        text = Path(args.data).read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    else:
        rows = synthetic_rows()
    with tempfile.TemporaryDirectory(prefix="llmneo-packing-bench-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        built = root / "inputs.json"  # a --workdir from an earlier run with the same sizes is reused
        reuse = built.is_file() and json.loads(built.read_text())["sizes"] == sizes
        paths = json.loads(built.read_text())["paths"] if reuse else build_inputs(root, rows, sizes)
        built.write_text(json.dumps({"sizes": sizes, "paths": paths}))
        base = {"model_name_or_path": paths["student"], "teacher_model_name_or_path": paths["teacher"],
                "dataset": paths["data"], "finetuning_type": "lora", "lora_rank": args.lora_rank,
                "kd_ratio": 0.5, "cutoff_len": args.cutoff, "max_steps": args.steps, "logging_steps": 1,
                "save_steps": 10**6, "plot_loss": False, "seed": 0}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(paths["student"])
        examples = dataset_of(arm_values("padded", base, 1), tokenizer)
        packed = dataset_of(arm_values("neat_packing", base, 1), tokenizer)
        per_row = len(examples) / len(packed)
        batches = {"padded": max(round(per_row * args.rows), 1), "packing": args.rows, "neat_packing": args.rows}
        datasets = {"padded": examples, "packing": dataset_of(arm_values("packing", base, 1), tokenizer),
                    "neat_packing": packed}
        assert [r["input_ids"] for r in datasets["packing"]] == [r["input_ids"] for r in packed]
        _report_data(args, sizes, length_stats(examples), len(packed))
        if args.stats_only:
            return
        # a neat row's position ids restart (are 0) once per example; `packing` has the same rows
        in_row = [sum(p == 0 for p in row["position_ids"]) for row in packed]
        per_row = {"padded": [1] * len(examples), "packing": in_row, "neat_packing": in_row}
        counts = {arm: step_counts(datasets[arm], per_row[arm], batches[arm], args.steps, 0, tokenizer.pad_token_id)
                  for arm in ARMS}
        results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for round_ in range(args.rounds):
            for arm in ARMS:
                run = run_arm(arm, arm_values(arm, base, batches[arm]), counts[arm], args.warmup,
                              root / "runs" / f"{arm}-{round_}", args.threads)
                results[arm].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
        _report_runs(args, batches, datasets, counts, results)


def _report_data(args, sizes: dict, stats: dict, packed_rows: int) -> None:
    source = args.data or "synthetic rows with alpaca_en_demo's word counts"
    print(f"\ndata: {source}; BPE vocabulary {sizes['vocab']:,} trained on it; cutoff_len {args.cutoff}\n")
    print("| examples | tokens per example: median / p90 / max (mean) | response tokens: median / p90 / max (mean) "
          f"| packed rows of {args.cutoff} | examples per packed row |")
    print("|---|---|---|---|---|")
    t, r = stats["tokens"], stats["response"]
    print(f"| {stats['examples']} | {t['median']:.0f} / {t['p90']} / {t['max']} ({t['mean']:.1f}) | "
          f"{r['median']:.0f} / {r['p90']} / {r['max']} ({r['mean']:.1f}) | {packed_rows} | "
          f"{stats['examples'] / packed_rows:.2f} |")


def _report_runs(args, batches: dict, datasets: dict, counts: dict, results: dict) -> None:
    print(f"\npacking benchmark: {args.rounds} round(s) of {args.steps}-step `llmneo train` runs per arm, "
          f"interleaved; Llama pair hidden {args.hidden}, student {args.student_layers} / teacher "
          f"{args.teacher_layers} layers, V = {args.vocab:,}, LoRA rank {args.lora_rank}, kd_ratio 0.5, "
          f"cutoff_len {args.cutoff}" + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")
          + f"; throughput after {args.warmup} warm-up steps; median (min–max) over rounds\n")
    print("| arm | rows per epoch | batch (rows) | steps per epoch | examples per step | trained tokens per step | "
          "positions per step | padding fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, steps in counts.items():
        positions = sum(c["positions"] for c in steps)
        print(f"| {arm} | {len(datasets[arm])} | {batches[arm]} | {math.ceil(len(datasets[arm]) / batches[arm])} | "
              f"{statistics.mean(c['examples'] for c in steps):.1f} | "
              f"{statistics.mean(c['trained'] for c in steps):.0f} | {positions / len(steps):.0f} | "
              f"{1 - sum(c['tokens'] for c in steps) / positions:.3f} |")
    print("\n| arm | trained tokens/s | positions/s (padding included) | trained tokens per CPU s | "
          "peak RSS (MiB) | peak RSS per trained token per step (KiB) | process wall (s) | process CPU (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, runs in results.items():
        per_step = statistics.mean(c["trained"] for c in counts[arm])
        print(f"| {arm} | {_spread([r['trained_per_s'] for r in runs])} | "
              f"{_spread([r['positions_per_s'] for r in runs])} | {_spread([r['trained_per_cpu_s'] for r in runs])} | "
              f"{_spread([r['peak_rss'] / 2**20 for r in runs])} | "
              f"{_spread([r['peak_rss'] / 1024 / per_step for r in runs])} | {_spread([r['wall'] for r in runs])} | "
              f"{_spread([r['cpu'] for r in runs])} |")
    print("\n| per round, ÷ padded's | trained tokens/s (wall) | trained tokens per CPU s | peak RSS |")
    print("|---|---|---|---|")
    for arm in ("packing", "neat_packing"):
        pairs = list(zip(results["padded"], results[arm]))
        print(f"| {arm} | {_spread([n['trained_per_s'] / p['trained_per_s'] for p, n in pairs], 2)} | "
              f"{_spread([n['trained_per_cpu_s'] / p['trained_per_cpu_s'] for p, n in pairs], 2)} | "
              f"{_spread([n['peak_rss'] / p['peak_rss'] for p, n in pairs], 3)} |")
    pairs = list(zip(results["packing"], results["neat_packing"]))
    print(f"| neat_packing ÷ packing (the mask's cost) | "
          f"{_spread([n['trained_per_s'] / p['trained_per_s'] for p, n in pairs], 2)} | "
          f"{_spread([n['trained_per_cpu_s'] / p['trained_per_cpu_s'] for p, n in pairs], 2)} | "
          f"{_spread([n['peak_rss'] / p['peak_rss'] for p, n in pairs], 3)} |")


if __name__ == "__main__":
    main()
