"""The alter-serve app without an engine, for admin-API, CLI and dashboard tests.

`AdminApp` is a real `AlterService` on a tiny random model (`tiny_model.build_tiny_model`) with a
registry in a temp folder, served by a real uvicorn server in a background thread on a free port.
The vLLM engine is never started (`create_app(service, start_engine=False)`): the admin API only
needs the registry. Model requests would answer 503, so tests of those belong to the live server.

    with AdminApp.start(tmp_path) as app:
        httpx.get(app.url + "/admin/tenants", headers=app.admin_headers)
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from alter_serve.api.app import create_app
from alter_serve.config import ServeConfig
from alter_serve.serving.service import AlterService

from .server.bundle_factory import random_bundle
from .tiny_model import build_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_service(model_dir: Path, data_dir: Path, **settings) -> AlterService:
    """An `AlterService` with tables created (its engine is constructed but never started).
    `settings` are further `ServeConfig` fields (e.g. `database_url`, `registry_poll_s`)."""
    config = ServeConfig(data_dir=data_dir, bundle_dirs=[data_dir / "bundles-src"], **settings)
    service = AlterService(config, model_dir)
    service.prepare()
    return service


def store_random_bundle(service: AlterService, name: str, heads: list[str], seed: int = 0) -> Path:
    """Write a random bundle for the service's base model under its allowed bundle dir; return it."""
    folder = service.config.bundle_dirs[0] / name
    random_bundle(service.model_dir, heads, seed=seed).save(folder)
    return folder


@dataclass
class AdminApp:
    service: AlterService
    admin_key: str
    port: int = field(default_factory=free_port)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, tmp: Path, model_dir: Path | None = None, **settings) -> AdminApp:
        """Serve an app on `tmp/serve`. Several apps started on one `tmp` are replicas sharing the
        data directory (and, with the same `database_url`, the registry)."""
        model_dir = model_dir or build_tiny_model(tmp / "model")
        service = build_service(model_dir, tmp / "serve", **settings)
        _, admin_key = service.registry.create_key(None, "admin")
        app = cls(service, admin_key)
        app._serve()
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.admin_headers, timeout=30)

    def _serve(self) -> None:
        config = uvicorn.Config(create_app(self.service, start_engine=False), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="admin-app", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the admin app did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)

    def __enter__(self) -> AdminApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
