"""On-policy distillation benchmark: generation speed with LoRA, and one on-policy step taken apart.

Builds a Llama-style pair with `llmneo.demo.tiny` (vocabulary 32,000 from a byte-level BPE trained on
synthetic words): a student of hidden 512, 8 layers (58M parameters) with LoRA rank 128 on every linear
layer (alpha 256, llmneo's `adapters.apply`; lora_B drawn at random, std 0.01, so the adapters change the
model as trained ones do), and a teacher of hidden 768, 8 layers (106M). 4 chat prompts of 57-103 tokens.
Each variant runs in a fresh process (`measure.in_fresh_process`), interleaved over `--rounds`; every
timing is given as wall time and as the process's CPU time (`time.process_time`), the latter being what
to read on a shared machine. Variants:

  gen_unmerged  `rollout.HFGenerator(..., merge_lora=False)`: PEFT's unmerged LoRA layers
  gen_shadow    `rollout.HFGenerator` as `llmneo train` builds it: merged shadow weights
                (`rollout.merged_lora`, W0 + scaling·B·A rebound for the call; its own cost reported)
  gen_merged    the same generator on a truly merged copy (`merge_and_unload` on a deep copy)
  step          `train.optimizer_step` (clipping and AdamW included) alternating an on-policy step (a
                `train.steps.RolloutSteps` with lmbda 1: generate, rebuild the batch, KD alone) with an
                off-policy Neo step (kd_ratio 0.5, live teacher) on the batch the on-policy step built;
                timers around generate, `train.accumulate`, the teacher's `rows` and its projections
                (`DenseRows` slices) split them into generate / teacher score / student forward+backward / rest
  check         (once, untimed) greedy tokens of gen_shadow == gen_merged; the student's weights bit-identical
                after shadow generation; PEFT's in-place merge() + unmerge(): its time and whether it is exact

The generation variants are greedy, 64 new tokens per prompt with no EOS (the generator's `eos` is empty,
so every row runs to 64); the step samples at temperature 1 (the config's default), also 64 tokens.

    python benchmarks/onpolicy_bench.py --threads 1 --rounds 3              # CPU, fp32 (the docs' numbers)
    python benchmarks/onpolicy_bench.py --device cuda --dtype bfloat16      # on a GPU
    python benchmarks/onpolicy_bench.py --variants gen_shadow gen_merged --rounds 5 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from measure import in_fresh_process  # noqa: E402

VARIANTS = ("gen_unmerged", "gen_shadow", "gen_merged", "step")
VOCAB = 32000
STUDENT = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1408}
TEACHER = {"hidden_size": 768, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048}
PROMPTS, NEW_TOKENS, LORA_RANK = 4, 64, 128


def build_inputs(root: Path, seed: int = 0) -> None:
    """The tokenizer and the prompts (chat-templated ids, and a dataset reply each) under `root`."""
    from llmneo.demo import tiny

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    tokenizer = tiny.build_tokenizer([" ".join(words[i:i + 50]) for i in range(0, len(words), 50)], vocab_size=VOCAB)
    assert len(tokenizer) == VOCAB, len(tokenizer)
    tokenizer.save_pretrained(root / "tokenizer")
    examples = []
    for n in range(PROMPTS):
        messages = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(20 + 5 * n))}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = tokenizer(" ".join(rng.choice(words) for _ in range(NEW_TOKENS)))["input_ids"][:NEW_TOKENS]
        examples.append({"prompt": prompt, "reply": reply + [tokenizer.eos_token_id]})
    (root / "prompts.json").write_text(json.dumps(examples))


class Timer:
    """Accumulated wall and process CPU seconds of the calls it wraps (CUDA synchronised at both ends)."""

    def __init__(self, cuda: bool):
        self.cuda, self.wall, self.cpu = cuda, 0.0, 0.0

    @contextlib.contextmanager
    def __call__(self):
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu

    def wrap(self, fn):
        def timed(*args, **kwargs):
            with self():
                return fn(*args, **kwargs)
        return timed

    def take(self) -> tuple[float, float]:
        out, self.wall, self.cpu = (self.wall, self.cpu), 0.0, 0.0
        return out

    def _sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()


def _student(root: Path, dev, dtype):
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import PreTrainedTokenizerFast

    from llmneo.config import schema
    from llmneo.demo import tiny
    from llmneo.models import adapters

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    model = tiny.build_model(tokenizer, seed=2, **STUDENT).to(dev, dtype)
    cfg = schema.load(overrides={"finetuning_type": "lora", "lora_rank": LORA_RANK, "kd_chunk_size": 256,
                                 "max_new_tokens": NEW_TOKENS})
    model = adapters.apply(model, cfg)
    draw = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter, not PEFT's B = 0 (which would make every variant the base model)
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=draw) * 0.01)
    examples = json.loads((root / "prompts.json").read_text())
    return model, tokenizer, cfg, examples


def _generator(model, tokenizer, temperature: float, merge_lora: bool = True):
    from llmneo.models import generate as rollout

    generator = rollout.HFGenerator(model, tokenizer, rollout.Sampling(NEW_TOKENS, temperature, 1.0), merge_lora)
    generator.eos = set()  # every row runs to NEW_TOKENS, so every variant generates the same number of tokens
    return generator


def _merged_copy(model):
    return copy.deepcopy(model).merge_and_unload()


def _timed_merge(timer: Timer):
    """rollout.merged_lora with its entry and exit (the shadow merge and the rebinding back) timed."""
    from llmneo.models import generate as rollout

    original = rollout.merged_lora

    @contextlib.contextmanager
    def merged_lora(model):
        context = original(model)
        with timer():
            context.__enter__()
        try:
            yield
        finally:
            with timer():
                context.__exit__(None, None, None)
    rollout.merged_lora = merged_lora


def one(variant: str, root: Path, device: str, dtype_name: str, repeats: int) -> dict:
    import torch

    dtype, dev = getattr(torch, dtype_name), torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model, tokenizer, cfg, examples = _student(root, dev, dtype)
    prompts = [torch.tensor(e["prompt"], device=dev) for e in examples]
    result = {"threads": torch.get_num_threads(),
              "student_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}
    if variant == "check":
        return {**result, **_check(model, tokenizer, prompts, cuda)}
    if variant == "step":
        return {**result, **_steps(model, tokenizer, cfg, examples, dev, dtype, repeats, cuda)}
    merge_timer = Timer(cuda)
    if variant == "gen_shadow":
        _timed_merge(merge_timer)
    target = _merged_copy(model) if variant == "gen_merged" else model
    generator = _generator(target, tokenizer, 0.0, merge_lora=variant != "gen_unmerged")
    timer = Timer(cuda)
    runs = []
    for n in range(repeats + 1):  # the first call is the warm-up
        with timer():
            replies = generator.generate(prompts)
        assert all(len(r) == NEW_TOKENS for r in replies), [len(r) for r in replies]
        runs.append((*timer.take(), *merge_timer.take()))
    keys = ("seconds", "cpu_seconds", "merge_seconds", "merge_cpu_seconds")
    return {**result, **{key: statistics.median(r[i] for r in runs[1:]) for i, key in enumerate(keys)},
            "tokens": PROMPTS * NEW_TOKENS}


def _check(model, tokenizer, prompts, cuda: bool) -> dict:
    """Tokens of the three ways to generate; the training weights before and after; in-place merge + unmerge."""
    import torch

    before = {name: (p.detach().clone(), p.data_ptr()) for name, p in model.state_dict().items()}
    tokens = {}
    for name, target, merge in (("unmerged", model, False), ("shadow", model, True),
                                ("merged", _merged_copy(model), True)):
        tokens[name] = [r.tolist() for r in _generator(target, tokenizer, 0.0, merge).generate(prompts)]
    after = model.state_dict()
    changed = [n for n, (t, ptr) in before.items() if not torch.equal(after[n], t) or after[n].data_ptr() != ptr]
    # What the shadow weights replace: PEFT's in-place merge and unmerge, timed, and how far W0 moves.
    timer = Timer(cuda)
    with timer():
        model.merge_adapter()
        model.unmerge_adapter()
    wall, cpu = timer.take()
    after = model.state_dict()
    drift = max(float((after[n] - before[n][0]).abs().max()) for n in before if "base_layer" in n)
    moved = sum(not torch.equal(after[n], before[n][0]) for n in before if "base_layer" in n)
    for name, (tensor, _) in before.items():  # put the weights back (nothing runs after this check anyway)
        after[name].copy_(tensor)
    return {"shadow_equals_merged": tokens["shadow"] == tokens["merged"],
            "unmerged_equals_merged": tokens["unmerged"] == tokens["merged"],
            "unmerged_rows_differing": sum(a != b for a, b in zip(tokens["unmerged"], tokens["merged"])),
            "weights_changed_by_generate": changed,
            "inplace_merge_unmerge_seconds": wall, "inplace_merge_unmerge_cpu_seconds": cpu,
            "inplace_base_weights_moved": moved, "inplace_max_drift": drift,
            "base_weights": sum("base_layer" in n for n in before)}


class _Fixed:
    """A step source that hands out the same micro-batch every step (the off-policy step's dataset)."""

    def __init__(self, batch=None):
        self.batch = batch

    def next_step(self):
        from llmneo.train.steps import Step

        return Step([self.batch])


def _steps(model, tokenizer, cfg, examples: list[dict], dev, dtype, repeats: int, cuda: bool) -> dict:
    import torch
    from accelerate import Accelerator

    from llmneo.data import dataset as data
    from llmneo.demo import tiny
    from llmneo.loss import rows
    from llmneo.loss.divergences import KDSettings
    from llmneo.loss.spec import LossSpec
    from llmneo.models import generate as rollout
    from llmneo.teachers.aligner import IdentityAligner
    from llmneo.teachers.live import LiveTeacher
    from llmneo.train import checkpoint, loop
    from llmneo.train import steps as step_source

    dataset = data.collate([{"input_ids": e["prompt"] + e["reply"], "labels": [-100] * len(e["prompt"]) + e["reply"]}
                            for e in examples], tokenizer.pad_token_id)
    dataset = {k: v.to(dev) for k, v in dataset.items()}
    teacher_model = tiny.build_model(tokenizer, seed=1, **TEACHER).to(dev, dtype).requires_grad_(False).eval()
    teacher = LiveTeacher(teacher_model, VOCAB)
    timers = {name: Timer(cuda) for name in ("step", "generate", "merge", "accumulate", "teacher")}
    teacher.rows = timers["teacher"].wrap(teacher.rows)
    rows.DenseRows.__getitem__ = timers["teacher"].wrap(rows.DenseRows.__getitem__)  # the teacher's projection
    loop.accumulate = timers["accumulate"].wrap(loop.accumulate)
    _timed_merge(timers["merge"])
    generator = _generator(model, tokenizer, cfg.temperature)
    # RolloutSteps asks for a step's replies at once (generate_many: one merge of the LoRA weights per step)
    generator.generate_many = timers["generate"].wrap(generator.generate_many)
    on_policy = step_source.RolloutSteps(_Fixed(dataset), generator, None, lmbda=1.0, seed=0,
                                         pad_token_id=tokenizer.pad_token_id, device=dev)
    off_policy = _Fixed()
    rollouts = on_policy.next_step

    def next_step():  # the off-policy step then trains on exactly the tokens this step generated
        step = rollouts()
        off_policy.batch = step.micro[0]
        return step
    on_policy.next_step = next_step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    setup = SimpleNamespace(accelerator=Accelerator(cpu=dev.type == "cpu"), model=model, teacher=teacher, config=cfg,
                            loss_spec=LossSpec(VOCAB, 0.5, KDSettings.from_config(cfg), cfg.kd_chunk_size),
                            aligner=IdentityAligner(), steps_in_backward=False, guards_non_finite=True, params=params,
                            optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                            progress=checkpoint.Progress(), out=Path(tempfile.gettempdir()), steps=None)
    model.train()
    runs = {"on": [], "off": []}
    for n in range(repeats + 1):  # the first pair is the warm-up
        for kind, source in (("on", on_policy), ("off", off_policy)):
            setup.steps = source
            with timers["step"]():
                out = loop.optimizer_step(setup, n + 1)
            assert out["replies"] == ("student" if kind == "on" else "dataset"), out
            parts = {name: timer.take() for name, timer in timers.items()}
            # student forward + backward: train.accumulate less the teacher inside it; the rest: prompts,
            # with_replies, clipping, AdamW. Per call, before the medians.
            parts["student"] = tuple(a - t for a, t in zip(parts["accumulate"], parts["teacher"]))
            parts["rest"] = tuple(s - g - a for s, g, a in zip(parts["step"], parts["generate"], parts["accumulate"]))
            runs[kind].append(parts)
    result = {"response_tokens": int((off_policy.batch["labels"] != -100).sum()),
              "sequence_tokens": int(off_policy.batch["attention_mask"].sum())}
    for kind, measured in runs.items():
        for name in measured[0]:
            for i, unit in enumerate(("seconds", "cpu_seconds")):
                result[f"{kind}_{name}_{unit}"] = statistics.median(m[name][i] for m in measured[1:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls (step: on/off pairs) per process, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process rounds, interleaved; medians over them")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (OMP/MKL_NUM_THREADS; default 1: CPU time then measures "
                             "the work on a shared machine); 0 = torch's own choice")
    parser.add_argument("--workdir", help="keep the tokenizer and prompts here (default: a temporary directory)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(one(args.one, Path(args.root), args.device, args.dtype, args.repeats)))
        return
    env = {"MALLOC_ARENA_MAX": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="llmneo-onpolicy-bench-") as scratch:
        root = Path(args.workdir or scratch)
        if not (root / "prompts.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            build_inputs(root)

        def run(variant: str) -> dict:
            result = in_fresh_process(__file__, ["--one", variant, "--root", str(root), "--device", args.device,
                                                 "--dtype", args.dtype, "--repeats", str(args.repeats),
                                                 "--threads", str(args.threads)], timeout=3600, env=env)
            print(json.dumps({variant: result}), file=sys.stderr, flush=True)
            return result

        check = run("check")
        runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
        for _ in range(args.rounds):
            for variant in args.variants:
                runs[variant].append(run(variant))
    _report(args, check, runs)


def _spread(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _speed_ratio(runs: dict, variant: str, unit: str, less: str | None = None) -> str:
    """Tokens/s of `variant` ÷ the merged copy's, per round (processes that ran next to each other)."""
    if "gen_merged" not in runs:
        return "-"
    merged = runs["gen_merged"]
    return _spread([merged[i][unit] / (r[unit] - (r[less] if less else 0.0)) for i, r in enumerate(runs[variant])])


def _report(args, check: dict, runs: dict[str, list[dict]]) -> None:
    failed = {v: r[0]["error"] for v, r in runs.items() if any("error" in x for x in r)}
    runs = {v: r for v, r in runs.items() if v not in failed}
    threads = "torch's default threads" if not args.threads else f"{args.threads} thread(s) per process"
    params = check.get("student_params") or next((r[0]["student_params"] for r in runs.values()), 0)
    print(f"\non-policy benchmark: device {args.device}, {args.dtype}, {threads}; student {params / 1e6:.0f}M "
          f"(hidden {STUDENT['hidden_size']}, {STUDENT['num_layers']} layers, V = {VOCAB}), LoRA rank {LORA_RANK} on "
          f"every linear layer; teacher hidden {TEACHER['hidden_size']}, {TEACHER['num_layers']} layers; "
          f"{PROMPTS} prompts x {NEW_TOKENS} new tokens; {args.rounds} round(s) of fresh processes, median of "
          f"{args.repeats} calls each; median (min–max) over the rounds\n")
    for variant, error in failed.items():
        print(f"{variant}: failed: {error}")
    gens = [v for v in ("gen_unmerged", "gen_shadow", "gen_merged") if v in runs]
    if gens:
        print("| generation (greedy) | wall (s) | tokens/s | CPU (s) | tokens per CPU s | "
              "÷ merged copy, tokens/s | ÷ merged copy, tokens per CPU s |")
        print("|---|---|---|---|---|---|---|")
        for v in gens:
            rate = [r["tokens"] / r["seconds"] for r in runs[v]]
            cpu_rate = [r["tokens"] / r["cpu_seconds"] for r in runs[v]]
            ratios = [_speed_ratio(runs, v, unit) for unit in ("seconds", "cpu_seconds")]
            print(f"| {v} | {_spread([r['seconds'] for r in runs[v]])} | {_spread(rate, 1)} | "
                  f"{_spread([r['cpu_seconds'] for r in runs[v]])} | {_spread(cpu_rate, 1)} | "
                  f"{ratios[0]} | {ratios[1]} |")
        if "gen_shadow" in runs:
            s = runs["gen_shadow"]
            print(f"\nshadow merge (merged_lora entry + exit) per generate: "
                  f"{_spread([r['merge_seconds'] for r in s], 4)} s wall, "
                  f"{_spread([r['merge_cpu_seconds'] for r in s], 4)} s CPU; gen_shadow without it ÷ merged copy, "
                  f"tokens/s: {_speed_ratio(runs, 'gen_shadow', 'seconds', 'merge_seconds')} wall, "
                  f"{_speed_ratio(runs, 'gen_shadow', 'cpu_seconds', 'merge_cpu_seconds')} CPU")
    if "step" in runs:
        s = runs["step"]
        print(f"\n| step part ({s[0]['sequence_tokens']} tokens, {s[0]['response_tokens']} of them replies) | "
              "on-policy wall (s) | on-policy CPU (s) | off-policy wall (s) | off-policy CPU (s) |")
        print("|---|---|---|---|---|")

        for name, label in (("generate", "generate (sampling, T = 1)"), ("merge", "  of which shadow merge"),
                            ("teacher", "teacher score (rows + projections)"),
                            ("student", "student forward + backward (loss included)"),
                            ("rest", "rest (rebuild batch, clip, AdamW)"), ("step", "whole step")):
            cells = [_spread([r[f"{kind}_{name}_{unit}"] for r in s])
                     for kind in ("on", "off") for unit in ("seconds", "cpu_seconds")]
            print(f"| {label} | " + " | ".join(cells) + " |")
        goal = [_spread([r[f"on_step_{u}"] / (r[f"on_generate_{u}"] + r[f"off_step_{u}"]) for r in s])
                for u in ("seconds", "cpu_seconds")]
        print("\n| ratio, per round | wall | CPU | target |\n|---|---|---|---|")
        print(f"| on-policy step ÷ (generation + off-policy step) | {goal[0]} | {goal[1]} | <= 1.10 |")
    print("\ncheck (one process, greedy): shadow-weight tokens == merged copy's: "
          f"{check.get('shadow_equals_merged')}; unmerged LoRA's tokens == merged copy's: "
          f"{check.get('unmerged_equals_merged')} ({check.get('unmerged_rows_differing')} of {PROMPTS} rows differ); "
          f"student tensors changed by shadow generation: {check.get('weights_changed_by_generate', check)}; "
          f"PEFT in-place merge() + unmerge(): {check.get('inplace_merge_unmerge_seconds', float('nan')):.4f} s wall, "
          f"{check.get('inplace_merge_unmerge_cpu_seconds', float('nan')):.4f} s CPU, moves "
          f"{check.get('inplace_base_weights_moved')} of {check.get('base_weights')} base weights "
          f"(max |ΔW0| {check.get('inplace_max_drift', float('nan')):.2e})")


if __name__ == "__main__":
    main()
