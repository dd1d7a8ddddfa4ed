"""rollout_endpoint when things fail, against the vLLM stand-in (tests/vllm_standin.py):
- a rollout_adapter_dir that cannot be written (under a file) is one line, at set-up and on resume;
- a refused start removes the nested folders it made;
- a 5xx from load_lora_adapter other than the engine's refusal is retried, then EndpointGone (the loop
  checkpoints), and the new adapter's folder goes with it;
- close() stops requests already retrying, and still unloads the adapter;
- a checkpoint's rollout files cut short or damaged are the corrupt-checkpoint line, before the server is asked;
- a run that fails after its last step (the final save) leaves no adapter on the server and no folder; and the
  served rollouts are closed before train_results.json is written.
"""

from __future__ import annotations

import errno
import json
import time
import urllib.request
from concurrent.futures import wait

import pytest
import torch
from helpers import write_yaml
from vllm_standin import StandIn

from llmneo import cli
from llmneo.config import schema
from llmneo.endpoint import EndpointGone
from llmneo.errors import LlmneoError
from llmneo.models import adapters, served_rollouts
from llmneo.train import loop

IM_END = 4  # the tiny tokenizer's <|im_end|>
SERVED = {"teacher_model_name_or_path": "teacher", "lmbda": 1, "lora_rank": 8, "temperature": 0,
          "max_new_tokens": 4}
PROMPTS = [torch.tensor([1, 17, 42, 99, 7]), torch.tensor([1, 250, 12])]


