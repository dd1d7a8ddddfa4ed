"""The client of a vLLM server of the student's base model (rollout_endpoint): its adapter API, its completions,
and its answers as one line each (models/served_rollouts.py syncs the adapter and writes the replies with it).

    GET  {url}/models                   the base model (parent null), its max_model_len; loaded adapters (parent set)
    POST {root}/v1/load_lora_adapter    {"lora_name", "lora_path"}  → plain text; refusals are 4xx, and 500 for
                                        what the engine refuses (no --enable-lora, a rank above --max-lora-rank),
                                        in the worker's words ("failed with error '...'"); other 5xx are retried
    POST {root}/v1/unload_lora_adapter  {"lora_name"}               → plain text; 404 when it is not loaded
    POST {url}/completions              `completion_request`        → choices[0].token_ids; 404 for an unknown model
The words matched are vLLM 0.32's (tests/vllm/test_rollouts.py meets each against a real server).
"""

from __future__ import annotations

import re

from llmneo.endpoint import JsonEndpoint
from llmneo.errors import LlmneoError
from llmneo.models import generate

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


class AdapterGone(LlmneoError):
    """A completion named an adapter the server does not hold (it restarted, or someone unloaded it)."""


class AlreadyLoaded(LlmneoError):
    """The server holds an adapter of that name already (an earlier run of this output_dir left it)."""


