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
Peak memory is RSS (CUDA: max allocated) above the baseline taken after the models are built, before the
warm-up step, so optimizer moments count; children run with MALLOC_ARENA_MAX=1 so that RSS repeats.

    python benchmarks/step_bench.py [--device cpu|cuda] [--dtype float32|bfloat16] [--lora-rank 32]
    python benchmarks/step_bench.py --preset large --arms neo_live full_kd
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process, measure, measure_cuda  # noqa: E402

ARMS = ("lora_sft", "neo_live", "neo_cache", "full_kd", "teacher_fwd")
SIZES = {"hidden": 512, "layers": 8, "vocab": 32000, "teacher_hidden": 768, "teacher_layers": 8, "lora_rank": 128,
         "batch": 4, "seq": 128}
PRESETS = {"default": {}, "large": {"hidden": 1024, "layers": 12, "teacher_hidden": 1024, "teacher_layers": 12}}
CACHE_TOPK = 64


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
    from llmneo import cache

    examples = [{"input_ids": ids.tolist(), "labels": labels.tolist()}
                for ids, labels in zip(batch["input_ids"].cpu(), batch["labels"].cpu())]
    fingerprint = {"dataset rows": "step-bench"}
    cache.write_examples(directory, live.model, examples, pad_id=0, vocab=vocab, k=CACHE_TOPK,
                         fingerprint=fingerprint, chunk=256, device=device)
    return cache.CachedTeacher(str(directory), fingerprint, device)


def one(arm: str, device: str, dtype_name: str, sizes: dict) -> dict:
    import tempfile

    import torch
    from accelerate import Accelerator

    from llmneo import adapters, config, train
    from llmneo.losses import response_positions
    from llmneo.teacher import LiveTeacher

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
    cfg = config.load(overrides={"finetuning_type": finetuning, "kd_chunk_size": 256, "lora_rank": sizes["lora_rank"]})
    teacher = None
    if arm != "lora_sft":
        teacher = LiveTeacher(_model(sizes["teacher_hidden"], sizes["teacher_layers"], vocab, seq, 1, dtype).to(dev),
                              vocab)
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
        kd_ratio = 0.5 if teacher is not None else 0.0

        def step():
            train.accumulate(accelerator, model, teacher, [batch], cfg, vocab, kd_ratio)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    tokens = batch_size * seq
    if dev.type == "cuda":
        result = measure_cuda(step)
    else:
        result = measure(step, repeats=5, baseline_before_warmup=True)
    result["tokens_per_second"] = tokens / result["seconds"]
    if arm != "teacher_fwd":
        result["student_params"] = student_params
    scratch.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name in SIZES:
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {SIZES[name]} (or the preset's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--one")
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.dtype, json.loads(args.sizes))))
        return
    sizes = {**SIZES, **PRESETS[args.preset]}
    sizes.update({name: getattr(args, name) for name in SIZES if getattr(args, name) is not None})
    results = {}
    for arm in args.arms:
        results[arm] = in_fresh_process(__file__, ["--one", arm, "--device", args.device, "--dtype", args.dtype,
                                                   "--sizes", json.dumps(sizes)], timeout=7200,
                                        env={"MALLOC_ARENA_MAX": "1"})
        print(json.dumps({arm: results[arm]}), file=sys.stderr, flush=True)
    student = next((r["student_params"] for r in results.values() if "student_params" in r), None)
    print(f"\nstep benchmark: device {args.device}, {args.dtype}; student hidden {sizes['hidden']}, {sizes['layers']} "
          f"layers" + (f" ({student / 1e6:.0f}M parameters)" if student else "") +
          f"; teacher hidden {sizes['teacher_hidden']}, {sizes['teacher_layers']} layers; V = {sizes['vocab']}; "
          f"{sizes['batch']} x {sizes['seq']} tokens per step; LoRA rank {sizes['lora_rank']}\n")
    print("| arm | step time (s) | tokens/s | peak above baseline (MiB) |")
    print("|---|---|---|---|")
    for arm, r in results.items():
        if "error" in r:
            print(f"| {arm} | - | - | {r['error']} |")
        else:
            print(f"| {arm} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | "
                  f"{r['peak_above_baseline_bytes'] / 2**20:.1f} |")
    ok = {arm for arm, r in results.items() if "error" not in r}
    t = {arm: results[arm]["seconds"] for arm in ok}
    m = {arm: results[arm]["peak_above_baseline_bytes"] for arm in ok}
    rows = []
    if {"neo_live", "lora_sft", "teacher_fwd"} <= ok:
        rows.append(("live Neo time / (LoRA-SFT + teacher forward)", t["neo_live"] / (t["lora_sft"] + t["teacher_fwd"]),
                     "<= 1.05"))
    if {"neo_cache", "lora_sft"} <= ok:
        rows.append(("cached Neo time / LoRA-SFT", t["neo_cache"] / t["lora_sft"], "<= 1.10"))
    if {"neo_live", "full_kd"} <= ok:
        rows.append(("Neo / full KD, memory", m["neo_live"] / m["full_kd"], "<= 0.6"))
        rows.append(("Neo / full KD, time", t["neo_live"] / t["full_kd"], "<= 0.75"))
    if rows:
        print("\n| ratio | measured | target |")
        print("|---|---|---|")
        for name, value, target in rows:
            print(f"| {name} | {value:.3f} | {target} |")


if __name__ == "__main__":
    main()
