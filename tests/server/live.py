"""A real alter-serve process (uvicorn + vLLM on CPU) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

READY_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    model_dir: Path
    data_dir: Path
    keys: dict[str, str]
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    # Instead of the default `alter-serve serve --model ...` command and the runner's environment:
    # an exact argv and environment (the compose start test runs the compose service's own).
    command: list[str] | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        self.log_path = self.data_dir / f"server-{self.port}.log"
        env = {**(os.environ if self.env is None else self.env), "PYTHONUNBUFFERED": "1"}
        cmd = self.command or [
            sys.executable, "-m", "alter_serve.cli", "serve", "--model", str(self.model_dir),
            "--data-dir", str(self.data_dir), "--port", str(self.port), "--dtype", "float32",
            *(self.extra_args or ["--max-loras", "4"])]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("a"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, key: str = "tenant", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.keys[key], max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def async_client(self, key: str = "tenant") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.keys[key], max_retries=0, timeout=120)

    def http(self, key: str | None = "tenant") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)
