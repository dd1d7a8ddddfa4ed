"""rollout_endpoint in the fast tier: the keys' checks, the seeds and the requests, and the served engine against the
vLLM stand-in (tests/vllm_standin.py, which tests/vllm/test_standin_agrees.py holds to a real vLLM server):
- the config refuses, in one line, rollout keys without rollout_endpoint, rollout_endpoint without lmbda, with
  full fine-tuning or DoRA, and values vLLM would refuse;
- seeds depend on (seed, step, row) only; a request sets every sampler explicitly;
- served greedy replies are HF generate's, and the adapter follows the weights every rollout_sync_steps;
  the previous adapter is unloaded and its folder deleted;
- sampled replies repeat with their seeds, never emit a padded head row; a server that lost the adapter gets
  it again; what the server refuses is one line, and a refused start leaves no folder behind;
- through the CLI: greedy equals HF generate, and a rollout_ahead run resumes exactly (slow): from a periodic
  checkpoint, after the rollout server or a served teacher went away mid-run, and only with its own
  rollout_ahead and rollout_sync_steps (an older checkpoint: their defaults);
- under DDP (2 CPU processes): a failure of one rank's replies stops every rank together, of one kind.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_same_training, read_metrics, resumed_from, write_yaml
from vllm_standin import StandIn

from llmneo import cli
from llmneo.config import schema
from llmneo.config.checks import ROLLOUT_KEYS
from llmneo.errors import LlmneoError
from llmneo.models import adapters, generate, rollout_server, served_rollouts

IM_END = 4  # the tiny tokenizer's <|im_end|>: the template's end of turn


# --- the config --------------------------------------------------------------------------------------------------

SERVED = {"teacher_model_name_or_path": "teacher", "lmbda": 1, "rollout_endpoint": "http://127.0.0.1:8000/v1"}


@pytest.mark.parametrize("change, expected", [
    ({"lmbda": 0}, "but lmbda is 0"),
    ({"finetuning_type": "full"}, "with finetuning_type: full there is none"),
    ({"use_dora": True}, "DoRA's is not one"),
    ({"lora_variant": "dora"}, "DoRA's is not one"),
    ({"temperature": 2.5}, "vLLM samples at temperature <= 2"),
    ({"temperature": 0.005}, "vLLM raises a temperature below 0.01 to 0.01 (HF does not), got 0.005"),
    ({"rollout_endpoint": "localhost:8000/v1"}, "must be an http(s) URL"),
    ({"rollout_ahead": 2}, "rollout_ahead must be 0 or 1"),
    ({"rollout_sync_steps": 0}, "rollout_sync_steps must be > 0"),
    ({"rollout_api_key_env": "sk-live-123"}, "must be the NAME of an environment variable"),
])
def test_the_config_refuses_what_cannot_serve_in_one_line(change, expected):
    with pytest.raises(LlmneoError) as err:
        schema.load(overrides={**SERVED, **change})
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert "sk-live-123" not in str(err.value)


@pytest.mark.parametrize("key", sorted(ROLLOUT_KEYS))
def test_rollout_keys_need_rollout_endpoint(key):
    value = {"rollout_sync_steps": 2, "rollout_ahead": 1}.get(key, "SOMETHING")
    with pytest.raises(LlmneoError, match=f"^{key} configures the student's rollouts from a vLLM server; set "
                                          f"rollout_endpoint"):
        schema.load(overrides={"teacher_model_name_or_path": "teacher", "lmbda": 1, key: value})


def test_a_served_config_loads_and_records_its_folder_absolute(tmp_path, monkeypatch):
    from llmneo.train import recorded_config

    monkeypatch.chdir(tmp_path)
    config = schema.load(overrides={**SERVED, "rollout_ahead": 1, "rollout_sync_steps": 3,
                                    "rollout_adapter_dir": "shared/adapters"})
    assert (config.rollout_ahead, config.rollout_sync_steps) == (1, 3)
    assert recorded_config.recorded(config).rollout_adapter_dir == str(tmp_path / "shared" / "adapters")


# --- seeds and requests ------------------------------------------------------------------------------------------

def test_row_seeds_depend_on_seed_step_and_row_only():
    seeds = {(s, t, r): served_rollouts.row_seed(s, t, r) for s in (0, 1) for t in range(1, 6) for r in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # another for every (seed, step, row)
    assert all(0 <= v < 2 ** 63 for v in seeds.values())  # vLLM takes an int64
    assert served_rollouts.row_seed(1, 3, 5) == seeds[(1, 3, 5)]  # and the same each time asked


def test_a_request_sets_every_sampler_as_hf_samples():
    sampled = rollout_server.completion_request("m", torch.tensor([5, 6]).tolist(), max_tokens=7, seed=11,
                                                 sampling=generate.Sampling(7, 0.7, 0.9), stop_ids={4, 2})
    assert sampled == {"model": "m", "prompt": [5, 6], "max_tokens": 7, "n": 1, "temperature": 0.7, "top_p": 0.9,
                       "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                       "frequency_penalty": 0.0, "min_tokens": 0, "ignore_eos": False, "seed": 11,
                       "stop_token_ids": [2, 4], "return_token_ids": True}
    greedy = rollout_server.completion_request("m", [5], max_tokens=3, seed=1, sampling=generate.Sampling(3, 0.0, 0.5),
                                                stop_ids=set(), allowed=[0, 1, 2])
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and greedy["allowed_token_ids"] == [0, 1, 2]


# --- the engine against the stand-in ------------------------------------------------------------------------------

PROMPTS = [torch.tensor([1, 17, 42, 99, 7]), torch.tensor([1, 250, 12]), torch.tensor([1, 60, 61, 9, 10, 66])]


def _engine(base_dir, tokenizer, url: str, tmp_path, **settings):
    """The PEFT student on `base_dir` and its ServedRollouts at `url` (LoRA rank 8; settings override)."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    config = schema.load(overrides={**SERVED, "model_name_or_path": str(base_dir), "rollout_endpoint": url,
                                    "output_dir": str(tmp_path / "out"), "lora_rank": 8, "temperature": 0,
                                    "max_new_tokens": 6, **settings})
    model = adapters.apply(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
    initial = ({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
               if adapters.rewrites_base(config) else None)  # PiSSA / OLoRA: as train.setup keeps it
    engine = served_rollouts.ServedRollouts(config, model, tokenizer, PartialState(cpu=True), stop_ids={IM_END},
                                            initial_adapter=initial)
    return config, model, engine


def _move(model, scale: float = 0.5, seed: int = 0) -> None:
    """What training does to the adapter: every LoRA weight moves."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _replies(engine, step: int, trained: int) -> tuple[list[list[int]], int]:
    micro = [{"index": torch.arange(len(PROMPTS))}]
    replies, staleness = engine.submit(step, trained, micro, [PROMPTS]).result()
    return [r.tolist() for r in replies[0]], staleness


def test_served_greedy_replies_are_hf_generates_and_follow_the_weights(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        config, model, engine = _engine(student_dir, tokenizer, standin.url, tmp_path, rollout_sync_steps=2)
        hf = generate.HFGenerator(model, tokenizer, generate.Sampling.from_config(config), stop_ids={IM_END})
        try:
            assert list(standin.adapters) == [engine.name(0)]  # loaded at set-up: the probe
            first, staleness = _replies(engine, 1, 0)
            assert staleness == 0 and first == [r.tolist() for r in hf.generate(PROMPTS)]
            _move(model)
            stale, staleness = _replies(engine, 2, 1)  # one step older than the weights: within rollout_sync_steps
            assert staleness == 1 and stale == first
            _move(model, seed=1)
            synced, staleness = _replies(engine, 3, 2)  # two steps: synced first
            assert staleness == 0 and synced == [r.tolist() for r in hf.generate(PROMPTS)] and synced != first
            assert list(standin.adapters) == [engine.name(2)]  # the previous one unloaded, its folder deleted
            assert [p.name for p in engine.folder.iterdir()] == [engine.name(2)]
        finally:
            engine.close()
        assert not standin.adapters and not engine.folder.exists()


def test_sampled_replies_repeat_with_their_seeds_and_never_a_padded_row(teacher_dir, tokenizer, tmp_path):
    # teacher_dir's head has 64 rows past the tokenizer, scaled up: unsuppressed, they would be sampled
    with StandIn(str(teacher_dir), tokenizer, name="padded", enable_lora=True) as standin:
        _, _, engine = _engine(teacher_dir, tokenizer, standin.url, tmp_path, temperature=1.0, max_new_tokens=12)
        try:
            assert engine.allowed == list(range(len(tokenizer)))
            once, again, later = _replies(engine, 3, 2)[0], _replies(engine, 3, 2)[0], _replies(engine, 4, 2)[0]
            assert once == again and once != later
            assert all(t < len(tokenizer) for reply in once + later for t in reply)
        finally:
            engine.close()


def test_a_server_that_lost_the_adapter_gets_it_again(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        _, _, engine = _engine(student_dir, tokenizer, standin.url, tmp_path)
        try:
            before = _replies(engine, 1, 0)[0]
            standin.adapters.clear()  # as after a restart of the server
            assert _replies(engine, 2, 0)[0] == before and list(standin.adapters) == [engine.name(0)]
        finally:
            engine.close()


def test_a_killed_run_of_the_same_output_dir_leaves_no_adapter_behind(student_dir, tokenizer, tmp_path):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        _, model, killed = _engine(student_dir, tokenizer, standin.url, tmp_path)
        _move(model)
        _replies(killed, 3, 2)  # synced: step 2's adapter is loaded, and never closed
        killed.pool.shutdown()
        standin.adapters["someone-else"] = standin.adapters[killed.name(2)]  # another client's stays
        _, _, again = _engine(student_dir, tokenizer, standin.url, tmp_path)
        try:
            assert sorted(standin.adapters) == sorted([again.name(0), "someone-else"])
            assert [p.name for p in again.folder.iterdir()] == [again.name(0)]
        finally:
            again.close()


@pytest.mark.parametrize("standin_settings, settings, expected", [
    ({"enable_lora": False}, {}, "serves no LoRA adapters (LoRA is not enabled. Use --enable-lora to enable LoRA.); "
                                 "start vLLM with --enable-lora --max-lora-rank 8"),
    ({"max_lora_rank": 4}, {}, "(LoRA rank 8 is greater than max_lora_rank 4.); start vLLM with --max-lora-rank 8"),
    ({}, {"rollout_endpoint_model": "nope"}, "rollout_endpoint_model 'nope' is not served at"),
    ({}, {"lora_variant": "pissa", "lora_rank": 12}, "LoRA rank 24 is greater than max_lora_rank 16"),
])
def test_what_the_server_refuses_is_one_line_and_leaves_nothing(student_dir, tokenizer, tmp_path, standin_settings,
                                                                settings, expected):
    with StandIn(str(student_dir), tokenizer, name="student", **{"enable_lora": True, **standin_settings}) as standin:
        with pytest.raises(LlmneoError) as err:
            _engine(student_dir, tokenizer, standin.url, tmp_path, **settings)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert standin.completions == 0 and not standin.adapters
    assert not (tmp_path / "out").exists()  # the probe's folder (and output_dir) went with the refusal


# --- through the CLI ------------------------------------------------------------------------------------------

@pytest.fixture
def served_run(base_overrides) -> dict:
    return {**base_overrides, "lmbda": 1, "temperature": 0, "max_new_tokens": 6, "learning_rate": 2e-2}


@pytest.mark.slow
def test_greedy_training_through_the_standin_is_training_through_hf(tmp_path, served_run, student_dir, tokenizer):
    hf, served = tmp_path / "hf", tmp_path / "served"
    assert cli.main(["train", write_yaml(tmp_path, "hf.yaml", {**served_run, "output_dir": str(hf)})]) == 0
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        run = {**served_run, "output_dir": str(served), "rollout_endpoint": standin.url}
        assert cli.main(["train", write_yaml(tmp_path, "served.yaml", run)]) == 0
        assert not standin.adapters
    assert_same_training(hf, served, tol=1e-4)
    assert [r["rollout_staleness"] for r in read_metrics(served)] == [0, 0, 0]
    assert not (served / "rollout_adapters").exists()


@pytest.mark.slow
def test_a_rollout_ahead_run_resumes_exactly_through_the_standin(tmp_path, served_run, student_dir, tokenizer,
                                                                 capsys):
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        # no LoRA dropout: the in-process stand-in's adapter loads (PEFT's init) draw from this process's RNG
        # (tests/vllm/test_rollouts.py resumes with dropout against a real server)
        run = {**served_run, "rollout_endpoint": standin.url, "rollout_ahead": 1, "temperature": 1.0, "max_steps": 4,
               "save_steps": 2}
        full = tmp_path / "full"
        assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**run, "output_dir": str(full)})]) == 0
        assert (full / "checkpoint-2" / "rollout_replies_0.safetensors").is_file()
        cut = resumed_from(tmp_path, full, "checkpoint-2", run)
        assert not standin.adapters
        # rollout_ahead and rollout_sync_steps shape the trajectory: a checkpoint resumes with its own only
        changed = tmp_path / "changed"
        shutil.copytree(full / "checkpoint-2", changed / "checkpoint-2")
        for key, value, written in (("rollout_ahead", 0, 1), ("rollout_sync_steps", 2, 1)):
            resumed = {**run, key: value, "output_dir": str(changed), "resume_from_checkpoint": "auto"}
            capsys.readouterr()
            assert cli.main(["train", write_yaml(tmp_path, "changed.yaml", resumed)]) == 2
            assert f"written with {key}={written}, this run has {key}={value}" in capsys.readouterr().err
        # a checkpoint older than the keys was written with their defaults: it resumes with them
        state = json.loads((full / "checkpoint-4" / "trainer_state.json").read_text())
        del state["config"]["rollout_ahead"], state["config"]["rollout_sync_steps"]
        (full / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
        resumed_from(tmp_path, full, "checkpoint-4", {**run, "rollout_ahead": 0}, name="older")
    assert_same_training(full, cut, tol=1e-6)
    assert [r["rollout_staleness"] for r in read_metrics(cut)] == [0, 1, 1, 1]


@pytest.mark.slow
def test_a_rollout_server_gone_mid_run_checkpoints_and_resumes_exactly(tmp_path, served_run, student_dir, tokenizer,
                                                                       capsys):
    """rollout_ahead: the server answers steps 1 and 2 (step 2's while step 1 trains), then only 503s, so step 3's
    replies, written while step 2 trains, fail. The run checkpoints step 2 with the adapter step 3 was to use;
    resumed, it writes step 3's replies again from that adapter and ends like a run that never stopped."""
    with StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as standin:
        run = {**served_run, "rollout_endpoint": standin.url, "rollout_ahead": 1, "temperature": 1.0, "max_steps": 4}
        whole, cut = tmp_path / "whole", tmp_path / "cut"
        assert cli.main(["train", write_yaml(tmp_path, "w.yaml", {**run, "output_dir": str(whole)})]) == 0
        standin.stop_after = standin.completions + 8  # 4 rows a step: steps 1 and 2
        capsys.readouterr()
        assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**run, "output_dir": str(cut)})]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "HTTP 503" in last and f"checkpoint written to {cut / 'checkpoint-2'}." in last, last
        assert not (cut / "checkpoint-2" / "rollout_replies_0.safetensors").exists()  # they never came
        assert not standin.adapters  # the failed run unloaded its adapter
        standin.stop_after = None
        resumed = {**run, "output_dir": str(cut), "resume_from_checkpoint": "auto"}
        assert cli.main(["train", write_yaml(tmp_path, "r.yaml", resumed)]) == 0
    assert_same_training(whole, cut, tol=1e-6)
    assert [r["rollout_staleness"] for r in read_metrics(cut)] == [0, 1, 1, 1]


