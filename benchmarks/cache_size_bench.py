"""Teacher cache bytes per token and error: llmneo's compact rows (format v2) against the exact layout and
against DistillKit's compressor, reimplemented from its code and README.

Prints three markdown tables (docs/benchmarks.md section 5 holds them):
1. Sizes at V = 128,256: `llmneo cache` (compact and exact, float32 teacher, k = 64 and 128) on a tiny Llama
   pair whose tokenizer has 128,256 entries (a byte-level BPE trained on synthetic words, so the teacher's
   top-k ids spread over the whole vocabulary), all files ÷ rows and shards ÷ rows; and the codecs measured
   directly on synthetic top-k rows over V = 128,256 (compact.encode's tensors; DistillKit's byte count).
2. DistillKit's two README settings: bytes per token from its own formula (config.total_bits).
3. Error against a float32 exact cache at the same k, on the tests' pair (tests/conftest.py) and a flatter
   teacher (head x4 instead of x40), 20 steps with the tests' base settings: per-entry log-prob error,
   Σ p·|Δ log p| per row, kd_loss relative error per step and adapter weights after the run.

DistillKit (github.com/arcee-ai/DistillKit, distillkit/compression/: compressor.py, monotonic_logprobs.py,
config.py; not installable here) is followed step by step: entries sorted by log-prob, ids bit-packed at
ceil(log2 V) bits (lossless), the first exact_k log-probs kept in bfloat16, ranks exact_k+1..k replaced by a
least-squares fit (its SVD pseudo-inverse, singular values under 1e-5 dropped, in float32 as its capture runs
it, and in float64 as a best case) over x = 0, 1, ..., k − exact_k − 1 (its default normalize_t: false),
coefficients float32, delta_encoding false, no residual bins; decoding evaluates the fit in float32 (exact
ranks bfloat16, fitted ranks float32: its `fit + residual` and `torch.cat` promote). The tail llmneo reads
is log(1 − Σ exp(decoded top-k)), the sum clamped below 1. Its rows are written as an exact-layout llmneo
cache (a copy of the float32 cache with ids/logprobs/tail rewritten), so training reads them unchanged.

    python benchmarks/cache_size_bench.py            # all three tables (about 25 s on 2 CPU cores)
    python benchmarks/cache_size_bench.py --quick    # a smoke run: fewer rows, 3 steps, the peaked teacher
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                   ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ALPACA_ROWS  # noqa: E402  (the tests' 8 rows, so table 3 is the tests' run)

from llmneo import cli  # noqa: E402
from llmneo.cache import compact, shards  # noqa: E402
from llmneo.loss.rows import SparseRows  # noqa: E402

LLAMA_V = 128_256
# --- DistillKit's compressor, reimplemented ---------------------------------------------------------------------

_BIT = torch.arange(8, dtype=torch.uint8)


def _pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """(M, n) non-negative integers → (M, ceil(n·width / 8)) uint8, `width` bits each, little-endian bits."""
    count, n = values.shape
    bits = ((values[:, :, None] >> torch.arange(width)) & 1).reshape(count, n * width).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -(n * width) % 8))
    return (bits.view(count, -1, 8) << _BIT).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    bits = ((packed[:, :, None] >> _BIT) & 1).reshape(packed.shape[0], -1)[:, :n * width].long()
    return (bits.view(-1, n, width) << torch.arange(width)).sum(dim=-1)


@dataclass(frozen=True)
class DistillKitLayout:
    """One DistillKit `logprob_compressor` setting (exact_dtype bfloat16, term_dtype float32, delta_encoding
    false, no residual bins): what compress_from_sparse stores and decompress_to_sparse gives back."""

    name: str
    k: int
    exact_k: int
    terms: tuple
    solve: torch.dtype = torch.float32  # DistillKit solves in its input's dtype: float32 from its capture

    def row_bytes(self, vocab: int) -> int:
        """Bytes per token by its config.total_bits: k ids at ceil(log2 V) bits rounded up to bytes, exact_k
        bfloat16 values and float32 coefficients."""
        return (self.k * math.ceil(math.log2(vocab)) + 7) // 8 + math.ceil((self.exact_k * 16 + len(self.terms) * 32) / 8)

    def design(self) -> torch.Tensor:
        x = torch.arange(self.k - self.exact_k, dtype=torch.float32)  # normalize_t false: x = 0, 1, ..., t − 1
        return torch.stack([x.sqrt() if term == "sqrt" else x ** term for term in self.terms], dim=-1)

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
        """(M, k) ids and log-probs → byte tensors: ids bit-packed in rank order, exact values, coefficients."""
        values, order = logprobs.float().sort(dim=1, descending=True)
        ids = ids.long().gather(1, order)
        exact = values[:, :self.exact_k].to(torch.bfloat16).contiguous()
        rest = values[:, self.exact_k:self.k]
        # its SVD pseudo-inverse (singular values under 1e-5 dropped); in float32, as DistillKit runs it on its
        # capture's float32 rows, x⁴ up to 1.2e8 spoils the fit at k = 128 (squared error ~400 per row instead
        # of ~0.07); solve=float64 gives the least-squares optimum, its best case
        u, s, vh = torch.linalg.svd(self.design().to(self.solve), full_matrices=False)
        inverse = torch.where(s > 1e-5, 1 / s, torch.zeros_like(s))
        coeffs = ((vh.T * inverse) @ (u.T @ rest.T.to(self.solve))).T.float().contiguous()  # stored float32
        return {"ids": _pack(ids, math.ceil(math.log2(vocab))), "exact": exact.view(torch.uint8),
                "coeffs": coeffs.view(torch.uint8)}

    def decode(self, stored: dict[str, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (M, k) rank order, log-probs (M, k) float32): exact ranks as stored (bfloat16), the fit
        evaluated in float32, as its decompress_monotonic_logprobs returns them."""
        exact = stored["exact"].contiguous().view(torch.bfloat16)
        coeffs = stored["coeffs"].contiguous().view(torch.float32)
        fit = coeffs @ self.design().T
        values = torch.cat([exact.float(), fit], dim=1)
        return _unpack(stored["ids"], math.ceil(math.log2(vocab)), self.k), values

    def round_trip(self, rows: SparseRows, vocab: int) -> SparseRows:
        """`rows` as DistillKit stores and reads them, with the tail llmneo reads: log(1 − Σ exp(top-k)), the sum
        clamped below 1 (a fit may sum past 1)."""
        ids, values = self.decode(self.encode(rows.ids, rows.logprobs, vocab), vocab)
        return SparseRows(ids, values, torch.log1p(-values.exp().sum(dim=1).clamp(max=1 - 1e-7)))


