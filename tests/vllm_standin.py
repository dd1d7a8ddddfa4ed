"""A stand-in for a vLLM OpenAI-compatible server, on a tiny HF model, for the fast tier's served tests.

It stands in for `vllm serve MODEL --max-logprobs 20 [--enable-lora --max-lora-rank R]` in-process (no vLLM
start-up, faults on demand), and follows the part of vLLM's protocol llmneo uses, errors included. The `vllm`
tier (tests/vllm/test_standin_agrees.py) sends the same requests to a real vLLM server and to a StandIn and
holds every field below to the real answers: log-probs to ~1e-4, ranks and greedy tokens exactly except at ties,
error statuses and messages word for word.
  POST /v1/completions  {"model", "prompt": ids | [ids, ...] | text, "max_tokens" (16), "prompt_logprobs": k,
                         "temperature" (1.0), "top_p", "top_k", "seed", "n", "stop_token_ids", "ignore_eos",
                         "min_tokens", "allowed_token_ids", "return_token_ids"}
      → {"object": "text_completion", "model", "choices": [{"index", "text", "finish_reason", "stop_reason",
         "token_ids", "prompt_token_ids", "prompt_logprobs": [null, {token_id: {"logprob", "rank",
         "decoded_token"}, ...}, ...]}], "usage"}; choice index = prompt * n + sample.
        Each prompt_logprobs entry after the first holds the top-k (rank 1..k) of the distribution over that token
        given the ones before it, plus the actual token with its true rank when that is lower than k.
        Generation stops at a stop_token_ids id (finish "stop", stop_reason the id), at the tokenizer's EOS
        unless ignore_eos (stop_reason null; other generation_config EOS ids act as stop ids), or after
        max_tokens or at max_model_len ("length"); the stop token is in token_ids, not in text.
        Temperature 0 is greedy, as vLLM's. Sampling (temperature > 0, top_p, top_k) draws from the stand-in's
        own torch generator seeded by `seed`: it respects allowed_token_ids, stop ids and max_tokens, and a seed
        repeats its samples, but it cannot reproduce vLLM's samples.
      Errors as vLLM words them: 400 for prompt_logprobs above max_logprobs ("... greater than max allowed: 20"),
        max_tokens < 1 once cut to the room max_model_len leaves, n > 1 at temperature 0, a temperature outside
        [0, 2] or top_p outside (0, 1], empty or out-of-vocabulary allowed_token_ids / stop_token_ids, prompt ids
        out of the vocabulary, prompts longer than max_model_len; 404 for an unknown model ("The model `x` does
        not exist. Valid aliases: teacher."); all as {"error": {"message", "type", "param", "code"}}.
  POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"} → 200 text "Success: LoRA adapter 'a'
      added successfully."; then model="a" is the base with that PEFT adapter (unmerged, as vLLM applies it).
      400 for a name already loaded (without load_inplace), the base's name, or an empty field; 404 "Loading lora
      a failed: No adapter found for PATH" without an adapter_config.json; 500 "Call to add_lora method failed:
      Worker failed with error '...'" for a rank above max_lora_rank, a file for a folder, or a server without
      enable_lora (vLLM answers those 500, so a client retries them as server errors).
  POST /v1/unload_lora_adapter {"lora_name"} → 200 text "Success: LoRA adapter 'a' removed successfully.";
      404 "The lora adapter 'a' cannot be found."
  POST /tokenize {"model", "prompt", "add_special_tokens"} → {"count", "max_model_len", "tokens", "token_strs"}
  POST /detokenize {"model", "tokens"} → {"prompt"}
  GET  /v1/models → {"object": "list", "data": [{"id", "object": "model", "root", "parent", "max_model_len"}]},
      loaded adapters after the base (parent: the base's name).
  Other paths: 404 {"detail": "Not Found"}; GET on a POST path: 405 {"detail": "Method Not Allowed"}.
Log-probs are normalised over all of the head's rows (config.vocab_size), padding included, as vLLM's
LogitsProcessor does (it trims only tensor-parallel padding), so a padded head's extra rows can rank.
Error messages lose file paths under /tmp, /home, ... as vLLM's sanitiser does ("<path>"). decoded_token is the
token decoded alone ("" when that splits a character; vLLM then repairs it from the prompt before it, which
the stand-in does not; llmneo never reads it).
Faults for the tests: `fail_every` (HTTP 503 on every n-th completion), `delay` (seconds per completion),
`hang_for` (one completion sleeps this long: a timeout), `stop_after` (completions answered before the
server starts refusing with 503, to kill a capture mid-way); `api_key` answers 401 (vLLM's {"error":
"Unauthorized"}) to /v1 requests without "Authorization: Bearer KEY", as `vllm serve --api-key` does.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature
POST_PATHS = ("/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/detokenize")


class StandIn:
    """`vllm serve model_dir --served-model-name NAME --max-logprobs N --max-model-len L` on a free port of
    127.0.0.1 (`url` ends in /v1), started and stopped by `with`; `enable_lora` and `max_lora_rank` as vLLM's
    --enable-lora --max-lora-rank, for runtime adapter loading."""

    def __init__(self, model_dir: str, tokenizer, *, name: str = "teacher", max_logprobs: int = 20,
                 fail_every: int = 0, delay: float = 0.0, hang_for: float = 0.0, tokenizer_for_tokenize=None,
                 api_key: str | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                 max_model_len: int = 512):
        from transformers import AutoModelForCausalLM

        self.model_dir = str(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = tokenizer
        self.served_tokenizer = tokenizer_for_tokenize or tokenizer
        self.name, self.max_logprobs, self.max_model_len = name, max_logprobs, max_model_len
        self.enable_lora, self.max_lora_rank = enable_lora, max_lora_rank
        self.adapters: dict[str, tuple[str, torch.nn.Module]] = {}  # lora_name → (path, base + adapter)
        self.vocab = self.model.config.vocab_size  # the head's rows: vLLM's vocabulary bound
        self.eos = tokenizer.eos_token_id
        extra = self.model.generation_config.eos_token_id
        extra = {extra} if isinstance(extra, int) else set(extra or ())
        self.extra_eos = extra - {self.eos}  # generation_config's other EOS ids: stop ids unless ignore_eos
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

    # --- models ------------------------------------------------------------------------------------------------
    def served(self, model: str | None):
        """The module serving `model` (the base when it is None or empty), or None for an unknown name."""
        if not model or model == self.name:
            return self.model
        found = self.adapters.get(model)
        return found[1] if found else None

    def _unknown(self, model) -> tuple[int, dict]:
        return 404, _error(f"The model `{model}` does not exist. Valid aliases: {self.name}.", "NotFoundError",
                           404, "model")

    def next_logprobs(self, ids: list[int], model: str | None = None) -> torch.Tensor:
        """log p(next token | ids) over the head's rows, from `model` (a served name): the tests' tie checks."""
        with self.lock, torch.no_grad():
            logits = self.served(model)(input_ids=torch.tensor([ids])).logits[0, -1, :self.vocab].float()
        return torch.log_softmax(logits, dim=-1)

    def prompt_logprobs(self, ids: list[int], k: int, module=None) -> list:
        module = module or self.model
        with torch.no_grad():
            logits = module(input_ids=torch.tensor([ids])).logits[0, :, :self.vocab].float()
        logp = torch.log_softmax(logits, dim=-1)  # row t: the distribution of token t + 1
        entries: list = [None]
        for t in range(1, len(ids)):
            row = logp[t - 1]
            order = torch.argsort(row, descending=True)
            entry = {}
            for rank, token in enumerate(order[:k].tolist(), 1):
                entry[str(token)] = {"logprob": float(row[token]), "rank": rank, "decoded_token": self._piece(token)}
            actual = ids[t]
            if str(actual) not in entry:
                rank = int((row > row[actual]).sum()) + 1
                entry[str(actual)] = {"logprob": float(row[actual]), "rank": rank,
                                      "decoded_token": self._piece(actual)}
            entries.append(entry)
        return entries

    def _piece(self, token: int) -> str:
        text = self.tokenizer.decode([token])
        return "" if text.endswith("\ufffd") else text  # half a character: vLLM repairs it from context

    # --- generation ----------------------------------------------------------------------------------------------
    def generate(self, module, ids: list[int], body: dict,
                 generator: torch.Generator) -> tuple[list[int], str, int | None]:
        """One completion of `ids`: (token ids, finish_reason, stop_reason), one token per forward (KV cache)."""
        budget = min(body.get("max_tokens") or 16, self.max_model_len - len(ids))
        stops = set(body.get("stop_token_ids") or ())
        if not body.get("ignore_eos"):
            stops |= self.extra_eos
        ends = stops | ({self.eos} if self.eos is not None else set())
        allowed = body.get("allowed_token_ids")
        out: list[int] = []
        cache, inputs = None, ids
        while len(out) < budget:
            with torch.no_grad():
                result = module(input_ids=torch.tensor([inputs]), cache=cache, use_cache=True)
            cache = result.cache
            logits = result.logits[0, -1, :self.vocab].float()  # (V,)
            if allowed is not None:
                keep = torch.full_like(logits, -torch.inf)
                keep[allowed] = 0.0
                logits = logits + keep
            if len(out) < (body.get("min_tokens") or 0) and ends:
                logits[list(ends)] = -torch.inf
            token = _pick(logits, body, generator)
            out.append(token)
            if token in stops:
                return out, "stop", token
            if token == self.eos and not body.get("ignore_eos"):
                return out, "stop", None
            inputs = [token]
        return out, "length", None

    def _invalid(self, body: dict, prompts: list[list[int]]) -> tuple[int, dict] | None:
        """vLLM's 400s for the request's parameters and prompts, or None."""
        k, max_tokens = body.get("prompt_logprobs"), body.get("max_tokens")
        temperature, top_p = body.get("temperature"), body.get("top_p")
        if temperature is not None and temperature < GREEDY_BELOW and (body.get("n") or 1) > 1:
            return 400, _error(f"n must be 1 when using greedy sampling, got {body['n']}.", "BadRequestError", 400)
        if temperature is not None and not 0 <= temperature <= 2:
            said = "must be non-negative" if temperature < 0 else "must be in [0, 2]"
            return _bad(f"temperature {said}, got {float(temperature)}.", "temperature", float(temperature))
        if top_p is not None and not 0 < top_p <= 1:
            return _bad(f"top_p must be in (0, 1], got {float(top_p)}.", "top_p", float(top_p))
        if k is not None and k > self.max_logprobs:
            return _bad(f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}",
                        "prompt_logprobs", k)
        allowed = body.get("allowed_token_ids")
        if allowed is not None and not allowed:
            return _bad("allowed_token_ids is not None and empty!", "allowed_token_ids", allowed)
        if allowed and (wrong := [t for t in allowed if not 0 <= t < self.vocab]):
            return _bad("allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids", wrong)
        if wrong := [t for t in body.get("stop_token_ids") or () if not 0 <= t < self.vocab]:
            return _bad(f"token_id(s) {wrong} in stop_token_ids contain out-of-vocab token ids. Vocabulary size: "
                        f"{self.vocab}", "stop_token_ids", wrong)
        top = max(len(self.tokenizer) - 1, self.vocab - 1)
        for ids in prompts:
            if ids and (min(ids) < 0 or max(ids) > top):
                return 400, _error(f"Token id {min(ids) if min(ids) < 0 else max(ids)} is out of vocabulary",
                                   "BadRequestError", 400)
            if len(ids) > self.max_model_len:
                at_least = "at least " if len(ids) == self.max_model_len + 1 else ""
                return _bad(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                            f"prompt contains {at_least}{len(ids)} input tokens, which exceeds this limit even "
                            f"without any output tokens. Please reduce the length of the input prompt.",
                            "input_tokens", len(ids))
            room = min(16 if max_tokens is None else max_tokens, self.max_model_len - len(ids))
            if room < 1:  # vLLM first cuts max_tokens to what the context leaves
                return _bad(f"max_tokens must be at least 1, got {room}.", "max_tokens", room)
        return None

    def complete(self, body: dict) -> tuple[int, dict]:
        module = self.served(body.get("model"))
        if module is None:
            return self._unknown(body.get("model"))
        prompts = body["prompt"]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [self.served_tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        refused = self._invalid(body, prompts)
        if refused:
            return refused
        k, n, with_ids = body.get("prompt_logprobs"), body.get("n") or 1, bool(body.get("return_token_ids"))
        generator = torch.Generator()
        generator.manual_seed(body["seed"] if body.get("seed") is not None else int(time.time_ns() % 2 ** 62))
        choices, made = [], 0
        with self.lock:
            for ids in prompts:
                entries = self.prompt_logprobs(ids, k, module) if k is not None else None
                for _ in range(n):
                    tokens, finish, stop = self.generate(module, ids, body, generator)
                    made += len(tokens)
                    shown = tokens[:-1] if finish == "stop" else tokens
                    text = self.tokenizer.decode(shown, skip_special_tokens=True)
                    choices.append({"index": len(choices), "text": text, "logprobs": None, "finish_reason": finish,
                                    "stop_reason": stop, "token_ids": tokens if with_ids else None,
                                    "prompt_logprobs": entries, "prompt_token_ids": ids if with_ids else None})
        asked = sum(len(p) for p in prompts)
        return 200, {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()),
                     "model": body.get("model") or self.name, "choices": choices,
                     "usage": {"prompt_tokens": asked, "completion_tokens": made, "total_tokens": asked + made}}

    # --- adapters ------------------------------------------------------------------------------------------------
    def load_lora(self, body: dict) -> tuple[int, dict | str]:
        if missing := _missing(body, ("lora_name", "lora_path")):
            return missing
        name, path = body["lora_name"], body["lora_path"]
        if not name or not path:
            return 400, _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name == self.name:
            return 400, _error(f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput",
                               400)
        if name in self.adapters and not body.get("load_inplace"):
            return 400, _error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                               f"in place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        if not self.enable_lora:
            return _worker_failed("LoRA is not enabled. Use --enable-lora to enable LoRA.")
        try:
            with open(os.path.join(path, "adapter_config.json")) as f:
                config = json.load(f)
        except FileNotFoundError:
            return 404, _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        except (OSError, json.JSONDecodeError) as exc:
            return _worker_failed(str(exc))
        rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
        problems = [f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."] \
            if rank > self.max_lora_rank else []
        if config.get("bias", "none") != "none":
            problems.append("Adapter bias is not supported.")
        if problems:
            return _worker_failed(" ".join(problems))
        from peft import PeftModel

        try:
            adapted = PeftModel.from_pretrained(copy.deepcopy(self.model), path).eval()
        except Exception as exc:  # a broken adapter: vLLM's worker fails the same way (HTTP 500)
            return _worker_failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        with self.lock:
            self.adapters[name] = (path, adapted)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, body: dict) -> tuple[int, dict | str]:
        if missing := _missing(body, ("lora_name",)):
            return missing
        name = body["lora_name"]
        if not name:
            return 400, _error("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
        with self.lock:
            if self.adapters.pop(name, None) is None:
                return 404, _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def model_cards(self) -> dict:
        cards = [{"id": self.name, "object": "model", "owned_by": "vllm", "root": self.model_dir, "parent": None,
                  "max_model_len": self.max_model_len}]
        cards += [{"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.name,
                   "max_model_len": None} for name, (path, _) in self.adapters.items()]
        return {"object": "list", "data": cards}

    # --- HTTP ------------------------------------------------------------------------------------------------------
    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict | str) -> None:
                text = isinstance(payload, str)  # vLLM answers adapter loads in plain text
                raw = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
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
                    self._send(200, standin.model_cards())
                elif self.path in POST_PATHS:
                    self._send(405, {"detail": "Method Not Allowed"})
                else:
                    self._send(404, {"detail": "Not Found"})

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
                elif self.path == "/v1/load_lora_adapter":
                    self._send(*standin.load_lora(body))
                elif self.path == "/v1/unload_lora_adapter":
                    self._send(*standin.unload_lora(body))
                elif self.path in ("/tokenize", "/detokenize") and standin.served(body.get("model")) is None:
                    self._send(*standin._unknown(body.get("model")))
                elif self.path == "/tokenize":
                    tokens = standin.served_tokenizer(body["prompt"], add_special_tokens=body.get(
                        "add_special_tokens", True))["input_ids"]
                    self._send(200, {"count": len(tokens), "max_model_len": standin.max_model_len, "tokens": tokens,
                                     "token_strs": None})
                elif self.path == "/detokenize":
                    self._send(200, {"prompt": standin.served_tokenizer.decode(body["tokens"])})
                else:
                    self._send(404, {"detail": "Not Found"})

        return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client killed mid-reply
            super().handle_error(request, client_address)


def _pick(logits: torch.Tensor, body: dict, generator: torch.Generator) -> int:
    """The next token from masked logits (V,): argmax at temperature 0, else a draw after top-k and top-p."""
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits / temperature
    top_k = body.get("top_k") or -1
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -torch.inf)
    top_p = body.get("top_p", 1.0)
    if top_p is not None and top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
        outside = probs.cumsum(0) - probs >= top_p  # tokens after the smallest set holding top_p
        logits = logits.clone()
        logits[order[outside]] = -torch.inf
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


# Paths vLLM's error sanitiser hides: anything under these roots, and other absolute paths to a file.x
_SYSTEM_PATHS = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_FILE_PATHS = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict:
    message = _FILE_PATHS.sub("<path>", _SYSTEM_PATHS.sub("<path>", message)).strip()
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(message: str, parameter: str, value) -> tuple[int, dict]:
    """vLLM's validation error: the parameter and value appended to the message, and named in param."""
    return 400, _error(f"{message} (parameter={parameter}, value={value})", "BadRequestError", 400, parameter)


def _worker_failed(problem: str) -> tuple[int, dict]:
    """An adapter the engine's worker refused: vLLM answers 500 with the worker's message inside."""
    return 500, _error(f"Call to add_lora method failed: Worker failed with error '{problem}', please check the "
                       f"stack trace above for the root cause", "InternalServerError", 500)


def _missing(body: dict, fields: tuple[str, ...]) -> tuple[int, dict] | None:
    """FastAPI's 400 for a required field left out of the body."""
    gone = [f for f in fields if f not in body]
    if not gone:
        return None
    lines = "\n".join(f"  {{'type': 'missing', 'loc': 'body.{f}', 'msg': 'Field required', 'input': '<dict of "
                      f"{len(body)} items>'}}" for f in gone)
    plural = "s" if len(gone) > 1 else ""
    return 400, _error(f"{len(gone)} validation error{plural}:\n{lines}", "Bad Request", 400, f"body.{gone[0]}")
