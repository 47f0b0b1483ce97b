"""The GPU deployment files hang together: docker-compose.yml, Dockerfile, configs/serve*.yaml,
Prometheus and Grafana provisioning, and the dashboard's PromQL against the metrics we export.

The structural checks always run (PyYAML only). Where a Compose client exists, `config -q` is run
as well: `docker compose` (v2 plugin) first, else Debian's `docker-compose` (v1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from alter_serve import metrics
from alter_serve.config import load_config
from alter_serve.engine.config import EngineConfig

from .compose import (COMPOSE_FILE, DOCKERFILE, ENV_EXAMPLE, INTERPOLATION, ROOT, SERVICE, env_example, interpolate,
                      load_yaml, volume_mounts)

GPU_CONFIG = ROOT / "configs" / "serve-gpu.yaml"
CPU_CONFIG = ROOT / "configs" / "serve.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
IMAGE_APP_DIR = "/app"  # Dockerfile WORKDIR: configs/ is copied to /app/configs


# ---- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config files are judged on their own: no ALTER_SERVE_* from the test runner's environment."""
    for key in list(os.environ):
        if key.startswith("ALTER_SERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def server(compose: dict) -> dict:
    assert SERVICE in compose["services"], f"docker-compose.yml has no service {SERVICE!r}"
    return compose["services"][SERVICE]


def _gpu_config():
    return load_config(GPU_CONFIG)


def _container_port(service: dict) -> int:
    """The container side of the (single) published port."""
    ports = service.get("ports", [])
    assert len(ports) == 1, f"expected one published port, got {ports}"
    spec = ports[0] if isinstance(ports[0], str) else str(ports[0]["target"])
    return int(spec.split("/")[0].rsplit(":", 1)[-1])


# ---- compose: the server --------------------------------------------------------------------------


def test_compose_has_the_three_services(compose: dict) -> None:
    assert {SERVICE, "prometheus", "grafana"} <= set(compose["services"])


def test_server_is_built_from_the_dockerfile_with_the_gpu_extra(server: dict) -> None:
    build = server["build"]
    assert isinstance(build, dict) and (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    extras = interpolate(build.get("args", {}).get("EXTRAS", ""), {})
    assert "gpu" in extras.split(","), f"the image must install the gpu extra, EXTRAS={extras!r}"
    text = DOCKERFILE.read_text()
    assert re.search(r'^RUN pip install (-e )?"\.\[\$\{EXTRAS\}\]"', text, re.MULTILINE), \
        "Dockerfile must pip install .[${EXTRAS}]"
    assert re.search(r"^COPY configs ", text, re.MULTILINE), "configs/ must be in the image"


def test_the_image_carries_the_postgres_driver_by_default(server: dict) -> None:
    """Several replicas need psycopg in the image (issue 18 §1): every default of EXTRAS includes the
    `postgres` extra, and that extra is a psycopg v3 requirement (the driver of `postgresql+psycopg`)."""
    defaults = {
        "docker-compose.yml": interpolate(server["build"]["args"]["EXTRAS"], {}),
        ".env.example": env_example().get("PIP_EXTRAS", ""),
        "Dockerfile": re.search(r"^ARG EXTRAS=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)[1],
    }
    for where, extras in defaults.items():
        assert {"gpu", "postgres"} <= set(extras.split(",")), f"{where}: EXTRAS={extras!r} lacks gpu or postgres"
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg") for req in extras["postgres"]), extras["postgres"]


def _documented_compose_database_url() -> str:
    """The (commented) ALTER_SERVE_DATABASE_URL of .env.example that points at the compose service."""
    urls = re.findall(r"^#\s*ALTER_SERVE_DATABASE_URL=(\S+@postgres:\d+/\S+)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert len(urls) == 1, f".env.example should show one URL for the compose postgres service, found {urls}"
    return urls[0]


def test_the_replicas_profile_runs_the_registry_database_the_env_example_points_at(compose: dict) -> None:
    """`--profile replicas` adds PostgreSQL on the compose network; .env.example's URL for it names
    that service, its user, database and port, and the psycopg driver the image carries."""
    from sqlalchemy.engine import make_url

    db = compose["services"].get("postgres")
    assert db is not None, "docker-compose.yml has no postgres service"
    assert db.get("profiles") == ["replicas"], "PostgreSQL must start only with --profile replicas"
    assert "ports" not in db, "the database must not be published on the host"
    env = db["environment"]
    url = make_url(_documented_compose_database_url())
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "postgres", 5432)
    assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD"), "the password must come from .env"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    data = [m for m in volume_mounts(db) if m["target"] == "/var/lib/postgresql/data"]
    assert data and data[0]["source"] in compose["volumes"], "the database needs a named volume"
    # The server passes the URL through from .env.
    assert "ALTER_SERVE_DATABASE_URL" in compose["services"][SERVICE]["environment"]


def test_server_reserves_nvidia_gpus(server: dict) -> None:
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpu, f"no NVIDIA GPU reservation in {devices}"
    count = interpolate(gpu[0].get("count", "all"), {})
    assert count == "all" or int(count) >= 1
    # The GPU count and vLLM's tensor parallelism move together.
    tp = interpolate(str(server["environment"].get("ALTER_SERVE_ENGINE__TENSOR_PARALLEL_SIZE", "")), {})
    assert tp == str(count), "ALTER_SERVE_ENGINE__TENSOR_PARALLEL_SIZE must follow the reserved GPU count"


def test_server_runs_the_gpu_config(server: dict) -> None:
    command = server["command"]
    command = command if isinstance(command, list) else command.split()
    config_path = command[command.index("--config") + 1]
    assert config_path.startswith(IMAGE_APP_DIR + "/")
    assert ROOT / config_path[len(IMAGE_APP_DIR) + 1:] == GPU_CONFIG


def test_admin_key_comes_from_the_environment(server: dict) -> None:
    env = server["environment"]
    assert isinstance(env, dict), "use the mapping form of environment"
    key = env.get("ALTER_SERVE_ADMIN_KEY")
    match = INTERPOLATION.fullmatch(str(key or ""))
    assert match and match["name"] == "ALTER_SERVE_ADMIN_KEY" and match["op"] == ":?", \
        "ALTER_SERVE_ADMIN_KEY must be ${ALTER_SERVE_ADMIN_KEY:?...}: required, never a literal"
    assert "admin_key" not in (yaml.safe_load(GPU_CONFIG.read_text()) or {}), "no admin key in the config file"
    assert ".env" in ROOT.joinpath(".gitignore").read_text().split(), ".env holds secrets: keep it out of git"


DEPLOY_DOC = ROOT / "docs" / "deploy.md"
_GENERATOR = re.compile(r"openssl rand -(?P<kind>hex|base64) (?P<bytes>\d+)")


def test_the_admin_key_format_agrees_across_compose_env_example_docs_and_server(clean_env) -> None:
    """Issue 18: the documented generator made keys the server refused, so the deploy looped on exit 2.
    Every generator the three files name makes keys the server takes as ALTER_SERVE_ADMIN_KEY, and
    .env.example's placeholder is refused (it is public: a deploy that kept it would have a known key)."""
    import base64
    import secrets

    from alter_serve.config import ServeConfig
    from alter_serve.registry.keys import imported_secret_problem

    generators = {(m["kind"], int(m["bytes"])) for path in (COMPOSE_FILE, ENV_EXAMPLE, DEPLOY_DOC)
                  for m in _GENERATOR.finditer(path.read_text())}
    assert generators, "compose, .env.example and docs/deploy.md name no key generator"
    for kind, size in generators:
        for _ in range(50):
            raw = secrets.token_bytes(size)
            secret = raw.hex() if kind == "hex" else base64.b64encode(raw).decode()
            assert imported_secret_problem(secret) is None, f"`openssl rand -{kind} {size}` made a refused key"
    with pytest.raises(ValueError, match="placeholder of .env.example"):
        ServeConfig(admin_key=env_example()["ALTER_SERVE_ADMIN_KEY"])
    with pytest.raises(ValueError, match="at least 32: generate one with `openssl rand -hex 32`"):
        ServeConfig(admin_key="too-short-a-secret")


def test_deploy_doc_tells_where_the_admin_key_comes_from() -> None:
    """The doc said the variable was ignored and to find the key in the logs; it is the key now."""
    text = DEPLOY_DOC.read_text()
    assert "does not yet use it" not in text and 'grep "admin key"' not in text
    assert "ALTER_SERVE_ADMIN_KEY" in text


def test_every_secret_and_required_variable_is_in_env_example(compose: dict) -> None:
    example = env_example()
    text = COMPOSE_FILE.read_text()
    required = {m["name"] for m in INTERPOLATION.finditer(text) if m["op"] in (":?", "?")}
    assert {"ALTER_SERVE_ADMIN_KEY", "MODEL_DIR", "GRAFANA_ADMIN_PASSWORD"} <= required
    missing = required - set(example)
    assert not missing, f".env.example lacks {sorted(missing)}"
    for service in compose["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if re.search(r"(KEY|PASSWORD|SECRET|TOKEN)", name):
                assert isinstance(value, str) and INTERPOLATION.fullmatch(value), f"{name} is hard-coded"


def test_volumes_hold_the_model_data_dir_and_bundle_dirs(compose: dict, server: dict, clean_env) -> None:
    config = _gpu_config()
    mounts = {m["target"]: m for m in volume_mounts(server)}
    data = mounts.get(str(config.data_dir))
    assert data is not None and data["type"] == "volume", f"data_dir {config.data_dir} must be on a named volume"
    assert data["source"] in (compose.get("volumes") or {}), f"volume {data['source']} is not declared"
    for bundle_dir in config.bundle_dirs:
        assert str(bundle_dir) in mounts, f"bundle_dir {bundle_dir} is not mounted"
    model = mounts.get(config.engine.model)
    assert model is not None and model["read_only"], "the base model must be mounted read-only at engine.model"


def test_healthcheck_probes_ready_on_the_served_port(server: dict, clean_env) -> None:
    config = _gpu_config()
    test = server["healthcheck"]["test"]
    probe = " ".join(test) if isinstance(test, list) else test
    assert re.search(rf"127\.0\.0\.1:{config.port}/ready\b", probe), probe
    assert _container_port(server) == config.port
    assert config.host == "0.0.0.0", "inside a container the server must listen on all interfaces"


# ---- server configs -------------------------------------------------------------------------------


def test_gpu_config(clean_env) -> None:
    config = _gpu_config()
    engine = config.engine
    assert engine.dtype == "bfloat16"
    assert engine.gpu_memory_utilization == pytest.approx(0.9)
    assert engine.max_loras > EngineConfig().max_loras
    assert engine.max_cpu_loras >= engine.max_loras
    assert config.data_dir.is_absolute() and config.bundle_dirs
    assert config.admin_key is None and config.database_url is None


def test_cpu_config_is_the_local_default(clean_env) -> None:
    config = load_config(CPU_CONFIG)
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.engine.dtype in ("float32", "bfloat16")
    assert config.engine.max_model_len is None  # the model's own context (the demo model has 128)
    assert config.engine.kv_cache_gib == 1


# ---- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_scrapes_the_server(compose: dict, server: dict, clean_env) -> None:
    mounted = {m["target"]: m["source"] for m in volume_mounts(compose["services"]["prometheus"])}
    assert (ROOT / mounted["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    config = load_yaml(PROMETHEUS)
    server_config = _gpu_config()
    # The separate metrics port, not the API port (where /metrics needs an admin key), and unpublished.
    assert server_config.metrics_port is not None and server_config.metrics_host == "0.0.0.0"
    assert server_config.metrics_port != server_config.port
    assert _container_port(server) == server_config.port, "the metrics port must not be published"
    want = f"{SERVICE}:{server_config.metrics_port}"
    jobs = [job for job in config["scrape_configs"]
            if any(want in static.get("targets", []) for static in job.get("static_configs", []))]
    assert jobs, f"no scrape job targets {want}"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"


# ---- Grafana --------------------------------------------------------------------------------------


def _grafana_mounts(compose: dict) -> dict[str, Path]:
    return {m["target"]: (ROOT / m["source"]).resolve()
            for m in volume_mounts(compose["services"]["grafana"]) if m["type"] == "bind"}


def _dashboards() -> list[Path]:
    found = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert found, "no dashboard JSON in deploy/grafana/dashboards"
    return found


def test_grafana_provisioning(compose: dict) -> None:
    mounts = _grafana_mounts(compose)
    assert mounts.get("/etc/grafana/provisioning") == (GRAFANA / "provisioning").resolve()
    sources = [s for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
               for s in load_yaml(f)["datasources"]]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert prometheus and prometheus[0]["url"] == "http://prometheus:9090"
    providers = [p for f in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml")) for p in load_yaml(f)["providers"]]
    assert providers, "no dashboard provider"
    for provider in providers:
        folder = provider["options"]["path"]
        assert mounts.get(folder) == (GRAFANA / "dashboards").resolve(), f"provider path {folder} is not the mounted dashboards"
    _dashboards()


def _exported_alter_metrics() -> set[str]:
    """Sample names /metrics exposes for our collectors (counters get _total, histograms _bucket...)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    names = set()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    assert names, "found no collectors in alter_serve.metrics"
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = []
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation operator
        if match.group(0).lower() not in _KEYWORDS:
            names.append(match.group(0))
    return names


def test_promql_parser_finds_metric_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, view) (rate(alter_request_latency_seconds_bucket'
            '{tenant=~"$tenant", view!="x"}[$__rate_interval]))) / on(instance) vllm:num_requests_running > 1e-9')
    assert promql_metric_names(expr) == ["alter_request_latency_seconds_bucket", "vllm:num_requests_running"]


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query of a dashboard."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            if panel.get("type") == "row":
                continue
            targets = panel.get("targets") or []
            assert targets, f"panel {panel.get('title')!r} has no query"
            for target in targets:
                found.append((f"panel {panel['title']!r} {target.get('refId')}", target["expr"]))

    walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            found.append((f"variable {variable['name']!r}", inner[1] if inner else query))
    return found


@pytest.mark.parametrize("path", _dashboards(), ids=lambda p: p.name)
def test_dashboard_queries_use_exported_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    exported = _exported_alter_metrics()
    problems = []
    for where, expr in _queries(dashboard):
        names = promql_metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        for name in names:
            if not (name in exported or name.startswith("vllm:")):
                problems.append(f"{where}: {name!r} is neither exported by alter_serve/metrics.py nor a vllm: metric")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", _dashboards(), ids=lambda p: p.name)
def test_dashboard_uses_the_provisioned_datasource_and_panels_do_not_overlap(path: Path) -> None:
    uids = {s["uid"] for f in (GRAFANA / "provisioning" / "datasources").glob("*.yml") for s in load_yaml(f)["datasources"]}
    dashboard = json.loads(path.read_text())
    ids, cells = set(), {}
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids, f"{panel['title']!r}: unknown datasource {target['datasource']}"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def _vllm_metric_names() -> set[str] | None:
    """Every 'vllm:...' string in the installed vLLM's sources (its metric names), or None without vLLM."""
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    names = set()
    for root in spec.submodule_search_locations:
        for source in Path(root).rglob("*.py"):
            names.update(re.findall(r"""["'](vllm:[a-z0-9_]+)["']""", source.read_text(errors="ignore")))
    return names


@pytest.mark.parametrize("path", _dashboards(), ids=lambda p: p.name)
def test_dashboard_vllm_metrics_exist_in_installed_vllm(path: Path) -> None:
    known = _vllm_metric_names()
    assert known is not None, "vLLM is not installed: `make setup` installs it (extra cpu or gpu)"
    used = {n for _, expr in _queries(json.loads(path.read_text())) for n in promql_metric_names(expr)
            if n.startswith("vllm:")}
    unknown = {n for n in used if re.sub(r"_(total|bucket|count|sum|created)$", "", n) not in known and n not in known}
    assert not unknown, f"the installed vLLM defines no {sorted(unknown)}"


# ---- docker compose config (in addition, where a client exists) -----------------------------------


def _compose_command() -> list[str] | None:
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    candidates += [["docker-compose"]] if shutil.which("docker-compose") else []
    for command in candidates:
        try:
            if subprocess.run([*command, "version"], capture_output=True, timeout=30).returncode == 0:
                return command
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def _run_compose(command: list[str], env_file: Path, *options: str) -> subprocess.CompletedProcess:
    # The runner's own variables must not stand in for the env file's.
    env = {k: v for k, v in os.environ.items()
           if k not in env_example() and k not in ("POSTGRES_PASSWORD", "ALTER_SERVE_DATABASE_URL")
           and not k.startswith("COMPOSE_")}
    return subprocess.run([*command, "--env-file", str(env_file), *options, "-f", str(COMPOSE_FILE), "config", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_docker_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose / docker-compose client")
    result = _run_compose(command, ENV_EXAMPLE)
    assert result.returncode == 0, f"{' '.join(command)} config -q failed:\n{result.stderr}"


def test_docker_compose_config_validates_with_the_replicas_profile(tmp_path: Path) -> None:
    """The documented several-replica start: .env.example with its replica lines uncommented."""
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose / docker-compose client")
    password = "a-test-secret"
    env_file = tmp_path / "replicas.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example().items()) + f"POSTGRES_PASSWORD={password}\n"
                        f"ALTER_SERVE_DATABASE_URL={_documented_compose_database_url()}\nAPI_PORT=8000-8001\n")
    result = _run_compose(command, env_file, "--profile", "replicas")
    assert result.returncode == 0, f"{' '.join(command)} --profile replicas config failed:\n{result.stderr}"


def test_docker_compose_refuses_to_run_without_the_admin_key(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose / docker-compose client")
    env_file = tmp_path / "no-admin-key.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example().items() if k != "ALTER_SERVE_ADMIN_KEY"))
    result = _run_compose(command, env_file)
    assert result.returncode != 0 and "ALTER_SERVE_ADMIN_KEY" in result.stderr
