"""The tier's server harness itself: a real vLLM serves the tiny student, and is gone after stop()."""

from __future__ import annotations

import urllib.request

import pytest
from vllm_server import VLLMServer


def test_server_serves_and_stops(vllm_student_dir, tmp_path):
    server = VLLMServer(vllm_student_dir, name="smoke", log_dir=tmp_path)
    with server:
        status, answer = server.post("/v1/completions", {"model": "smoke", "prompt": [[5, 6, 7]], "max_tokens": 3,
                                                         "temperature": 0, "return_token_ids": True})
        assert status == 200
        assert len(answer["choices"][0]["token_ids"]) == 3
    assert server.process.poll() is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/models", timeout=5)
