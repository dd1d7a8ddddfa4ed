"""Training-step benchmark on one model pair: tokens/s and peak memory per arm, each in a fresh process.

Default sizes: student Llama-style, hidden 512, 8 layers, vocab 32,000 (about 58M parameters); teacher
hidden 768, 8 layers, same vocab (about 106M); one micro-batch of 4 × 128 tokens, the last 3/4 of each
row are response tokens; LoRA rank 128. `--preset large`: a 217M student (hidden 1024, 12 layers), a
teacher of the same shape, LoRA rank 128, 4 × 128 tokens. Every size is an option (intermediate size
8/3 · hidden rounded up to a multiple of 64, as in the defaults). Arms, all through llmneo's own step
(train.accumulate: chunked loss, backward) plus AdamW:
  lora_sft    LoRA (rank --lora-rank, alpha 2·rank, all linear layers), CE only
  neo_live    LoRA + KD with the live teacher
  neo_cache   LoRA + KD from a top-64 cache: shards written to disk by llmneo's cache writer before the
              timed steps, read every step through CachedTeacher, as `llmneo train` does
  full_kd     full fine-tuning + KD with the live teacher
  teacher_fwd the teacher's forward alone (hidden states + its head at the response positions)
  neo_cross_same   neo_live forced through the cross-tokenizer path (alignment.CrossTokenizerAligner):
              every reply token aligned 1:1 to itself, an identity VocabMap (ULD weight 0): the path's own cost
  neo_cross_other  a teacher over --teacher-vocab (40,000) tokens sharing --shared (28,000) with the student,
              paired at random; per block of reply text, 1 student token ↔ 1 teacher token (p 0.85), ↔ a
              2-token teacher span (0.10), or 2 student tokens ↔ 1 teacher token (0.05, both unaligned)
The cross arms build the teacher fields (crosstok.collate_teacher) and the VocabMap directly: the bench has no
tokenizer. `--chunk-costs` also times the fused loss on one chunk of 256 positions with each arm's rows (fkl, rkl).
Peak memory is RSS (CUDA: max allocated) above the baseline taken after the models are built, before the
warm-up step, so optimizer moments count; children run with MALLOC_ARENA_MAX=1 so that RSS repeats.

    python benchmarks/step_bench.py [--device cpu|cuda] [--dtype float32|bfloat16] [--lora-rank 32]
    python benchmarks/step_bench.py --preset large --arms neo_live full_kd --rounds 3 --repeats 2
    python benchmarks/step_bench.py --arms neo_live neo_cross_same neo_cross_other --rounds 3 --threads 1 --chunk-costs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process, measure, measure_cuda, tensor_peak  # noqa: E402

ARMS = ("lora_sft", "neo_live", "neo_cache", "full_kd", "teacher_fwd", "neo_cross_same", "neo_cross_other")
CROSS_ARMS = ("neo_cross_same", "neo_cross_other")
SIZES = {"hidden": 512, "layers": 8, "vocab": 32000, "teacher_hidden": 768, "teacher_layers": 8, "lora_rank": 128,
         "batch": 4, "seq": 128, "teacher_vocab": 40000, "shared": 28000}
PRESETS = {"default": {}, "large": {"hidden": 1024, "layers": 12, "teacher_hidden": 1024, "teacher_layers": 12}}
CACHE_TOPK = 64
# neo_cross_other's synthetic alignment: (student tokens, teacher tokens) per block of reply text, and its probability
CROSS_BLOCKS = (((1, 1), 0.85), ((1, 2), 0.10), ((2, 1), 0.05))
TEACHER_SYSTEM_TOKENS = 8  # the teacher's template puts a system prompt before the conversation


def _intermediate(hidden: int) -> int:
    return math.ceil(hidden * 8 / 3 / 64) * 64  # 512 → 1408, 768 → 2048, 1024 → 2752


def _model(hidden, layers, vocab, seq, seed, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=_intermediate(hidden),
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(512, seq), tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def _cached_teacher(live, batch, vocab, directory: Path, device):
    """Write the batch's top-k teacher rows as a real cache (shards + index.json) and open it for reading."""
    from llmneo.cache import write
    from llmneo.teachers import cached

    examples = [{"input_ids": ids.tolist(), "labels": labels.tolist()}
                for ids, labels in zip(batch["input_ids"].cpu(), batch["labels"].cpu())]
    fingerprint = {"dataset rows": "step-bench"}
    write.write_examples(directory, live.model, examples, pad_id=0, vocab=vocab, k=CACHE_TOPK,
                         fingerprint=fingerprint, chunk=256, device=device)
    return cached.CachedTeacher(str(directory), fingerprint, device)


