"""Without network: a Hub id fails at once in one line that names HF_HUB_OFFLINE, not after the libraries' retries.

The Hub is made unreachable by pointing HF_ENDPOINT at a closed local port, in a fresh process (huggingface_hub
reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported) whose HF_HOME is a cache built here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, write_jsonl

from llmneo import cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_with(tmp_path: Path, repo_id: str, model_dir: Path) -> Path:
    """An HF_HOME whose Hub cache holds `model_dir` as revision main of `repo_id` (huggingface_hub's layout)."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return home


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    # huggingface_hub's own retry warnings ("Retrying in 1s [Retry 1/5]") are shown, so that a retry would be seen.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**base, "HF_HUB_VERBOSITY": "warning", **env})


def test_an_unreachable_hub_fails_fast_in_one_line_naming_hf_hub_offline(tmp_path, student_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    home = _cache_with(tmp_path, "org/cached-model", student_dir)
    runs = [(["model_name_or_path=org/some-model", f"dataset={data}"], "model_name_or_path"),
            ([f"model_name_or_path={student_dir}", "dataset=org/some-data"], "dataset"),
            (["model_name_or_path=org/cached-model", f"dataset={data}"], "model_name_or_path")]
    code = "\n".join([
        "import sys",
        "from llmneo import cli, hub",
        *(f"print('rc', cli.main(['train', *{args!r}, 'output_dir={tmp_path / f'out{i}'}']), file=sys.stderr)"
          for i, (args, _) in enumerate(runs)),
        "print('probes', hub.unreachable.cache_info().misses, file=sys.stderr)",
    ])
    done = _run(code, {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(home)})
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("llmneo: error:")]
    assert [line for line in lines if line.startswith("rc ")] == ["rc 2"] * 3, done.stderr
    assert len(errors) == 3, done.stderr
    for error, (_, key) in zip(errors, runs):
        assert error.startswith(f"llmneo: error: {key}: cannot reach the Hugging Face Hub at http://127.0.0.1:")
        assert "HF_HUB_OFFLINE=1" in error
    assert "'org/some-model'" in errors[0] and "not in the local cache" in errors[0] and "local path" in errors[0]
    assert "'org/some-data'" in errors[1] and "a dataset in the local cache or a local file" in errors[1]
    assert "'org/cached-model'" in errors[2] and "it is in the local cache: set HF_HUB_OFFLINE=1" in errors[2]
    assert "Retrying in" not in done.stderr and "Traceback" not in done.stderr
    assert "probes 1" in lines  # the Hub is asked once per process


def test_offline_a_cached_hub_model_loads_from_the_cache(tmp_path, student_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    home = _cache_with(tmp_path, "org/cached-model", student_dir)
    code = ("import sys\nfrom llmneo import cli\n"
            f"print('rc', cli.main(['eval', 'model_name_or_path=org/cached-model', 'dataset={data}']), file=sys.stderr)")
    done = _run(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)})
    assert "rc 0" in done.stderr.splitlines() and "perplexity" in done.stdout, done.stderr


def test_offline_mode_and_an_uncached_model_is_one_line(tmp_path, capsys):
    """In this process conftest set HF_HUB_OFFLINE=1 before huggingface_hub was imported."""
    from huggingface_hub import constants

    assert constants.is_offline_mode()
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    assert cli.main(["train", "model_name_or_path=llmneo-test/not-cached", f"dataset={data}",
                     f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmneo: error: model_name_or_path: 'llmneo-test/not-cached' is not in the local Hugging "
                          "Face cache")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in err and "local path" in err


def test_offline_mode_and_an_uncached_dataset_is_one_line(tmp_path, capsys, student_dir):
    assert cli.main(["train", f"model_name_or_path={student_dir}", "dataset=llmneo-test/no-data",
                     f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmneo: error: dataset: 'llmneo-test/no-data' is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in err and "a dataset in the local cache or a local file" in err


@pytest.mark.parametrize("name", ["models/student", "./org/model"])
def test_a_missing_local_path_is_not_a_hub_lookup(tmp_path, capsys, name, monkeypatch):
    """A path meant locally never reaches the Hub check (nor the Hub): the error is about the path."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", f"model_name_or_path={name}", "dataset=d.jsonl", "output_dir=out"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Hugging Face" not in err
