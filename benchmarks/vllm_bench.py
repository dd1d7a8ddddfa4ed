"""vLLM against llmneo's own paths on the step benchmark's pair: capture, generation, weight sync, on-policy steps.

Every server is a real `vllm serve` (tests/vllm/vllm_server.py's VLLMServer: .venv-vllm or $LLMNEO_VLLM_PYTHON),
one at a time, always stopped. The pair (tiny.build_model, a 32,000-token BPE): a student of hidden 512, 8 layers
(58M) and a teacher of hidden 768, 8 layers (106M) with 12 heads (head_dim 64, as vLLM's CPU attention needs);
`--preset gpu`: 1B and 3.4B. Besides wall time, the server's CPU seconds (its whole process group) and the HF
side's, which are what to read on a shared machine. Parts (`--parts`):

  capture   prompt log-probs of --batch x --seq random tokens at k = --k, each way vLLM 0.32 returns them:
            /v1/completions, all sequences in one request (`completions`: what llmneo asked before) or one each
            (`completions_each`), with return_tokens_as_token_ids (`completions_token_ids`); the tokens-in/out
            endpoint /inference/v1/generate (on with --enable-scale-out), one request per sequence, with
            detokenize true (`generate`), false (`generate_tokens`: what llmneo asks now), and false with
            flat_logprobs (`generate_flat`); the forward alone (`forward_only`, no prompt_logprobs: its head runs
            on the last position only). Each way's entries are checked against `completions'`: ids, ranks,
            log-probs. `--capture-teachers small` adds a 2-layer hidden-128 teacher, whose forward is cheap, so
            that the server's work per entry shows, as on a GPU.
  generate  --prompts chat prompts x --new-tokens greedy tokens, EOS ignored: HF generate (HFGenerator, a fresh
            process; LoRA through its merged shadow weights) and vLLM (one /v1/completions request), the base
            and with a rank --lora-rank adapter (--enable-lora, written by models.plain_lora); rows equal to HF's.
  sync      the trained weights onto the server, per step: the adapter (plain_lora.write) loaded under a new name
            and the last one unloaded, or loaded in place (load_inplace); or the merged weights (W0 + s.B.A) as
            safetensors, POST /collective_rpc reload_weights and /reset_prefix_cache (VLLM_SERVER_DEV_MODE=1).
            Then a 1-token request less the next one: what a load leaves for the first use. The reloaded
            server's greedy rows are compared with HF's on the same merged weights.
  step      `llmneo train` on-policy steps (lmbda 1, live teacher) with replies from HF generate, from a vLLM
            server (rollout_endpoint), and from it a step ahead (rollout_ahead: 1); each optimizer step timed.

    python benchmarks/vllm_bench.py --capture-teachers default small    # CPU, fp32: every part (about 25 min)
    python benchmarks/vllm_bench.py --device cuda --dtype bfloat16 --preset gpu --threads 0 --parts capture generate
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "vllm")]
from measure import in_fresh_process  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

PARTS = ("capture", "generate", "sync", "step")
VOCAB = 32000
PRESETS = {  # tiny.build_model sizes; head_dim 64 everywhere
    "default": {"student": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1408},
                "teacher": {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "intermediate_size": 2048}},
    "gpu": {"student": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "intermediate_size": 5504},  # ~1B
            "teacher": {"hidden_size": 3072, "num_layers": 28, "num_heads": 48, "intermediate_size": 8192}},  # ~3.4B
}
SMALL_TEACHER = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 384}
CAPTURE_WAYS = ("completions", "completions_each", "completions_token_ids", "generate", "generate_tokens",
                "generate_flat", "forward_only")


# --- inputs ---------------------------------------------------------------------------------------------

def build(root: Path, args) -> None:
    """Tokenizer, prompts, the student, its adapter and the teachers under `root` (once; --workdir keeps them)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from llmneo.config import schema
    from llmneo.demo import tiny
    from llmneo.models import adapters

    key = json.dumps({"preset": args.preset, "dtype": args.dtype, "lora_rank": args.lora_rank, "prompts": args.prompts})
    if (root / "done").is_file() and (root / "done").read_text() == key:
        return
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    tokenizer = tiny.build_tokenizer([" ".join(words[i:i + 50]) for i in range(0, len(words), 50)], vocab_size=VOCAB)
    prompts = []
    for n in range(args.prompts):
        messages = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(20 + 2 * n))}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    (root / "prompts.json").write_text(json.dumps(prompts))
    sizes = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    for name, shape, seed in (("teacher", sizes["teacher"], 1), ("small_teacher", SMALL_TEACHER, 3),
                              ("student", sizes["student"], 2)):
        model = tiny.build_model(tokenizer, seed=seed, **shape).to(dtype)
        tiny.save_pair(model, tokenizer, root / name)
    cfg = schema.load(overrides={"finetuning_type": "lora", "lora_rank": args.lora_rank})
    model = adapters.apply(model, cfg)
    draw = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter, not PEFT's B = 0 (which would leave the base model)
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            weight = layer.lora_B["default"].weight
            weight.copy_((torch.randn(weight.shape, generator=draw) * 0.01).to(weight.dtype))
    model.save_pretrained(root / "adapter_peft")  # the trained state (PEFT's scaling), for HF and for sync
    (root / "done").write_text(key)


