"""`llmneo demo`: the paper's four-arm experiment in miniature, on CPU, from nothing, plus on-policy Neo.

1. Generate the toy world (`llmneo.demo.world`) and its data: a large teacher corpus, a small student
   fine-tuning set, a held-out set, and a tokenizer trained on the world's text.
2. Pretrain a Llama-style teacher on the world with llmneo's own loop (full training), cached by a
   fingerprint of everything that shapes it, so a second run reuses it; `<output_dir>/teacher` links to it.
3. Derive the student with `llmneo prune` (block influence on the fine-tuning set).
4. Train the four arms (SFT, LoRA, KD, Neo) from that student on the same data, steps and batch size
   (the same token budget), each with the paper's defaults: guideline learning rates 2e-5 (full) and
   2e-4 (LoRA), kd_ratio 0.5, cosine schedule with 10 % warmup. Only the LoRA rank is scaled to the
   tiny width (hidden/8), the same for all LoRA arms. A fifth arm, on-policy Neo, is Neo with lmbda 0.5
   (TRL GKD's default): on about half of the steps the student writes the replies to the step's prompts
   (temperature 1, up to max_new_tokens, which the world's longest answer sets) and learns the KD term alone
   on them; the world's road walks are where its own earlier choices shape what it says next.
5. Evaluate every model on the held-out set against the teacher (perplexity, KL, top-1 agreement, and
   the teacher's log-prob of the model's own greedy answers); write report.md, results.json and
   curves.png, and say plainly how Neo compares with LoRA and KD, and on-policy Neo with Neo.

`llmneo demo key=value ...` overrides the settings below (e.g. max_steps=1000 seed=1
output_dir=demo_big); any other config key (kd_loss=jsd, lora_rank=32, ...) applies to all arms, except
the generation keys (lmbda, seq_kd, max_new_tokens, temperature, top_p), which apply to on-policy Neo only.

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
from llmneo.config import schema as config_mod
from llmneo.demo import report, world
from llmneo.demo.report import ON_POLICY, verdict  # noqa: F401  (verdict: the demo's API, tested here)
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


@dataclass(frozen=True)
class Arm:
    name: str
    finetuning_type: str
    with_teacher: bool
    on_policy: bool = False

    @property
    def directory(self) -> str:
        return self.name.replace(" ", "-")


ARMS = (Arm("sft", "full", False), Arm("lora", "lora", False), Arm("kd", "full", True), Arm("neo", "lora", True),
        Arm(ON_POLICY, "lora", True, on_policy=True))
# TRL GKD's default share of on-policy steps; nothing in the toy world suggests another value.
LMBDA = 0.5
# Config keys that only an arm that generates uses: `llmneo demo temperature=0.7` changes on-policy Neo alone.
GENERATION_KEYS = ("lmbda", "seq_kd", "max_new_tokens", "temperature", "top_p")
END_OF_TURN = "<|im_end|>"  # how tiny.CHATML_TEMPLATE ends every turn


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
    """Split overrides into demo settings and config keys shared by the arms (GENERATION_KEYS: on-policy Neo's)."""
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
    # validate the keys now, with the usual messages, as each arm will get them
    every_arm, generation = split_shared(shared)
    config_mod.load(overrides=every_arm)
    on_policy = config_mod.load(overrides={**every_arm, "lmbda": LMBDA, **generation,
                                           "teacher_model_name_or_path": "teacher"})
    if not on_policy.generates:
        raise LlmneoError("the on-policy Neo arm needs lmbda > 0 (or seq_kd: true); the other arms never generate, "
                          "so drop lmbda=0")
    return demo, shared


def split_shared(shared: dict) -> tuple[dict, dict]:
    """(the keys every arm gets, the generation keys that on-policy Neo alone gets)."""
    return ({k: v for k, v in shared.items() if k not in GENERATION_KEYS},
            {k: v for k, v in shared.items() if k in GENERATION_KEYS})


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
    # world 2: road walks joined the world, and its models stop generating at the end of a chat turn
    blob = json.dumps({k: getattr(demo, k) for k in keys} | {"world": 2, "numerics": arithmetic}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _teacher(demo: DemoSettings, numerics: dict, files: dict, out: Path, tokenizer) -> tuple[Path, dict]:
    from llmneo.demo import tiny
    from llmneo.train import loop as train

    cached = out / "cache" / f"teacher-{_fingerprint(demo, numerics)}"
    if (cached / "train_results.json").is_file():
        _say(f"teacher: reusing the cached teacher in {cached}")
        return cached, json.loads((cached / "train_results.json").read_text())
    init = out / "cache" / "teacher-init"
    model = tiny.build_model(tokenizer, hidden_size=demo.hidden_size, num_layers=demo.teacher_layers,
                             num_heads=4, seed=demo.seed)
    # The chat template ends a reply with <|im_end|>, not the tokenizer's EOS, so generation must stop there
    # too, as real chat models' generation configs say; otherwise every reply runs on to max_new_tokens.
    # The pruned student and every arm inherit this generation config.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
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


def reply_budget(tokenizer, data_rows: list[dict]) -> int:
    """max_new_tokens for the world: its longest reply in tokens (with the end-of-turn token), and half as
    much again, so that a model which runs on past a right answer is seen doing so."""
    replies = [m["content"] for row in data_rows for m in row["messages"] if m["role"] == "assistant"]
    longest = max(len(ids) for ids in tokenizer(replies)["input_ids"]) + 1
    return longest + longest // 2


def _metrics(path: Path, teacher, examples, tokenizer, max_new_tokens: int) -> dict:
    import torch

    from llmneo import evaluate
    from llmneo.models import loading as models

    model, _ = models.load_trained(config_mod.load(overrides={"model_name_or_path": str(path)}), torch.float32)
    scores = evaluate.held_out(model, teacher, examples, pad_token_id=tokenizer.pad_token_id,
                               vocab_size=len(tokenizer), batch_size=64)
    greedy = evaluate.greedy_teacher_logprob(model, teacher, examples, tokenizer, max_new_tokens=max_new_tokens,
                                             batch_size=64)
    return scores | greedy


def run(path: str | None, overrides: list[str]) -> dict:
    demo, shared = parse(path, overrides)
    with pinned_numerics() as numerics:
        if numerics["missed"]:
            _say("numerics not as pinned, so figures may differ from a pinned run in the last digits: "
                 + "; ".join(numerics["missed"]))
        return _run(demo, shared, numerics)


def _run(demo: DemoSettings, shared: dict, numerics: dict) -> dict:
    import torch

    from llmneo.data import dataset as data
    from llmneo.demo import tiny
    from llmneo.models import loading as models
    from llmneo.models import prune
    from llmneo.train import loop as train

    torch.manual_seed(demo.seed)
    started = time.perf_counter()
    out = Path(demo.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="no teacher_model_name_or_path")

    towns = world.make_towns(demo.seed, demo.towns)
    _say(f"world: {len(towns)} towns, {len(world.GOODS)} goods; market answers have an entropy of "
         f"{world.market_entropy(towns):.2f} nats per sampled good, road walks {world.road_entropy(towns):.2f} "
         f"nats per step")
    sizes = {"teacher": demo.teacher_rows, "train": demo.train_rows, "heldout": demo.heldout_rows}
    samples = {name: world.rows(towns, size, demo.seed + 1 + i) for i, (name, size) in enumerate(sizes.items())}
    files = {name: world.write_jsonl(out / "data" / f"{name}.jsonl", rows) for name, rows in samples.items()}
    tokenizer = tiny.build_tokenizer(corpus=world.corpus(towns), vocab_size=demo.vocab_size)
    every_arm, generation_overrides = split_shared(shared)
    generation = {"lmbda": LMBDA, "max_new_tokens": reply_budget(tokenizer, samples["teacher"]), **generation_overrides}
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
    # Every model's greedy answers are scored with the world's budget, whatever the arm's max_new_tokens.
    max_new_tokens = reply_budget(tokenizer, samples["teacher"])
    rows = [{"model": f"teacher ({demo.teacher_layers} layers)",
             **_metrics(teacher_dir, teacher_model, heldout, tokenizer, max_new_tokens),
             "trainable_params": teacher_results["trainable_params"],
             "peak_memory_bytes": teacher_results["peak_memory_bytes"], "wall_time": teacher_results["train_runtime"]},
            {"model": f"pruned student ({demo.student_layers} layer{plural}), untrained",
             **_metrics(student_dir, teacher_model, heldout, tokenizer, max_new_tokens), "trainable_params": None,
             "peak_memory_bytes": None, "wall_time": prune_time}]
    curves = {}
    for arm in ARMS:
        how = (f"{arm.finetuning_type} fine-tuning{' + KD' if arm.with_teacher else ''}"
               + (f", on-policy ({report.describe_settings(generation)})" if arm.on_policy else ""))
        _say(f"arm {arm.name}: {how}, {demo.max_steps} steps")
        arm_dir = out / "arms" / arm.directory
        cfg = config_mod.load(overrides={
            "lora_rank": max(4, demo.hidden_size // 8), "logging_steps": max(1, demo.max_steps // 40),
            "cutoff_len": 64, "save_steps": 10**9, **every_arm, **(generation if arm.on_policy else {}),
            "model_name_or_path": str(student_dir), "finetuning_type": arm.finetuning_type,
            "teacher_model_name_or_path": str(teacher_dir) if arm.with_teacher else None,
            "dataset": str(files["train"]), "output_dir": str(arm_dir), "overwrite_output_dir": True,
            "max_steps": demo.max_steps, "per_device_train_batch_size": demo.per_device_train_batch_size,
            "seed": demo.seed})
        results = train.run(cfg)
        curves[arm.name] = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"model": arm.name, **_metrics(arm_dir, teacher_model, heldout, tokenizer, max_new_tokens),
                     "trainable_params": results["trainable_params"],
                     "peak_memory_bytes": results["peak_memory_bytes"], "wall_time": results["train_runtime"]}
                    | ({"on_policy_fraction": results.get("on_policy_fraction")} if arm.on_policy else {}))
    return _report(demo, shared, generation, numerics, rows, curves, out, time.perf_counter() - started)


def _report(demo, shared, generation, numerics, rows, curves, out: Path, runtime: float) -> dict:
    now = numerics_in_effect()  # a library that reset threads mid-run would void the pins: say so
    changed = [f"{key} became {now[key]}" for key in ("threads", "aten_cpu_capability", "device")
               if now[key] != numerics[key]]
    if changed:
        numerics["missed"].append("changed during the run: " + ", ".join(changed))
    command = "llmneo demo " + " ".join(f"{k}={v}" for k, v in
                                        {**dataclasses.asdict(demo), **shared}.items()
                                        if k in shared or getattr(DemoSettings, k) != v)
    return report.write(out, command=command.strip(), settings=dataclasses.asdict(demo), shared=shared,
                        generation=generation, numerics=numerics, rows=rows, curves=curves, runtime=runtime)
