"""Loss-only benchmark: CE + forward-KL over N response tokens, forward + backward, fp32, CPU or GPU.

Variants, each in --runs fresh processes:
  official  the official LLM-Neo code's loss: full [N, V] logits of both models, fp32 log_softmax /
            softmax over them (what its patched LLaMA-Factory trainer does after masking)
  llmneo    llmneo.loss.chunked.fused_loss (chunk sizes from --chunks)
  liger     Liger's LigerFusedLinearJSDLoss (beta=0, i.e. forward KL), when liger-kernel is installed

Memory, above the state once the inputs and weights exist (CUDA: max allocated above the baseline):
  tensor peak  peak of live tensor bytes (torch's allocator, from the profiler's memory events): the same
               in every run; `buffers` = tensor peak / (chunk * V * 4), the count of chunk x V fp32 buffers
  RSS          peak RSS, with MALLOC_ARENA_MAX=1 in each child unless set already. It still moves from run
               to run where a chunk x V buffer is under glibc's 32 MiB ceiling for mmap (V = 32k, chunk 256):
               freed blocks stay in the heap. MALLOC_MMAP_THRESHOLD_=131072 (passed on to the children)
               makes every such block mmapped and returned at free, and RSS then equals the tensor peak.
Each figure is the median over the runs, with the min-max spread; time is the median of the runs' medians.

    python benchmarks/loss_bench.py [--tokens 4096] [--hidden 512] [--vocab 32000 128256] [--chunks 256 1024 4096]
                                    [--runs 3] [--variants official llmneo liger]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process, measure, measure_cuda, tensor_peak  # noqa: E402

VARIANTS = ("official", "llmneo", "liger")


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
        from llmneo.loss.chunked import fused_loss
        from llmneo.loss.divergences import KDSettings
        from llmneo.loss.rows import DenseRows
        from llmneo.loss.spec import LossSpec

        settings = KDSettings("fkl", temperature=1.0, beta=0.5, skew=0.1)

        def step():
            student_h.grad = None
            rows = DenseRows(teacher_h, lambda h: h @ teacher_w.T, vocab)
            loss, _, _ = fused_loss(student_h, labels, lambda h: h @ student_w.T, [], rows,
                                    LossSpec(vocab, 0.5, settings, chunk))
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
        result = measure_cuda(step)
        return {**result, "tensor_peak_bytes": result["peak_above_baseline_bytes"]}  # max allocated: tensor bytes
    result = measure(step, repeats=2)  # RSS first, so the profiler's own bookkeeping is not in it
    return {**result, **tensor_peak(step)}


def _spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[0], ordered[-1]


def _mib(values: list[int]) -> str:
    median, low, high = _spread([v / 2**20 for v in values])
    return f"{median:.1f} ({low:.1f}–{high:.1f})"


def _ratio(runs: list[int], official: list[int]) -> str:
    """Median ratio, and the worst case: this variant's largest run over the official's smallest."""
    return f"{_spread(runs)[0] / _spread(official)[0]:.3f} (≤ {max(runs) / max(min(official), 1):.3f})"


def print_table(rows: list[dict], vocabs: list[int]) -> None:
    print("| V | variant | chunk | time (s) | tensor peak (MiB) | buffers | vs official (tensor) | "
          "RSS, 1 arena (MiB) | vs official (RSS) | vs official (time) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vocab in vocabs:
        base = next((r for r in rows if r["vocab"] == vocab and r["variant"] == "official"), None)
        for r in (r for r in rows if r["vocab"] == vocab):
            if r["errors"]:
                print(f"| {vocab} | {r['variant']} | {r['chunk']} | - | {r['errors'][0]} | - | - | - | - | - |")
                continue
            tensor = [run["tensor_peak_bytes"] for run in r["runs"]]
            rss = [run["peak_above_baseline_bytes"] for run in r["runs"]]
            seconds = _spread([run["seconds"] for run in r["runs"]])[0]
            buffers = f"{_spread(tensor)[0] / (r['chunk'] * vocab * 4):.2f}" if r["chunk"] != "-" else "-"
            vs_tensor = vs_rss = vs_time = "-"
            if base is not None and not base["errors"]:
                vs_tensor = _ratio(tensor, [run["tensor_peak_bytes"] for run in base["runs"]])
                vs_rss = _ratio(rss, [run["peak_above_baseline_bytes"] for run in base["runs"]])
                vs_time = f"{seconds / _spread([run['seconds'] for run in base['runs']])[0]:.2f}"
            print(f"| {vocab} | {r['variant']} | {r['chunk']} | {seconds:.3f} | {_mib(tensor)} | {buffers} | "
                  f"{vs_tensor} | {_mib(rss)} | {vs_rss} | {vs_time} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant (median and spread)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="a subset, e.g. to run the large official one on its own (ratios need it)")
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
    # One glibc arena: RSS then repeats from run to run (see the docstring); an explicit setting wins.
    child_env = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}
    rows = []
    for vocab in args.vocab:
        variants = [("official", 0)] + [("llmneo", c) for c in args.chunks] + ([("liger", 1024)] if have_liger else [])
        variants = [(variant, chunk) for variant, chunk in variants if variant in args.variants]
        for variant, chunk in variants:
            row = {"vocab": vocab, "variant": variant, "chunk": chunk or "-", "runs": [], "errors": []}
            for _ in range(args.runs):  # one variant's runs back to back; never two big processes at once
                result = in_fresh_process(__file__, ["--one", variant, str(vocab), "--chunk", str(chunk), "--tokens",
                                                     str(args.tokens), "--hidden", str(args.hidden), "--device",
                                                     args.device], env=child_env)
                if "error" in result:
                    row["errors"].append(result["error"])
                else:
                    row["runs"].append(result)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"} | result), file=sys.stderr, flush=True)
            rows.append(row)
    malloc = " ".join(f"{k}={v}" for k, v in sorted({**os.environ, **child_env}.items()) if k.startswith("MALLOC_"))
    print(f"\nN = {args.tokens} tokens, H = {args.hidden}, fp32, device {args.device}, fwd + bwd per step; "
          f"{args.runs} fresh processes per row, median (min–max); {malloc}\n")
    print_table(rows, args.vocab)


if __name__ == "__main__":
    main()