def vocab_map(student_vocab: int, teacher_vocab: int, shared: int, seed: int = 3):
    """A crosstok.vocab.VocabMap sharing `shared` tokens: random student ids paired with random teacher ids (the
    identity map when both vocabularies are `shared` tokens); w = 1 - overlap, as crosstok.vocab.vocab_map sets it."""
    import dataclasses

    import torch

    from llmneo.crosstok.vocab import VocabMap

    gen = torch.Generator().manual_seed(seed)
    if shared == student_vocab == teacher_vocab:
        student_ids = teacher_ids = torch.arange(shared)
    else:
        student_ids = torch.randperm(student_vocab, generator=gen)[:shared].sort().values  # (S,)
        teacher_ids = torch.randperm(teacher_vocab, generator=gen)[:shared]  # (S,) in a random order
    to_student = torch.full((teacher_vocab,), -1, dtype=torch.long)
    to_student[teacher_ids] = student_ids
    student_only = torch.ones(student_vocab, dtype=torch.bool)
    student_only[student_ids] = False
    found = VocabMap(student_ids, teacher_ids, to_student, student_only, to_student < 0, 0.0)
    return dataclasses.replace(found, uld_weight=1.0 - found.overlap)


def cross_fields(batch: dict, teacher_vocab: int, identity: bool, seed: int = 4) -> tuple[dict, dict]:
    """The teacher fields of a student `batch` (on the CPU), made by crosstok.collate_teacher, and the share of reply
    tokens in each kind of block (student:teacher tokens). `identity`: the teacher's tokens are the student's,
    every reply token aligned 1:1 to itself; else random teacher tokens aligned block by block (CROSS_BLOCKS)."""
    import random

    from llmneo.crosstok import offsets

    rng = random.Random(seed)
    kinds, weights = zip(*CROSS_BLOCKS)
    examples, counts = [], {}
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        prompt = next(t for t, label in enumerate(labels) if label != -100)
        teacher = ids[:prompt] if identity else [rng.randrange(teacher_vocab)
                                                 for _ in range(prompt + TEACHER_SYSTEM_TOKENS)]
        prompt_len, start, end, s = len(teacher), [-1] * len(ids), [-1] * len(ids), prompt
        while s < len(ids):
            n_student, n_teacher = (1, 1) if identity else rng.choices(kinds, weights)[0]
            n_student = min(n_student, len(ids) - s)
            if n_student == 1:  # a block of two student tokens aligns neither
                start[s], end[s] = len(teacher), len(teacher) + n_teacher
            counts[f"{n_student}:{n_teacher}"] = counts.get(f"{n_student}:{n_teacher}", 0) + n_student
            teacher += ids[s:s + 1] if identity else [rng.randrange(teacher_vocab) for _ in range(n_teacher)]
            s += n_student
        examples.append({"teacher_input_ids": teacher, "teacher_start": start, "teacher_end": end,
                         "teacher_prompt_len": prompt_len})
    total = sum(counts.values())
    shares = {name: count / total for name, count in sorted(counts.items())}
    return offsets.collate_teacher(examples, batch["input_ids"].shape[1]), shares