def _student_with_adapter(root: Path, device: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "student").to(device)
    return PeftModel.from_pretrained(base, root / "adapter_peft").to(device)


def _server(args, model_dir: Path, name: str, gpu_share: float = 0.85, **kwargs) -> VLLMServer:
    """A VLLMServer; on a GPU without VLLMServer's CPU flags, holding `gpu_share` of its memory (one server at a
    time; the step part leaves the rest to training)."""
    extra = list(kwargs.pop("extra", ()))
    if args.device != "cpu":
        extra += ["--no-enforce-eager", "--dtype", args.dtype, "--gpu-memory-utilization", str(gpu_share)]
    return VLLMServer(model_dir, name=name, max_logprobs=max(20, args.k), max_model_len=512, extra=tuple(extra),
                      log_dir=args.logs, **kwargs)


def _threads(args) -> dict:
    """The environment of HF's processes: `--threads` torch threads (vLLM's CPU engine computes on one core)."""
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}


def _post(url: str, body: dict | None = None, timeout: float = 1800) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read().decode()[:300]}") from None


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in the process group `pgid` (a server: API process and
    engine core); on a shared machine, what the server did, whatever else ran."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime (12) stime (13)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def timed(server: VLLMServer, call) -> tuple:
    """call()'s result, wall seconds, the server's CPU seconds and this process's CPU seconds."""
    cpu, mine, started = group_cpu_seconds(server.process.pid), time.process_time(), time.perf_counter()
    out = call()
    wall = time.perf_counter() - started
    return out, wall, group_cpu_seconds(server.process.pid) - cpu, time.process_time() - mine


