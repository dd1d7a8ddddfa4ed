"""The student's on-policy replies from a vLLM server of its base model, with only the adapter synced to it
(rollout_endpoint).

The server (`vllm serve BASE --enable-lora --max-lora-rank R`, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) holds the
student's original base weights. What trains here is the adapter, so a sync writes it as a plain LoRA
(models.plain_lora folds rsLoRA's scale, MoSLoRA's mixer and PiSSA/OLoRA's changed base into one) into a fresh
folder under rollout_adapter_dir, and the server loads it under a new name:

    POST {root}/v1/load_lora_adapter    {"lora_name": "llmneo-TAG-stepV", "lora_path": FOLDER}     → plain text
    POST {url}/completions              {"model": that name, "prompt": ids, "max_tokens", "seed", ...,
                                         "stop_token_ids", "return_token_ids": true}   → choices[0].token_ids
    POST {root}/v1/unload_lora_adapter  {"lora_name": the previous adapter}                        → plain text

V is the optimizer step whose weights the adapter holds and TAG is fixed by output_dir, so every rank knows the
name without asking. `ServedRollouts.submit(step, trained, ...)` writes a step's replies:
  - the adapter is synced when the server's is rollout_sync_steps or more steps older than the weights the
    optimizer holds (`trained`); rank 0 writes and loads it while the other ranks wait (a broadcast carrying
    rank 0's error, so every rank stops with the same line), then unloads the previous one, which no rank
    uses any more. rollout_staleness = step - 1 - V: 0 when every step syncs, 1 when replies are written a
    step ahead (rollout_ahead), from the adapter synced before the step that trains meanwhile;
  - each row is its own request on a thread pool, with a seed from (seed, step, the row's example index):
    the same wherever the row lands (any rank, a resumed run), and sampled as HFGenerator samples: max_new_tokens
    (never past the model's positions or the server's --max-model-len), temperature (0 = greedy), top_p, and
    every other sampler set to off explicitly (vLLM otherwise takes the model's generation_config), stopping at
    EOS and the template's end of turn, never emitting a padded head row;
  - a server that lost the adapter (restarted) gets it loaded again from its folder, once per request.
Set-up loads the adapter the first step uses (the current weights, or the checkpoint's), so an unreachable
server, an unknown model, a server without LoRA or a rank above --max-lora-rank is one line before training.
Checkpoints keep what the next step uses (`save`): the server's adapter (rollout_adapter/, rollouts.json) and
the replies already generated for the next step (rollout_replies_RANK.safetensors); a resumed run loads both.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llmneo.endpoint import JsonEndpoint
from llmneo.errors import LlmneoError
from llmneo.models import generate, heads, plain_lora

STATE = "rollouts.json"  # in a checkpoint: the step whose weights the server's adapter holds
ADAPTER = "rollout_adapter"  # in a checkpoint: that adapter's plain LoRA folder
REPLIES = "rollout_replies_{rank}.safetensors"  # in a checkpoint: the next step's replies, generated ahead
THREADS = 32  # requests in flight per rank
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

    def load(self, name: str, folder: str) -> None:
        self.request("POST", f"{self.root}/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder},
                     json_answer=False)

    def unload(self, name: str) -> None:
        self.request("POST", f"{self.root}/v1/unload_lora_adapter", {"lora_name": name}, json_answer=False)

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
        """A refused adapter load answers 500 (vLLM's engine raised): retrying cannot change it."""
        if "lora_path" not in (payload or {}):
            return None
        found = re.search(r"failed with error '(.+?)'", message)
        reason = found.group(1) if found else message
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


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of dataset example `row` at optimizer step `step`: the same on any rank and in a resumed
    run, another for every (seed, step, row); below 2**63, as vLLM takes an int64."""
    digest = hashlib.blake2b(f"llmneo-rollout-{seed}-{step}-{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def run_tag(output_dir: str | Path) -> str:
    """Part of every adapter name: fixed by the run's output_dir, so all ranks (and a resumed run) agree on it."""
    return hashlib.blake2b(str(Path(output_dir).absolute()).encode(), digest_size=4).hexdigest()


class Pending:
    """One step's replies being written: per micro-batch, per row, a Future of its reply (or the reply itself);
    `result()` waits for all of them."""

    def __init__(self, rows: list[list], staleness: int | None):
        self.rows, self.staleness = rows, staleness

    def result(self) -> tuple[list[list[torch.Tensor]], int | None]:
        try:
            return [[r.result() if isinstance(r, Future) else r for r in batch] for batch in self.rows], self.staleness
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for batch in self.rows:
            for r in batch:
                if isinstance(r, Future):
                    r.cancel()


class ServedRollouts:
    """The student's replies from the server at config.rollout_endpoint (see the module docstring). `model` is
    the prepared student, `step` the last completed step, `resume_from` the checkpoint it continues."""

    ahead: bool

    def __init__(self, config, model: torch.nn.Module, tokenizer, accelerator, *, stop_ids: set[int] | None = None,
                 initial_adapter: dict | None = None, step: int = 0, resume_from: Path | None = None):
        self.model, self.accelerator, self.initial = model, accelerator, initial_adapter
        self.main, self.rank = accelerator.is_main_process, accelerator.process_index
        self.sampling = generate.Sampling.from_config(config)
        self.seed, self.sync_steps, self.ahead = config.seed, config.rollout_sync_steps, bool(config.rollout_ahead)
        hf = heads.unwrap(model)
        self.eos = generate.eos_ids(model, tokenizer) | set(stop_ids or ())
        self.max_positions = getattr(hf.config, "max_position_embeddings", None)
        rows = hf.get_output_embeddings().weight.shape[0]
        self.allowed = list(range(len(tokenizer))) if rows > len(tokenizer) else None  # as HFGenerator.suppressed
        self.endpoint = RolloutEndpoint(config.rollout_endpoint, config.rollout_endpoint_model,
                                        config.rollout_api_key_env, served_rank=plain_lora.served_rank(config))
        self.default_folder = config.rollout_adapter_dir is None
        self.folder = Path(config.rollout_adapter_dir or Path(config.output_dir) / "rollout_adapters").absolute()
        self.tag = run_tag(config.output_dir)
        self.version: int | None = None  # the step whose weights the server's adapter holds
        self.pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="llmneo-rollouts")
        self._reloading = threading.Lock()
        self._closed = False
        saved = _read_json(resume_from / STATE) if resume_from is not None else None
        made = [d for d in (Path(config.output_dir).absolute(), self.folder) if not d.exists()]
        try:
            if saved is not None and (resume_from / ADAPTER).is_dir():  # the adapter the next steps were to use
                self._sync(int(saved["version"]), copy_of=resume_from / ADAPTER)
            else:  # this run's current weights; also the probe: server, model, LoRA support and rank, before step 1
                self._sync(step)
        except BaseException:  # a refused run leaves nothing behind
            self.pool.shutdown(wait=False)
            if self.main:
                shutil.rmtree(self.folder / self.name(saved["version"] if saved else step), ignore_errors=True)
                for folder in reversed(made):
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
            raise
        self._resumed = _read_replies(resume_from / REPLIES.format(rank=self.rank)) if resume_from else None

    def name(self, version: int) -> str:
        return f"llmneo-{self.tag}-step{version}"

    def submit(self, step: int, trained: int, micro: list[dict], prompts: list[list[torch.Tensor]]) -> Pending:
        """Start writing optimizer step `step`'s replies to `prompts` (one list per micro-batch of `micro`) while the
        optimizer holds step `trained`'s weights (step - 1, or step - 2 when written ahead); the adapter is synced
        first when it is rollout_sync_steps or more steps older than those weights."""
        if self.version is None or trained - self.version >= self.sync_steps:
            self._sync(trained)
        name = self.name(self.version)
        rows = []
        for batch, batch_prompts in zip(micro, prompts):
            index = batch["index"].tolist() if "index" in batch else list(range(len(batch_prompts)))
            limits = [self._max_tokens(batch_prompts, p) for p in batch_prompts]  # errors here, before any request
            rows.append([self.pool.submit(self._reply, completion_request(
                name, p.tolist(), max_tokens=limit, sampling=self.sampling, stop_ids=self.eos,
                seed=row_seed(self.seed, step, int(row)), allowed=self.allowed))
                for p, limit, row in zip(batch_prompts, limits, index)])
        return Pending(rows, step - 1 - self.version)

    def resumed(self, step: int) -> Pending | None:
        """The replies the checkpoint holds for `step` (generated ahead before it was written), or None."""
        if self._resumed is None or self._resumed[0] != step:
            return None
        return Pending(self._resumed[2], self._resumed[1])

    def save(self, directory: Path, pending: Pending | None, step: int | None) -> None:
        """Into checkpoint folder `directory` (every rank): the server's adapter (rank 0), and this rank's replies for
        the next step `step` when they are being written ahead. Replies a failed request left unwritten are not
        saved: the resumed run writes them again, with the same adapter and seeds."""
        if self.main and self.version is not None:
            shutil.copytree(self.folder / self.name(self.version), directory / ADAPTER)
            (directory / STATE).write_text(json.dumps({"version": self.version, "name": self.name(self.version)}))
        if pending is None:
            return
        try:
            replies, staleness = pending.result()
        except LlmneoError:
            return
        _write_replies(directory / REPLIES.format(rank=self.rank), step, staleness, replies)

    def close(self) -> None:
        """Stop the requests, unload the adapter and delete its folder (once; a failing server is not waited for)."""
        if self._closed:
            return
        self._closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.endpoint.retries = 0
        if self.main and self.version is not None:
            self._drop(self.version)
            if self.default_folder:
                with_contents = self.folder.is_dir() and any(self.folder.iterdir())
                if self.folder.is_dir() and not with_contents:
                    self.folder.rmdir()

    # --- inside -----------------------------------------------------------------------------------------------
    def _sync(self, version: int, copy_of: Path | None = None) -> None:
        """Rank 0 writes step `version`'s adapter (the current weights, or a checkpoint's folder `copy_of`) and loads
        it; every rank waits for it and raises rank 0's error if it failed; then the previous adapter goes."""
        name = self.name(version)
        folder = self.folder / name
        error = None
        if self.main:
            try:
                shutil.rmtree(folder, ignore_errors=True)  # an earlier run's, of this output_dir
                if copy_of is not None:
                    _copy_folder(copy_of, folder)
                else:
                    plain_lora.write(self.model, folder, initial=self.initial)
                self._load(name, folder)
            except Exception as exc:  # every rank stops, with rank 0's line
                error = exc
        shared = [None if error is None else (isinstance(error, LlmneoError), str(error))]
        _broadcast(shared)
        if error is not None:
            raise error
        if shared[0] is not None:
            raise LlmneoError(shared[0][1] if shared[0][0] else f"rollout_endpoint: rank 0 could not sync the "
                              f"adapter ({shared[0][1]})")
        previous, self.version = self.version, version
        if self.main and previous is not None and previous != version:
            self._drop(previous)  # every rank has passed the broadcast: none generates with it any more

    def _load(self, name: str, folder: Path) -> None:
        try:
            self.endpoint.load(name, str(folder))
        except AlreadyLoaded:  # left by an earlier run of this output_dir, perhaps with other weights
            self.endpoint.unload(name)
            self.endpoint.load(name, str(folder))

    def _drop(self, version: int) -> None:
        """Unload an adapter and delete its folder; a server that does not answer costs a warning, not the run."""
        name = self.name(version)
        try:
            self.endpoint.unload(name)
        except AdapterGone:
            pass
        except LlmneoError as exc:
            warnings.warn(f"rollout_endpoint: could not unload adapter {name} ({exc})")
        shutil.rmtree(self.folder / name, ignore_errors=True)

    def _reply(self, body: dict) -> torch.Tensor:
        try:
            ids = self.endpoint.complete(body)
        except AdapterGone:  # the server restarted: load the adapter again from its folder, once
            with self._reloading:
                try:
                    self.endpoint.load(body["model"], str(self.folder / body["model"]))
                except AlreadyLoaded:  # another request (or rank) loaded it meanwhile
                    pass
            ids = self.endpoint.complete(body)
        return generate.cut_at_eos(torch.tensor(ids, dtype=torch.long), self.eos)

    def _max_tokens(self, batch_prompts: list[torch.Tensor], prompt: torch.Tensor) -> int:
        """max_new_tokens, within the model's positions as HFGenerator bounds them (by the micro-batch's widest
        prompt, as it left-pads), and within the server's --max-model-len."""
        new_tokens = self.sampling.max_new_tokens
        width = max(len(p) for p in batch_prompts)
        if self.max_positions:
            new_tokens = min(new_tokens, self.max_positions - width)
            if new_tokens <= 0:
                raise LlmneoError(f"a prompt of {width} tokens leaves no room to generate within the model's "
                                  f"{self.max_positions} positions; lower cutoff_len")
        limit = self.endpoint.max_model_len
        if limit:
            if len(prompt) >= limit:
                raise LlmneoError(f"a prompt of {len(prompt)} tokens leaves no room to generate within "
                                  f"rollout_endpoint's --max-model-len {limit}; start vLLM with a larger "
                                  f"--max-model-len, or lower cutoff_len")
            new_tokens = min(new_tokens, limit - len(prompt))
        return new_tokens


def _broadcast(objects: list) -> None:
    """Rank 0's `objects`, on every rank (a barrier too); nothing to do in one process."""
    from accelerate.utils import broadcast_object_list

    broadcast_object_list(objects, from_process=0)


def _copy_folder(source: Path, folder: Path) -> None:
    """A copy of `source` at `folder`, renamed into place whole (the server never reads half of it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_replies(path: Path, step: int, staleness: int | None, replies: list[list[torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    tensors = {f"m{m}.r{r}": reply.to("cpu", torch.long).contiguous()
               for m, batch in enumerate(replies) for r, reply in enumerate(batch)}
    shape = json.dumps([len(batch) for batch in replies])
    save_file(tensors, str(path), metadata={"step": str(step), "staleness": json.dumps(staleness), "rows": shape})


def _read_replies(path: Path) -> tuple[int, int | None, list[list[torch.Tensor]]] | None:
    """(step, staleness, replies per micro-batch) from a checkpoint's replies file, or None without one."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        rows = json.loads(meta["rows"])
        replies = [[f.get_tensor(f"m{m}.r{r}") for r in range(n)] for m, n in enumerate(rows)]
    return int(meta["step"]), json.loads(meta["staleness"]), replies
