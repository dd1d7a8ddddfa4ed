"""A stand-in for a vLLM OpenAI-compatible server, on a tiny HF model, for the served-teacher tests.

It stands in for `vllm serve MODEL --max-logprobs 20`, which cannot run here (no GPU), and follows the part of
vLLM's protocol llmneo uses, errors included:
  POST /v1/completions  {"model", "prompt": ids | [ids, ...], "max_tokens", "prompt_logprobs": k}
      → {"object": "text_completion", "model", "choices": [{"index", "text", "finish_reason",
         "prompt_logprobs": [null, {token_id: {"logprob", "rank", "decoded_token"}, ...}, ...]}], "usage"}
        Each entry after the first holds the top-k (rank 1..k) of the distribution over that token given the
        ones before it, plus the actual token with its true rank when that is lower than k.
      HTTP 400 {"error": {"message", "type": "BadRequestError", "param", "code": 400}} when k > max_logprobs,
        with vLLM's wording; 404 for an unknown model.
  POST /tokenize {"model", "prompt", "add_special_tokens"} → {"count", "max_model_len", "tokens"}
  POST /detokenize {"model", "tokens"} → {"prompt"}
  GET  /v1/models → {"object": "list", "data": [{"id", "object": "model", "max_model_len"}]}
Log-probs are normalised over all of the head's rows (config.vocab_size), padding included, as vLLM's
LogitsProcessor does (it trims only tensor-parallel padding), so a padded head's extra rows can rank.
Faults for the tests: `fail_every` (HTTP 503 on every n-th completion), `delay` (seconds per completion),
`hang_for` (one completion sleeps this long: a timeout), `stop_after` (completions answered before the
server starts refusing with 503, to kill a capture mid-way); `api_key` answers 401 (vLLM's {"error":
"Unauthorized"}) to /v1 requests without "Authorization: Bearer KEY", as `vllm serve --api-key` does.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class StandIn:
    def __init__(self, model_dir: str, tokenizer, *, name: str = "teacher", max_logprobs: int = 20,
                 fail_every: int = 0, delay: float = 0.0, hang_for: float = 0.0, tokenizer_for_tokenize=None,
                 api_key: str | None = None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = tokenizer
        self.served_tokenizer = tokenizer_for_tokenize or tokenizer
        self.name, self.max_logprobs = name, max_logprobs
        self.fail_every, self.delay, self.hang_for = fail_every, delay, hang_for
        self.stop_after: int | None = None
        self.api_key = api_key  # like `vllm serve --api-key`: /v1 requests need "Authorization: Bearer KEY"
        self.headers_seen: list[str] = []
        self.completions = 0
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = False  # server_close() waits for requests in flight
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the protocol ----------------------------------------------------------------------------------------
    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        vocab = self.model.config.vocab_size  # vLLM normalises over all of the head's rows, padding included
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, :, :vocab].float()
        logp = torch.log_softmax(logits, dim=-1)  # row t: the distribution of token t + 1
        entries: list = [None]
        for t in range(1, len(ids)):
            row = logp[t - 1]
            order = torch.argsort(row, descending=True)
            entry = {}
            for rank, token in enumerate(order[:k].tolist(), 1):
                entry[str(token)] = {"logprob": float(row[token]), "rank": rank,
                                     "decoded_token": self.tokenizer.decode([token])}
            actual = ids[t]
            if str(actual) not in entry:
                rank = int((row > row[actual]).sum()) + 1
                entry[str(actual)] = {"logprob": float(row[actual]), "rank": rank,
                                      "decoded_token": self.tokenizer.decode([actual])}
            entries.append(entry)
        return entries

    def complete(self, body: dict) -> tuple[int, dict]:
        if body.get("model") != self.name:
            return 404, _error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return 400, _error(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs}", "BadRequestError", 400)
        prompts = body["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        choices = []
        for index, ids in enumerate(prompts):
            with self.lock:
                entries = self.prompt_logprobs(ids, k) if k is not None else None
                with torch.no_grad():
                    nxt = int(self.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            choices.append({"index": index, "text": self.tokenizer.decode([nxt]), "logprobs": None,
                            "finish_reason": "length", "stop_reason": None, "prompt_logprobs": entries})
        tokens = sum(len(p) for p in prompts)
        return 200, {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()), "model": self.name,
                     "choices": choices, "usage": {"prompt_tokens": tokens, "completion_tokens": len(prompts),
                                                   "total_tokens": tokens + len(prompts)}}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _refused(self) -> bool:
                standin.headers_seen.append(str(self.headers.get("Authorization")))
                if standin.api_key and self.path.startswith("/v1") and \
                        self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                    self._send(401, {"error": "Unauthorized"})
                    return True
                return False

            def do_GET(self):
                if self._refused():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": standin.name, "object": "model",
                                                                  "max_model_len": 512}]})
                else:
                    self._send(404, _error("Not Found", "NotFoundError", 404))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self._refused():
                    return
                if self.path == "/v1/completions":
                    with standin.lock:
                        standin.completions += 1
                        n = standin.completions
                    if standin.stop_after is not None and n > standin.stop_after:
                        return self._send(503, _error("Service Unavailable", "ServiceUnavailableError", 503))
                    if standin.fail_every and n % standin.fail_every == 0:
                        return self._send(503, _error("Service Unavailable", "ServiceUnavailableError", 503))
                    if standin.hang_for and n == 1:
                        time.sleep(standin.hang_for)
                    if standin.delay:
                        time.sleep(standin.delay)
                    self._send(*standin.complete(body))
                elif self.path == "/tokenize":
                    tokens = standin.served_tokenizer(body["prompt"], add_special_tokens=body.get(
                        "add_special_tokens", True))["input_ids"]
                    self._send(200, {"count": len(tokens), "max_model_len": 512, "tokens": tokens})
                elif self.path == "/detokenize":
                    self._send(200, {"prompt": standin.served_tokenizer.decode(body["tokens"])})
                else:
                    self._send(404, _error("Not Found", "NotFoundError", 404))

        return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client killed mid-reply
            super().handle_error(request, client_address)


def _error(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
