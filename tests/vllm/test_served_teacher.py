"""A served teacher against a real vLLM server: the same results as in-process, and a server that dies.

The shared `teacher_server` serves `vllm_teacher_dir` (head as large as the tokenizer, so vLLM's log-probs,
normalised over every head row, are the in-process teacher's) with --max-logprobs 20. Everything runs through
the CLI on tiny runs (3 steps, LoRA rank 4, fp32). The fault tests start their own server, kill it (SIGKILL of
its process group) at a known point of a run, and start it again on the same port.

The known point: `KillAt` wraps Endpoint.prompt_logprobs so that the n-th request, once every request before
it has been answered, first kills the server. The request then goes to the dead server as llmneo sends it;
nothing else is replaced. This makes the cut deterministic on a loaded machine, where a watcher that kills
"once some progress exists" could find the tiny run already finished.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vllm_server import VLLMServer

from llmneo import cli
from llmneo.cache import compact
from llmneo.teachers import served

from helpers import ALPACA_ROWS, assert_same_training, cache_rows, read_metrics, write_jsonl, write_yaml

K = 20  # the shared server's --max-logprobs
TOL = 1e-4  # vLLM's fp32 CPU kernels against HF's: log-probs agree to ~1e-5, the losses to ~1e-6


def assert_same_rows(a: Path, b: Path) -> None:
    """Two caches hold the same rows: the same top-k ids in the same order, log-probs within TOL, and the same
    tail mass (a served tail is log(1 - top-k mass) from k float32 log-probs: its mass is what is comparable)."""
    (offsets_a, rows_a), (offsets_b, rows_b) = cache_rows(a), cache_rows(b)
    assert offsets_a == offsets_b
    differ = (rows_a["ids"] != rows_b["ids"]).any(dim=-1).nonzero().flatten().tolist()
    assert not differ, f"top-{K} ids differ at rows {differ[:10]}"
    assert (rows_a["logprobs"] - rows_b["logprobs"]).abs().max() <= TOL
    assert (rows_a["tail"].exp() - rows_b["tail"].exp()).abs().max() <= TOL


class KillAt:
    """Kill `server` just before the `n`-th prompt_logprobs request (counted from the first) goes out, once the
    requests before it have been answered."""

    def __init__(self, monkeypatch, server: VLLMServer, n: int):
        self.server, self.n = server, n
        self.started, self.answered = 0, set()
        self.killed = False
        self.changed = threading.Condition()
        original = served.Endpoint.prompt_logprobs

        def prompt_logprobs(endpoint, sequences, k):
            with self.changed:
                self.started += 1
                mine = self.started
            if mine == self.n:
                with self.changed:
                    assert self.changed.wait_for(lambda: self.answered >= set(range(1, self.n)), timeout=300)
                self.server.kill()
                self.killed = True
            try:
                return original(endpoint, sequences, k)
            finally:
                with self.changed:
                    self.answered.add(mine)
                    self.changed.notify_all()

        monkeypatch.setattr(served.Endpoint, "prompt_logprobs", prompt_logprobs)


@pytest.fixture(scope="module")
def base(vllm_student_dir, tmp_path_factory) -> dict:
    """Three steps of 4 from 24 examples (a capture has more requests than it keeps in flight)."""
    data = write_jsonl(tmp_path_factory.mktemp("served_data") / "train.jsonl", ALPACA_ROWS * 3)
    return {"model_name_or_path": str(vllm_student_dir), "dataset": str(data), "lora_rank": 4,
            "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1, "cutoff_len": 64, "seed": 0,
            "teacher_topk": K, "cache_format": "exact"}  # float32 rows: compared with the server's to TOL


@pytest.fixture(scope="module")
def reference(base, vllm_teacher_dir, tmp_path_factory) -> Path:
    """The in-process teacher's cache at k = 20 (`cache`) and a run trained from it (`run`)."""
    where = tmp_path_factory.mktemp("reference")
    values = {**base, "teacher_model_name_or_path": str(vllm_teacher_dir), "teacher_cache": str(where / "cache")}
    assert cli.main(["cache", write_yaml(where, "cache.yaml", values)]) == 0
    assert cli.main(["train", write_yaml(where, "train.yaml", {**values, "output_dir": str(where / "run")})]) == 0
    return where


