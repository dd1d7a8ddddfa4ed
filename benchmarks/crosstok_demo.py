"""Cross-tokenizer KD on the demo world (#13): does a teacher whose tokenizer differs from the student's still help?

Per seed, everything as `llmneo demo` makes it (DemoSettings' defaults, llmneo.demo.runner's own helpers):
the world and its teacher / train / held-out data, the demo tokenizer, the demo's teacher (runner._teacher:
pretrained with the demo tokenizer, cached by fingerprint; reused from `<demo-dir>/cache` when a `llmneo demo`
with the same settings and numerics made it already) and the student pruned from it (prune.run). Then a second
teacher of the same size, trained the same way (runner._teacher again: same data, steps, learning rate, seed)
but with another tokenizer: byte-level BPE on the same world corpus asked for --other-vocab tokens (BPE stops
earlier when the corpus has no merge left), and another chat template (a system prompt, `role:` headers and
`<|eot|>` ending each turn instead of `<|im_end|>`). From the same pruned student, the same steps, batch and
the paper's LoRA defaults as the demo's arms:

  lora        LoRA alone, no teacher
  neo_other   Neo with the other-tokenizer teacher (kd_cross_tokenizer: auto, so cross-tokenizer KD)
  neo_same    Neo with the demo's own teacher (one tokenizer): the reference (the demo's `neo` arm)

Every student is scored on the held-out set against the demo's teacher (evaluate.held_out: perplexity, KL to
that teacher, top-1 agreement, and that KL over the positions the other tokenizer aligns and over the others):
the world is the same, so that teacher is a fair yardstick. The two teachers are compared in nats per held-out
reply (each reply's summed token CE on its own tokens, end of turn included: a figure no tokenization changes).
Prints markdown tables (per seed, means over seeds); writes results-other<vocab>[...].json to --output-dir.
--kd-unaligned and --kd-uld-weight set neo_other's kd_unaligned and kd_uld_weight. On the 2-core machine: about
9 minutes for 3 seeds with the demo's seed-0 teacher reused, 3 once all teachers are cached.

    python benchmarks/crosstok_demo.py                      # seeds 0 1 2, --other-vocab 600
    python benchmarks/crosstok_demo.py --kd-unaligned skip   # unaligned tokens on (1 - kd_ratio)·CE, no KD
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
import warnings
from pathlib import Path

from llmneo.config import schema as config_mod
from llmneo.demo import runner, world

# Another family's chat template: a system prompt the student's template never has, `role:` headers, and its
# own end-of-turn token (added to the tokenizer as a special token). The default system prompt is short and in the
# world's words, so that every conversation still fits the demo's cutoff_len of 64 (checked before training).
SYSTEM_PROMPT = "The towns and their roads."


def other_template(system_prompt: str) -> str:
    """The other family's chat template (no system turn when `system_prompt` is empty)."""
    system = "{{ '<|im_start|>system\n" + system_prompt + "<|eot|>\n' }}" if system_prompt else ""
    return (system + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\n' + message['content'] "
            "+ '<|eot|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}{% endif %}")


OTHER_END_OF_TURN = "<|eot|>"
ARMS = (("lora", None), ("neo_other", "other"), ("neo_same", "same"))
CUTOFF = 64  # the demo's cutoff_len, for teachers and arms


def other_tokenizer(towns, vocab_size: int, system_prompt: str = SYSTEM_PROMPT):
    from llmneo.demo import tiny

    tokenizer = tiny.build_tokenizer(corpus=world.corpus(towns), vocab_size=vocab_size,
                                     chat_template=other_template(system_prompt))
    tokenizer.add_special_tokens({"additional_special_tokens": [OTHER_END_OF_TURN]})
    return tokenizer