@pytest.fixture(scope="module")
def unpadded_teacher_dir(tmp_path_factory, tokenizer):
    """A served teacher's head has no rows past the tokenizer (tests/teachers/test_served.py)."""
    from llmneo.demo import tiny

    model = tiny.build_model(tokenizer, hidden_size=48, num_layers=3, seed=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("unpadded_teacher"))


@pytest.mark.slow
def test_a_teacher_gone_after_the_replies_came_resumes_exactly_with_rollout_ahead(
        tmp_path, served_run, student_dir, unpadded_teacher_dir, tokenizer, capsys):
    """rollout_ahead: step 3's replies (adapter 1) are in hand and step 4's are being written (adapter 2, synced)
    when the served teacher fails during step 3. The checkpoint of step 2 keeps step 3's replies, with adapter 2
    for step 4's; resumed, it trains on those very replies. A learning rate high enough that adapters 1 and 2
    write other replies, so a resume that wrote step 3's again from adapter 2 would show."""
    with StandIn(str(unpadded_teacher_dir), tokenizer) as teacher, \
            StandIn(str(student_dir), tokenizer, name="student", enable_lora=True) as student:
        run = {**served_run, "rollout_endpoint": student.url, "rollout_ahead": 1, "temperature": 1.0,
               "max_new_tokens": 12, "learning_rate": 0.5, "max_steps": 4, "teacher_endpoint": teacher.url,
               "teacher_topk": 20}
        del run["teacher_model_name_or_path"]
        whole, cut = tmp_path / "whole", tmp_path / "cut"
        assert cli.main(["train", write_yaml(tmp_path, "w.yaml", {**run, "output_dir": str(whole)})]) == 0
        teacher.stop_after = teacher.completions + 3  # steps 1 and 2 (and part of 3, prefetched)
        capsys.readouterr()
        assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**run, "output_dir": str(cut)})]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "teacher_endpoint" in last and f"checkpoint written to {cut / 'checkpoint-2'}." in last, last
        assert (cut / "checkpoint-2" / "rollout_replies_0.safetensors").is_file()
        assert not student.adapters
        teacher.stop_after = None
        resumed = {**run, "output_dir": str(cut), "resume_from_checkpoint": "auto"}
        assert cli.main(["train", write_yaml(tmp_path, "r.yaml", resumed)]) == 0
    assert_same_training(whole, cut, tol=1e-6)
    assert [r["rollout_staleness"] for r in read_metrics(cut)] == [0, 1, 1, 1]


