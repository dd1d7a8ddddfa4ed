"""A served teacher (teacher_endpoint): online training, `llmneo cache` capture, and every failure as one line.

The server is tests/vllm_standin.py, which stands in for vLLM's OpenAI-compatible server (`vllm serve
--max-logprobs 20`) on the tiny teacher: it follows vLLM's /v1/completions prompt_logprobs schema,
/tokenize, /detokenize and /v1/models, errors included; tests/vllm/test_standin_agrees.py holds it to a
real vLLM server (make test-vllm).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_training, cache_rows, read_metrics, write_yaml
from safetensors.torch import load_file
from vllm_standin import StandIn

from llmneo import cli
from llmneo.cache import compact
from llmneo.loss.rows import SparseRows
from llmneo.teachers import served


@pytest.fixture(scope="module")
def unpadded_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """The conftest teacher's shape without a padded head: vLLM normalises over every head row, so a served
    teacher equals an in-process one (which drops padded rows) only when there are none (see the padded test)."""
    from llmneo.demo import tiny

    model = tiny.build_model(tokenizer, hidden_size=48, num_layers=3, seed=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, tokenizer, tmp_path_factory.mktemp("unpadded_teacher"))


@pytest.fixture
def server(unpadded_teacher_dir, tokenizer):
    with StandIn(str(unpadded_teacher_dir), tokenizer) as standin:
        yield standin


@pytest.fixture
def served_overrides(base_overrides, server) -> dict:
    values = {**base_overrides, "teacher_endpoint": server.url, "teacher_topk": 20}
    del values["teacher_model_name_or_path"]
    return values


@pytest.fixture
def local_overrides(base_overrides, unpadded_teacher_dir) -> dict:
    """The same run with the served model in-process."""
    return {**base_overrides, "teacher_model_name_or_path": str(unpadded_teacher_dir)}


# --- the protocol, read ----------------------------------------------------------------------------------------

def test_sparse_rows_read_vllms_prompt_logprobs_schema():
    # token 7 is the actual token at index 2 and ranks 5th: it is in the entry but not one of the top 2
    entries = [None,
               {"3": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, "4": {"logprob": -2.5, "rank": 2,
                                                                              "decoded_token": "b"}},
               {"9": {"logprob": -0.7, "rank": 1, "decoded_token": "c"}, "8": {"logprob": -1.2, "rank": 2,
                                                                              "decoded_token": "d"},
                "7": {"logprob": -4.0, "rank": 5, "decoded_token": "e"}}]
    rows = served.sparse_rows(entries, [1, 2], 2, 10, "row 1")
    assert rows.ids.tolist() == [[3, 4], [9, 8]]
    assert rows.logprobs[1].tolist() == pytest.approx([-0.7, -1.2])
    mass = torch.tensor([-0.7, -1.2]).exp().sum()
    assert float(rows.tail[1]) == pytest.approx(float(torch.log(1 - mass)), rel=1e-5)
    assert served.token_logprobs(entries, [0, 3, 7], [2], "row 1").tolist() == pytest.approx([-4.0])
    with pytest.raises(Exception, match="no log-probs at token 0 of row 1"):
        served.sparse_rows(entries, [0], 2, 10, "row 1")  # the first entry is null: never a silent gap
    with pytest.raises(Exception, match="outside the student's vocabulary"):
        served.sparse_rows(entries, [2], 2, 9, "row 1")


# --- online training ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_served_teacher_trains_like_a_cache_at_k20_and_capture_gives_the_same_cache(tmp_path, local_overrides,
                                                                                    served_overrides, server):
    cached, online, captured_run = tmp_path / "cached", tmp_path / "online", tmp_path / "captured_run"
    local_cache, captured = tmp_path / "cache_local", tmp_path / "cache_served"
    local = {**local_overrides, "teacher_topk": 20, "teacher_cache": str(local_cache), "cache_format": "exact"}
    assert cli.main(["cache", write_yaml(tmp_path, "c1.yaml", local)]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "t1.yaml", {**local, "output_dir": str(cached)})]) == 0
    before = server.completions
    assert cli.main(["train", write_yaml(tmp_path, "t2.yaml", {**served_overrides, "output_dir": str(online)})]) == 0
    # one request per micro-batch, plus the k probe before training: prefetching asks one step ahead, never
    # past the last step
    assert server.completions - before == served_overrides["max_steps"] + 1
    assert_same_training(cached, online, tol=1e-5)

    remote = {**served_overrides, "teacher_cache": str(captured), "cache_shard_size": 7, "cache_format": "exact"}
    assert cli.main(["cache", write_yaml(tmp_path, "c2.yaml", remote)]) == 0
    (offsets_a, rows_a), (offsets_b, rows_b) = cache_rows(local_cache), cache_rows(captured)
    assert offsets_a == offsets_b and len(json.loads((captured / "index.json").read_text())["shards"]) > 1
    assert torch.equal(rows_a["ids"], rows_b["ids"])
    assert torch.allclose(rows_a["logprobs"], rows_b["logprobs"], atol=1e-5)
    # A served tail is log(1 - top-k mass) from the k float32 log-probs the server sends (in-process, it is a
    # logsumexp of the rest): where the top-k hold nearly all the mass its log keeps few digits, so the tail
    # masses are compared, to float32's resolution of the top-k mass.
    assert torch.allclose(rows_a["tail"].exp(), rows_b["tail"].exp(), atol=1e-6)
    fingerprint = json.loads((captured / "index.json").read_text())["fingerprint"]
    assert fingerprint["teacher"] == f"endpoint-model:{server.name}"
    assert cli.main(["train", write_yaml(tmp_path, "t3.yaml", {**remote, "output_dir": str(captured_run)})]) == 0
    assert_same_training(cached, captured_run, tol=1e-5)
    # the default layout: a capture writes the compact codes of exactly the rows above
    small = tmp_path / "cache_compact"
    assert cli.main(["cache", write_yaml(tmp_path, "c3.yaml", {**remote, "teacher_cache": str(small),
                                                               "cache_format": "compact"})]) == 0
    index = json.loads((small / "index.json").read_text())
    assert index["layout"] == "compact" and index["offsets"] == offsets_b
    stored = [load_file(str(small / shard["file"])) for shard in index["shards"]]
    want = compact.encode(SparseRows(rows_b["ids"], rows_b["logprobs"], rows_b["tail"]), index["vocab"])
    for key, value in want.items():
        assert torch.equal(torch.cat([part[key] for part in stored]), value), key


@pytest.mark.slow
def test_on_policy_sampled_rkl_with_a_served_teacher_equals_the_live_teacher(tmp_path, local_overrides,
                                                                            served_overrides):
    on_policy = {"lmbda": 1, "kd_loss": "sampled_rkl", "temperature": 0, "max_new_tokens": 5}
    live, online = tmp_path / "live", tmp_path / "online"
    assert cli.main(["train", write_yaml(tmp_path, "l.yaml", {**local_overrides, **on_policy,
                                                         "output_dir": str(live)})]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "o.yaml", {**served_overrides, **on_policy,
                                                         "output_dir": str(online)})]) == 0
    assert_same_training(live, online, tol=1e-5)
    assert all(r["on_policy"] for r in read_metrics(online))


def test_api_key_comes_from_the_named_environment_variable_only(tmp_path, served_overrides, unpadded_teacher_dir,
                                                                tokenizer, monkeypatch, capsys):
    with StandIn(str(unpadded_teacher_dir), tokenizer, api_key="sekrit-123") as guarded:
        values = {**served_overrides, "teacher_endpoint": guarded.url, "teacher_api_key_env": "LLMNEO_TEST_KEY",
                  "max_steps": 1}
        monkeypatch.delenv("LLMNEO_TEST_KEY", raising=False)
        assert cli.main(["train", write_yaml(tmp_path, "a.yaml", values)]) == 2
        assert "LLMNEO_TEST_KEY is not set" in capsys.readouterr().err
        monkeypatch.setenv("LLMNEO_TEST_KEY", "wrong")
        assert cli.main(["train", write_yaml(tmp_path, "b.yaml", values)]) == 2
        err = capsys.readouterr().err.strip()
        assert "HTTP 401" in err and len(err.splitlines()) == 1 and "wrong" not in err
        monkeypatch.setenv("LLMNEO_TEST_KEY", "sekrit-123")
        values["overwrite_output_dir"] = True
        assert cli.main(["train", write_yaml(tmp_path, "c.yaml", values)]) == 0
        assert "Bearer sekrit-123" in guarded.headers_seen
        out = Path(values["output_dir"])
        for written in out.rglob("*"):
            if written.is_file() and written.suffix in (".json", ".yaml", ".jsonl"):
                assert "sekrit" not in written.read_text(), written


# --- failures: one line, nothing lost ---------------------------------------------------------------------------

def test_k_above_the_servers_max_logprobs_is_one_line_naming_the_flag(tmp_path, served_overrides, capsys):
    values = {**served_overrides, "teacher_topk": 21}
    assert cli.main(["train", write_yaml(tmp_path, "k.yaml", values)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-logprobs 21" in err and "teacher_topk" in err


def test_a_503_now_and_then_is_retried_and_changes_nothing(tmp_path, served_overrides, server):
    clean, flaky = tmp_path / "clean", tmp_path / "flaky"
    assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**served_overrides, "output_dir": str(clean)})]) == 0
    server.fail_every = 2
    assert cli.main(["train", write_yaml(tmp_path, "f.yaml", {**served_overrides, "output_dir": str(flaky)})]) == 0
    assert_same_training(clean, flaky, tol=0.0)


def test_a_padded_head_whose_extra_rows_rank_is_one_line_naming_the_cause(tmp_path, served_overrides, teacher_dir,
                                                                          tokenizer, capsys):
    """conftest's teacher pads its head past the tokenizer with rows scaled ×40, which take top-k places once
    normalised over (as vLLM does)."""
    with StandIn(str(teacher_dir), tokenizer) as padded:
        values = {**served_overrides, "teacher_endpoint": padded.url}
        assert cli.main(["train", write_yaml(tmp_path, "p.yaml", values)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "outside the student's vocabulary" in last and "head has more rows than the tokenizer" in last


def test_other_400s_are_not_blamed_on_max_logprobs(server):
    endpoint = served.Endpoint(server.url, None)
    error = endpoint.client_error(400, "Prefix caching with prompt logprobs not yet supported on VLLM V1.",
                                   {"prompt_logprobs": 20})
    assert "--no-enable-prefix-caching" in str(error) and "--max-logprobs" not in str(error)
    error = endpoint.client_error(400, "Unknown field prompt_logprobs", {"prompt_logprobs": 20})
    assert "--max-logprobs" not in str(error) and "HTTP 400" in str(error)


def test_a_timeout_and_an_unreachable_server_are_one_line(server, teacher_dir, tokenizer):
    with StandIn(str(teacher_dir), tokenizer, hang_for=3.0) as slow:
        endpoint = served.Endpoint(slow.url, None, timeout=0.5, retries=0)
        with pytest.raises(served.LlmneoError, match="no answer within 0.5 s after 1 attempts"):
            endpoint.prompt_logprobs([[1, 2, 3]], 2)
    with pytest.raises(served.LlmneoError, match="cannot connect") as caught:
        served.Endpoint("http://127.0.0.1:9/v1", None, retries=1, backoff=0.01)  # asks /v1/models for the name
    assert len(str(caught.value).splitlines()) == 1


def test_credentials_in_the_endpoint_url_are_never_printed(tmp_path, served_overrides, capsys):
    """A URL may carry user:password@; the errors name the endpoint without them."""
    with pytest.raises(served.LlmneoError) as caught:
        served.Endpoint("http://alice:s3cretpass@127.0.0.1:9/v1", None, retries=0)
    assert "s3cretpass" not in str(caught.value) and "http://***@127.0.0.1:9/v1" in str(caught.value)
    values = {**served_overrides, "teacher_endpoint": "ftp://alice:s3cretpass@host/v1"}
    assert cli.main(["train", write_yaml(tmp_path, "u.yaml", values)]) == 2
    err = capsys.readouterr().err
    assert "http(s) URL" in err and "s3cretpass" not in err


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path, served_overrides, teacher_dir,
                                                                     tokenizer, capsys):
    from llmneo.demo import tiny

    other = tiny.build_tokenizer(corpus=["completely different words here", "zebra yak xylophone"], vocab_size=300)
    with StandIn(str(teacher_dir), tokenizer, tokenizer_for_tokenize=other) as alien:
        values = {**served_overrides, "teacher_endpoint": alien.url}
        assert cli.main(["train", write_yaml(tmp_path, "w.yaml", values)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "tokenizes differently" in err
        assert alien.completions == 0


def _capture_command(config: str) -> list[str]:
    return [sys.executable, "-m", "llmneo", "cache", config]


@pytest.mark.slow
def test_capture_resumes_after_kill_9_and_after_a_dead_server_without_losing_or_duplicating_rows(
        tmp_path, served_overrides, server, capsys):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    base = {**served_overrides, "cache_shard_size": 5, "per_device_eval_batch_size": 1}
    assert cli.main(["cache", write_yaml(tmp_path, "whole.yaml", {**base, "teacher_cache": str(whole)})]) == 0

    # 1. kill -9 once a shard is on disk
    config = write_yaml(tmp_path, "r.yaml", {**base, "teacher_cache": str(resumed)})
    server.delay = 0.5  # the last 3 examples take 1.5 s: time to see the first shard, even on a loaded machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_capture_command(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    progress = tmp_path / ".resumed.partial" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.is_file() and json.loads(progress.read_text())["shards"]):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = json.loads(progress.read_text())["examples"]
    assert 0 < done_before < 8 and not resumed.exists()

    # 2. the server dies: one line, exit 2, and what was captured stays
    server.delay, server.stop_after = 0.0, server.completions + 1
    capsys.readouterr()
    assert cli.main(["cache", config]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar, then the error on a line of its own
    assert "HTTP 503" in err.splitlines()[-1] and "Traceback" not in err and not resumed.exists()
    assert json.loads(progress.read_text())["examples"] >= done_before

    # 3. the server is back: the capture resumes and finishes, equal to the uninterrupted one
    server.stop_after = None
    assert cli.main(["cache", config]) == 0
    assert "resuming an interrupted capture" in capsys.readouterr().out
    (offsets_a, rows_a), (offsets_b, rows_b) = cache_rows(whole), cache_rows(resumed)
    assert offsets_a == offsets_b
    for key in rows_a:
        assert torch.equal(rows_a[key], rows_b[key]), key
    assert not (tmp_path / ".resumed.partial").exists()


def test_config_checks_for_a_served_teacher(tmp_path, served_overrides, teacher_dir, capsys):
    for extra, message in (({"teacher_model_name_or_path": str(teacher_dir)}, "both set"),
                           ({"teacher_endpoint": "localhost:8000"}, "http(s) URL"),
                           ({"seq_kd": True}, "a served teacher only scores"),
                           ({"teacher_api_key_env": "sk-abc123-secret"}, "NAME of an environment variable")):
        assert cli.main(["train", write_yaml(tmp_path, "x.yaml", {**served_overrides, **extra})]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "secret" not in err


@pytest.mark.parametrize("pasted", ["hf_PastedTokenAbc123xyz", "sk-proj-Pasted_Key-123", "a1b2c3d4e5f6a7b8c9d0"])
def test_an_api_key_pasted_into_teacher_api_key_env_is_never_echoed(tmp_path, served_overrides, capsys, pasted):
    """A key that looks like a variable name (hf_..., letters, digits and _) too: it is not printed back."""
    assert cli.main(["train", write_yaml(tmp_path, "k.yaml", {**served_overrides, "teacher_api_key_env": pasted})]) == 2
    err = capsys.readouterr().err.strip()
    assert "NAME of an environment variable" in err and "OPENAI_API_KEY" in err and len(err.splitlines()) == 1
    assert pasted not in err and "Pasted" not in err
    with pytest.raises(served.LlmneoError) as error:  # the endpoint itself, as a library caller builds it
        served.Endpoint("http://127.0.0.1:9/v1", "m", pasted)
    assert pasted not in str(error.value) and "OPENAI_API_KEY" in str(error.value)


def test_a_variable_name_that_is_set_may_be_lower_case(tmp_path, served_overrides, monkeypatch):
    from llmneo.config import schema as config

    monkeypatch.setenv("my_teacher_key", "x")
    assert config.load(overrides={**served_overrides, "teacher_api_key_env": "my_teacher_key"}).teacher_api_key_env


@pytest.mark.slow
def test_served_teachers_can_be_routed_like_live_ones(tmp_path, local_overrides, unpadded_teacher_dir, tokenizer):
    """Two served teachers, each row to one (teacher_column), at k = V: the same losses as the two live."""
    from helpers import ALPACA_ROWS, write_jsonl

    from llmneo.demo import tiny

    other = tiny.build_model(tokenizer, hidden_size=40, num_layers=2, seed=9)
    other_dir = tiny.save_pair(other, tokenizer, tmp_path / "other")
    routed = write_jsonl(tmp_path / "routed.jsonl", [{**row, "teacher": i % 2} for i, row in enumerate(ALPACA_ROWS)])
    common = {**local_overrides, "dataset": str(routed), "teacher_column": "teacher", "teacher_topk": len(tokenizer)}
    live = tmp_path / "live"
    assert cli.main(["train", write_yaml(tmp_path, "l.yaml", {**common, "output_dir": str(live),
                                                         "teacher_model_name_or_path": [str(unpadded_teacher_dir),
                                                                                        str(other_dir)]})]) == 0
    with StandIn(str(unpadded_teacher_dir), tokenizer, max_logprobs=len(tokenizer)) as first, \
            StandIn(str(other_dir), tokenizer, max_logprobs=len(tokenizer)) as second:
        values = {**common, "teacher_endpoint": [first.url, second.url], "output_dir": str(tmp_path / "served")}
        del values["teacher_model_name_or_path"]
        assert cli.main(["train", write_yaml(tmp_path, "s.yaml", values)]) == 0
        assert first.completions > 1 and second.completions > 1
    for a, b in zip(read_metrics(live), read_metrics(tmp_path / "served")):
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], abs=1e-5)
        assert b["kd_loss_per_teacher"] == pytest.approx(a["kd_loss_per_teacher"], abs=1e-5)


@pytest.mark.slow
def test_a_server_gone_mid_run_leaves_a_checkpoint_of_the_last_whole_step_that_resumes_exactly(
        tmp_path, served_overrides, server, capsys):
    """The server answers the k probe and steps 1 and 2, then only 503s: step 3 fails after its retries. The run
    checkpoints step 2 with the RNG as step 2 left it (LoRA dropout draws in the failed step's forward), says so
    in one line and exits 2; resumed once the server is back, it ends like a run that never stopped."""
    values = {**served_overrides, "lora_dropout": 0.1}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.main(["train", write_yaml(tmp_path, "w.yaml", {**values, "output_dir": str(whole)})]) == 0
    server.stop_after = server.completions + 3  # step 2's request goes out during step 1, step 3's during step 2
    capsys.readouterr()
    assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**values, "output_dir": str(cut)})]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("llmneo: error:") == 1 and last.startswith("llmneo: error:")
    assert "HTTP 503" in last and f"checkpoint written to {cut / 'checkpoint-2'}." in last
    assert "resume_from_checkpoint=auto" in last
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (cut / "train_results.json").exists()
    server.stop_after = None
    resumed = {**values, "output_dir": str(cut), "resume_from_checkpoint": "auto"}
    assert cli.main(["train", write_yaml(tmp_path, "r.yaml", resumed)]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_training(whole, cut, tol=1e-6)


def test_a_neat_packed_row_is_asked_one_example_per_sequence_and_trains_like_the_local_teacher(
        tmp_path, local_overrides, unpadded_teacher_dir, tokenizer, capsys):
    """neat_packing with a served teacher: each packed example goes to the server as its own sequence (the server
    would attend across the examples of a packed row), so training equals a top-20 cache of the in-process
    teacher, which keeps them apart with position ids. The server takes at most 64 tokens, less than the packed row (301): it
    refuses the row packed with cross-talk (packing: true), which goes as one sequence. `llmneo cache` from the
    server splits the rows the same way."""
    neat = {**local_overrides, "neat_packing": True, "cutoff_len": 512, "per_device_train_batch_size": 1,
            "teacher_topk": 20, "cache_format": "exact"}  # exact rows: the online teacher's are not quantized
    cached = {**neat, "teacher_cache": str(tmp_path / "cache"), "output_dir": str(tmp_path / "local")}
    assert cli.main(["cache", write_yaml(tmp_path, "c.yaml", cached)]) == 0  # the same top-20, in-process
    assert cli.main(["train", write_yaml(tmp_path, "l.yaml", cached)]) == 0
    with StandIn(str(unpadded_teacher_dir), tokenizer, max_model_len=64) as short:
        served_values = {**neat, "teacher_endpoint": short.url, "output_dir": str(tmp_path / "online")}
        del served_values["teacher_model_name_or_path"]
        assert cli.main(["train", write_yaml(tmp_path, "o.yaml", served_values)]) == 0
        assert_same_training(tmp_path / "local", tmp_path / "online", tol=1e-5)
        captured = {**served_values, "teacher_cache": str(tmp_path / "captured"), "output_dir": str(tmp_path / "cc")}
        assert cli.main(["cache", write_yaml(tmp_path, "cc.yaml", captured)]) == 0  # `llmneo cache` splits them too
        assert cli.main(["train", write_yaml(tmp_path, "tc.yaml", captured)]) == 0
        assert_same_training(tmp_path / "local", tmp_path / "cc", tol=1e-5)
        capsys.readouterr()
        crossed = {**served_values, "neat_packing": False, "packing": True, "output_dir": str(tmp_path / "crossed")}
        assert cli.main(["train", write_yaml(tmp_path, "x.yaml", crossed)]) == 2
        assert "maximum context length is 64 tokens" in capsys.readouterr().err