class RolloutEndpoint(JsonEndpoint):
    """The vLLM server at `url` (…/v1) serving the student's base model `model` (default: its one base model)."""

    key = "rollout_endpoint"

    def __init__(self, url: str, model: str | None, api_key_env: str | None = None, *, served_rank: int | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 0.25):
        super().__init__(url, api_key_env, timeout=timeout, retries=retries, backoff=backoff,
                         key_field="rollout_api_key_env")
        self.served_rank = served_rank  # the adapter's rank as the server sees it, for the --max-lora-rank advice
        cards = self.request("GET", f"{self.url}/models").get("data", [])
        bases = {str(c.get("id")): c for c in cards if not c.get("parent")}  # loaded adapters name a parent
        if model is None and len(bases) != 1:
            raise LlmneoError(f"rollout_endpoint {self.shown} serves {len(bases)} base models "
                              f"({', '.join(bases) or 'none'}); name the student's base in rollout_endpoint_model")
        model = model or next(iter(bases))
        if model not in bases:
            adapter = any(c.get("id") == model for c in cards)
            what = "a LoRA adapter there, not a base model" if adapter else "not served"
            raise LlmneoError(f"rollout_endpoint_model '{model}' is {what} at {self.shown} (its base models: "
                              f"{', '.join(bases) or 'none'}); set rollout_endpoint_model to the served name of the "
                              f"student's base model (vllm serve ... --served-model-name)")
        self.model = model
        self.max_model_len = bases[model].get("max_model_len")
        self.adapters = [str(c.get("id")) for c in cards if c.get("parent")]  # loaded when this client started

    def load(self, name: str, folder: str) -> None:
        self.request("POST", f"{self.root}/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder},
                     json_answer=False)

    def unload(self, name: str) -> None:
        """One attempt even after stop(): a closing run still takes its adapter off the server."""
        self.request("POST", f"{self.root}/v1/unload_lora_adapter", {"lora_name": name}, json_answer=False,
                     after_stop=True)

    def complete(self, body: dict) -> list[int]:
        """The generated token ids of one completion request (`completion_request`)."""
        answer = self.request("POST", f"{self.url}/completions", body)
        choices = answer.get("choices") or [{}]
        ids = choices[0].get("token_ids")
        if not isinstance(ids, list):
            raise LlmneoError(f"rollout_endpoint {self.shown} answered without token_ids; it needs a vLLM that "
                              f"supports return_token_ids (an OpenAI-compatible server of another kind does not)")
        return [int(t) for t in ids]

    def client_error(self, code: int, message: str, payload: dict | None) -> LlmneoError:
        payload = payload or {}
        if "lora_path" in payload:  # load_lora_adapter
            if code == 400 and "already been loaded" in message:
                return AlreadyLoaded(message)
            if code == 404 and "no adapter found" in message.lower():
                return LlmneoError(f"rollout_endpoint {self.shown} cannot read the adapter folder "
                                   f"{payload['lora_path']} ({message}); rollout_adapter_dir must be a folder the "
                                   f"server can read (a shared filesystem when it runs on another machine)")
            if code in (404, 405):
                return LlmneoError(f"rollout_endpoint {self.shown} does not load adapters at run time (HTTP {code} "
                                   f"from /v1/load_lora_adapter); start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING="
                                   f"True in its environment and --enable-lora --max-lora-rank {self._max_rank()}")
        if code == 404 and "lora_name" in payload:  # unload_lora_adapter: it is gone already
            return AdapterGone(message)
        if code == 404 and "prompt" in payload:
            return AdapterGone(f"rollout_endpoint {self.shown} does not hold the adapter '{payload.get('model')}' "
                               f"that llmneo loaded ({message}); was it unloaded by another client?")
        if code in (401, 403):
            return LlmneoError(f"rollout_endpoint {self.shown} refused the request (HTTP {code}: {message}); set the "
                               f"API key's environment variable and name it in rollout_api_key_env")
        if code == 400 and "prompt" in payload:
            return LlmneoError(f"rollout_endpoint {self.shown} refused a completion request ({message})")
        return super().client_error(code, message, payload)

    def server_error(self, code: int, message: str, payload: dict | None) -> LlmneoError | None:
        """An adapter load the engine refused answers 500 with its worker's words: retrying cannot change it. Any
        other 5xx (a proxy's 502/503/504, an engine answering 500 as it dies) is retried: EndpointGone at last."""
        if code != 500 or "lora_path" not in (payload or {}):
            return None
        found = re.search(r"failed with error '(.+?)(?:', please check|'$|$)", message)  # the message may be cut
        reason = found.group(1) if found else message
        if not found and "lora is not enabled" not in reason.lower() and "max_lora_rank" not in reason:
            return None
        if "lora is not enabled" in reason.lower():
            return LlmneoError(f"rollout_endpoint {self.shown} serves no LoRA adapters ({reason}); start vLLM with "
                               f"--enable-lora --max-lora-rank {self._max_rank()} (and "
                               f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
        if "max_lora_rank" in reason:
            return LlmneoError(f"rollout_endpoint {self.shown} refused the student's adapter ({reason}); start vLLM "
                               f"with --max-lora-rank {self._max_rank()}, or lower lora_rank (pissa and olora serve "
                               f"2 * lora_rank)")
        return LlmneoError(f"rollout_endpoint {self.shown} could not load the student's adapter ({reason})")

    def _max_rank(self) -> str:
        """The smallest --max-lora-rank vLLM accepts that holds the served rank."""
        if self.served_rank is None:
            return "R"
        return str(next((r for r in MAX_LORA_RANKS if r >= self.served_rank), self.served_rank))


def completion_request(model: str, prompt: list[int], *, max_tokens: int, sampling: generate.Sampling,
                       stop_ids: set[int], seed: int, allowed: list[int] | None = None) -> dict:
    """One row's /v1/completions body, sampling as HFGenerator does. Every sampler vLLM would otherwise fill from the
    model's generation_config is set: off, or HF's value (top_k 0 is vLLM's 'off'; temperature 0 is greedy)."""
    body = {"model": model, "prompt": [int(t) for t in prompt], "max_tokens": int(max_tokens), "n": 1,
            "temperature": float(sampling.temperature), "top_p": float(sampling.top_p) if sampling.temperature > 0
            else 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "min_tokens": 0, "ignore_eos": False, "seed": int(seed),
            "stop_token_ids": sorted(int(t) for t in stop_ids), "return_token_ids": True}
    if allowed is not None:  # a head padded past the tokenizer never emits its padding rows
        body["allowed_token_ids"] = allowed
    return body
