"""The student's on-policy replies from a vLLM server of its base model, with only the adapter synced to it
(rollout_endpoint).

The server (`vllm serve BASE --enable-lora --max-lora-rank R`, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) holds the
student's original base weights. What trains here is the adapter, so a sync writes it as a plain LoRA
(models.plain_lora folds rsLoRA's scale, MoSLoRA's mixer and PiSSA/OLoRA's changed base into one) into a fresh
folder under rollout_adapter_dir, and the server loads it under a new name (the client, and the server's
answers as one line each: models/rollout_server.py):

    POST {root}/v1/load_lora_adapter    {"lora_name": "llmneo-TAG-stepV", "lora_path": FOLDER}     → plain text
    POST {url}/completions              {"model": that name, "prompt": ids, "max_tokens", "seed", ...,
                                         "stop_token_ids", "return_token_ids": true}   → choices[0].token_ids
    POST {root}/v1/unload_lora_adapter  {"lora_name": the previous adapter}                        → plain text

V is the optimizer step whose weights the adapter holds and TAG is fixed by output_dir (rank 0's, shared at
start), so every rank names each adapter without asking; what a killed run of the output_dir left is unloaded.
`ServedRollouts.submit(step, trained, ...)` writes a step's replies:
  - the adapter is synced once it is rollout_sync_steps or more steps older than the optimizer's weights
    (`trained`): rank 0 writes and loads it, the other ranks wait (a broadcast that carries rank 0's error, so
    all stop with its line), then rank 0 unloads the previous one, which no rank uses any more. rollout_staleness
    = step - 1 - V: 0 when each step syncs, 1 for replies written a step ahead (rollout_ahead);
  - each row is one request on a thread pool, seeded from (seed, step, the row's example index): the same on
    any rank and in a resumed run. They sample as HFGenerator does: max_new_tokens within the model's positions
    (and the server's --max-model-len), temperature (0 = greedy), top_p, every other sampler explicitly off (vLLM
    would take the model's generation_config), stopping at EOS and the template's end of turn, never a padded
    head row; an adapter the server lost (a restart) is loaded again from its folder.
Set-up loads the adapter the first step uses (the current weights, or the checkpoint's): an unreachable server,
an unknown model, a server without LoRA or a rank above --max-lora-rank is one line before training.
Checkpoints keep what the next step uses (`save`): the server's adapter (rollout_adapter/, rollouts.json) and
the replies written ahead (rollout_replies_RANK.safetensors); a resumed run loads both.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llmneo import run_dir
from llmneo.endpoint import EndpointGone
from llmneo.errors import LlmneoError
from llmneo.models import generate, heads, plain_lora
from llmneo.models.rollout_server import AdapterGone, AlreadyLoaded, RolloutEndpoint, completion_request

STATE = "rollouts.json"  # in a checkpoint: the step whose weights the server's adapter holds
ADAPTER = "rollout_adapter"  # in a checkpoint: that adapter's plain LoRA folder
REPLIES = "rollout_replies_{rank}.safetensors"  # in a checkpoint: the next step's replies, generated ahead
THREADS = 32  # requests in flight per rank


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of dataset example `row` at optimizer step `step`: the same on any rank and in a resumed
    run, another for every (seed, step, row); below 2**63, as vLLM takes an int64."""
    digest = hashlib.blake2b(f"llmneo-rollout-{seed}-{step}-{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def run_tag(output_dir: str | Path) -> str:
    """Part of every adapter name: fixed by the run's output_dir, so all ranks (and a resumed run) agree on it."""
    return hashlib.blake2b(str(Path(output_dir).absolute()).encode(), digest_size=4).hexdigest()


class Pending:
    """A step's replies being written: per micro-batch, per row, a Future of its reply (or the reply itself)."""

    def __init__(self, rows: list[list], staleness: int | None):
        self.rows, self.staleness = rows, staleness

    def result(self) -> tuple[list[list[torch.Tensor]], int | None]:
        try:
            return [[r.result() if isinstance(r, Future) else r for r in batch] for batch in self.rows], self.staleness
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for r in (r for batch in self.rows for r in batch if isinstance(r, Future)):
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
        folder = Path(config.rollout_adapter_dir or Path(config.output_dir) / "rollout_adapters").absolute()
        shared = [run_tag(config.output_dir), folder]  # rank 0's: a relative path may resolve otherwise elsewhere
        _broadcast(shared)
        self.tag, self.folder = shared
        self.version: int | None = None  # the step whose weights the server's adapter holds
        self.pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="llmneo-rollouts")
        self._reloading = threading.Lock()
        self._closed = False
        saved = _read_json(resume_from / STATE) if resume_from is not None else None
        self._resumed = _read_replies(resume_from / REPLIES.format(rank=self.rank)) if resume_from else None
        made = {d for top in (Path(config.output_dir).absolute(), self.folder) for d in (top, *top.parents)
                if not d.exists()}  # nested ones too (mkdir parents=True)
        if self.main:
            self._drop_earlier()
        try:
            if saved is not None and (resume_from / ADAPTER).is_dir():  # the adapter the next steps were to use
                self._sync(int(saved["version"]), copy_of=resume_from / ADAPTER)
            else:  # this run's current weights; also the probe: server, model, LoRA support and rank, before step 1
                self._sync(step)
        except BaseException:  # a refused run leaves nothing behind
            self.pool.shutdown(wait=False)
            if self.main:
                shutil.rmtree(self.folder / self.name(saved["version"] if saved else step), ignore_errors=True)
                for folder in sorted(made, key=lambda d: len(d.parts), reverse=True):  # the deepest first
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
            raise

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
        """The replies the checkpoint holds for `step` (written ahead, or those of a step that failed once they had
        come), or None."""
        if self._resumed is None or self._resumed[0] != step:
            return None
        return Pending(self._resumed[2], self._resumed[1])

    def save(self, directory: Path, pending: Pending | None, step: int | None) -> None:
        """Into checkpoint folder `directory` (every rank): the server's adapter (rank 0), and this rank's replies for
        the next step `step` when they were written already (train.steps.RolloutSteps.save hands them over only
        when every rank has them; else the resumed run writes them again, with the same adapter and seeds)."""
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
        self.endpoint.stop()  # requests retrying stop at their next wait; the unload below still gets one attempt
        self.pool.shutdown(wait=False, cancel_futures=True)
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
            except Exception as exc:  # every rank stops, with rank 0's line; the new folder goes
                error = exc
                if version != self.version:
                    shutil.rmtree(folder, ignore_errors=True)
        kind = "gone" if isinstance(error, EndpointGone) else "user" if isinstance(error, LlmneoError) else "bug"
        shared = [None if error is None else (kind, str(error))]
        _broadcast(shared)
        if error is not None:
            raise error
        if shared[0] is not None:  # the same kind of error as rank 0's: a gone server checkpoints on every rank
            kind, message = shared[0]
            raise (EndpointGone if kind == "gone" else LlmneoError)(
                message if kind != "bug" else f"rollout_endpoint: rank 0 could not sync the adapter ({message})")
        previous, self.version = self.version, version
        if self.main and previous is not None and previous != version:
            self._drop(previous)  # every rank has passed the broadcast: none generates with it any more

    def _drop_earlier(self) -> None:
        """Adapters an earlier run of this output_dir left (it was killed): unloaded, their folders deleted."""
        prefix = f"llmneo-{self.tag}-step"
        for name in self.endpoint.adapters:
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                self._drop(int(name[len(prefix):]))
        for folder in self.folder.glob(f"{prefix}*") if self.folder.is_dir() else ():
            shutil.rmtree(folder, ignore_errors=True)

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
    staging = None
    try:  # the parent folder too: rollout_adapter_dir may be unwritable, or under a file
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.rename(folder)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = run_dir.write_failure(exc)
        if reason is not None:
            raise plain_lora.unwritable(folder, reason) from None
        raise


