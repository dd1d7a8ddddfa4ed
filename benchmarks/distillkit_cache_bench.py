"""Teacher cache bytes per token and error: llmneo's compact and exact layouts against DistillKit's compressor.

Sizes: a tiny Llama pair (`llmneo.demo.tiny`) whose tokenizer has Llama 3's 128,256 entries (the tests'
320-token BPE plus placeholder tokens, so `llmneo cache` codes ids below V = 128,256), and `--examples` alpaca
rows whose replies repeat one of the tests' replies 12 times (cutoff_len 256). `llmneo cache` (a subprocess,
float32 teacher) writes top-k caches at k = 64 and 128 in `cache_format: compact` and `exact`; B/token is all the
cache's files ÷ its rows (response tokens), with shard bytes ÷ rows beside it. DistillKit's row is the byte
count of its encoded rows at the same V (equal to its config.total_bits ÷ 8).

Error: on the tests' pair (tests/conftest.py: V = 320, teacher head × 40) and a flatter teacher (head × 4),
against a float32 `cache_format: exact` cache at the same k:
  llmneo compact   `llmneo cache` with cache_format: compact
  DistillKit       the exact cache's rows through DistillKit's encode → decode (below), written back as an
                   exact-layout llmneo cache: float32 log-probs, the exact cache's index.json unchanged (so the
                   same fingerprint, offsets and shard ranges), rows re-sorted by decoded log-prob, and
                   tail = log(max(1 − Σ decoded p, 0)), as DistillKit's loss clamps the missing mass to [0, 1]
(a) per stored entry (matched by id): max |log-prob error|, and max over rows of Σ p·|error| (p exact);
(b) `llmneo train`, `--steps` steps with the tests' base settings (LoRA rank 4, batch 4, cutoff_len 64, seed 0)
from the exact cache and from the other: max over steps of |kd_loss − exact's| ÷ exact's, and max |adapter
weight difference| after the last step.

DistillKit's compressor does not install here (`pip download distillkit`: no distribution), so
`DistillKitLayout` reimplements distillkit/compression (compressor.py, monotonic_logprobs.py, bitpack.py,
config.py of github.com/arcee-ai/DistillKit at a61c2e7) for its README's two settings (no residual bins, no
delta encoding, no error diffusion): top-k sorted by log-prob; ids bit-packed MSB first at ceil(log2 V) bits in
rank order; the first exact_k log-probs in bfloat16; ranks exact_k+1..k as a least-squares fit of the
log-probs themselves over x = 0, 1, ..., k − exact_k − 1 (normalize_t defaults to false), solved as DistillKit
does through an SVD pseudo-inverse in float32 (singular values under 1e-5 dropped), coefficients float32.
Decoding evaluates the fit in float32; DistillKit's `fit + residual` and `torch.cat` promote its bfloat16 parts,
so the fitted ranks come back in float32 and the exact ones as bfloat16 values.

    python benchmarks/distillkit_cache_bench.py            # sizes at V = 128,256 (64 examples), error runs
    python benchmarks/distillkit_cache_bench.py --quick    # 8 examples, 4 training steps: a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ALPACA_ROWS  # noqa: E402  (the tests' prompts and replies)

LLAMA3_VOCAB = 128_256


@dataclass(frozen=True)
class DistillKitLayout:
    """DistillKit's `DistributionQuantizationConfig` for its README's settings (no residual bins)."""

    name: str
    k: int
    exact_k: int
    terms: tuple  # ints are powers of x, "sqrt" is sqrt(x)
    work: torch.dtype = torch.float32  # DistillKit solves in float64 only when handed float64 log-probs

    def id_bits(self, vocab: int) -> int:
        return math.ceil(math.log2(vocab))  # config.total_bits: ceil(log2 d)

    def logprob_bytes(self) -> int:
        return math.ceil((self.exact_k * 16 + len(self.terms) * 32) / 8)  # bfloat16 exact, float32 terms

    def row_bytes(self, vocab: int) -> int:
        return math.ceil(self.k * self.id_bits(vocab) / 8) + self.logprob_bytes()

    def _design(self, count: int) -> torch.Tensor:
        x = torch.arange(count, dtype=torch.float32)
        return torch.stack([x.sqrt() if term == "sqrt" else x ** term for term in self.terms], dim=-1)  # (t, n)

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
        """(M, k) top-k ids and float32 log-probs (any order) → DistillKit's two byte tensors per row."""
        values, order = logprobs.float().sort(dim=-1, descending=True)
        ids = ids.long().gather(-1, order)
        exact = values[:, :self.exact_k].to(torch.bfloat16).view(torch.uint8)  # (M, 2 exact_k)
        rest = values[:, self.exact_k:self.k].to(self.work)  # (M, t)
        u, s, vh = torch.linalg.svd(self._design(rest.shape[1]).to(self.work), full_matrices=False)  # its pinv
        inverse = torch.where(s > 1e-5, 1 / s, torch.zeros_like(s))
        coeffs = (vh.T @ (inverse[:, None] * (u.T @ rest.T))).T.float().contiguous()  # (M, n) stored float32
        width = self.id_bits(vocab)
        bits = ((ids[:, :, None] >> torch.arange(width - 1, -1, -1)) & 1).reshape(len(ids), -1)
        bits = torch.nn.functional.pad(bits, (0, -bits.shape[1] % 8)).view(len(ids), -1, 8)
        packed = (bits * (1 << torch.arange(7, -1, -1))).sum(-1).to(torch.uint8)  # MSB first, as bitpack.py
        return {"compressed_logprobs": torch.cat([exact, coeffs.view(torch.uint8)], dim=-1),
                "bytepacked_indices": packed}

    def decode(self, stored: dict[str, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log-probs float32) in DistillKit's rank order: exact ranks bfloat16 values, fitted ranks float32."""
        raw = stored["compressed_logprobs"]
        exact = raw[:, :2 * self.exact_k].contiguous().view(torch.bfloat16)
        coeffs = raw[:, 2 * self.exact_k:].contiguous().view(torch.float32)
        fit = (self._design(self.k - self.exact_k)[None] * coeffs[:, None, :]).sum(-1)  # (M, t) float32
        logprobs = torch.cat([exact.float(), fit], dim=-1)
        width = self.id_bits(vocab)
        bits = ((stored["bytepacked_indices"].long()[:, :, None] >> torch.arange(7, -1, -1)) & 1).reshape(len(raw), -1)
        ids = (bits[:, :self.k * width].view(len(raw), self.k, width) << torch.arange(width - 1, -1, -1)).sum(-1)
        return ids, logprobs


RECOMMENDED = DistillKitLayout("DistillKit recommended", 128, 16, (0, 1, 2, 3, 4, "sqrt"))
BUDGET = DistillKitLayout("DistillKit budget", 50, 1, (0, 1, "sqrt"))  # its README's budget pick: 3 terms
# The recommended layout, bytes unchanged, with the fit solved in float64 (DistillKit does so for float64 input;
# its capture hands it float32): how much of its error is the float32 solve, not the layout
RECOMMENDED_F64 = DistillKitLayout("DistillKit recommended, fit solved in float64", 128, 16, (0, 1, 2, 3, 4, "sqrt"),
                                   torch.float64)


def distillkit_codec(layout: DistillKitLayout, vocab: int, src: str | None):
    """(encode, decode) for `layout`: DistillKit's own LogprobCompressor imported from the checkout `src`
    (its distillkit/ folder; it needs torch and pydantic only), else the reimplementation above."""
    if src is None:
        return ((lambda ids, logprobs: layout.encode(ids, logprobs, vocab)),
                (lambda stored: layout.decode(stored, vocab)))
    sys.path.insert(0, src)
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    compressor = LogprobCompressor(config=DistributionQuantizationConfig(
        d=vocab, k=layout.k, exact_k=layout.exact_k, exact_dtype="bfloat16", polynomial_terms=list(layout.terms),
        term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False))
    return ((lambda ids, logprobs: compressor.compress_from_sparse(ids, logprobs.to(layout.work))),
            (lambda stored: tuple(t.float() if t.is_floating_point() else t
                                  for t in compressor.decompress_to_sparse(stored))))


def llmneo(args: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "llmneo", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        raise SystemExit(f"llmneo {args[0]} failed (exit {code}); see {log}")


def write_config(path: Path, values: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return str(path)


def build_pair(root: Path, head_scale: float, vocab: int | None = None) -> dict:
    """The tests' pair (conftest.py: student hidden 32 × 2 layers, teacher hidden 48 × 3 with its vocabulary
    padded to a multiple of 64, head × `head_scale`); with `vocab`, the tokenizer is topped up with placeholder
    tokens to `vocab` entries."""
    from llmneo.demo import tiny

    tokenizer = tiny.build_tokenizer()
    if vocab:
        tokenizer.add_tokens([f"<|placeholder_{i}|>" for i in range(vocab - len(tokenizer))])
        assert len(tokenizer) == vocab, len(tokenizer)
    student = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = tiny.build_model(tokenizer, hidden_size=48, num_layers=3, seed=2,
                               vocab_size=len(tokenizer) + 64 - len(tokenizer) % 64)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(head_scale)
    return {"student": str(tiny.save_pair(student, tokenizer, root / "student")),
            "teacher": str(tiny.save_pair(teacher, tokenizer, root / "teacher")), "vocab": len(tokenizer)}


def write_data(path: Path, examples: int, repeat: int) -> str:
    rows = [{**row, "output": " ".join([row["output"]] * repeat)}
            for row in (ALPACA_ROWS * (examples // len(ALPACA_ROWS) + 1))[:examples]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cache(root: Path, base: dict, k: int, layout: str) -> Path:
    name = f"cache-{layout}-k{k}"
    values = {**base, "teacher_cache": str(root / name), "teacher_topk": k, "cache_format": layout,
              "overwrite_output_dir": True}
    llmneo(["cache", write_config(root / f"{name}.yaml", values)], root / f"{name}.log")
    return root / name


def cache_rows(directory: Path) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, ids, log-probs, tail) of every row of a cache, decoded by llmneo whatever its layout."""
    from llmneo.cache import shards

    index, rows = shards.all_rows(directory)
    return index, rows.ids, rows.logprobs, rows.tail


def entry_error(exact: tuple, ids: torch.Tensor, logprobs: torch.Tensor) -> dict:
    """Per-entry error of (ids, log-probs) against the exact cache's rows, entries matched by id."""
    _, exact_ids, exact_lp, _ = exact
    a_ids, a_order = exact_ids.sort(dim=1)
    b_ids, b_order = ids.long().sort(dim=1)
    same = (a_ids == b_ids).all(dim=1)
    reference = exact_lp.gather(1, a_order)[same]
    error = (logprobs.float().gather(1, b_order)[same] - reference).abs()
    return {"rows": len(same), "id_mismatch_rows": int((~same).sum()), "max_abs": float(error.max()),
            "max_p_weighted": float((reference.exp() * error).sum(dim=1).max())}


def distillkit_cache(exact_dir: Path, layout: DistillKitLayout, target: Path, vocab: int,
                     src: str | None) -> tuple[Path, dict]:
    """The exact cache's rows through DistillKit's encode → decode, written as an exact-layout llmneo cache with
    the same index.json; and the per-entry error."""
    from llmneo.cache import shards
    from llmneo.loss.rows import SparseRows

    exact = cache_rows(exact_dir)
    index, ids, logprobs, _ = exact
    encode, decode = distillkit_codec(layout, vocab, src)
    stored = encode(ids, logprobs)
    assert stored["compressed_logprobs"].shape[1] + stored["bytepacked_indices"].shape[1] == layout.row_bytes(vocab)
    back_ids, back_lp = decode(stored)
    back_lp, order = back_lp.sort(dim=1, descending=True, stable=True)  # llmneo's rows are in rank order
    back_ids = back_ids.gather(1, order)
    mass = back_lp.exp().sum(dim=1)
    tail = torch.log((1 - mass).clamp_min(0))  # DistillKit: leftover = (1 - Σp).clamp(0, 1)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for shard in index["shards"]:
        part = slice(shard["start"], shard["end"])
        shards.save_shard(target / shard["file"], [SparseRows(back_ids[part], back_lp[part], tail[part])],
                          torch.float32)
    (target / "index.json").write_text((exact_dir / "index.json").read_text())
    return target, {**entry_error(exact, back_ids, back_lp), "rows_mass_over_1": int((mass >= 1).sum()),
                    "row_bytes": layout.row_bytes(vocab)}


def train(root: Path, base: dict, cache: Path, name: str) -> Path:
    out = root / f"train-{name}"
    values = {**base, "output_dir": str(out), "teacher_cache": str(cache), "teacher_model_name_or_path": None,
              "overwrite_output_dir": True}
    llmneo(["train", write_config(root / f"train-{name}.yaml", values)], root / f"train-{name}.log")
    return out


def training_error(reference: Path, other: Path) -> dict:
    from safetensors.torch import load_file

    def kd(out: Path) -> list[float]:
        return [json.loads(line)["kd_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = kd(reference), kd(other)
    assert len(a) == len(b) > 0
    wa, wb = (load_file(str(out / "adapter_model.safetensors")) for out in (reference, other))
    return {"kd_rel": max(abs(y - x) / abs(x) for x, y in zip(a, b)), "kd_range": (min(a), max(a)),
            "weights": max(float((wa[n] - wb[n]).abs().max()) for n in wa),
            "weight_scale": max(float(w.abs().max()) for w in wa.values())}


def sizes(root: Path, examples: int) -> list[dict]:
    from llmneo.cache import compact

    pair = build_pair(root / "pair", 40.0, LLAMA3_VOCAB)
    base = {"model_name_or_path": pair["student"], "teacher_model_name_or_path": pair["teacher"],
            "dataset": write_data(root / "train.jsonl", examples, 12), "cutoff_len": 256, "seed": 0,
            "output_dir": str(root / "unused")}
    found = []
    for k in (64, 128):
        for layout in ("compact", "exact"):
            cache = make_cache(root, base, k, layout)
            index = json.loads((cache / "index.json").read_text())
            files = sum(f.stat().st_size for f in cache.iterdir())
            shard_bytes = sum((cache / s["file"]).stat().st_size for s in index["shards"])
            found.append({"layout": f"llmneo {layout}", "k": k, "rows": index["rows"], "total": files / index["rows"],
                          "shards": shard_bytes / index["rows"],
                          "formula": compact.row_bytes(k, LLAMA3_VOCAB) if layout == "compact" else 8 * k + 4})
    for layout in (RECOMMENDED, BUDGET):  # bytes of DistillKit's encoded rows at this V
        probe = layout.encode(torch.randint(0, LLAMA3_VOCAB, (4, layout.k)), -torch.rand(4, layout.k) * 20,
                              LLAMA3_VOCAB)
        found.append({"layout": f"{layout.name} (exact_k {layout.exact_k}, {len(layout.terms)} terms)",
                      "k": layout.k, "rows": None, "total": None, "shards": sum(t.shape[1] for t in probe.values()),
                      "formula": layout.row_bytes(LLAMA3_VOCAB)})
    return found


def errors(root: Path, head_scale: float, steps: int, src: str | None) -> list[dict]:
    from llmneo.cache import compact

    pair = build_pair(root / "pair", head_scale)
    base = {"model_name_or_path": pair["student"], "teacher_model_name_or_path": pair["teacher"],
            "dataset": write_data(root / "train.jsonl", len(ALPACA_ROWS), 1), "lora_rank": 4,
            "per_device_train_batch_size": 4, "max_steps": steps, "logging_steps": 1, "cutoff_len": 64, "seed": 0,
            "save_steps": 10**6, "plot_loss": False, "output_dir": str(root / "unused")}
    references: dict[int, tuple[Path, Path]] = {}

    def reference(k: int) -> tuple[Path, Path]:
        if k not in references:
            cache = make_cache(root, base, k, "exact")
            references[k] = cache, train(root, base, cache, f"exact-k{k}")
        return references[k]

    found = []
    for k in (50, 64, 128):
        exact_dir, exact_run = reference(k)
        cache = make_cache(root, base, k, "compact")
        measured = entry_error(cache_rows(exact_dir), *cache_rows(cache)[1:3])
        found.append({"layout": "llmneo compact", "k": k, **measured, "row_bytes": compact.row_bytes(k, pair["vocab"]),
                      **training_error(exact_run, train(root, base, cache, f"compact-k{k}"))})
    for number, layout in enumerate((RECOMMENDED, RECOMMENDED_F64, BUDGET)):
        exact_dir, exact_run = reference(layout.k)
        cache, measured = distillkit_cache(exact_dir, layout, root / f"cache-distillkit-{number}", pair["vocab"], src)
        found.append({"layout": layout.name, "k": layout.k, **measured,
                      **training_error(exact_run, train(root, base, cache, f"distillkit-{number}"))})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="examples of the V = 128,256 size runs")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the error runs")
    parser.add_argument("--quick", action="store_true", help="8 examples, 4 steps")
    parser.add_argument("--distillkit-src", metavar="DIR",
                        help="a DistillKit checkout: encode and decode with its own LogprobCompressor instead of the "
                             "reimplementation (it needs torch and pydantic only)")
    parser.add_argument("--workdir", help="keep models, caches and runs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.steps = 8, 4
    with tempfile.TemporaryDirectory(prefix="llmneo-dk-cache-") as scratch:
        root = Path(args.workdir or scratch)
        size_rows = sizes(root / "sizes", args.examples)
        print(f"\n### Bytes per response token at V = {LLAMA3_VOCAB:,} (float32 teacher, {size_rows[0]['rows']:,} "
              f"response tokens in {args.examples} examples)\n")
        print("| layout | k | B/token, all files | B/token, shards | formula (B/row) |")
        print("|---|---|---|---|---|")
        for r in size_rows:
            total = "–" if r["total"] is None else f"{r['total']:.1f}"
            print(f"| {r['layout']} | {r['k']} | {total} | {r['shards']:.1f} | {r['formula']} |", flush=True)
        for name, scale in (("the tests' pair (teacher head × 40)", 40.0), ("a flatter teacher (head × 4)", 4.0)):
            rows = errors(root / f"errors-x{scale:g}", scale, args.steps, args.distillkit_src)
            print(f"\n### Error against a float32 exact cache at the same k: {name}, V = 320, "
                  f"{rows[0]['rows']} rows, {args.steps} training steps; DistillKit rows from "
                  f"{'its own code in ' + args.distillkit_src if args.distillkit_src else 'the reimplementation'}, "
                  f"trained as an exact llmneo cache of its decoded log-probs\n")
            print("| layout | k | B/row at V = 320 | max \\|log-prob error\\| | max Σ p·\\|error\\| per row | "
                  "max kd_loss rel. error | max \\|adapter weight diff\\| | exact kd_loss range |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                note = f" ({r['rows_mass_over_1']} rows with Σp ≥ 1)" if r.get("rows_mass_over_1") else ""
                note += f" ({r['id_mismatch_rows']} rows' ids differ)" if r["id_mismatch_rows"] else ""
                print(f"| {r['layout']}{note} | {r['k']} | {r['row_bytes']} | {r['max_abs']:.3g} | "
                      f"{r['max_p_weighted']:.3g} | {r['kd_rel']:.3g} | {r['weights']:.3g} "
                      f"(\\|w\\| ≤ {r['weight_scale']:.2g}) | {r['kd_range'][0]:.4g}–{r['kd_range'][1]:.4g} |",
                      flush=True)


if __name__ == "__main__":
    main()
