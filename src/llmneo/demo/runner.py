"""`llmneo demo`: the paper's four-arm experiment in miniature, on CPU, from nothing.

1. Generate the toy world (`llmneo.demo.world`) and its data: a large teacher corpus, a small student
   fine-tuning set, a held-out set, and a tokenizer trained on the world's text.
2. Pretrain a Llama-style teacher on the world with llmneo's own loop (full training), cached by a
   fingerprint of everything that shapes it, so a second run reuses it; `<output_dir>/teacher` links to it.
3. Derive the student with `llmneo prune` (block influence on the fine-tuning set).
4. Train the four arms (SFT, LoRA, KD, Neo) from that student on the same data, steps and batch size
   (the same token budget), each with the paper's defaults: guideline learning rates 2e-5 (full) and
   2e-4 (LoRA), kd_ratio 0.5, cosine schedule with 10 % warmup. Only the LoRA rank is scaled to the
   tiny width (hidden/8), the same for both LoRA arms.
5. Evaluate every model on the held-out set against the teacher; write report.md, results.json and
   curves.png, and say plainly how Neo compares with LoRA and KD.

`llmneo demo key=value ...` overrides the settings below (e.g. max_steps=1000 seed=1
output_dir=demo_big); any other config key (kd_loss=jsd, lora_rank=32, ...) applies to all four arms.

Reproducibility: float rounding depends on which kernels run, and without pins that differs between
machines of one kind: the thread count changes how reductions are split, ATen picks AVX2 or AVX-512
kernels by CPU, and MKL picks its GEMM branch by CPU vendor and ISA. 600 teacher steps amplify those
last-bit differences into the third decimal of the table. So the demo pins all three (PINNED_ENV) before
torch is loaded, and records in the report the numerics it actually ran with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Only torch-free modules here: the numerics below must be in the environment before torch is loaded,
# so torch and the modules that import it are imported inside the functions that run the demo.
from llmneo import config as config_mod
from llmneo.demo import world
from llmneo.errors import LlmneoError

# Two threads whatever the core count (reductions are split by thread count; MKL_DYNAMIC off so that MKL
# never picks fewer), ATen's AVX2 kernels and MKL's AVX2 GEMM branch: every x86-64 CPU of the last decade
# (Intel or AMD, with or without AVX-512) runs the same arithmetic under these, so the table is the same
# bit for bit. Two threads is what the 2-core reference machine runs anyway, so pinning costs it nothing.
# Passive OpenMP waits change no arithmetic: they stop the two threads from spinning at every barrier,
# which made the demo several times slower on a CPU shared with other work. The GPU is hidden: the table
# is the CPU's.
PINNED_ENV = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "MKL_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "OMP_WAIT_POLICY": "PASSIVE",
    "CUDA_VISIBLE_DEVICES": "",
}

ARMS = (("sft", "full", False), ("lora", "lora", False), ("kd", "full", True), ("neo", "lora", True))


@dataclass
class DemoSettings:
    output_dir: str = "demo_out"
    seed: int = 0
    max_steps: int = 400  # optimizer steps per arm
    per_device_train_batch_size: int = 16
    teacher_steps: int = 600
    teacher_learning_rate: float = 1e-3
    towns: int = 24
    teacher_rows: int = 6000
    train_rows: int = 150
    heldout_rows: int = 400
    hidden_size: int = 128
    teacher_layers: int = 4
    student_layers: int = 1
    vocab_size: int = 400


def parse(path: str | None, overrides: list[str]) -> tuple[DemoSettings, dict]:
    """Split overrides into demo settings and config keys shared by the four arms."""
    raw = config_mod.read_yaml(path) if path else {}
    raw.update(config_mod.parse_overrides(overrides))
    names = {f.name: f for f in dataclasses.fields(DemoSettings)}
    settings, shared = {}, {}
    for key, value in raw.items():
        if key in names:
            kind = names[key].type
            try:
                settings[key] = {"int": int, "float": float}.get(kind, str)(value)
            except ValueError:
                raise LlmneoError(f"demo setting '{key}' expects {kind}, got {value!r}") from None
        elif key in config_mod.FIELDS:
            shared[key] = value
        else:
            raise LlmneoError(f"unknown demo setting or config key '{key}'; demo settings: {', '.join(names)}")
    demo = DemoSettings(**settings)
    for key in ("max_steps", "teacher_steps", "train_rows", "heldout_rows", "teacher_rows", "towns",
                "student_layers", "teacher_layers", "hidden_size", "per_device_train_batch_size"):
        if getattr(demo, key) <= 0:
            raise LlmneoError(f"demo setting {key} must be > 0, got {getattr(demo, key)}")
    if demo.student_layers >= demo.teacher_layers:
        raise LlmneoError("student_layers must be smaller than teacher_layers (the student is a pruned teacher)")
    config_mod.load(overrides=shared)  # validate the shared keys now, with the usual messages
    return demo, shared


def _say(message: str) -> None:
    print(f"[llmneo demo] {message}", flush=True)


def numerics_in_effect() -> dict:
    """The settings that decide the demo's float rounding, as torch reports them now."""
    import torch

    return {"threads": torch.get_num_threads(), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR") if torch.backends.mkl.is_available() else "no MKL",
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__}