def _spread(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


# --- 1. capture -----------------------------------------------------------------------------------------

def _capture_once(way: str, server: VLLMServer, name: str, sequences: list[list[int]], k: int):
    """(entries per sequence, response bytes) by one way; entries as Endpoint.prompt_logprobs returns them."""
    completions, generate = f"{server.url}/completions", f"{server.root}/inference/v1/generate"
    body = {"model": name, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
    if way in ("completions", "completions_token_ids", "forward_only"):
        extra = {"return_tokens_as_token_ids": True} if way == "completions_token_ids" else {}
        if way == "forward_only":
            body.pop("prompt_logprobs")
        raw = _post(completions, {**body, **extra, "prompt": sequences})
        choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
        return [c.get("prompt_logprobs") for c in choices], len(raw)

    def one(sequence):
        if way == "completions_each":
            raw = _post(completions, {**body, "prompt": [sequence]})
            return json.loads(raw)["choices"][0]["prompt_logprobs"], len(raw)
        params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "detokenize": way == "generate"}
        if way == "generate_flat":
            params["flat_logprobs"] = True  # SamplingParams' flat container in the engine (fewer Python objects)
        raw = _post(generate, {"model": name, "token_ids": sequence, "sampling_params": params})
        return json.loads(raw)["prompt_logprobs"], len(raw)

    with ThreadPoolExecutor(len(sequences)) as pool:  # all in flight, as the engine batches them
        found = list(pool.map(one, sequences))
    return [e for e, _ in found], sum(n for _, n in found)


def _compare(reference: list, entries: list) -> dict:
    """Whether every position has the same token ids and ranks, and the largest log-prob difference."""
    same, worst = True, 0.0
    for ref_seq, seq in zip(reference, entries):
        for ref, got in zip(ref_seq[1:], seq[1:]):
            if set(ref) != set(got) or any(ref[i]["rank"] != got[i]["rank"] for i in ref):
                same = False
            worst = max([worst, *(abs(ref[i]["logprob"] - got[i]["logprob"]) for i in ref if i in got)])
    return {"same_ids_and_ranks": same, "max_logprob_diff": worst}


def part_capture(args, root: Path) -> dict:
    from llmneo.teachers import served

    rng = random.Random(1)
    sequences = [[rng.randrange(5, VOCAB) for _ in range(args.seq)] for _ in range(args.batch)]
    results = {}
    for teacher in args.capture_teachers:
        model_dir = root / ("teacher" if teacher == "default" else "small_teacher")
        with _server(args, model_dir, "teacher", extra=("--enable-scale-out",)) as server:
            runs = {way: [] for way in CAPTURE_WAYS}
            entries = {}
            for way in CAPTURE_WAYS:
                _capture_once(way, server, "teacher", sequences, args.k)  # warm-up
            for _ in range(args.rounds):  # interleaved: each way meets the same neighbours' load
                for way in CAPTURE_WAYS:
                    (got, size), wall, cpu, client = timed(
                        server, lambda: _capture_once(way, server, "teacher", sequences, args.k))
                    runs[way].append({"seconds": wall, "server_cpu": cpu, "client_cpu": client, "bytes": size})
                    entries.setdefault(way, got)
            rows_started = time.perf_counter()  # the client's next step, the same for every way
            for seq, got in zip(sequences, entries["completions"]):
                served.sparse_rows(got, list(range(1, len(seq))), args.k, VOCAB, "bench")
            rows_seconds = time.perf_counter() - rows_started
            checks = {way: _compare(entries["completions"], got) for way, got in entries.items()
                      if way not in ("completions", "forward_only")}
        results[teacher] = {"runs": runs, "checks": checks, "sparse_rows_seconds": rows_seconds}
        print(json.dumps({f"capture {teacher}": results[teacher]}), file=sys.stderr, flush=True)
    return results


# --- 2. generation --------------------------------------------------------------------------------------

def hf_generate(root: Path, variant: str, device: str, dtype_name: str, new_tokens: int, repeats: int) -> dict:
    """HF generate through llmneo's HFGenerator (as `llmneo train` builds it), in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from llmneo.models import generate as rollout

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "student")
    if variant == "lora":
        model = _student_with_adapter(root, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(root / "student").to(device)
    model = model.to(getattr(torch, dtype_name))
    generator = rollout.HFGenerator(model, tokenizer, rollout.Sampling(new_tokens, 0.0, 1.0))
    generator.eos = set()  # every row runs to new_tokens, as vLLM's ignore_eos
    prompts = [torch.tensor(p, device=device) for p in json.loads((root / "prompts.json").read_text())]
    times, cpu = [], []
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        started, mine = time.perf_counter(), time.process_time()
        replies = generator.generate(prompts)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - mine)
    return {"times": times[1:], "cpu": cpu[1:], "tokens": sum(len(r) for r in replies),
            "rows": [r.tolist() for r in replies]}


def _vllm_generate(server: VLLMServer, name: str, prompts: list, new_tokens: int) -> list[list[int]]:
    raw = _post(f"{server.url}/completions", {"model": name, "prompt": prompts, "max_tokens": new_tokens,
                                              "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
    return [c["token_ids"] for c in sorted(json.loads(raw)["choices"], key=lambda c: c["index"])]


def _timed_generate(server, name, prompts, new_tokens, repeats) -> dict:
    _vllm_generate(server, name, prompts, new_tokens)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        rows, wall, server_cpu, _ = timed(server, lambda: _vllm_generate(server, name, prompts, new_tokens))
        times.append(wall)
        cpu.append(server_cpu)
    return {"times": times, "cpu": cpu, "tokens": sum(map(len, rows)), "rows": rows}


def part_generate(args, root: Path) -> dict:
    prompts = json.loads((root / "prompts.json").read_text())
    found = {}
    for variant in ("base", "lora"):  # before any server starts: nothing else of ours on the cores
        found[f"hf_{variant}"] = in_fresh_process(__file__, [
            "--one", f"hf_{variant}", "--workdir", str(root), "--device", args.device, "--dtype", args.dtype,
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)], timeout=3600, env=_threads(args))
        print(json.dumps({f"hf_{variant}": found[f"hf_{variant}"].get("times")}), file=sys.stderr, flush=True)
    with _server(args, root / "student", "student") as server:
        found["vllm_base"] = _timed_generate(server, "student", prompts, args.new_tokens, args.repeats)
    with _server(args, root / "student", "student", enable_lora=True, max_lora_rank=args.lora_rank,
                 max_loras=2) as server:
        from llmneo.models import plain_lora

        adapter = root / "adapter_plain"
        if not adapter.is_dir():
            plain_lora.write(_student_with_adapter(root, "cpu"), adapter)
        _post(f"{server.url}/load_lora_adapter", {"lora_name": "policy", "lora_path": str(adapter)})
        found["vllm_lora"] = _timed_generate(server, "policy", prompts, args.new_tokens, args.repeats)
        found["vllm_lora_server_base"] = _timed_generate(server, "student", prompts, args.new_tokens, args.repeats)
    for name, reference in (("vllm_base", "hf_base"), ("vllm_lora", "hf_lora"), ("vllm_lora_server_base", "hf_base")):
        if "rows" in found.get(reference, {}):
            found[name]["rows_equal_hf"] = sum(a == b for a, b in zip(found[name]["rows"], found[reference]["rows"]))
    print(json.dumps({k: {x: y for x, y in v.items() if x != "rows"} for k, v in found.items()}), file=sys.stderr)
    return found


# --- 3. sync --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lap(laps: dict, name: str):
    """The block's wall seconds, as laps[name]."""
    started = time.perf_counter()
    yield
    laps[name] = time.perf_counter() - started


def _nudge(model) -> None:
    """An optimizer step's worth of change, so that every sync writes new weights."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(1e-4)


def _merged_state(model) -> dict:
    """The merged student's tensors under the base checkpoint's names: W0 + scaling.B.A for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            state[f"{name}.weight"] = (module.base_layer.weight + module.get_delta_weight("default")).contiguous()
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        state.setdefault(clean, tensor.contiguous())
    return state


def _first_use(laps: dict, server: VLLMServer, name: str, rng: random.Random) -> None:
    """What the first request on the new weights costs above the next one (work a load may leave for it); two
    random prompts of 64 tokens, so that the prefix cache serves neither."""
    walls = []
    for _ in range(2):
        started = time.perf_counter()
        _vllm_generate(server, name, [[rng.randrange(5, VOCAB) for _ in range(64)]], 1)
        walls.append(time.perf_counter() - started)
    laps["first request − the next (1 token)"] = walls[0] - walls[1]


def part_sync(args, root: Path) -> dict:
    import shutil

    import torch
    from safetensors.torch import save_file

    from llmneo.models import plain_lora

    torch.set_num_threads(args.threads or os.cpu_count())
    model = _student_with_adapter(root, args.device)
    work = Path(tempfile.mkdtemp(prefix="llmneo-vllm-sync-", dir=args.sync_dir))
    prompts = json.loads((root / "prompts.json").read_text())
    rng = random.Random(4)
    found = {"lora_new_name": [], "lora_inplace": [], "merged_reload": []}
    try:
        with _server(args, root / "student", "student", enable_lora=True, max_lora_rank=args.lora_rank,
                     max_loras=2) as server:
            for n in range(args.repeats + 1):  # the first is the warm-up
                for way in ("lora_new_name", "lora_inplace"):
                    _nudge(model)
                    laps, folder = {}, work / f"{way}-{n}"
                    name = f"step-{n}" if way == "lora_new_name" else "policy"
                    with lap(laps, "write (plain_lora.write)"):
                        plain_lora.write(model, folder)
                    with lap(laps, "load"):
                        _post(f"{server.url}/load_lora_adapter", {"lora_name": name, "lora_path": str(folder),
                                                                   "load_inplace": way == "lora_inplace"})
                    if way == "lora_new_name" and n:
                        with lap(laps, "unload the last"):
                            _post(f"{server.url}/unload_lora_adapter", {"lora_name": f"step-{n - 1}"})
                    _first_use(laps, server, name, rng)
                    if n:
                        found[way].append(laps)
                    shutil.rmtree(work / f"{way}-{n - 1}", ignore_errors=True)
        with _server(args, root / "student", "student") as server:
            config = json.loads((root / "student" / "config.json").read_text())
            for n in range(args.repeats + 1):
                _nudge(model)
                laps, folder = {}, work / f"merged-{n}"
                folder.mkdir()
                with lap(laps, "merge (W0 + s.B.A)"), torch.no_grad():
                    state = _merged_state(model)
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                with lap(laps, "write safetensors"):
                    save_file({k: v.to(getattr(torch, args.dtype)).cpu() for k, v in state.items()},
                              folder / "model.safetensors")
                    (folder / "config.json").write_text(json.dumps(config))
                with lap(laps, "reload_weights (collective_rpc)"):
                    _post(f"{server.root}/collective_rpc", {"method": "reload_weights",
                                                           "kwargs": {"weights_path": str(folder)}})
                with lap(laps, "reset_prefix_cache"):
                    _post(f"{server.root}/reset_prefix_cache")
                _first_use(laps, server, "student", rng)
                if n:
                    found["merged_reload"].append(laps)
                shutil.rmtree(work / f"merged-{n - 1}", ignore_errors=True)
            # The reloaded server against HF on the same merged weights: the weights really arrived.
            served_rows = _vllm_generate(server, "student", prompts, args.new_tokens)
        merged = model.merge_and_unload()
        from llmneo.models import generate as rollout
        from transformers import PreTrainedTokenizerFast

        generator = rollout.HFGenerator(merged, PreTrainedTokenizerFast.from_pretrained(root / "student"),
                                        rollout.Sampling(args.new_tokens, 0.0, 1.0))
        generator.eos = set()
        hf_rows = [r.tolist() for r in generator.generate([torch.tensor(p, device=args.device) for p in prompts])]
        found["merged_rows_equal_hf"] = sum(a == b for a, b in zip(served_rows, hf_rows))
        found["weights_bytes"] = (work / f"merged-{args.repeats}" / "model.safetensors").stat().st_size
        found["adapter_bytes"] = sum(f.stat().st_size for f in (work / f"lora_inplace-{args.repeats}").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(found), file=sys.stderr, flush=True)
    return found


# --- 4. on-policy steps through `llmneo train` ----------------------------------------------------------

STEP_ARMS = ("hf", "vllm", "vllm_ahead")


def train_steps(config: Path, server_group: int | None) -> dict:
    """`llmneo train config` in this (fresh) process: each optimizer step's wall time, this process's CPU time and
    the rollout server's (process group `server_group`)."""
    from llmneo import cli
    from llmneo.train import loop

    steps, original = [], loop.optimizer_step

    def timed(*args, **kwargs):
        server = group_cpu_seconds(server_group) if server_group else 0.0
        started, mine = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            steps.append({"seconds": time.perf_counter() - started, "cpu": time.process_time() - mine,
                          "server_cpu": (group_cpu_seconds(server_group) - server) if server_group else 0.0})
    loop.optimizer_step = timed
    return {"code": cli.main(["train", str(config)]), "steps": steps}


def part_step(args, root: Path) -> dict:
    rng = random.Random(2)
    words = "the quick brown fox jumps over a lazy dog while teachers distil students".split()
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(24)), "input": "",
             "output": " ".join(rng.choice(words) for _ in range(args.new_tokens))} for _ in range(args.step_batch)]
    (root / "step_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"model_name_or_path": str(root / "student"), "teacher_model_name_or_path": str(root / "teacher"),
            "dataset": str(root / "step_rows.jsonl"), "finetuning_type": "lora", "lora_rank": args.lora_rank,
            "lmbda": 1.0, "max_new_tokens": args.new_tokens, "per_device_train_batch_size": args.step_batch,
            "max_steps": args.repeats + 1, "logging_steps": 1, "cutoff_len": 512}
    found = {}
    for arm in STEP_ARMS:
        out = root / f"step_{arm}"
        config = {**base, "output_dir": str(out), "overwrite_output_dir": True}
        server = None
        if arm != "hf":
            server = _server(args, root / "student", "student", gpu_share=0.3, enable_lora=True,
                             max_lora_rank=args.lora_rank, max_loras=2).start()
            config.update(rollout_endpoint=server.url, rollout_ahead=1 if arm == "vllm_ahead" else 0)
        try:
            path = root / f"step_{arm}.json"
            path.write_text(json.dumps(config))
            group = ["--server-group", str(server.process.pid)] if server else []
            found[arm] = in_fresh_process(__file__, ["--one", "train", "--config", str(path), *group],
                                          timeout=3600, env=_threads(args))
        finally:
            if server is not None:
                server.stop()
        print(json.dumps({arm: found[arm]}), file=sys.stderr, flush=True)
    return found


