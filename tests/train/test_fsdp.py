"""FSDP2 on CPU (gloo, 2 processes), launched as a user launches it: `accelerate launch --config_file
examples/accelerate/fsdp.yaml`. It must give the DDP run's losses and adapter, resume exactly, shard the
teacher for inference, and resume a full fine-tune."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import engines

BIN = Path(sys.executable).parent
FSDP_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp.yaml"
ROWS = [{"instruction": f"Question {i} about the fox?", "input": "", "output": "Answer " * (1 + i % 4) + "done."}
        for i in range(16)]
TIMEOUT = 600  # the CPU is shared; a launch takes ~20 s alone


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _accelerate_fsdp(*args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-3000:])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_run(a: Path, b: Path, weights: str, tol: float) -> None:
    rows_a, rows_b = _metrics(a), _metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] and rows_a
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=tol), (ra["step"], key)
    _same_weights(a / weights, b / weights, tol)
    results_a, results_b = (json.loads((d / "train_results.json").read_text()) for d in (a, b))
    for key in ("eval_ce_loss", "eval_kd_loss"):  # the held-out split, scored by every rank's sharded models
        assert results_b[key] == pytest.approx(results_a[key], abs=tol), key


def _same_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].shape == wb[name].shape and (wa[name] - wb[name]).abs().max() <= tol, name


@pytest.fixture
def neo_config(tmp_path, student_dir, teacher_dir) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / "neo.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(student_dir), "teacher_model_name_or_path": str(teacher_dir),
        "dataset": str(data), "lora_rank": 4, "per_device_train_batch_size": 2, "max_steps": 6, "logging_steps": 1,
        "save_steps": 3, "cutoff_len": 64, "learning_rate": 5e-3, "seed": 3, "val_size": 4}))
    return path


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes(tmp_path, neo_config):
    """Neo (LoRA + live teacher): FSDP2 per-step losses, gradient norms, held-out scores and adapter equal DDP's;
    a run resumed from its checkpoint equals the uninterrupted one."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _ok(_torchrun("-m", "llmneo", "train", str(neo_config), f"output_dir={ddp}"))
    done = _accelerate_fsdp("-m", "llmneo", "train", str(neo_config), f"output_dir={fsdp}")
    _ok(done)
    # It really ran sharded: the full-logits fallback announced once, one optimizer shard per rank.
    assert (done.stdout + done.stderr).count("using full logits at the response positions") == 1
    assert sorted(p.name for p in (fsdp / "checkpoint-3").glob("optimizer*.pt")) == ["optimizer_0.pt", "optimizer_1.pt"]
    assert not list((ddp / "checkpoint-3").glob("optimizer_*.pt"))
    # DDP used the chunked loss, FSDP the full logits: the same numbers all the same.
    _same_run(ddp, fsdp, "adapter_model.safetensors", tol=1e-5)
    adapter = Path("checkpoint-3") / "adapter_model.safetensors"
    _same_weights(ddp / adapter, fsdp / adapter, tol=1e-5)

    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(fsdp / "checkpoint-3", cut / "checkpoint-3")
    resumed = _accelerate_fsdp("-m", "llmneo", "train", str(neo_config), f"output_dir={cut}",
                               "resume_from_checkpoint=auto")
    _ok(resumed)
    assert "resuming from" in resumed.stdout
    _same_run(fsdp, cut, "adapter_model.safetensors", tol=1e-6)


PROBE = '''
import json, sys
from pathlib import Path
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from llmneo import cli
from llmneo.models import engines, loading as models

student_dir, teacher_dir, out, neo_config, *full = sys.argv[1:]
out = Path(out)
accelerator = engines.create_accelerator(mixed_precision="no")
rank = accelerator.process_index
# The Llama student first, as in a run: its preparation leaves its layer class in accelerate's plugin.
student = models.load_model(student_dir, "model_name_or_path", torch.float32, False)
student, _ = accelerator.prepare(student, torch.optim.AdamW(student.parameters()))
teacher = models.load_model(teacher_dir, "teacher_model_name_or_path", torch.float32, False)
if rank == 1:  # cpu_ram_efficient_loading: only rank 0's weights count; the others receive theirs from it
    with torch.no_grad():
        for param in teacher.parameters():
            param.zero_()
placed = engines.place_teacher(teacher, accelerator)
params = list(placed.parameters())
facts = {"distributed_type": accelerator.distributed_type.value, "teacher": type(placed).__name__,
         "layers_sharded": all(isinstance(layer, FSDPModule) for layer in placed.model.layers),
         "all_dtensor": all(isinstance(p, DTensor) for p in params),
         "local_fraction": sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params),
         "training": placed.training, "requires_grad": any(p.requires_grad for p in params)}
with torch.no_grad():
    torch.save(placed(input_ids=torch.arange(3, 23).reshape(2, 10)).logits, out / f"logits_{rank}.pt")
(out / f"facts_{rank}.json").write_text(json.dumps(facts))
# The process group lives until a run ends, so the run comes last.
assert cli.main(["train", neo_config, f"output_dir={out / 'full'}", *full]) == 0
'''


@pytest.mark.slow
def test_fsdp_shards_the_teacher_and_resumes_full_finetuning(tmp_path, neo_config, student_dir, tokenizer):
    """A teacher of another architecture than the student's (Qwen2 for a Llama) is sharded per decoder layer
    for inference and gives the whole teacher's logits on every rank; a full fine-tune (every weight a
    DTensor) resumes from its checkpoint to the same model."""
    teacher_dir = tiny.save_pair(tiny.build_model(tokenizer, family="qwen2", hidden_size=48, num_layers=3, seed=4),
                                 tokenizer, tmp_path / "qwen2_teacher")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    full = ["finetuning_type=full", "max_steps=4", "save_steps=2", "learning_rate=1e-3"]
    _ok(_accelerate_fsdp(str(probe), str(student_dir), str(teacher_dir), str(tmp_path), str(neo_config), *full))

    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = whole(input_ids=torch.arange(3, 23).reshape(2, 10)).logits
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"facts_{rank}.json").read_text())
        assert facts["distributed_type"] == "FSDP" and facts["teacher"] == "FSDPQwen2ForCausalLM"
        assert facts["layers_sharded"]
        assert facts["all_dtensor"] and facts["local_fraction"] == pytest.approx(0.5, abs=0.05)
        assert not facts["training"] and not facts["requires_grad"]
        logits = torch.load(tmp_path / f"logits_{rank}.pt")
        assert (logits - expected).abs().max() <= 1e-5, rank

    cut = tmp_path / "cut"
    checkpoint = tmp_path / "full" / "checkpoint-2"
    _ok(_accelerate_fsdp("-m", "llmneo", "train", str(neo_config), f"output_dir={cut}",
                         f"resume_from_checkpoint={checkpoint}", *full))
    _same_run(tmp_path / "full", cut, "model.safetensors", tol=1e-6)


def test_fsdp1_on_cpu_is_refused(monkeypatch):
    """accelerate would silently run an FSDP1 launch on CPU as plain DDP; llmneo says what to change."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LlmneoError, match="fsdp_version: 2"):
        engines.create_accelerator(mixed_precision="no")