def _pins_missed(numerics: dict, torch_was_loaded: bool) -> list[str]:
    """Why this run's figures may differ from another machine's pinned run (empty when they should not)."""
    missed = []
    if torch_was_loaded:
        missed.append("torch was loaded before the demo pinned its numerics (kernels may be chosen already)")
    if numerics["threads"] != int(PINNED_ENV["OMP_NUM_THREADS"]):
        missed.append(f"{numerics['threads']} threads")
    if numerics["aten_cpu_capability"] != PINNED_ENV["ATEN_CPU_CAPABILITY"].upper():
        missed.append(f"ATen runs {numerics['aten_cpu_capability']} kernels, not AVX2")
    if numerics["mkl_cbwr"] != PINNED_ENV["MKL_CBWR"]:
        missed.append(f"MKL branch {numerics['mkl_cbwr']}")
    if numerics["device"] != "cpu":
        missed.append("a GPU is in use")
    return missed


@contextlib.contextmanager
def pinned_numerics():
    """Pin threads and kernel ISAs (PINNED_ENV) for the demo; restore the caller's settings after it."""
    torch_was_loaded = "torch" in sys.modules
    saved = {key: os.environ.get(key) for key in PINNED_ENV}
    os.environ.update(PINNED_ENV)
    import torch  # ATen and MKL read the pins from the environment when their first kernel runs

    threads = torch.get_num_threads()
    torch.set_num_threads(int(PINNED_ENV["OMP_NUM_THREADS"]))  # also when torch was loaded with other settings
    try:
        numerics = numerics_in_effect()
        numerics["missed"] = _pins_missed(numerics, torch_was_loaded)
        yield numerics
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fingerprint(demo: DemoSettings, numerics: dict) -> str:
    keys = ("seed", "towns", "teacher_rows", "teacher_steps", "teacher_learning_rate", "hidden_size",
            "teacher_layers", "vocab_size")
    # A teacher trained under other numerics is another teacher (it differs in the last bits and so downstream).
    arithmetic = {k: numerics[k] for k in ("threads", "aten_cpu_capability", "mkl_cbwr", "device")}
    blob = json.dumps({k: getattr(demo, k) for k in keys} | {"world": 1, "numerics": arithmetic}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _teacher(demo: DemoSettings, numerics: dict, files: dict, out: Path, tokenizer) -> tuple[Path, dict]:
    from llmneo import train
    from llmneo.demo import tiny

    cached = out / "cache" / f"teacher-{_fingerprint(demo, numerics)}"
    if (cached / "train_results.json").is_file():
        _say(f"teacher: reusing the cached teacher in {cached}")
        return cached, json.loads((cached / "train_results.json").read_text())
    init = out / "cache" / "teacher-init"
    model = tiny.build_model(tokenizer, hidden_size=demo.hidden_size, num_layers=demo.teacher_layers,
                             num_heads=4, seed=demo.seed)
    tiny.save_pair(model, tokenizer, init)
    _say(f"teacher: pretraining {sum(p.numel() for p in model.parameters()):,} parameters on "
         f"{demo.teacher_rows} world samples ({demo.teacher_steps} steps, full training)")
    cfg = config_mod.load(overrides=dict(
        model_name_or_path=str(init), finetuning_type="full", dataset=str(files["teacher"]), output_dir=str(cached),
        overwrite_output_dir=True, max_steps=demo.teacher_steps, per_device_train_batch_size=32,
        learning_rate=demo.teacher_learning_rate, warmup_ratio=0.05, logging_steps=25, cutoff_len=64,
        seed=demo.seed, save_steps=10**9))
    return cached, train.run(cfg)


def _link(link: Path, target: Path) -> None:
    """`demo_out/teacher` names the teacher this run used, whatever its cache fingerprint (examples/sweep use it)."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise LlmneoError(f"{link} exists and is not the demo's link to its teacher; move it away and rerun")
    link.symlink_to(target.relative_to(link.parent), target_is_directory=True)


def _metrics(path: Path, teacher, examples, tokenizer) -> dict:
    import torch

    from llmneo import evaluate, models

    model, _ = models.load_trained(config_mod.load(overrides={"model_name_or_path": str(path)}), torch.float32)
    return evaluate.held_out(model, teacher, examples, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                             batch_size=64)


def run(path: str | None, overrides: list[str]) -> dict:
    demo, shared = parse(path, overrides)
    with pinned_numerics() as numerics:
        if numerics["missed"]:
            _say("numerics not as pinned, so figures may differ from a pinned run in the last digits: "
                 + "; ".join(numerics["missed"]))
        return _run(demo, shared, numerics)


def _run(demo: DemoSettings, shared: dict, numerics: dict) -> dict:
    import torch

    from llmneo import data, models, prune, train

    from llmneo.demo import tiny

    torch.manual_seed(demo.seed)
    started = time.perf_counter()
    out = Path(demo.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="no teacher_model_name_or_path")

    towns = world.make_towns(demo.seed, demo.towns)
    _say(f"world: {len(towns)} towns, {len(world.GOODS)} goods; market answers have an entropy of "
         f"{world.market_entropy(towns):.2f} nats per sampled good")
    sizes = {"teacher": demo.teacher_rows, "train": demo.train_rows, "heldout": demo.heldout_rows}
    files = {name: world.write_jsonl(out / "data" / f"{name}.jsonl", world.rows(towns, size, demo.seed + 1 + i))
             for i, (name, size) in enumerate(sizes.items())}
    tokenizer = tiny.build_tokenizer(corpus=world.corpus(towns), vocab_size=demo.vocab_size)
    teacher_dir, teacher_results = _teacher(demo, numerics, files, out, tokenizer)
    _link(out / "teacher", teacher_dir)

    _say(f"student: pruning the teacher from {demo.teacher_layers} to {demo.student_layers} layers by block influence")
    pruned_at = time.perf_counter()
    student_dir = out / "student"
    prune.run(config_mod.load(overrides=dict(
        model_name_or_path=str(teacher_dir), num_layers=demo.student_layers, dataset=str(files["train"]),
        output_dir=str(student_dir), overwrite_output_dir=True, cutoff_len=64)))
    prune_time = time.perf_counter() - pruned_at

    heldout_cfg = config_mod.load(overrides={"dataset": str(files["heldout"]), "cutoff_len": 64})
    heldout = data.build(heldout_cfg, tokenizer).train
    teacher_cfg = config_mod.load(overrides={"model_name_or_path": str(teacher_dir)})
    teacher_model, _ = models.load_trained(teacher_cfg, torch.float32)
    plural = "s" if demo.student_layers > 1 else ""
    rows = [{"model": f"teacher ({demo.teacher_layers} layers)",
             **_metrics(teacher_dir, teacher_model, heldout, tokenizer),
             "trainable_params": teacher_results["trainable_params"],
             "peak_memory_bytes": teacher_results["peak_memory_bytes"], "wall_time": teacher_results["train_runtime"]},
            {"model": f"pruned student ({demo.student_layers} layer{plural}), untrained",
             **_metrics(student_dir, teacher_model, heldout, tokenizer), "trainable_params": None,
             "peak_memory_bytes": None, "wall_time": prune_time}]
    curves = {}
    for arm, finetuning_type, with_teacher in ARMS:
        _say(f"arm {arm}: {finetuning_type} fine-tuning{' + KD' if with_teacher else ''}, {demo.max_steps} steps")
        arm_dir = out / "arms" / arm
        cfg = config_mod.load(overrides={
            "lora_rank": max(4, demo.hidden_size // 8), "logging_steps": max(1, demo.max_steps // 40),
            "cutoff_len": 64, "save_steps": 10**9, **shared,
            "model_name_or_path": str(student_dir), "finetuning_type": finetuning_type,
            "teacher_model_name_or_path": str(teacher_dir) if with_teacher else None,
            "dataset": str(files["train"]), "output_dir": str(arm_dir), "overwrite_output_dir": True,
            "max_steps": demo.max_steps, "per_device_train_batch_size": demo.per_device_train_batch_size,
            "seed": demo.seed})
        results = train.run(cfg)
        curves[arm] = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"model": arm, **_metrics(arm_dir, teacher_model, heldout, tokenizer),
                     "trainable_params": results["trainable_params"],
                     "peak_memory_bytes": results["peak_memory_bytes"], "wall_time": results["train_runtime"]})
    return _report(demo, shared, numerics, rows, curves, out, time.perf_counter() - started)


def verdict(rows: list[dict]) -> str:
    """Plain statements on Neo vs LoRA and Neo vs KD, whatever the numbers say."""
    by = {r["model"]: r for r in rows}
    neo, lora, kd, base = by["neo"], by["lora"], by["kd"], rows[1]
    lines = []
    better = neo["perplexity"] < lora["perplexity"]
    closer = neo["kl_to_teacher"] < lora["kl_to_teacher"]
    lines.append(f"Neo {'beats' if better else 'does not beat'} LoRA on held-out perplexity "
                 f"({neo['perplexity']:.4f} vs {lora['perplexity']:.4f}) and "
                 f"{'is closer to' if closer else 'is not closer to'} the teacher "
                 f"(KL {neo['kl_to_teacher']:.4f} vs {lora['kl_to_teacher']:.4f}).")
    gain_kd = base["kl_to_teacher"] - kd["kl_to_teacher"]
    gain_neo = base["kl_to_teacher"] - neo["kl_to_teacher"]
    if gain_kd > 0:
        lines.append(f"Neo recovers {100 * gain_neo / gain_kd:.0f}% of full KD's KL reduction from the pruned student "
                     f"with {neo['trainable_params'] / kd['trainable_params']:.1%} of its trainable parameters "
                     f"(held-out perplexity {neo['perplexity']:.4f} vs KD {kd['perplexity']:.4f}).")
    else:
        lines.append("Full KD did not reduce the KL to the teacher on this run, "
                     "so there is no KD gain to compare with.")
    return " ".join(lines)


def describe_numerics(numerics: dict) -> str:
    threads = f"{numerics['threads']} thread{'s' if numerics['threads'] != 1 else ''}"
    text = (f"{threads}, ATen {numerics['aten_cpu_capability']} kernels, MKL branch {numerics['mkl_cbwr']}, "
            f"{numerics['device']}, torch {numerics['torch']}")
    if numerics["missed"]:
        return text + " (not as pinned: " + "; ".join(numerics["missed"]) + ")"
    return text + " (as pinned)"


def _report(demo, shared, numerics, rows, curves, out: Path, runtime: float) -> dict:
    from llmneo import evaluate, plot, run_dir

    now = numerics_in_effect()  # a library that reset threads mid-run would void the pins: say so
    changed = [f"{key} became {now[key]}" for key in ("threads", "aten_cpu_capability", "device")
               if now[key] != numerics[key]]
    if changed:
        numerics["missed"].append("changed during the run: " + ", ".join(changed))
    for row in rows:
        mem = row.get("peak_memory_bytes")
        row["peak_memory_mb"] = None if mem is None else mem / 2**20
    columns = [("model", "model"), ("perplexity", "held-out ppl"), ("kl_to_teacher", "KL to teacher"),
               ("top1_agreement", "top-1 agreement"), ("trainable_params", "trainable params"),
               ("peak_memory_mb", "peak RSS (MB)"), ("wall_time", "wall time (s)")]
    table = evaluate.format_table(rows, columns)
    statement = verdict(rows)
    command = "llmneo demo " + " ".join(f"{k}={v}" for k, v in
                                        {**dataclasses.asdict(demo), **shared}.items()
                                        if k in shared or getattr(DemoSettings, k) != v)
    plot.arm_comparison(curves, rows, out / "curves.png")
    text = "\n".join([
        "# llmneo demo: SFT, LoRA, KD and Neo on a toy world", "",
        f"Command: `{command.strip()}` (settings: {json.dumps(dataclasses.asdict(demo))}"
        + (f", shared: {json.dumps(shared)}" if shared else "") + ")", "",
        table, "",
        f"**Verdict.** {statement}", "",
        "Held-out metrics are over response tokens of unseen samples of the world. Peak RSS is the process's "
        "resident-set high-water mark during that run (CPU); at this size it is mostly the torch runtime.",
        f"Numerics: {describe_numerics(numerics)}.",
        f"Total demo time: {runtime:.0f} s. Curves: curves.png.", ""])
    (out / "report.md").write_text(text)
    run_dir.write_json(out / "results.json", {"rows": rows, "verdict": statement, "settings": dataclasses.asdict(demo),
                                              "shared": shared, "numerics": numerics, "runtime": runtime})
    print()
    print(table)
    print()
    print(statement)
    _say(f"report written to {out / 'report.md'} ({runtime:.0f} s)")
    return {"rows": rows, "verdict": statement, "runtime": runtime}
