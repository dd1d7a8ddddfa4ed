"""A teacher served by an inference engine: vLLM's OpenAI-compatible `/v1/completions` with `prompt_logprobs`.

The protocol (vLLM's; nothing here imports vllm):
  POST {teacher_endpoint}/completions  {"model", "prompt": [[ids...], ...], "max_tokens": 1, "prompt_logprobs": k}
    → choices[i].prompt_logprobs: one entry per prompt token; the first is null, every other one a dict
      keyed by token id (a string) → {"logprob", "rank", "decoded_token"} holding the top-k (rank ≤ k)
      and also the actual token, which is not one of the top-k when it ranks lower.
    vLLM caps k at its --max-logprobs (default 20) and answers HTTP 400 above it.
  POST {server root}/inference/v1/generate  {"model", "token_ids": [ids...], "sampling_params": {"max_tokens": 1,
       "prompt_logprobs": k, "detokenize": false}} → prompt_logprobs: the same entries, decoded_token null.
    vLLM's tokens-in/tokens-out endpoint (served with --enable-scale-out): one sequence per request, and no
    top-k token decoded, which takes 30-50 % off the server's CPU time per entry (benchmarks/vllm_bench.py).
    Asked first; a server without it (403: scale-out off; 404: an older vLLM, another server) is asked
    through /completions from then on.
  POST {server root}/tokenize  {"model", "prompt": text, "add_special_tokens": false} → {"tokens": [...], ...}
  GET  {teacher_endpoint}/models → {"data": [{"id": name, ...}]}

`Endpoint` sends those requests through llmneo.endpoint (retries with exponential back-off on timeouts,
refused connections and 5xx; every failure one line saying what to do) and knows vLLM's teacher-side errors. `sparse_rows` reads the entry that predicts
each response token into the top-k ids, log-probs and tail mass the sparse losses already take (rows.py).
`ServedTeacher` is the training-time teacher signal (`rows(batch, positions)`), fetching batches ahead on a
thread pool (`prefetch`) so the student does not wait; `cache.capture` captures from an Endpoint the same way.
The API key comes from the environment variable named by `teacher_api_key_env`, never from a config or log.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from llmneo.endpoint import JsonEndpoint
from llmneo.errors import LlmneoError
from llmneo.loss.rows import SampledRows, SparseRows
from llmneo.teachers.signal import TeacherSignal

PROBE = "llmneo checks the teacher's tokenizer: Hello, world! 123 ümlaut 東京"


TOKENS_OUT_IN_FLIGHT = 16  # requests in flight per prompt_logprobs call on the tokens-out endpoint


class _NoTokensOut(LlmneoError):
    """The server has no /inference/v1/generate (or has it switched off): Endpoint asks /completions instead."""


class Endpoint(JsonEndpoint):
    """vLLM's OpenAI-compatible server at `url` (…/v1) serving the teacher `model`."""

    key = "teacher_endpoint"
    tokens_out: bool | None = None  # whether the server answers /inference/v1/generate (None: not asked yet)

    def __init__(self, url: str, model: str | None, api_key_env: str | None = None, *, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 0.25):
        super().__init__(url, api_key_env, timeout=timeout, retries=retries, backoff=backoff)
        self.model = model or self._only_model()

    def client_error(self, code: int, message: str, payload: dict | None) -> LlmneoError:
        payload = payload or {}
        if code in (403, 404) and "token_ids" in payload:  # no tokens-out endpoint (or it is off): ask /completions
            return _NoTokensOut(message)
        k = payload.get("prompt_logprobs", (payload.get("sampling_params") or {}).get("prompt_logprobs"))
        if code == 400 and k is not None and "max allowed" in message.lower():  # vLLM: "... greater than max allowed: 20"
            return LlmneoError(f"teacher_endpoint refused prompt_logprobs={k} ({message}); start vLLM with "
                               f"--max-logprobs {k} or more, or lower teacher_topk to what it allows")
        if code == 400 and "prefix caching" in message.lower():
            return LlmneoError(f"teacher_endpoint cannot return prompt log-probs with prefix caching on ({message}); "
                               f"start vLLM with --no-enable-prefix-caching, or use a vLLM that supports both")
        if code in (401, 403):
            return LlmneoError(f"teacher_endpoint {self.shown} refused the request (HTTP {code}: {message}); set the "
                               f"API key's environment variable and name it in teacher_api_key_env")
        if code == 404:
            return LlmneoError(f"teacher_endpoint {self.shown}: HTTP 404 ({message}); check the URL (it ends in /v1) "
                               f"and teacher_endpoint_model")
        return super().client_error(code, message, payload)

    def _only_model(self) -> str:
        served = self.served_models()
        if len(served) != 1:
            raise LlmneoError(f"teacher_endpoint {self.shown} serves {len(served)} models ({', '.join(map(str, served))});"
                              f" name one in teacher_endpoint_model")
        return served[0]

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list]:
        """Each sequence's prompt_logprobs (one entry per token, the first null), in the order given: through
        /inference/v1/generate while the server answers it, else through /completions (all sequences at once)."""
        sequences = [list(map(int, s)) for s in sequences]
        entries = self._tokens_out_logprobs(sequences, k) if self.tokens_out is not False else None
        if entries is None:
            answer = self.request("POST", f"{self.url}/completions", {
                "model": self.model, "prompt": sequences, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0})
            choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(sequences):
                raise LlmneoError(f"teacher_endpoint {self.shown} answered {len(choices)} choices for "
                                  f"{len(sequences)} prompts; is it a vLLM OpenAI-compatible server?")
            entries = [c.get("prompt_logprobs") for c in choices]
        for seq, got in zip(sequences, entries):
            if not isinstance(got, list) or len(got) != len(seq):
                raise LlmneoError(f"teacher_endpoint {self.shown} gave no prompt_logprobs (or the wrong count) for a "
                                  f"prompt of {len(seq)} tokens; serve the teacher with vLLM, which supports "
                                  f"prompt_logprobs")
        return entries

    def _tokens_out_logprobs(self, sequences: list[list[int]], k: int) -> list | None:
        """The entries from vLLM's tokens-out endpoint, one request per sequence, all in flight (the engine
        batches them); None, and /completions from then on, when the server has no such endpoint."""
        params = {"max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0, "detokenize": False}

        def one(sequence: list[int]) -> dict:
            return self.request("POST", f"{self.root}/inference/v1/generate",
                                {"model": self.model, "token_ids": sequence, "sampling_params": params})
        try:
            with ThreadPoolExecutor(max_workers=min(len(sequences), TOKENS_OUT_IN_FLIGHT) or 1) as pool:
                answers = list(pool.map(one, sequences))
        except _NoTokensOut:
            self.tokens_out = False
            return None
        self.tokens_out = True
        return [answer.get("prompt_logprobs") for answer in answers]

    def tokenize(self, text: str) -> list[int]:
        answer = self.request("POST", f"{self.root}/tokenize",
                              {"model": self.model, "prompt": text, "add_special_tokens": False})
        return [int(t) for t in answer.get("tokens", [])]


def check_endpoint(endpoint: Endpoint, tokenizer, k: int) -> None:
    """Before the first batch: the tokenizer (check_tokenizer), and one request at `k` prompt log-probs, so a
    k above the server's --max-logprobs is refused before any work starts."""
    check_tokenizer(endpoint, tokenizer)
    endpoint.prompt_logprobs([tokenizer(PROBE, add_special_tokens=False)["input_ids"][:8]], k)


def check_tokenizer(endpoint: Endpoint, tokenizer) -> None:
    """The served teacher must tokenize like the student: a probe string through /tokenize, and the student's
    last vocabulary ids through /detokenize (the vocabulary reaches as far, with the same tokens). Ids past
    it are refused when they come back in log-probs (`sparse_rows`)."""
    ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    theirs = endpoint.tokenize(PROBE)
    if theirs != ours:
        raise LlmneoError(f"the teacher at {endpoint.url} ({endpoint.model}) tokenizes differently from the student "
                          f"(a probe string gives {len(theirs)} tokens there and {len(ours)} here); serve a teacher "
                          f"that shares the student's tokenizer")
    last = [len(tokenizer) - 1]
    answer = endpoint.request("POST", f"{endpoint.root}/detokenize", {"model": endpoint.model, "tokens": last})
    if answer.get("prompt") != tokenizer.decode(last):
        raise LlmneoError(f"the teacher at {endpoint.url} ({endpoint.model}) has another vocabulary: its token "
                          f"{last[0]} is {answer.get('prompt')!r}, the student's is {tokenizer.decode(last)!r} "
                          f"({len(tokenizer)} tokens); serve a teacher that shares the student's tokenizer")


# --- responses → rows ----------------------------------------------------------------------------------------

def sparse_rows(entries: list, targets: list[int], k: int, vocab_size: int, where: str) -> SparseRows:
    """Top-k rows for the positions predicting tokens `targets` (indices into `entries`, each ≥ 1).

    The entry at index t is the teacher's distribution over token t given tokens < t. Its top-k are the
    tokens of rank ≤ k, in rank order; tail = log(1 - their mass). A missing entry is an error naming `where`.
    """
    ids = torch.empty(len(targets), k, dtype=torch.long)
    logprobs = torch.empty(len(targets), k, dtype=torch.float32)
    for row, t in enumerate(targets):
        entry = entries[t] if 0 < t < len(entries) else None
        if not isinstance(entry, dict):
            raise LlmneoError(f"the teacher endpoint gave no log-probs at token {t} of {where}; nothing is trained "
                              f"on a gap (check the server's logs)")
        top = sorted(((v["rank"], int(i), float(v["logprob"])) for i, v in entry.items() if v["rank"] <= k))
        if len(top) < k:
            raise LlmneoError(f"the teacher endpoint gave {len(top)} of the top {k} log-probs at token {t} of {where};"
                              f" lower teacher_topk or check the server")
        ids[row] = torch.tensor([i for _, i, _ in top[:k]])
        logprobs[row] = torch.tensor([lp for _, _, lp in top[:k]])
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise LlmneoError(f"the teacher endpoint ranked token id {int(ids.max())} in its top {k} at {where}, outside "
                          f"the student's vocabulary of {vocab_size}: its output head has more rows than the tokenizer "
                          f"(vLLM normalises over all of them) and those rows carry mass; serve a teacher whose head "
                          f"matches the student's tokenizer, or use it in-process (teacher_model_name_or_path)")
    mass = torch.logsumexp(logprobs.double(), dim=-1).clamp(max=0.0)
    tail = torch.log(-torch.expm1(mass)).float()  # log(1 - top-k mass); -inf when the top-k hold it all
    if k >= vocab_size:  # nothing lies outside: what rounding leaves over is no tail
        tail = torch.full_like(tail, -torch.inf)
    return SparseRows(ids, logprobs, tail)


def token_logprobs(entries: list, sequence: list[int], targets: list[int], where: str) -> torch.Tensor:
    """The teacher's log-prob of the actual token at each index of `targets` (the entry always holds it)."""
    out = []
    for t in targets:
        entry = entries[t] if 0 < t < len(entries) else None
        value = entry.get(str(sequence[t])) if isinstance(entry, dict) else None
        if value is None:
            raise LlmneoError(f"the teacher endpoint gave no log-prob for token {t} of {where}; nothing is trained "
                              f"on a gap (check the server's logs)")
        out.append(float(value["logprob"]))
    return torch.tensor(out, dtype=torch.float32)


def _sequences(batch: dict, positions: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's unpadded ids, and the indices of the tokens its response positions predict (t + 1); a
    neat-packed row (position_ids) as one sequence per example, so the server scores each on its own."""
    sequences, targets = [], []
    restarts = batch.get("position_ids")
    for row, (ids, mask, chosen) in enumerate(zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(),
                                                  positions.cpu())):
        n = int(mask.sum())
        wanted = [int(t) + 1 for t in chosen.nonzero().flatten().tolist()]
        starts = None if restarts is None else (restarts[row, :n].cpu() == 0).nonzero().flatten().tolist()
        for sequence, its_targets in packed_examples(ids[:n].tolist(), wanted, starts):
            sequences.append(sequence)
            targets.append(its_targets)
    return sequences, targets


def packed_examples(sequence: list[int], targets: list[int], starts: list[int] | None):
    """(ids, targets) of each example of a packed `sequence` whose examples begin at `starts` (None: one
    example), with the targets renumbered from each example's start; packed examples with no target are left
    out. Neat packing never makes an example's first token a target (data.packing), so none is lost."""
    if starts is None:
        yield sequence, targets
        return
    for start, end in zip(starts, starts[1:] + [len(sequence)]):
        inside = [t - start for t in targets if start < t < end]
        if inside:
            yield sequence[start:end], inside


class ServedTeacher(TeacherSignal):
    """Teacher rows from an Endpoint: sparse top-k rows (SparseRows), or, for sampled_rkl, the actual tokens'
    log-probs (SampledRows). `prefetch(batch, positions)` starts a batch's request on a thread pool of
    `in_flight` workers; `rows` then waits for it (or asks now, for a batch nobody prefetched)."""

    prefetches = True

    def __init__(self, endpoint: Endpoint, k: int, vocab_size: int, *, sampled: bool = False, in_flight: int = 4):
        self.endpoint, self.k, self.vocab_size, self.sampled = endpoint, k, vocab_size, sampled
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="llmneo-teacher")
        self._pending: dict[str, Future] = {}
        self.requests = 0

    @staticmethod
    def _key(batch: dict, positions: torch.Tensor) -> str:
        digest = hashlib.sha256(str(tuple(batch["input_ids"].shape)).encode())
        digest.update(batch["input_ids"].cpu().numpy().tobytes())
        digest.update(positions.cpu().numpy().tobytes())
        return digest.hexdigest()

    def prefetch(self, batch: dict, positions: torch.Tensor) -> None:
        key = self._key(batch, positions)
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._fetch, *_sequences(batch, positions))

    def _fetch(self, sequences: list[list[int]], targets: list[list[int]]):
        if not sequences:  # a neat-packed batch with no target in any example: nothing to ask
            empty = torch.zeros(0, self.k)
            return (SampledRows(empty[:, 0].long(), empty[:, 0]) if self.sampled
                    else SparseRows(empty.long(), empty, torch.zeros(0)))
        self.requests += 1
        entries = self.endpoint.prompt_logprobs(sequences, self.k)
        parts = []
        for n, (seq, got, wanted) in enumerate(zip(sequences, entries, targets)):
            where = f"batch row {n} ({len(seq)} tokens)"
            if self.sampled:
                parts.append(SampledRows(torch.tensor([seq[t] for t in wanted], dtype=torch.long),
                                         token_logprobs(got, seq, wanted, where)))
            else:
                parts.append(sparse_rows(got, wanted, self.k, self.vocab_size, where))
        if self.sampled:
            return SampledRows(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]))
        return SparseRows(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                          torch.cat([p.tail for p in parts]))

    def rows(self, batch: dict, positions: torch.Tensor):
        future = self._pending.pop(self._key(batch, positions), None)
        found = future.result() if future is not None else self._fetch(*_sequences(batch, positions))
        device = batch["input_ids"].device
        if isinstance(found, SampledRows):
            return SampledRows(found.ids.to(device), found.logprobs.to(device))
        return found.to(device)

    def close(self) -> None:
        self.endpoint.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

