"""JSON over HTTP to an inference server (vLLM's OpenAI-compatible API), with retries and one-line errors.

Both sides of llmneo talk to such servers: a served teacher (`teachers.served`) and the engine that writes the
student's rollouts (`models.served_rollouts`). `JsonEndpoint` is what they share: the URL (…/v1) and its root,
an API key from a named environment variable (never from a config or a log), requests retried with
exponential back-off on timeouts, refused connections, broken answers and HTTP 5xx, `stop()` so a failing run
exits promptly, and every failure as one LlmneoError naming the config key (`key`) it came from. Subclasses
turn the 4xx answers they know into advice (`client_error`).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.error
import urllib.request

from llmneo.config.checks import names_a_variable, shown_url
from llmneo.errors import LlmneoError


class EndpointGone(LlmneoError):
    """The server stayed unreachable (refused, timed out, 5xx, broken answers) through every retry, or the
    endpoint was stopped: the training loop checkpoints its last completed step before saying so."""


class JsonEndpoint:
    """The server at `url` (…/v1); `key` names the config key in messages (teacher_endpoint, rollout_endpoint)."""

    key = "endpoint"

    def __init__(self, url: str, api_key_env: str | None = None, *, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.25, key_field: str = "teacher_api_key_env"):
        self.url = url.rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.shown = shown_url(self.url)  # for messages: no credentials a URL may carry
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._stopping = threading.Event()  # set by stop(): no new attempt starts (a failed run exits promptly)
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                # The name is shown only when it looks like one: a key pasted into the field is not echoed.
                named = api_key_env if names_a_variable(api_key_env) else "the variable it names"
                raise LlmneoError(f"{key_field}: {named} is not set in the environment; export it (the key "
                                  f"never goes into a config), and give {key_field} a variable's NAME, e.g. "
                                  f"OPENAI_API_KEY")

    def request(self, method: str, url: str, payload: dict | None = None, *, json_answer: bool = True,
                after_stop: bool = False):
        """JSON in, JSON out (or the answer's text when `json_answer` is false: vLLM answers adapter loads in
        plain text); retried on timeouts, refused connections and 5xx; one-line errors otherwise.
        `after_stop`: once stop() was called, one attempt still (a closing client's clean-up) instead of none."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem, tried = "", 0
        attempts = 1 if after_stop and self._stopping.is_set() else self.retries + 1
        for attempt in range(attempts):
            if attempt and self._stopping.wait(self.backoff * 2 ** (attempt - 1)):
                break
            if self._stopping.is_set() and not after_stop:
                problem = "stopped"
                break
            tried += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout) as answer:
                    raw = answer.read().decode()
                    return json.loads(raw) if json_answer else raw
            except urllib.error.HTTPError as exc:
                message = error_message(exc)
                if exc.code >= 500:
                    final = self.server_error(exc.code, message, payload)
                    if final is not None:  # a 5xx that retrying cannot change (a refused adapter)
                        raise final from None
                    problem = f"HTTP {exc.code} ({message})"
                    continue
                raise self.client_error(exc.code, message, payload) from None
            except (TimeoutError, socket.timeout):
                problem = f"no answer within {self.timeout:g} s"
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    problem = f"no answer within {self.timeout:g} s"
                else:
                    problem = f"cannot connect ({getattr(reason, 'strerror', None) or reason})"
            except (ConnectionError, http.client.HTTPException, json.JSONDecodeError, UnicodeDecodeError) as exc:
                if isinstance(exc, http.client.InvalidURL):
                    raise LlmneoError(f"{self.key} {self.shown} is not a valid URL ({exc}); e.g. "
                                      f"http://localhost:8000/v1") from None
                problem = f"a broken answer ({type(exc).__name__})"
        raise EndpointGone(f"{self.key} {self.shown}: {problem} after {tried} attempts; check that "
                           f"the server is up and reachable (vllm serve ...), or raise its capacity")

    def stop(self) -> None:
        """Start no further attempt: requests in flight end within their timeout (retries already running stop
        at their next wait), queued ones fail at once; only `after_stop` requests still get one attempt."""
        self._stopping.set()

    def client_error(self, code: int, message: str, payload: dict | None) -> LlmneoError:
        """A 4xx answer as one line; subclasses add what they know about their requests."""
        if code in (401, 403):
            return LlmneoError(f"{self.key} {self.shown} refused the request (HTTP {code}: {message}); set the "
                               f"API key's environment variable and name it in the config's *_api_key_env")
        return LlmneoError(f"{self.key} {self.shown} answered HTTP {code}: {message}")

    def server_error(self, code: int, message: str, payload: dict | None) -> LlmneoError | None:
        """A 5xx answer that retrying cannot change, as one line; None (the default) retries it."""
        return None

    def served_models(self) -> list[str]:
        return [str(m.get("id")) for m in self.request("GET", f"{self.url}/models").get("data", [])]


def error_message(exc: urllib.error.HTTPError) -> str:
    """The first line of an error answer's message: vLLM's {"error": {...}}, {"error": "..."} or a flat body."""
    try:
        body = json.loads(exc.read().decode() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return exc.reason or "no message"
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    return (str(message or exc.reason or "no message").splitlines() or ["no message"])[0][:300]