@pytest.fixture(scope="module")
def captured(base, teacher_server, tmp_path_factory) -> Path:
    """`llmneo cache` from the shared server, uninterrupted, in shards of 7 positions."""
    where = tmp_path_factory.mktemp("captured")
    values = {**base, "teacher_endpoint": teacher_server.url, "teacher_cache": str(where / "cache"),
              "cache_shard_size": 7}
    assert cli.main(["cache", write_yaml(where, "cache.yaml", values)]) == 0
    return where / "cache"


@pytest.fixture(scope="module")
def own_teacher_server(vllm_teacher_dir, tmp_path_factory):
    with VLLMServer(vllm_teacher_dir, name="teacher", max_logprobs=K,
                    log_dir=tmp_path_factory.mktemp("vllm_logs")) as server:
        yield server


@pytest.fixture
def own_server(own_teacher_server) -> VLLMServer:
    """The fault tests' own teacher server, up (they kill it and start it again; one that failed midway may
    have left it dead)."""
    if own_teacher_server.process.poll() is not None:
        own_teacher_server.start()
    return own_teacher_server


def test_capture_and_online_training_from_vllm_equal_an_in_process_cache(tmp_path, base, teacher_server, reference,
                                                                         captured):
    assert_same_rows(reference / "cache", captured)
    index = json.loads((captured / "index.json").read_text())
    assert len(index["shards"]) > 1 and index["fingerprint"]["teacher"] == "endpoint-model:teacher"

    from_capture, online = tmp_path / "from_capture", tmp_path / "online"
    values = {**base, "teacher_cache": str(captured), "teacher_endpoint": teacher_server.url}
    assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**values, "output_dir": str(from_capture)})]) == 0
    assert_same_training(reference / "run", from_capture, tol=TOL)
    del values["teacher_cache"]
    assert cli.main(["train", write_yaml(tmp_path, "o.yaml", {**values, "output_dir": str(online)})]) == 0
    assert_same_training(reference / "run", online, tol=TOL)
    assert all(row["kd_loss"] > 0 for row in read_metrics(online))
    # the default layout: a capture from vLLM writes compact rows, which decode to the same top-k ids and to
    # log-probs within the codes' bound (compact.error_bound) of the float32 capture's
    small = tmp_path / "compact"
    values = {**base, "teacher_endpoint": teacher_server.url, "teacher_cache": str(small), "cache_format": "compact"}
    assert cli.main(["cache", write_yaml(tmp_path, "cc.yaml", values)]) == 0
    assert json.loads((small / "index.json").read_text())["layout"] == "compact"
    (offsets_a, exact), (offsets_b, coded) = cache_rows(captured), cache_rows(small)
    assert offsets_a == offsets_b
    by_id_a, by_id_b = exact["ids"].sort(dim=1), coded["ids"].sort(dim=1)
    assert torch.equal(by_id_a.values, by_id_b.values)
    a, b = exact["logprobs"].gather(1, by_id_a.indices), coded["logprobs"].gather(1, by_id_b.indices)
    assert ((a - b).abs() <= compact.error_bound(a)[:, None] + TOL).all()
    assert torch.allclose(exact["tail"], coded["tail"], atol=TOL)