def _engine(base_dir, tokenizer, url: str, tmp_path, *, model=None, step: int = 0, resume_from=None, **settings):
    """A PEFT student on `base_dir` (or `model`) and its ServedRollouts at `url`."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    config = schema.load(overrides={**SERVED, "model_name_or_path": str(base_dir), "rollout_endpoint": url,
                                    "output_dir": str(tmp_path / "out"), **settings})
    if model is None:
        model = adapters.apply(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
    engine = served_rollouts.ServedRollouts(config, model, tokenizer, PartialState(cpu=True), stop_ids={IM_END},
                                            step=step, resume_from=resume_from)
    return model, engine


def _move(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.5 * torch.randn(p.shape, generator=generator))


def _submit(engine, step: int, trained: int):
    return engine.submit(step, trained, [{"index": torch.arange(len(PROMPTS))}], [PROMPTS])


def _served_adapters(standin) -> list[str]:
    """What the server says it holds: GET /v1/models lists loaded adapters with a parent."""
    with urllib.request.urlopen(f"{standin.url}/models") as answer:
        return [c["id"] for c in json.loads(answer.read())["data"] if c.get("parent")]


def _one_line(error) -> str:
    text = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in text
    return text


# --- writing the adapter ------------------------------------------------------------------------------------------

def test_a_rollout_adapter_dir_under_a_file_is_one_line(student_dir, tokenizer, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        with pytest.raises(LlmneoError) as err:
            _engine(student_dir, tokenizer, standin.url, tmp_path, rollout_adapter_dir=str(tmp_path / "a-file" / "sub"))
        assert "(rollout_adapter_dir): Not a directory" in _one_line(err)
        assert not standin.adapters
        # resumed: the checkpoint's adapter is copied there, and refused the same way
        model, engine = _engine(student_dir, tokenizer, standin.url, tmp_path)
        checkpoint = tmp_path / "checkpoint-1"
        checkpoint.mkdir()
        engine.save(checkpoint, None, None)
        engine.close()
        with pytest.raises(LlmneoError) as err:
            _engine(student_dir, tokenizer, standin.url, tmp_path, model=model, step=1, resume_from=checkpoint,
                    rollout_adapter_dir=str(tmp_path / "a-file" / "sub"))
        assert "cannot write the served adapter to" in _one_line(err) and "Not a directory" in str(err.value)
        assert not _served_adapters(standin)


def test_a_rollout_adapter_dir_under_a_file_exits_2_through_the_cli(tmp_path, base_overrides, student_dir,
                                                                    tokenizer, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        run = {**base_overrides, "lmbda": 1, "max_new_tokens": 4, "rollout_endpoint": standin.url,
               "rollout_adapter_dir": str(tmp_path / "a-file" / "sub")}
        assert cli.main(["train", write_yaml(tmp_path, "run.yaml", run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "(rollout_adapter_dir): Not a directory" in err.strip().splitlines()[-1]


def test_a_refused_start_removes_the_nested_folders_it_made(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=False) as standin:
        with pytest.raises(LlmneoError, match="serves no LoRA adapters"):
            _engine(student_dir, tokenizer, standin.url, tmp_path, rollout_adapter_dir=str(tmp_path / "a" / "b" / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "out").exists()


# --- the server failing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, message", [
    (503, "Service Unavailable"),  # a proxy in front of vLLM, or vLLM busy
    (500, "EngineCore encountered an issue. See stack trace (above) for the root cause."),  # an engine dying
])
def test_a_5xx_from_load_lora_adapter_is_retried_then_endpoint_gone(student_dir, tokenizer, tmp_path, code,
                                                                    message):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        model, engine = _engine(student_dir, tokenizer, standin.url, tmp_path)
        loads = []

        def failing(body):
            loads.append(body["lora_name"])
            return code, {"error": {"message": message, "type": "InternalServerError", "param": None, "code": code}}

        standin.load_lora = failing
        engine.endpoint.backoff = 0.01
        try:
            _move(model)
            with pytest.raises(EndpointGone) as err:  # the loop checkpoints step 1 on it (test below, slow)
                _submit(engine, 2, 1)
            assert f"HTTP {code}" in _one_line(err) and "after 5 attempts" in str(err.value)
            assert loads == [engine.name(1)] * (engine.endpoint.retries + 1)
            assert [p.name for p in engine.folder.iterdir()] == [engine.name(0)]  # the failed sync's folder went
            assert engine.version == 0 and list(standin.adapters) == [engine.name(0)]
        finally:
            engine.close()
        assert not _served_adapters(standin) and not engine.folder.exists()


def test_the_engines_refusal_is_final(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True, max_lora_rank=4) as standin:
        load, loads = standin.load_lora, []
        standin.load_lora = lambda body: (loads.append(body), load(body))[1]
        with pytest.raises(LlmneoError) as err:
            _engine(student_dir, tokenizer, standin.url, tmp_path)
        assert not isinstance(err.value, EndpointGone) and "greater than max_lora_rank 4" in _one_line(err)
        assert len(loads) == 1  # not retried


def test_close_stops_requests_already_retrying_and_still_unloads(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        _, engine = _engine(student_dir, tokenizer, standin.url, tmp_path)
        engine.endpoint.backoff = 30.0  # a retry would wait 30 s, then 60, ...
        standin.stop_after = standin.completions  # every completion is a 503 from now on
        pending = _submit(engine, 1, 0)
        deadline = time.perf_counter() + 10
        while standin.completions < len(PROMPTS) and time.perf_counter() < deadline:
            time.sleep(0.01)  # each row has had its first answer: they are waiting to retry
        started = time.perf_counter()
        engine.close()
        rows = pending.rows[0]
        done, _ = wait(rows, timeout=5)
        assert len(done) == len(rows) and time.perf_counter() - started < 5
        assert all(isinstance(r.exception(), EndpointGone) for r in rows)
        assert not _served_adapters(standin) and not engine.folder.exists()


# --- a checkpoint's rollout files ---------------------------------------------------------------------------------

def _damage(checkpoint, how: str) -> None:
    state, adapter = checkpoint / served_rollouts.STATE, checkpoint / served_rollouts.ADAPTER
    replies = checkpoint / served_rollouts.REPLIES.format(rank=0)
    if how == "state not json":
        state.write_text('{"version": 1, "na')
    elif how == "state without version":
        state.write_text(json.dumps({"name": "x"}))
    elif how == "no state":
        state.unlink()
    elif how == "no adapter":
        for path in adapter.iterdir():
            path.unlink()
        adapter.rmdir()
    elif how == "adapter cut short":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "replies cut short":
        replies.write_bytes(replies.read_bytes()[: replies.stat().st_size // 2])


@pytest.mark.parametrize("how, named", [
    ("state not json", "rollouts.json is not a JSON object"),
    ("state without version", "rollouts.json is not a JSON object with the adapter's version"),
    ("no state", "rollouts.json is missing"),
    ("no adapter", "rollout_adapter/ is missing"),
    ("adapter cut short", "rollout_adapter/ cannot be read"),
    ("replies cut short", "rollout_replies_0.safetensors cannot be read"),
])
def test_damaged_rollout_files_are_the_corrupt_checkpoint_line(student_dir, tokenizer, tmp_path, how, named):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True, max_lora_rank=16) as standin:
        model, engine = _engine(student_dir, tokenizer, standin.url, tmp_path, rollout_ahead=1)
        checkpoint = tmp_path / "out" / "checkpoint-1"
        checkpoint.mkdir()
        engine.save(checkpoint, _submit(engine, 2, 0), 2)  # step 2's replies, written ahead
        engine.close()
        assert (checkpoint / served_rollouts.REPLIES.format(rank=0)).is_file()
        _damage(checkpoint, how)
        with pytest.raises(LlmneoError) as err:
            _engine(student_dir, tokenizer, standin.url, tmp_path, model=model, step=1, resume_from=checkpoint,
                    rollout_ahead=1)
        line = _one_line(err)
        assert line.startswith(f"checkpoint '{checkpoint}' is incomplete or corrupt: {named}"), line
        assert line.endswith("resume from another checkpoint-STEP or start again with overwrite_output_dir=true")
        assert not _served_adapters(standin) and not (tmp_path / "out" / "rollout_adapters").exists()


def test_a_checkpoint_without_rollout_files_syncs_its_weights(student_dir, tokenizer, tmp_path):
    """A checkpoint of a run that generated with HF (no rollout_endpoint) has none: its weights are the adapter."""
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        _, engine = _engine(student_dir, tokenizer, standin.url, tmp_path, step=3, resume_from=checkpoint)
        try:
            assert engine.version == 3 and list(standin.adapters) == [engine.name(3)]
        finally:
            engine.close()


# --- through the CLI ------------------------------------------------------------------------------------------

@pytest.fixture
def served_run(base_overrides) -> dict:
    return {**base_overrides, "lmbda": 1, "temperature": 0, "max_new_tokens": 4, "max_steps": 2}


def test_a_run_failing_after_its_last_step_leaves_nothing_on_the_server(tmp_path, served_run, student_dir,
                                                                        tokenizer, monkeypatch, capsys):
    def disk_full(*args, **kwargs):  # the final save fails as on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "_save_model", disk_full)
    out = tmp_path / "out"
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        run = {**served_run, "rollout_endpoint": standin.url}
        assert cli.main(["train", write_yaml(tmp_path, "run.yaml", run)]) == 2
        assert "No space left on device" in capsys.readouterr().err.strip().splitlines()[-1]
        assert not _served_adapters(standin)
    assert not (out / "rollout_adapters").exists() and not (out / "train_results.json").exists()


def test_the_rollouts_are_closed_before_the_results_are_written(tmp_path, served_run, student_dir, tokenizer):
    out, results_then = tmp_path / "out", []
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        unload = standin.unload_lora

        def noting(body):  # whether train_results.json was there when each adapter was unloaded
            results_then.append((out / "train_results.json").exists())
            return unload(body)

        standin.unload_lora = noting
        run = {**served_run, "rollout_endpoint": standin.url}
        assert cli.main(["train", write_yaml(tmp_path, "run.yaml", run)]) == 0
        assert not _served_adapters(standin)
    assert results_then and not any(results_then) and (out / "train_results.json").is_file()
    assert not (out / "rollout_adapters").exists()


@pytest.mark.slow
def test_a_503_loading_the_adapter_mid_run_checkpoints(tmp_path, served_run, student_dir, tokenizer, capsys):
    """Step 1 uses the adapter loaded at set-up; step 2's sync meets only 503s: retried, then EndpointGone, and
    the loop writes checkpoint-1 and says how to resume."""
    out = tmp_path / "out"
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        load = standin.load_lora
        standin.load_lora = lambda body: load(body) if not standin.adapters and "step0" in body["lora_name"] else (
            503, {"error": {"message": "Service Unavailable", "type": "ServiceUnavailableError", "code": 503}})
        run = {**served_run, "rollout_endpoint": standin.url, "save_steps": 10}
        assert cli.main(["train", write_yaml(tmp_path, "run.yaml", run)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "HTTP 503" in last and f"checkpoint written to {out / 'checkpoint-1'}." in last, last
        assert (out / "checkpoint-1" / served_rollouts.ADAPTER).is_dir()
        assert not _served_adapters(standin)
    assert not (out / "rollout_adapters").exists()
