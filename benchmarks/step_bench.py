"""Training-step benchmark on one model pair: tokens/s and peak memory per arm, each in a fresh process.

Student: Llama-style, hidden 512, 8 layers, vocab 32,000 (about 58M parameters). Teacher: hidden 768,
8 layers, same vocab (about 106M). One micro-batch of 4 × 128 tokens, 96 response tokens per row.
Arms, all through llmneo's own step (train.accumulate: chunked loss, backward) plus AdamW:
  lora_sft    LoRA (paper defaults: rank 128 unless --lora-rank, alpha 2·rank, all linear layers), CE only
  neo_live    LoRA + KD with the live teacher
  neo_cache   LoRA + KD from top-64 teacher rows already in memory (CachedTeacher adds a read per batch)
  full_kd     full fine-tuning + KD with the live teacher
  teacher_fwd the teacher's forward alone (hidden states + its head at the response positions)
Peak memory is RSS (CUDA: max allocated) above the baseline taken after the models are built.

    python benchmarks/step_bench.py [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process, measure, measure_cuda  # noqa: E402

ARMS = ("lora_sft", "neo_live", "neo_cache", "full_kd", "teacher_fwd")
VOCAB = 32000


def _model(hidden, layers, inter, seed, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def one(arm: str, device: str, dtype_name: str, lora_rank: int) -> dict:
    import torch
    from accelerate import Accelerator

    from llmneo import adapters, config, train
    from llmneo.cache import topk_rows
    from llmneo.losses import response_positions
    from llmneo.teacher import LiveTeacher, SparseRows

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    batch_size, seq, prompt = 4, 128, 32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch_size, seq), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "labels": labels.to(dev)}
    finetuning = "full" if arm == "full_kd" else "lora"
    cfg = config.load(overrides={"finetuning_type": finetuning, "kd_chunk_size": 256, "lora_rank": lora_rank})
    teacher = None
    if arm != "lora_sft":
        teacher = LiveTeacher(_model(768, 8, 2048, 1, dtype).to(dev), VOCAB)
    if arm == "neo_cache":  # the rows a cache holds, computed once, outside the timed step
        positions, _ = response_positions(batch["labels"])
        dense = teacher.rows(batch, positions)
        cached = topk_rows(dense[0:len(dense)], 64)
        rows = SparseRows(cached.ids, cached.logprobs, cached.tail)
        del teacher, dense

        class Cached:
            def rows(self, batch, positions):
                return rows.to(dev)

        teacher = Cached()
    accelerator = Accelerator(cpu=dev.type == "cpu")
    if arm == "teacher_fwd":
        positions, _ = response_positions(batch["labels"])

        def step():
            dense = teacher.rows(batch, positions)
            for start in range(0, len(dense), 256):
                dense[start:start + 256]
    else:
        student = _model(512, 8, 1408, 2, torch.float32 if finetuning == "full" else dtype).to(dev)
        model = adapters.apply(student, cfg)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        kd_ratio = 0.5 if teacher is not None else 0.0

        def step():
            train.accumulate(accelerator, model, teacher, [batch], cfg, VOCAB, kd_ratio)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    tokens = batch_size * seq
    if dev.type == "cuda":
        result = measure_cuda(step)
        result["tokens_per_second"] = tokens / result["seconds"]
        return result
    result = measure(step, repeats=5, baseline_before_warmup=True)
    result["tokens_per_second"] = tokens / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.dtype, args.lora_rank)))
        return
    results = {}
    for arm in ARMS:
        results[arm] = in_fresh_process(__file__, ["--one", arm, "--device", args.device, "--dtype", args.dtype,
                                                   "--lora-rank", str(args.lora_rank)])
        print(json.dumps({arm: results[arm]}), file=sys.stderr, flush=True)
    print(f"\nstep benchmark: device {args.device}, {args.dtype}, 4 x 128 tokens per step, "
          f"LoRA rank {args.lora_rank}\n")
    print("| arm | step time (s) | tokens/s | peak above baseline (MiB) |")
    print("|---|---|---|---|")
    for arm, r in results.items():
        if "error" in r:
            print(f"| {arm} | - | - | {r['error']} |")
        else:
            print(f"| {arm} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | "
                  f"{r['peak_above_baseline_bytes'] / 2**20:.1f} |")
    if any("error" in r for r in results.values()):
        return
    t = {arm: r["seconds"] for arm, r in results.items()}
    m = {arm: r["peak_above_baseline_bytes"] for arm, r in results.items()}
    print("\n| ratio | measured | target |")
    print("|---|---|---|")
    print(f"| live Neo time / (LoRA-SFT + teacher forward) | {t['neo_live'] / (t['lora_sft'] + t['teacher_fwd']):.3f} "
          f"| <= 1.05 |")
    print(f"| cached Neo time / LoRA-SFT | {t['neo_cache'] / t['lora_sft']:.3f} | <= 1.10 |")
    print(f"| Neo / full KD, memory | {m['neo_live'] / m['full_kd']:.3f} | <= 0.6 |")
    print(f"| Neo / full KD, time | {t['neo_live'] / t['full_kd']:.3f} | <= 0.75 |")


if __name__ == "__main__":
    main()
