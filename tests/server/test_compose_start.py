"""The compose service's own command and environment start a ready server, without Docker (issue 18
§1: the documented deploy exited with code 2 on the documented admin key, and restart looped it).

docker-compose.yml's alter-serve service runs the image's ENTRYPOINT with the service's `command`,
in the service's `environment` interpolated from `.env`; the image holds the repository at /app.
Here that argv and that environment, interpolated from `.env.example` with its admin-key
placeholder filled the documented way (`openssl rand -hex 32`, here `secrets.token_hex(32)`: the
placeholder itself is refused, as a public value), run on this machine. What the container and
the GPU would provide is supplied on top,
each as an ALTER_SERVE_* override, the mechanism docs/deploy.md documents:
- the folders compose mounts (/models/base, /data, /bundles) and the image's /app → host folders;
- the GPU engine settings of serve-gpu.yaml → CPU ones (dtype, KV cache size, context, eager);
- listening on every interface → 127.0.0.1 and free ports.
Nothing else of the compose service is changed, so a key format, a config field or a command the
server refuses fails here as it would in the container.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import httpx
import pytest

from ..compose import COMPOSE_FILE, ROOT, SERVICE, env_example, image_entrypoint, load_yaml, service_environment
from ..tiny_model import build_tiny_model
from .live import LiveServer, free_port

pytestmark = pytest.mark.vllm
IMAGE_APP_DIR = "/app"  # the Dockerfile's WORKDIR, where the repository is copied


def _host_argv(service: dict) -> list[str]:
    """The container's argv (ENTRYPOINT + command) as run here: this interpreter's `alter-serve`,
    and /app paths in the repository."""
    entrypoint, command = image_entrypoint(), service["command"]
    assert entrypoint == ["alter-serve"], entrypoint
    args = command if isinstance(command, list) else command.split()
    local = [str(ROOT / a[len(IMAGE_APP_DIR) + 1:]) if a.startswith(IMAGE_APP_DIR + "/") else a for a in args]
    return [sys.executable, "-m", "alter_serve.cli", *local]


def _container_stand_ins(model: Path, data: Path, bundles: Path, port: int, metrics_port: int) -> dict[str, str]:
    """What Docker and the GPU provide, as config overrides (module docstring)."""
    return {
        "ALTER_SERVE_ENGINE__MODEL": str(model),  # /models/base
        "ALTER_SERVE_DATA_DIR": str(data),  # the alter-data volume at /data
        "ALTER_SERVE_BUNDLE_DIRS": f'["{bundles}"]',  # /bundles
        "ALTER_SERVE_HOST": "127.0.0.1", "ALTER_SERVE_PORT": str(port),
        "ALTER_SERVE_METRICS_HOST": "127.0.0.1", "ALTER_SERVE_METRICS_PORT": str(metrics_port),
        "ALTER_SERVE_ENGINE__DTYPE": "float32", "ALTER_SERVE_ENGINE__KV_CACHE_GIB": "1",
        "ALTER_SERVE_ENGINE__MAX_MODEL_LEN": "512", "ALTER_SERVE_ENGINE__ENFORCE_EAGER": "true",
        "ALTER_SERVE_ENGINE__MAX_LORAS": "4", "ALTER_SERVE_ENGINE__MAX_NUM_SEQS": "16",
    }


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def compose_server(tmp_path_factory, metrics_port) -> LiveServer:
    tmp = tmp_path_factory.mktemp("compose")
    service = load_yaml(COMPOSE_FILE)["services"][SERVICE]
    env_file = {**env_example(), "ALTER_SERVE_ADMIN_KEY": secrets.token_hex(32)}  # as docs/deploy.md says
    compose_env = service_environment(service, env_file)
    assert compose_env["ALTER_SERVE_ADMIN_KEY"] == env_file["ALTER_SERVE_ADMIN_KEY"]
    port = free_port()
    (tmp / "bundles").mkdir()
    runner = {k: v for k, v in os.environ.items() if not k.startswith("ALTER_SERVE_")}
    env = {**runner, **compose_env,
           **_container_stand_ins(build_tiny_model(tmp / "model"), tmp / "data", tmp / "bundles", port, metrics_port)}
    server = LiveServer(tmp / "model", tmp / "data", {"admin": compose_env["ALTER_SERVE_ADMIN_KEY"]}, port=port,
                        command=_host_argv(service), env=env)
    (tmp / "data").mkdir()
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_the_compose_command_serves_with_a_documented_admin_key(compose_server):
    with compose_server.http("admin") as http:
        assert http.get("/ready").json()["ready"] is True
        assert http.get("/admin/tenants").status_code == 200  # the configured key is the admin key
        created = http.post("/admin/tenants", json={"name": "acme", "views": ["original"]})
        assert created.status_code == 200, created.text
        key = http.post("/admin/tenants/acme/keys").json()["key"]
    with httpx.Client(base_url=compose_server.base_url, timeout=120) as http:
        answer = http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "original", "prompt": "Hello", "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_prometheus_reads_the_metrics_port_and_tenants_cannot(compose_server, metrics_port):
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert scraped.status_code == 200 and "alter_engine_ready" in scraped.text
    with compose_server.http(None) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/openapi.json").status_code == 401
        assert http.get("/docs").status_code == 404


def test_the_admin_key_is_neither_logged_nor_written(compose_server):
    assert compose_server.keys["admin"] not in (compose_server.log_path.read_text(errors="replace"))
    assert not (compose_server.data_dir / "admin-key").exists()  # imported, not created
