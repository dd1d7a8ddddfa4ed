"""Loss-only benchmark: CE + forward-KL over N response tokens, forward + backward, fp32, CPU or GPU.

Variants, each in a fresh process:
  official  the official LLM-Neo code's loss: full [N, V] logits of both models, fp32 log_softmax /
            softmax over them (what its patched LLaMA-Factory trainer does after masking)
  llmneo    llmneo.chunked.fused_loss (chunk sizes from --chunks)
  liger     Liger's LigerFusedLinearJSDLoss (beta=0, i.e. forward KL), when liger-kernel is installed

Peak memory is the RSS (CUDA: max allocated) above the baseline taken once the inputs and weights exist.

    python benchmarks/loss_bench.py [--tokens 4096] [--hidden 512] [--vocab 32000 128256] [--chunks 512 1024 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process, measure, measure_cuda  # noqa: E402


def one(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(device)
    student_h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    student_w = torch.randn(vocab, hidden, device=dev) / hidden**0.5  # frozen head, as in LoRA
    teacher_h = torch.randn(tokens, hidden, device=dev)
    teacher_w = torch.randn(vocab, hidden, device=dev) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), device=dev)

    if variant == "official":
        def step():
            student_h.grad = None
            s = student_h @ student_w.T  # (N, V)
            with torch.no_grad():
                t = teacher_h @ teacher_w.T  # (N, V)
            ce = F.cross_entropy(s, labels)
            p_t = F.softmax(t, dim=-1)
            kl = (p_t * (F.log_softmax(t, dim=-1) - F.log_softmax(s, dim=-1))).sum(-1).mean()
            (0.5 * ce + 0.5 * kl).backward()
    elif variant == "llmneo":
        from llmneo.chunked import fused_loss
        from llmneo.teacher import DenseRows

        settings = {"kind": "fkl", "temperature": 1.0, "beta": 0.5, "skew": 0.1}

        def step():
            student_h.grad = None
            rows = DenseRows(teacher_h, lambda h: h @ teacher_w.T, vocab)
            loss, _, _ = fused_loss(student_h, labels, lambda h: h @ student_w.T, [], rows, vocab_size=vocab,
                                    kd_ratio=0.5, settings=settings, chunk_size=chunk)
            (loss / tokens).backward()
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0,
                                          compiled=dev.type == "cuda", chunk_size=chunk)

        def step():
            student_h.grad = None
            loss_fn(student_h, student_w, teacher_h, teacher_w, labels).backward()
    else:
        raise SystemExit(f"unknown variant {variant}")

    if dev.type == "cuda":
        return measure_cuda(step)
    return measure(step, repeats=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "VOCAB"))
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.tokens, args.hidden, int(args.one[1]), args.chunk, args.device)))
        return
    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except ImportError:
        have_liger = False
    rows = []
    for vocab in args.vocab:
        variants = [("official", 0)] + [("llmneo", c) for c in args.chunks] + ([("liger", 1024)] if have_liger else [])
        for variant, chunk in variants:
            result = in_fresh_process(__file__, ["--one", variant, str(vocab), "--chunk", str(chunk), "--tokens",
                                                 str(args.tokens), "--hidden", str(args.hidden), "--device",
                                                 args.device])
            rows.append({"vocab": vocab, "variant": variant, "chunk": chunk or "-", **result})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nN = {args.tokens} tokens, H = {args.hidden}, fp32, device {args.device}, fwd + bwd per step\n")
    print("| V | variant | chunk | time (s) | peak above baseline (MiB) | vs official (mem) | vs official (time) |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        base = next(r for r in rows if r["vocab"] == vocab and r["variant"] == "official")
        for r in (r for r in rows if r["vocab"] == vocab):
            if "error" in r:
                print(f"| {vocab} | {r['variant']} | {r['chunk']} | - | {r['error']} | - | - |")
                continue
            mem = r["peak_above_baseline_bytes"] / 2**20
            ratio_mem = ratio_time = "-"
            if "error" not in base:
                ratio_mem = f"{r['peak_above_baseline_bytes'] / max(base['peak_above_baseline_bytes'], 1):.3f}"
                ratio_time = f"{r['seconds'] / base['seconds']:.2f}"
            print(f"| {vocab} | {r['variant']} | {r['chunk']} | {r['seconds']:.3f} | {mem:.1f} | {ratio_mem} | "
                  f"{ratio_time} |")


if __name__ == "__main__":
    main()
