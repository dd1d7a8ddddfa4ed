"""The Hugging Face Hub, asked for a model or dataset only when it can answer.

Without network, huggingface_hub retries each file with backoff before it gives up: a Hub model id took
53 s to fail and a Hub dataset 31 s, and even a cached model waits minutes for the optional files its cache
lacks. So before the first Hub lookup, one short request (HEAD on HF_ENDPOINT, through huggingface_hub's
own session, so its proxies and headers apply) asks whether the Hub answers, once per process. When it
does not, or when HF_HUB_OFFLINE forbids downloads and the id is not cached, the error is one line that
says what to do; with HF_HUB_OFFLINE=1 a cached id loads from the cache without any lookup.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import get_session

from llmneo.errors import LlmneoError

# Seconds the reachability probe waits: an answering Hub replies in well under a second, and a network that
# drops packets (rather than refusing) must not cost the user the library's minute.
PROBE_TIMEOUT = 5.0

_USE_LOCAL = {"model": "a model in the local cache or a local path",
              "dataset": "a dataset in the local cache or a local file"}


def require(repo_id: str, kind: str, key: str) -> None:
    """Before `repo_id` (kind: model or dataset) is looked up on the Hub for config key `key`: one line instead
    of the libraries' long retries when the Hub cannot answer, or HF_HUB_OFFLINE forbids asking it."""
    if _offline(kind):
        if not _cached(repo_id, kind):
            raise LlmneoError(f"{key}: '{repo_id}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                              f"and HF_HUB_OFFLINE=1 forbids downloading it; give {_USE_LOCAL[kind]}, point HF_HOME "
                              f"at a cache that has it, or unset HF_HUB_OFFLINE")
        return
    problem = unreachable()
    if problem is None:
        return
    where = f"{key}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} for '{repo_id}' ({problem})"
    if _cached(repo_id, kind):
        # Online mode looks every file up first, and retries each one the cache lacks (optional files too).
        raise LlmneoError(f"{where}; it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there")
    raise LlmneoError(f"{where}, and it is not in the local cache; if you work offline, set HF_HUB_OFFLINE=1 and "
                      f"use {_USE_LOCAL[kind]}")


@functools.cache
def unreachable() -> str | None:
    """Why the Hub at HF_ENDPOINT does not answer (one line), or None when it does; asked once per process."""
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001  (no answer, for whatever reason: DNS, refused, timeout, proxy, TLS)
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return None  # any HTTP answer, even an error status, means the Hub is there


def _offline(kind: str) -> bool:
    """HF_HUB_OFFLINE as the library that looks `kind` up reads it (datasets: HF_DATASETS_OFFLINE, when set)."""
    given = os.environ.get("HF_DATASETS_OFFLINE") if kind == "dataset" else None
    if given is not None:
        return given.upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.is_offline_mode()


def _cached(repo_id: str, kind: str) -> bool:
    """Whether some revision of `repo_id` is in the Hub cache (or, for a dataset, in datasets' own cache)."""
    snapshots = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=kind), "snapshots")
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if kind != "dataset":
        return False
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME, "datasets"))
    folder = repo_id.replace("/", "___")
    return (datasets_cache / folder).is_dir() or (datasets_cache / folder.lower()).is_dir()