# --- under DDP: the ranks fail together ------------------------------------------------------------------------

def test_a_rank_whose_replies_came_raises_the_failing_ranks_kind_of_error():
    from llmneo.endpoint import EndpointGone
    from llmneo.train import steps

    gone = steps.shared_error(steps.GONE, 1, "rollout_endpoint http://x/v1: HTTP 503 after 5 attempts")
    assert type(gone) is EndpointGone and str(gone) == "rollout_endpoint http://x/v1: HTTP 503 after 5 attempts"
    refused = steps.shared_error(steps.REFUSED, 1, "a prompt of 90 tokens leaves no room")
    assert type(refused) is LlmneoError and str(refused) == "a prompt of 90 tokens leaves no room"
    bug = steps.shared_error(steps.FAILED, 3, "boom")
    assert type(bug) is LlmneoError and str(bug) == "rank 3 could not write its rollout replies (boom)"
    steps.raise_together(None, None)  # one process: nothing failed, nothing raised
    with pytest.raises(ValueError, match="^boom$"):  # one process: its own error, as it was
        steps.raise_together(None, ValueError("boom"))


DDP_SCRIPT = '''
import json, sys
from concurrent.futures import Future
import torch
from accelerate import PartialState
from llmneo.endpoint import EndpointGone
from llmneo.errors import LlmneoError
from llmneo.models.served_rollouts import Pending
from llmneo.train.steps import RolloutSteps, Step, raise_together

state = PartialState(cpu=True)
rank, seen = state.process_index, {}
LINE = "rollout_endpoint http://x/v1: HTTP 503 (Service Unavailable) after 5 attempts"


class OneBatch:
    def next_step(self):
        return Step([{"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, -100, -100, 8, 9]]),
                      "attention_mask": torch.ones(1, 5, dtype=torch.long)}])


class Replies:
    """Written ahead; step 3's requests fail on rank 1 only (its server went away mid-step)."""
    ahead, saved = True, []

    def submit(self, step, trained, micro, prompts):
        reply = Future()
        if rank == 1 and step == 3:
            reply.set_exception(EndpointGone(LINE))
        else:
            reply.set_result(torch.tensor([3, 4]))
        return Pending([[reply]], 1)

    def resumed(self, step):
        return None

    def save(self, directory, pending, step):
        self.saved.append(step)

    def close(self):
        pass


def caught(call):
    try:
        call()
    except BaseException as exc:
        return [type(exc).__name__, str(exc)]
    return None


source = RolloutSteps(OneBatch(), None, None, 1.0, 0, 0, "cpu", served=Replies(), last=4, accelerator=state)
source.next_step(); source.next_step()  # steps 1 and 2; step 3's replies are being written
source.save(None, 2)  # checkpoint-2: step 3's replies failed on rank 1, so no rank keeps them
seen["saved"] = Replies.saved
seen["step 3"] = caught(source.next_step)
gone_or_refused = EndpointGone(LINE) if rank == 0 else LlmneoError("a prompt of 90 tokens leaves no room")
seen["mixed"] = caught(lambda: raise_together(state, gone_or_refused))
seen["bug"] = caught(lambda: raise_together(state, ValueError("boom") if rank == 1 else None))
seen["none"] = caught(lambda: raise_together(state, None))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(seen, f)
state.wait_for_everyone()
state.destroy_process_group()  # gloo's threads stopped before exit: a busy machine aborted at exit without it
'''


def test_a_server_failing_one_ranks_requests_stops_every_rank_together(tmp_path):
    """Two CPU processes (torchrun, gloo): rank 1's replies for step 3 fail, rank 0's come. Both skip them in
    the checkpoint and both raise EndpointGone with rank 1's line at step 3 (so both checkpoint, none waits in
    the step). Of mixed failures, the one that stops the run wins; a rank's bug reaches the other as one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    line = "rollout_endpoint http://x/v1: HTTP 503 (Service Unavailable) after 5 attempts"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["saved"] == [None] and seen["step 3"] == ["EndpointGone", line] and seen["none"] is None
        assert seen["mixed"] == ["LlmneoError", "a prompt of 90 tokens leaves no room"]
    assert ranks[0]["bug"] == ["LlmneoError", "rank 1 could not write its rollout replies (boom)"]
    assert ranks[1]["bug"] == ["ValueError", "boom"]