# --- the tables -----------------------------------------------------------------------------------------

def report(args, results: dict) -> None:
    tokens = args.batch * args.seq
    print(f"\nvLLM benchmark: device {args.device}, {args.dtype}, preset {args.preset} "
          f"(student {PRESETS[args.preset]['student']}, teacher {PRESETS[args.preset]['teacher']}); "
          f"{args.rounds} round(s), {args.repeats} repeat(s)")
    for teacher, found in results.get("capture", {}).items():
        runs = found["runs"]
        floor = {key: statistics.median(r[key] for r in runs["forward_only"]) for key in ("seconds", "server_cpu")}
        print(f"\ncapture, teacher {teacher}: {args.batch} x {args.seq} tokens, k = {args.k}; wall = request + JSON "
              f"parse; server CPU = its processes' CPU seconds; median (min–max) of {args.rounds} interleaved rounds;"
              f" "
              f"'above the forward' = less forward_only's median (its head runs on the last position only); "
              f"sparse_rows of every position afterwards (client, the same for every way): "
              f"{found['sparse_rows_seconds']:.3f} s\n")
        print("| way | wall (s) | tokens/s | server CPU (s) | tokens per server CPU s | server CPU above the forward "
              "(s) | client CPU (s) | bytes per token | same ids and ranks | max abs log-prob diff |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for way, measured in runs.items():
            wall, cpu = [r["seconds"] for r in measured], [r["server_cpu"] for r in measured]
            check = found["checks"].get(way, {})
            same = "reference" if way == "completions" else ("-" if not check else check["same_ids_and_ranks"])
            diff = f"{check['max_logprob_diff']:.1e}" if check else "-"
            print(f"| {way} | {_spread(wall)} | {_spread([tokens / s for s in wall], 0)} | {_spread(cpu)} | "
                  f"{_spread([tokens / s for s in cpu], 0)} | {statistics.median(cpu) - floor['server_cpu']:.3f} | "
                  f"{_spread([r['client_cpu'] for r in measured])} | {measured[0]['bytes'] / tokens:.0f} | {same} | "
                  f"{diff} |")
    generated = results.get("generate")
    if generated:
        print(f"\ngeneration: {args.prompts} prompts x {args.new_tokens} greedy tokens (EOS ignored), LoRA rank "
              f"{args.lora_rank}; median of {args.repeats} after a warm-up\n")
        print("| generator | wall (s) | tokens/s | CPU (s) | tokens per CPU s | rows equal to HF's |")
        print("|---|---|---|---|---|---|")
        for name, r in generated.items():
            if "error" in r:
                print(f"| {name} | - | - | - | - | {r['error']} |")
                continue
            print(f"| {name} | {_spread(r['times'])} | {_spread([r['tokens'] / t for t in r['times']], 1)} | "
                  f"{_spread(r['cpu'])} | {_spread([r['tokens'] / t for t in r['cpu']], 1)} | "
                  f"{r.get('rows_equal_hf', '-')} |")
    synced = results.get("sync")
    if synced:
        print(f"\nsync per step (median (min–max) of {args.repeats}, after a warm-up); adapter "
              f"{synced['adapter_bytes'] / 2**20:.1f} MiB, merged weights {synced['weights_bytes'] / 2**20:.1f} MiB; "
              f"greedy rows of the reloaded server equal to HF's on the merged weights: "
              f"{synced['merged_rows_equal_hf']} of {args.prompts}\n")
        print("| way | part | seconds |\n|---|---|---|")
        for way in ("lora_new_name", "lora_inplace", "merged_reload"):
            laps = synced[way]
            for part in laps[0]:
                print(f"| {way} | {part} | {_spread([lap[part] for lap in laps])} |")
            whole = [sum(max(v, 0.0) if k.startswith("first") else v for k, v in lap.items()) for lap in laps]
            print(f"| {way} | **whole sync** (a negative first-use difference as 0) | **{_spread(whole)}** |")
    stepped = results.get("step")
    if stepped:
        print(f"\non-policy `llmneo train` steps (lmbda 1, {args.step_batch} prompts x up to {args.new_tokens} "
              f"tokens, LoRA rank {args.lora_rank}, live teacher), median (min–max) of the steps after the first\n")
        print("| replies from | step wall (s) | train process CPU (s) | server CPU (s) | steps |")
        print("|---|---|---|---|---|")
        for arm, r in stepped.items():
            if "error" in r or r.get("code"):
                print(f"| {arm} | - | - | - | {r.get('error', 'exit ' + str(r.get('code')))} |")
                continue
            cells = [_spread([step[key] for step in r["steps"][1:]]) for key in ("seconds", "cpu", "server_cpu")]
            print(f"| {arm} | " + " | ".join(cells) + f" | {len(r['steps'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--capture-teachers", nargs="+", choices=("default", "small"), default=["default"])
    parser.add_argument("--batch", type=int, default=16, help="capture: sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="capture: tokens per sequence")
    parser.add_argument("--k", type=int, default=20, help="capture: prompt log-probs per position")
    parser.add_argument("--prompts", type=int, default=16, help="generate and sync: chat prompts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--step-batch", type=int, default=4, help="step: prompts per optimizer step")
    parser.add_argument("--rounds", type=int, default=5, help="capture: interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="generate, sync, step: timed calls after a warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the HF side (generate, train, sync); vLLM's CPU engine binds one core "
                             "and leaves the other to its API process; 0 = torch's default")
    parser.add_argument("--workdir", help="keep the models here between runs (default: a temporary directory)")
    parser.add_argument("--sync-dir", help="where sync writes the weights (default: the system's temp dir)")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--server-group", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "train":
        print(json.dumps(train_steps(Path(args.config), args.server_group)))
        return
    if args.one:
        found = hf_generate(Path(args.workdir), args.one.removeprefix("hf_"), args.device, args.dtype,
                            args.new_tokens, args.repeats)
        print(json.dumps(found))
        return
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the servers' /collective_rpc and /reset_prefix_cache (sync)
    with tempfile.TemporaryDirectory(prefix="llmneo-vllm-bench-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        args.logs = root / "logs"
        args.logs.mkdir(exist_ok=True)
        build(root, args)
        results = {}
        for part in args.parts:
            results[part] = globals()[f"part_{part}"](args, root)
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str))
    report(args, results)


if __name__ == "__main__":
    main()