def test_on_policy_sampled_rkl_from_vllm_equals_the_live_teacher(tmp_path, base, teacher_server, vllm_teacher_dir):
    on_policy = {**base, "lmbda": 1, "kd_loss": "sampled_rkl", "temperature": 0, "max_new_tokens": 5}
    live, online = tmp_path / "live", tmp_path / "online"
    assert cli.main(["train", write_yaml(tmp_path, "l.yaml", {**on_policy, "output_dir": str(live),
                                                         "teacher_model_name_or_path": str(vllm_teacher_dir)})]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "o.yaml", {**on_policy, "output_dir": str(online),
                                                         "teacher_endpoint": teacher_server.url})]) == 0
    assert_same_training(live, online, tol=TOL)
    assert all(row["on_policy"] for row in read_metrics(online))


def _one_error_line(err: str) -> str:
    """stderr holds progress bars and exactly one error line, the last, and no traceback: that line."""
    assert "Traceback" not in err and err.count("llmneo: error:") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llmneo: error:"), err
    return last


def test_capture_survives_the_server_killed_midway_and_resumes_to_the_uninterrupted_rows(
        tmp_path, base, own_server, captured, monkeypatch, capsys):
    # One example per request and per shard: request 12 (the k probe is 1) goes out only after 3 examples were
    # taken from the 8 in flight, so their shards are on disk when the server dies.
    target, partial = tmp_path / "cache", tmp_path / ".cache.partial"
    config = write_yaml(tmp_path, "cache.yaml", {**base, "teacher_endpoint": own_server.url,
                                                "teacher_cache": str(target), "per_device_eval_batch_size": 1,
                                                "cache_shard_size": 1})
    cut = KillAt(monkeypatch, own_server, 12)
    capsys.readouterr()
    assert cli.main(["cache", config]) == 2
    assert cut.killed
    last = _one_error_line(capsys.readouterr().err)
    assert f"teacher_endpoint {own_server.url}" in last and "after 5 attempts" in last

    # Nothing looks done: no cache, no index; what progress.json records is on disk, whole, and nothing else is.
    assert not target.exists() and not (partial / "index.json").exists()
    progress = json.loads((partial / "progress.json").read_text())
    assert 3 <= progress["examples"] < len(ALPACA_ROWS) * 3
    assert len(progress["offsets"]) == progress["examples"] + 1 and len(progress["shards"]) == progress["examples"]
    assert sorted(p.name for p in partial.iterdir()) == sorted([s["file"] for s in progress["shards"]]
                                                               + ["progress.json"])
    rows = sum(load_file(str(partial / s["file"]))["ids"].shape[0] for s in progress["shards"])
    assert rows == progress["offsets"][-1] == progress["shards"][-1]["end"]

    monkeypatch.undo()
    own_server.start()  # the same port, so the same command
    assert cli.main(["cache", config]) == 0
    assert f"resuming an interrupted capture after {progress['examples']} examples" in capsys.readouterr().out
    assert not partial.exists()
    assert_same_rows(captured, target)


def test_online_training_survives_the_server_killed_midway_and_resumes_exactly(
        tmp_path, base, own_server, reference, monkeypatch, capsys):
    # Request 1 is the k probe, 2 and 3 steps 1 and 2 (prefetched together), 4 step 3's, sent once step 1 is
    # done: the server dies before step 3.
    out = tmp_path / "run"
    config = write_yaml(tmp_path, "train.yaml", {**base, "teacher_endpoint": own_server.url, "output_dir": str(out)})
    cut = KillAt(monkeypatch, own_server, 4)
    capsys.readouterr()
    assert cli.main(["train", config]) == 2
    assert cut.killed
    last = _one_error_line(capsys.readouterr().err)
    assert "cannot connect" in last and f"checkpoint written to {out / 'checkpoint-2'}." in last
    assert "resume_from_checkpoint=auto" in last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "train_results.json").exists()

    monkeypatch.undo()
    own_server.start()
    resumed = write_yaml(tmp_path, "resume.yaml", {**base, "teacher_endpoint": own_server.url, "output_dir": str(out),
                                                   "resume_from_checkpoint": "auto"})
    assert cli.main(["train", resumed]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_training(reference / "run", out, tol=TOL)