RECOMMENDED = DistillKitLayout("recommended", 128, 16, (0, 1, 2, 3, 4, "sqrt"))  # its README, "Logit Compression"
BUDGET = DistillKitLayout("budget", 50, 1, (0, 1, "sqrt"))
RECOMMENDED_F64 = DistillKitLayout("recommended-f64", 128, 16, RECOMMENDED.terms, torch.float64)
DK_SETTINGS = (RECOMMENDED, BUDGET)
DK_ARMS = (RECOMMENDED, RECOMMENDED_F64, BUDGET)  # table 3: as DistillKit runs it, and its best case


# --- caches through the CLI ---------------------------------------------------------------------------------------

def _cli(args: list[str]) -> None:
    if cli.main(args) != 0:
        raise SystemExit(f"llmneo {' '.join(args)} failed")


def _yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def cache_rows(folder: Path) -> SparseRows:
    """Every row of a cache, decoded by llmneo's own reader (either layout)."""
    return shards.all_rows(folder)[1]


def sizes(folder: Path) -> tuple[float, float]:
    rows = json.loads((folder / "index.json").read_text())["rows"]
    files = [f for f in folder.iterdir() if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    shard_bytes = sum(f.stat().st_size for f in files if f.name.startswith("shard-"))
    return total / rows, shard_bytes / rows


def write_dk_cache(exact: Path, target: Path, layout: DistillKitLayout, vocab: int) -> None:
    """A copy of the float32 exact cache `exact` whose rows are DistillKit's reconstruction (index.json kept)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(exact, target)
    for shard in json.loads((exact / "index.json").read_text())["shards"]:
        stored = load_file(str(exact / shard["file"]))
        back = layout.round_trip(SparseRows(stored["ids"].long(), stored["logprobs"], stored["tail"]), vocab)
        stored.update(ids=back.ids.to(torch.int32).contiguous(), logprobs=back.logprobs.float().contiguous(),
                      tail=back.tail.float().contiguous())
        save_file(stored, str(target / shard["file"]))


class uniform_codes:
    """llmneo's compact codes with uniform instead of sqrt companding (to_code / from_code swapped in-process)."""

    def __enter__(self):
        self.saved = compact.to_code, compact.from_code
        compact.to_code = lambda unit: torch.round(unit * compact.CODES).to(torch.uint8)
        compact.from_code = lambda codes: codes.float() / compact.CODES

    def __exit__(self, *exc):
        compact.to_code, compact.from_code = self.saved


# --- table 1: sizes at V = 128,256 --------------------------------------------------------------------------------

def table_sizes(root: Path, quick: bool) -> list[str]:
    from llmneo.demo import tiny

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(4, 10))) for _ in range(200_000)]
    tokenizer = tiny.build_tokenizer([" ".join(words[i:i + 50]) for i in range(0, len(words), 50)],
                                     vocab_size=LLAMA_V)
    assert len(tokenizer) == LLAMA_V, len(tokenizer)
    pair = tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=2), tokenizer,
                          root / "llama-v")
    data = root / "big.jsonl"
    count = 4 if quick else 16
    data.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(words) for _ in range(10)), "input": "",
                                        "output": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                            for _ in range(count)))
    base = {"model_name_or_path": str(pair), "teacher_model_name_or_path": str(pair), "dataset": str(data),
            "output_dir": str(root / "unused"), "cutoff_len": 256, "seed": 0}
    lines = ["| k | layout | formula B/token | `llmneo cache`: all files / rows | shards / rows | rows |",
             "|---|---|---|---|---|---|"]
    for k in (64, 128):
        for layout in ("compact", "exact"):
            folder = root / f"big-{layout}-{k}"
            _cli(["cache", _yaml(root / f"big-{layout}-{k}.yaml", {**base, "teacher_topk": k,
                                                                   "teacher_cache": str(folder),
                                                                   "cache_format": layout})])
            total, shard = sizes(folder)
            ids = cache_rows(folder).ids
            formula = compact.row_bytes(k, LLAMA_V) if layout == "compact" else 8 * k + 4
            lines.append(f"| {k} | {layout} | {formula} | {total:.1f} | {shard:.1f} | "
                         f"{json.loads((folder / 'index.json').read_text())['rows']} (ids {int(ids.min())}–"
                         f"{int(ids.max())}) |")
    lines += ["", "Codecs alone on synthetic top-k rows over V = 128,256 (top-k of randn × 3 logits):", "",
              "| k | codec | bytes of the stored tensors / row | formula |", "|---|---|---|---|"]
    count = 32 if quick else 512
    logp = torch.log_softmax(torch.randn(count, LLAMA_V, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    for k in (50, 64, 128):
        values, ids = logp.topk(k, dim=-1)
        tail = torch.logsumexp(logp.scatter(-1, ids, -math.inf), dim=-1)
        stored = compact.encode(SparseRows(ids, values, tail), LLAMA_V)
        measured = sum(t.numel() * t.element_size() for t in stored.values()) / count
        lines.append(f"| {k} | llmneo compact | {measured:.1f} | {compact.row_bytes(k, LLAMA_V)} |")
        for layout in DK_SETTINGS:
            if layout.k == k:
                stored = layout.encode(ids, values, LLAMA_V)
                measured = sum(t.shape[1] for t in stored.values())
                lines.append(f"| {k} | DistillKit {layout.name} (exact_k {layout.exact_k}, {len(layout.terms)} "
                             f"terms) | {measured} | {layout.row_bytes(LLAMA_V)} (its total_bits) |")
    return lines


# --- table 3: error against a float32 cache -----------------------------------------------------------------------

def entry_errors(reference: SparseRows, other: SparseRows) -> tuple[float, float]:
    """Max per-entry |Δ log p| and max per-row Σ p·|Δ log p| (p the reference's), entries matched by id."""
    assert torch.equal(reference.ids.sort(dim=1).values, other.ids.sort(dim=1).values)
    a = reference.logprobs.float().gather(1, reference.ids.argsort(dim=1))
    b = other.logprobs.float().gather(1, other.ids.argsort(dim=1))
    finite = torch.isfinite(a) & torch.isfinite(b)
    delta = torch.where(finite, (a - b).abs(), 0.0)
    return float(delta.max()), float((a.exp() * delta).sum(dim=1).max())


def train(root: Path, name: str, values: dict, cache: Path) -> tuple[list[dict], dict]:
    from safetensors.torch import load_file

    out = root / f"run-{name}"
    _cli(["train", _yaml(root / f"t-{name}.yaml", {**values, "teacher_model_name_or_path": None,
                                                   "teacher_cache": str(cache), "output_dir": str(out)})])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(str(out / "adapter_model.safetensors"))


def table_error(root: Path, quick: bool) -> list[str]:
    from llmneo.demo import tiny

    tokenizer = tiny.build_tokenizer()
    student = tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1), tokenizer,
                             root / "student")
    teachers = {}
    for label, head in (("peaked (head ×40)", 40.0), ("flat (head ×4)", 4.0))[:1 if quick else 2]:
        model = tiny.build_model(tokenizer, hidden_size=48, num_layers=3, seed=2,
                                 vocab_size=len(tokenizer) + 64 - len(tokenizer) % 64)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head)
        teachers[label] = tiny.save_pair(model, tokenizer, root / f"teacher-{head:g}")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    base = {"model_name_or_path": str(student), "dataset": str(data), "lora_rank": 4,
            "per_device_train_batch_size": 4, "max_steps": 3 if quick else 20, "logging_steps": 1,
            "cutoff_len": 64, "seed": 0}
    lines = [f"Vocabulary {len(tokenizer)} (model rows padded to a multiple of 64); {base['max_steps']} steps; "
             "each row against a float32 exact cache at the same k.", "",
             "| teacher | k | layout | B/token at V = 128,256 | max \\|Δ log p\\| | max Σ p·\\|Δ log p\\| | "
             "kd_loss max rel. error | adapter max \\|Δw\\| |", "|---|---|---|---|---|---|---|---|"]
    for label, teacher in teachers.items():
        for k in (50, 128):
            values = {**base, "teacher_model_name_or_path": str(teacher), "teacher_topk": k,
                      "output_dir": str(root / "unused")}
            tag = f"{teacher.name}-{k}"
            caches = {"exact": root / f"cache-{tag}-exact"}
            _cli(["cache", _yaml(root / f"c-{tag}-exact.yaml", {**values, "teacher_cache": str(caches["exact"]),
                                                                "cache_format": "exact"})])
            reference = cache_rows(caches["exact"])
            ref_metrics, ref_weights = train(root, f"{tag}-exact", values, caches["exact"])
            arms = [("llmneo compact (sqrt)", "compact", compact.row_bytes(k, LLAMA_V)),
                    ("llmneo compact (uniform)", "uniform", compact.row_bytes(k, LLAMA_V))]
            arms += [(f"DistillKit {d.name.removesuffix('-f64')} (exact_k {d.exact_k}, {len(d.terms)} terms, "
                      f"{str(d.solve).removeprefix('torch.')} solve)", d.name, d.row_bytes(LLAMA_V))
                     for d in DK_ARMS if d.k == k]
            for title, arm, size in arms:
                folder = root / f"cache-{tag}-{arm}"
                patch = uniform_codes() if arm == "uniform" else _nothing()
                with patch:  # the uniform codes must be written and read by the same patched codec
                    if arm in ("compact", "uniform"):
                        _cli(["cache", _yaml(root / f"c-{tag}-{arm}.yaml", {**values, "teacher_cache": str(folder),
                                                                           "cache_format": "compact"})])
                    else:
                        write_dk_cache(caches["exact"], folder, next(d for d in DK_ARMS if d.name == arm),
                                       json.loads((caches["exact"] / "index.json").read_text()).get("vocab")
                                       or len(tokenizer))
                    worst_entry, worst_row = entry_errors(reference, cache_rows(folder))
                    metrics, weights = train(root, f"{tag}-{arm}", values, folder)
                kd = max(abs(b["kd_loss"] - a["kd_loss"]) / abs(a["kd_loss"]) for a, b in zip(ref_metrics, metrics))
                moved = max(float((ref_weights[n] - weights[n]).abs().max()) for n in ref_weights)
                lines.append(f"| {label} | {k} | {title} | {size} | {worst_entry:.2g} | {worst_row:.2g} | "
                             f"{kd:.2g} | {moved:.2g} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rows, 3 steps, one teacher")
    parser.add_argument("--workdir", help="keep models, caches and runs here (default: a temporary directory)")
    parser.add_argument("--skip-sizes", action="store_true", help="only the error table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmneo-cache-size-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        out = []
        if not args.skip_sizes:
            out += ["### Sizes at V = 128,256 (float32 teacher)", "", *table_sizes(root, args.quick), ""]
        out += ["### DistillKit's settings (its config.total_bits)", "",
                "| setting | k | exact_k | terms | B/token at V = 128,256 | at V ≤ 65,536 (16-bit ids) |",
                "|---|---|---|---|---|---|"]
        out += [f"| {d.name} | {d.k} | {d.exact_k} | {list(d.terms)} | {d.row_bytes(LLAMA_V)} | {d.row_bytes(65_536)} |"
                for d in DK_SETTINGS]
        out += ["", "### Error against a float32 exact cache", "", *table_error(root, args.quick)]
        print("\n".join(out))


if __name__ == "__main__":
    main()