def one(arm: str, device: str, dtype_name: str, sizes: dict, repeats: int = 5) -> dict:
    import tempfile

    import torch
    from accelerate import Accelerator

    from llmneo.config import schema
    from llmneo.data.labels import response_positions
    from llmneo.loss.spec import LossSpec
    from llmneo.models import adapters, loading
    from llmneo.teachers import aligner as alignment
    from llmneo.teachers.live import LiveTeacher
    from llmneo.train import loop

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    vocab, batch_size, seq = sizes["vocab"], sizes["batch"], sizes["seq"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=gen)
    labels = ids.clone()
    labels[:, :seq // 4] = -100
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "labels": labels.to(dev),
             "index": torch.arange(batch_size)}
    finetuning = "full" if arm == "full_kd" else "lora"
    cfg = schema.load(overrides={"finetuning_type": finetuning, "kd_chunk_size": 256, "lora_rank": sizes["lora_rank"]})
    teacher = aligner = None
    teacher_vocab = sizes["teacher_vocab"] if arm == "neo_cross_other" else vocab
    if arm in CROSS_ARMS:
        fields, blocks = cross_fields(batch, teacher_vocab, identity=arm == "neo_cross_same")
        batch.update({key: value.to(dev) for key, value in fields.items()})
        shared = sizes["shared"] if arm == "neo_cross_other" else vocab
        aligner = alignment.CrossTokenizerAligner(vocab_map(vocab, teacher_vocab, shared).to(dev))
    if arm != "lora_sft":
        teacher_model = _model(sizes["teacher_hidden"], sizes["teacher_layers"], teacher_vocab,
                               max(seq, batch.get("teacher_input_ids", ids).shape[1]), 1, dtype).to(dev)
        teacher = LiveTeacher(loading.freeze(teacher_model), teacher_vocab)
    scratch = tempfile.TemporaryDirectory(prefix="llmneo-step-bench-")
    if arm == "neo_cache":  # the cache is written before the timed steps; every step reads it from disk
        teacher = _cached_teacher(teacher, batch, vocab, Path(scratch.name), dev)
    accelerator = Accelerator(cpu=dev.type == "cpu")
    if arm == "teacher_fwd":
        positions, _ = response_positions(batch["labels"])

        def step():
            dense = teacher.rows(batch, positions)
            for start in range(0, len(dense), 256):
                dense[start:start + 256]
    else:
        student = _model(sizes["hidden"], sizes["layers"], vocab, seq, 2,
                         torch.float32 if finetuning == "full" else dtype).to(dev)
        student_params = sum(p.numel() for p in student.parameters())
        model = adapters.apply(student, cfg)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        loss_spec = LossSpec.from_config(cfg, vocab, has_teacher=teacher is not None)  # kd_ratio 0.5 with one

        def step():
            loop.accumulate(accelerator, model, teacher, [batch], loss_spec, aligner=aligner)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    tokens = batch_size * seq
    cpu_times = []

    def timed_step():  # process CPU time per step: with --threads 1, the work, whatever else runs on the machine
        started = time.process_time()
        step()
        cpu_times.append(time.process_time() - started)

    if dev.type == "cuda":
        result = measure_cuda(timed_step)
    else:
        result = measure(timed_step, repeats=repeats, baseline_before_warmup=True)
    result["tokens_per_second"] = tokens / result["seconds"]
    result["cpu_seconds"] = statistics.median(cpu_times[1:])  # the first call is the warm-up
    if arm != "teacher_fwd":
        result["student_params"] = student_params
    if aligner is not None:
        aligned, positions = aligner.take_counts()
        result.update(aligned_fraction=aligned / positions, blocks=blocks, uld_weight=aligner.vocab.uld_weight,
                      teacher_tokens=int(batch["teacher_attention_mask"].sum()))
    scratch.cleanup()
    return result