def _teachers(demo, numerics: dict, files: dict, out: Path, demo_dir: Path, tokenizer, other) -> dict:
    """{"same": (dir, how), "other": (dir, how)}: both pretrained by runner._teacher, the demo's own recipe."""
    fingerprint = runner._fingerprint(demo, numerics)
    reused = demo_dir / "cache" / f"teacher-{fingerprint}"
    if (reused / "train_results.json").is_file():
        same = (reused, f"reused from {reused}")
    else:
        cached = (out / "cache" / f"teacher-{fingerprint}" / "train_results.json").is_file()
        same = (runner._teacher(demo, numerics, files, out, tokenizer)[0], "reused" if cached else "trained here")
    # The other teacher's cache lives in a folder of its own, named by its tokenizer: runner._teacher's fingerprint
    # covers the settings (vocab_size = the other tokenizer's size) and numerics, not the template. The generation
    # config it sets (stop at <|im_end|>) is never used here: nothing generates.
    template = hashlib.sha256(other.chat_template.encode()).hexdigest()[:8]
    other_out = out / f"other-tokenizer-{len(other)}-{template}"
    cached = other_out / "cache" / f"teacher-{runner._fingerprint(_with_vocab(demo, len(other)), numerics)}"
    how = "reused" if (cached / "train_results.json").is_file() else "trained here"
    return {"same": same, "other": (runner._teacher(_with_vocab(demo, len(other)), numerics, files, other_out,
                                                    other)[0], how)}


def _with_vocab(demo, size: int):
    return dataclasses.replace(demo, vocab_size=size)


def _longest(tokenizer, path: Path) -> int:
    """The longest conversation of a data file in `tokenizer`'s rendering, in tokens (the demo cuts at 64)."""
    from llmneo.data import dataset as data

    examples = data.build(config_mod.load(overrides={"dataset": str(path), "cutoff_len": 1024}), tokenizer).train
    return max(len(example["input_ids"]) for example in examples)


def _alignable(heldout_file: Path, tokenizer, other):
    """The held-out batch in the student's tokens, its response positions (bool (B, T)), and which of them the other
    teacher's tokenizer aligns ((N,) bool, as alignment.teacher_spans decides: the predicted token has a span)."""
    from llmneo.crosstok import offsets as crosstok
    from llmneo.data import dataset as data
    from llmneo.data.labels import response_positions

    cfg = config_mod.load(overrides={"dataset": str(heldout_file), "cutoff_len": CUTOFF})
    batch = data.collate(data.build(cfg, tokenizer, crosstok.TeacherSide(other, None)).train, tokenizer.pad_token_id)
    positions, _ = response_positions(batch["labels"])
    return batch, positions, batch["teacher_start"][:, 1:][positions[:, :-1]] >= 1  # position p predicts token p+1


def _kl_by_alignment(model, yardstick, vocab_size: int, batch, positions, aligned) -> tuple[float, float]:
    """KL(demo teacher ‖ model) averaged over the held-out positions the other tokenizer aligns, and over the rest."""
    import torch

    from llmneo.loss.divergences import token_divergence
    from llmneo.models import heads

    def logits(m):  # (N, V) at the response positions
        hidden = heads.final_hidden_states(m, batch["input_ids"], batch["attention_mask"])[positions]
        return heads.output_head(m)[0](hidden)[:, :vocab_size]

    with torch.no_grad():
        kl = token_divergence(logits(model), logits(yardstick), "fkl")  # (N,)
    return float(kl[aligned].mean()), float(kl[~aligned].mean()) if bool((~aligned).any()) else float("nan")


def _reply_nats(model, tokenizer, heldout_file: Path) -> float:
    """Mean over held-out replies of the summed token CE of the reply (end of turn included), on the model's own
    tokens: comparable across tokenizers."""
    from llmneo import evaluate
    from llmneo.data import dataset as data

    examples = data.build(config_mod.load(overrides={"dataset": str(heldout_file), "cutoff_len": 1024}),
                          tokenizer).train
    scores = evaluate.held_out(model, None, examples, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                               batch_size=64)
    return scores["ce_loss"] * scores["tokens"] / len(examples)


