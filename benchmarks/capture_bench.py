"""Cache capture throughput: `llmneo cache` with the teacher in-process against the same teacher behind an
endpoint (tests/vllm_standin.py, which follows vLLM's /v1/completions prompt_logprobs protocol, on CPU).

Both write the same top-k cache for the same tokenized examples; the table gives response tokens per second
and bytes per token. The stand-in runs the teacher one prompt at a time with full-vocabulary log-softmax in
Python, so its figure measures llmneo's client (requests in flight, JSON parsing, shard writing) against a
slow server, not vLLM's speed; with a GPU, point --endpoint at a real `vllm serve` instead.

    python benchmarks/capture_bench.py [--examples 64] [--k 20] [--threads 2] [--endpoint URL --model NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--endpoint", default=None, help="a running vLLM server (…/v1); default: the stand-in")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llmneo import cli
    from llmneo.demo import tiny

    root = Path(tempfile.mkdtemp(prefix="llmneo-capture-bench-"))
    tokenizer = tiny.build_tokenizer()
    student = tiny.save_pair(tiny.build_model(tokenizer, hidden_size=64, num_layers=2, seed=1), tokenizer, root / "s")
    teacher = tiny.save_pair(tiny.build_model(tokenizer, hidden_size=128, num_layers=4, seed=2), tokenizer, root / "t")
    words = "the quick brown fox jumps over a lazy dog while teachers distil students".split()
    rows = [{"instruction": " ".join(words[(i + j) % len(words)] for j in range(12)), "input": "",
             "output": " ".join(words[(3 * i + j) % len(words)] for j in range(24))} for i in range(args.examples)]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"model_name_or_path": str(student), "dataset": str(data), "teacher_topk": args.k, "cutoff_len": 256,
            "per_device_eval_batch_size": 8}

    def run(name: str, values: dict) -> dict:
        config = root / f"{name}.yaml"
        config.write_text(json.dumps({**base, **values, "teacher_cache": str(root / name)}))
        started = time.perf_counter()
        assert cli.main(["cache", str(config)]) == 0
        seconds = time.perf_counter() - started
        index = json.loads((root / name / "index.json").read_text())
        size = sum(f.stat().st_size for f in (root / name).iterdir())
        return {"source": name, "seconds": seconds, "tokens": index["rows"], "tokens_per_second": index["rows"] / seconds,
                "bytes_per_token": size / index["rows"]}

    results = [run("in_process", {"teacher_model_name_or_path": str(teacher)})]
    if args.endpoint:
        results.append(run("endpoint", {"teacher_endpoint": args.endpoint, "teacher_endpoint_model": args.model}))
    else:
        from vllm_standin import StandIn

        with StandIn(str(teacher), tokenizer, max_logprobs=max(20, args.k)) as server:
            results.append(run("endpoint_standin", {"teacher_endpoint": server.url}))
    print(f"\n{args.examples} examples, k = {args.k}, torch threads {args.threads}\n")
    print("| source | seconds | response tokens | tokens/s | bytes per token |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['source']} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens_per_second']:.0f} | "
              f"{r['bytes_per_token']:.0f} |")


if __name__ == "__main__":
    main()