def _read_json(path: Path) -> dict | None:
    """A checkpoint's rollouts.json (`path`), its adapter folder beside it checked too; None when the checkpoint
    has neither (a run without rollout_endpoint wrote it: it generated with the weights it holds). One without
    the other, or either unreadable or cut short, is a corrupt checkpoint: resuming from the current weights
    instead would quietly not be the run it continues."""
    checkpoint, adapter = path.parent, path.parent / ADAPTER
    if not path.exists() and not adapter.exists():
        return None
    if not path.is_file():
        raise _corrupt(checkpoint, f"{path.name} is missing beside {ADAPTER}/")
    try:
        state = json.loads(path.read_text())
        int(state["version"])
    except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError):
        raise _corrupt(checkpoint, f"{path.name} is not a JSON object with the adapter's version") from None
    if not adapter.is_dir():
        raise _corrupt(checkpoint, f"{ADAPTER}/ is missing beside {path.name}")
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((adapter / plain_lora.CONFIG_FILE).read_text())
        with safe_open(str(adapter / plain_lora.WEIGHTS_FILE), framework="pt") as f:  # its header: not cut short
            f.keys()
    except (OSError, ValueError, UnicodeDecodeError, SafetensorError) as exc:
        raise _corrupt(checkpoint, f"{ADAPTER}/ cannot be read ({_first_line(exc)})") from None
    return state


def _write_replies(path: Path, step: int, staleness: int | None, replies: list[list[torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    tensors = {f"m{m}.r{r}": reply.to("cpu", torch.long).contiguous()
               for m, batch in enumerate(replies) for r, reply in enumerate(batch)}
    shape = json.dumps([len(batch) for batch in replies])
    save_file(tensors, str(path), metadata={"step": str(step), "staleness": json.dumps(staleness), "rows": shape})


def _read_replies(path: Path) -> tuple[int, int | None, list[list[torch.Tensor]]] | None:
    """(step, staleness, replies per micro-batch) from a checkpoint's replies file, or None without one (none
    were written ahead, or their requests failed); a file cut short or unreadable is a corrupt checkpoint."""
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = json.loads(meta["rows"])
            replies = [[f.get_tensor(f"m{m}.r{r}") for r in range(n)] for m, n in enumerate(rows)]
        return int(meta["step"]), json.loads(meta["staleness"]), replies
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, SafetensorError) as exc:
        raise _corrupt(path.parent, f"{path.name} cannot be read ({_first_line(exc)})") from None


def _corrupt(checkpoint: Path, what: str) -> LlmneoError:
    """train/checkpoint.py's line for a checkpoint that is cut short or damaged."""
    return LlmneoError(f"checkpoint '{checkpoint}' is incomplete or corrupt: {what}; resume from another "
                       f"checkpoint-STEP or start again with overwrite_output_dir=true")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