def chunk_costs(device: str, dtype_name: str, sizes: dict, repeats: int = 10, chunk: int = 256) -> dict:
    """Seconds for the fused loss (chunked.fused_loss, forward + backward to the hidden states; a frozen head)
    on one chunk of `chunk` positions, with neo_live's rows and each cross arm's SpanRows, under kd_loss fkl (the
    closed forms) and rkl (autograd); on the CPU also the chunk's tensor peak (measure.tensor_peak)."""
    import torch

    from llmneo.crosstok.span_rows import SpanRows
    from llmneo.loss.chunked import fused_loss
    from llmneo.loss.divergences import KDSettings
    from llmneo.loss.rows import LogitRows
    from llmneo.loss.spec import LossSpec

    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    vocab, teacher_vocab = sizes["vocab"], sizes["teacher_vocab"]
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(sizes["hidden"], vocab, bias=False).to(dev, dtype).requires_grad_(False)
    hidden = torch.randn(chunk, sizes["hidden"], generator=gen).to(dev, dtype)  # (C, H)
    targets = torch.randint(0, vocab, (chunk,), generator=gen).to(dev)  # (C,)
    same = torch.randn(chunk, vocab, generator=gen).mul(3).to(dev, dtype)  # (C, V) teacher logits
    other = torch.randn(chunk, teacher_vocab, generator=gen).mul(3).to(dev, dtype)  # (C, V_T)
    aligned = torch.rand(chunk, generator=gen) < 0.9  # (C,)
    shift = torch.where(torch.rand(chunk, generator=gen) < 0.1, -0.5, 0.0)  # (C,) some 2-token spans
    rows = {"neo_live (LogitRows)": LogitRows(same),
            "neo_cross_same (SpanRows, identity map)": SpanRows(
                LogitRows(same), torch.zeros(chunk, device=dev), torch.ones(chunk, dtype=torch.bool, device=dev),
                vocab_map(vocab, vocab, vocab).to(dev)),
            "neo_cross_other (SpanRows, shared term + ULD)": SpanRows(  # kd_unaligned: ce, the default
                LogitRows(other), shift.to(dev), aligned.to(dev),
                vocab_map(vocab, teacher_vocab, sizes["shared"]).to(dev), targets, ~aligned.to(dev))}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median_seconds(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    found = {}
    for name, teacher_rows in rows.items():
        for kind in ("fkl", "rkl"):  # fkl: the closed forms; rkl: autograd through the divergence, chunk by chunk
            def loss_step(teacher_rows=teacher_rows, settings=KDSettings(kind)):
                piece = hidden.clone().requires_grad_(True)
                total, _, _ = fused_loss(piece, targets, head, [], teacher_rows, LossSpec(vocab, 0.5, settings, chunk))
                total.backward()

            found.setdefault(name, {})[kind] = {"seconds": median_seconds(loss_step)}
            if dev.type == "cpu":  # live tensor bytes at the chunk's peak, as in loss_bench (measure.tensor_peak)
                found[name][kind]["tensor_peak_bytes"] = tensor_peak(loss_step)["tensor_peak_bytes"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name in SIZES:
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {SIZES[name]} (or the preset's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the arms this many times, interleaved (A B A B ...); the tables give medians, and "
                             "each ratio's spread over the rounds: on a shared machine, use 3 or more")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for the arms' processes; with 1, the CPU-time ratios measure the work "
                             "even on a busy machine")
    parser.add_argument("--chunk-costs", action="store_true",
                        help="also time the loss on one chunk with each arm's rows (a fresh process, after the arms)")
    parser.add_argument("--one")
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "chunk_costs":
        print(json.dumps(chunk_costs(args.device, args.dtype, json.loads(args.sizes))))
        return
    if args.one:
        print(json.dumps(one(args.one, args.device, args.dtype, json.loads(args.sizes), args.repeats)))
        return
    sizes = {**SIZES, **PRESETS[args.preset]}
    sizes.update({name: getattr(args, name) for name in SIZES if getattr(args, name) is not None})
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for _ in range(args.rounds):
        for arm in args.arms:
            result = in_fresh_process(__file__, ["--one", arm, "--device", args.device, "--dtype", args.dtype,
                                                 "--repeats", str(args.repeats), "--sizes", json.dumps(sizes)],
                                      timeout=7200, env={"MALLOC_ARENA_MAX": "1",
                                                         **({"OMP_NUM_THREADS": str(args.threads)} if args.threads
                                                            else {})})
            runs[arm].append(result)
            print(json.dumps({arm: result}), file=sys.stderr, flush=True)
    costs = None
    if args.chunk_costs:
        costs = in_fresh_process(__file__, ["--one", "chunk_costs", "--device", args.device, "--dtype", args.dtype,
                                            "--sizes", json.dumps(sizes)], timeout=1800,
                                 env={"MALLOC_ARENA_MAX": "1",
                                      **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
    _report(args, sizes, runs, costs)


def _median_run(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    return {"seconds": statistics.median(r["seconds"] for r in ok),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
            "peak_above_baseline_bytes": statistics.median(r["peak_above_baseline_bytes"] for r in ok),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in ok),
            "student_params": ok[0].get("student_params"),
            **{key: ok[0][key] for key in ("aligned_fraction", "blocks", "uld_weight", "teacher_tokens")
               if key in ok[0]}}


def _ratio(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _report(args, sizes: dict, runs: dict[str, list[dict]], costs: dict | None = None) -> None:
    results = {arm: _median_run(r) for arm, r in runs.items()}
    student = next((r["student_params"] for r in results.values() if r.get("student_params")), None)
    print(f"\nstep benchmark: device {args.device}, {args.dtype}; student hidden {sizes['hidden']}, {sizes['layers']} "
          f"layers" + (f" ({student / 1e6:.0f}M parameters)" if student else "") +
          f"; teacher hidden {sizes['teacher_hidden']}, {sizes['teacher_layers']} layers; V = {sizes['vocab']}; "
          f"{sizes['batch']} x {sizes['seq']} tokens per step; LoRA rank {sizes['lora_rank']}; "
          f"{args.rounds} round(s) of fresh processes, median step of {args.repeats} each"
          + (", medians over the rounds" if args.rounds > 1 else "") + "\n")
    print("| arm | step time (s) | tokens/s | step CPU time (s) | peak above baseline (MiB) |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        if "error" in r:
            print(f"| {arm} | - | - | - | {r['error']} |")
        else:
            print(f"| {arm} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['cpu_seconds']:.3f} | "
                  f"{r['peak_above_baseline_bytes'] / 2**20:.1f} |")
    ok = {arm for arm, r in runs.items() if all("error" not in x for x in r)}
    # Per round, so that each ratio compares processes that ran next to each other.
    m = {arm: [r["peak_above_baseline_bytes"] for r in runs[arm]] for arm in ok}
    rounds = range(args.rounds)
    rows = []
    for measure_name, key in (("time", "seconds"), ("CPU time", "cpu_seconds")):
        t = {arm: [r[key] for r in runs[arm]] for arm in ok}
        if {"neo_live", "lora_sft", "teacher_fwd"} <= ok:
            rows.append((f"live Neo {measure_name} / (LoRA-SFT + teacher forward)",
                         [t["neo_live"][i] / (t["lora_sft"][i] + t["teacher_fwd"][i]) for i in rounds], "<= 1.05"))
        if {"neo_cache", "lora_sft"} <= ok:
            rows.append((f"cached Neo {measure_name} / LoRA-SFT",
                         [t["neo_cache"][i] / t["lora_sft"][i] for i in rounds], "<= 1.10"))
        if {"neo_live", "full_kd"} <= ok:
            rows.append((f"Neo / full KD, {measure_name}", [t["neo_live"][i] / t["full_kd"][i] for i in rounds],
                         "<= 0.75"))
    if {"neo_live", "full_kd"} <= ok:
        rows.append(("Neo / full KD, memory", [m["neo_live"][i] / m["full_kd"][i] for i in rounds], "<= 0.6"))
    for arm in CROSS_ARMS:
        if {arm, "neo_live"} <= ok:
            for measure_name, key in (("time", "seconds"), ("CPU time", "cpu_seconds"),
                                      ("memory", "peak_above_baseline_bytes")):
                rows.append((f"{arm} / neo_live, {measure_name}",
                             [runs[arm][i][key] / runs["neo_live"][i][key] for i in rounds], "-"))
    if rows:
        print("\n| ratio | measured" + (" (median, min–max over rounds)" if args.rounds > 1 else "") + " | target |")
        print("|---|---|---|")
        for name, values, target in rows:
            print(f"| {name} | {_ratio(values)} | {target} |")
    crossed = [arm for arm in CROSS_ARMS if arm in results and "error" not in results[arm]]
    if crossed:
        print("\n| cross arm | teacher vocabulary | shared tokens | ULD weight | reply tokens by block "
              "(student:teacher) | aligned positions | teacher tokens per step |")
        print("|---|---|---|---|---|---|---|")
        for arm in crossed:
            r = results[arm]
            other = arm == "neo_cross_other"
            blocks = ", ".join(f"{name} {share:.1%}" for name, share in r["blocks"].items())
            print(f"| {arm} | {sizes['teacher_vocab'] if other else sizes['vocab']:,} | "
                  f"{sizes['shared'] if other else sizes['vocab']:,} | {r['uld_weight']:.3f} | {blocks} | "
                  f"{r['aligned_fraction']:.1%} | {r['teacher_tokens']:,} |")
    if costs is not None and "error" not in costs:
        unit = 256 * sizes["vocab"] * 4  # one chunk × V fp32 buffer
        print("\n| one chunk of 256 positions (fused loss, forward + backward) | fkl: seconds | fkl: tensor peak, "
              "chunk × V buffers | rkl (autograd): seconds | rkl: tensor peak, chunk × V buffers |")
        print("|---|---|---|---|---|")
        for name, c in costs.items():
            cells = [f"{c[kind]['seconds']:.4f} | " + (f"{c[kind]['tensor_peak_bytes'] / unit:.1f}"
                                                      if "tensor_peak_bytes" in c[kind] else "-")
                     for kind in ("fkl", "rkl")]
            print(f"| {name} | " + " | ".join(cells) + " |")
    elif costs is not None:
        print(f"\nchunk costs: {costs['error']}")


if __name__ == "__main__":
    main()