def one_seed(seed: int, args, numerics: dict) -> dict:
    import torch

    from llmneo import evaluate
    from llmneo.crosstok import offsets as crosstok
    from llmneo.data import dataset as data
    from llmneo.demo import tiny
    from llmneo.models import prune
    from llmneo.train import loop

    started = time.perf_counter()
    demo = runner.DemoSettings(seed=seed, max_steps=args.max_steps, teacher_steps=args.teacher_steps)
    out = Path(args.output_dir)
    seed_dir = out / f"seed-{seed}"
    torch.manual_seed(seed)
    towns = world.make_towns(seed, demo.towns)
    sizes = {"teacher": demo.teacher_rows, "train": demo.train_rows, "heldout": demo.heldout_rows}
    samples = {name: world.rows(towns, size, seed + 1 + i) for i, (name, size) in enumerate(sizes.items())}
    files = {name: world.write_jsonl(seed_dir / "data" / f"{name}.jsonl", rows) for name, rows in samples.items()}
    tokenizer = tiny.build_tokenizer(corpus=world.corpus(towns), vocab_size=demo.vocab_size)
    other = other_tokenizer(towns, args.other_vocab, args.system_prompt)
    longest = (_longest(tokenizer, files["teacher"]), _longest(other, files["teacher"]))
    if max(longest) > CUTOFF:  # the teachers train at the demo's cutoff_len: a cut conversation is another teacher
        raise SystemExit(f"seed {seed}: the longest teacher conversation is {longest[1]} tokens in the other "
                         f"tokenizer's rendering, over cutoff_len {CUTOFF}; shorten --system-prompt")
    teachers = _teachers(demo, numerics, files, out, Path(args.demo_dir), tokenizer, other)

    student_dir = seed_dir / "student"
    prune.run(config_mod.load(overrides=dict(
        model_name_or_path=str(teachers["same"][0]), num_layers=demo.student_layers, dataset=str(files["train"]),
        output_dir=str(student_dir), overwrite_output_dir=True, cutoff_len=CUTOFF)))
    heldout = data.build(config_mod.load(overrides={"dataset": str(files["heldout"]), "cutoff_len": CUTOFF}),
                         tokenizer).train
    yardstick = _load(teachers["same"][0])
    split = _alignable(files["heldout"], tokenizer, other)

    def score(path: Path) -> dict:
        model = _load(path)
        found = evaluate.held_out(model, yardstick, heldout, pad_token_id=tokenizer.pad_token_id,
                                  vocab_size=len(tokenizer), batch_size=64)
        return {key: found[key] for key in ("perplexity", "kl_to_teacher", "top1_agreement")} | dict(
            zip(("kl_aligned", "kl_unaligned"), _kl_by_alignment(model, yardstick, len(tokenizer), *split)))

    rows = {"pruned student, untrained": score(student_dir)}
    details = {}
    for name, teacher in ARMS:
        arm_dir = seed_dir / "arms" / name
        cfg = config_mod.load(overrides={  # the demo's arm settings (runner._run)
            "lora_rank": max(4, demo.hidden_size // 8), "logging_steps": max(1, demo.max_steps // 40),
            "cutoff_len": CUTOFF, "save_steps": 10**9, "model_name_or_path": str(student_dir),
            "finetuning_type": "lora",
            "teacher_model_name_or_path": str(teachers[teacher][0]) if teacher else None,
            **({"kd_uld_weight": args.kd_uld_weight} if teacher == "other" and args.kd_uld_weight is not None else {}),
            **({"kd_unaligned": args.kd_unaligned} if teacher == "other" and args.kd_unaligned else {}),
            "dataset": str(files["train"]), "output_dir": str(arm_dir), "overwrite_output_dir": True,
            "max_steps": demo.max_steps, "per_device_train_batch_size": demo.per_device_train_batch_size,
            "seed": seed})
        results = loop.run(cfg)
        rows[name] = score(arm_dir) | {"train_seconds": results["train_runtime"]}
        if teacher == "other":
            vocab = crosstok.vocab_for(cfg, tokenizer, other)
            details = {"kd_aligned_fraction": results.get("kd_aligned_fraction"), "uld_weight": vocab.uld_weight,
                       "shared_tokens": vocab.shared, "overlap": vocab.overlap}
    details.update(
        student_vocab=len(tokenizer), other_vocab=len(other), other_vocab_asked=args.other_vocab,
        same_teacher=teachers["same"][1], other_teacher=teachers["other"][1],
        longest=longest,
        same_teacher_reply_nats=_reply_nats(yardstick, tokenizer, files["heldout"]),
        other_teacher_reply_nats=_reply_nats(_load(teachers["other"][0]), other, files["heldout"]),
        seconds=time.perf_counter() - started)
    return {"seed": seed, "rows": rows, "details": details}


def _load(path: Path):
    import torch

    from llmneo.models import loading

    return loading.load_trained(config_mod.load(overrides={"model_name_or_path": str(path)}), torch.float32)[0]


def _spread(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(found: list[dict]) -> str:
    metrics = (("perplexity", "held-out ppl"), ("kl_to_teacher", "KL to demo teacher"),
               ("top1_agreement", "top-1 agreement"), ("kl_aligned", "KL, aligned positions"),
               ("kl_unaligned", "KL, unaligned positions"))
    lines = ["| seed | model | " + " | ".join(title for _, title in metrics) + " | train time (s) |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for seed in found:
        for model, row in seed["rows"].items():
            seconds = row.get("train_seconds")
            lines.append(f"| {seed['seed']} | {model} | " + " | ".join(f"{row[key]:.4f}" for key, _ in metrics)
                         + f" | {'-' if seconds is None else f'{seconds:.1f}'} |")
    seeds = ", ".join(str(s["seed"]) for s in found)
    lines += ["", f"Mean (min–max) over seeds {seeds}; Δ = the arm minus LoRA alone, per seed:", "",
              "| model | " + " | ".join(title for _, title in metrics) + " | Δ ppl vs LoRA | Δ KL vs LoRA |",
              "|---|" + "---|" * (len(metrics) + 2)]
    for model in found[0]["rows"]:
        cells = [_spread([s["rows"][model][key] for s in found]) for key, _ in metrics]
        deltas = [_spread([s["rows"][model][key] - s["rows"]["lora"][key] for s in found])
                  for key in ("perplexity", "kl_to_teacher")]
        lines.append(f"| {model} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "| seed | student / other tokenizer (asked) | shared tokens | ULD weight | kd_aligned_fraction | "
              "nats per held-out reply: demo teacher / other teacher | longest teacher example, tokens: demo / other "
              "| teachers |", "|---|---|---|---|---|---|---|---|"]
    for seed in found:
        d = seed["details"]
        lines.append(f"| {seed['seed']} | {d['student_vocab']} / {d['other_vocab']} ({d['other_vocab_asked']}) | "
                     f"{d['shared_tokens']} | {d['uld_weight']:.3f} | {d['kd_aligned_fraction']:.3f} | "
                     f"{d['same_teacher_reply_nats']:.3f} / {d['other_teacher_reply_nats']:.3f} | "
                     f"{d['longest'][0]} / {d['longest'][1]} | demo: {d['same_teacher']}; "
                     f"other: {d['other_teacher']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--other-vocab", type=int, default=600, help="the other tokenizer's BPE vocabulary size "
                                                                     "(the demo's is 400)")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="the other template's system prompt ('': none)")
    parser.add_argument("--kd-unaligned", choices=("ce", "skip"), help="neo_other's kd_unaligned (default: the "
                                                                        "library's, ce)")
    parser.add_argument("--kd-uld-weight", type=float, help="neo_other's kd_uld_weight (default: 1 - overlap)")
    parser.add_argument("--max-steps", type=int, default=runner.DemoSettings.max_steps)
    parser.add_argument("--teacher-steps", type=int, default=runner.DemoSettings.teacher_steps,
                        help="both teachers' pretraining steps (fewer: a quick check, not the figure)")
    parser.add_argument("--output-dir", default="out_crosstok")
    parser.add_argument("--demo-dir", default="demo_out", help="a `llmneo demo` output whose cached teachers to reuse")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="no teacher_model_name_or_path")
    with runner.pinned_numerics() as numerics:  # the demo's numerics, so its cached teachers are reused
        found = [one_seed(seed, args, numerics) for seed in args.seeds]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    uld = ("" if args.kd_uld_weight is None else f"-uld{args.kd_uld_weight:g}") + (
        f"-unaligned-{args.kd_unaligned}" if args.kd_unaligned else "")
    system = "" if args.system_prompt == SYSTEM_PROMPT else "-system" + hashlib.sha256(
        args.system_prompt.encode()).hexdigest()[:6]
    name = f"results-other{args.other_vocab}{uld}{system}.json"
    (Path(args.output_dir) / name).write_text(json.dumps(found, indent=1))
    print("\n" + report(found))


if __name__ == "__main__":
    main()
