"""Server configuration: YAML file, then environment (ALTER_SERVE_*), then CLI flags, each overriding the last.

Nested engine fields use a double underscore in the environment: ALTER_SERVE_ENGINE__MAX_LORAS=8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine.config import EngineConfig
from .registry.keys import imported_secret_problem


class ServeConfig(BaseSettings):
    # hide_input_in_errors: a refused admin key must not be echoed into the log by its error message.
    model_config = SettingsConfigDict(env_prefix="ALTER_SERVE_", env_nested_delimiter="__", extra="forbid",
                                      hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    data_dir: Path = Path("var/serve")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite in data_dir")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    admin_key: SecretStr | None = Field(default=None, description="bootstrap admin key (else one is created)")
    bundle_dirs: list[Path] = Field(default_factory=list, description="folders admins may register bundles from")
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    max_upload_bytes: int = Field(default=2 << 30, ge=1024)
    request_log_flush_s: float = Field(default=0.5, gt=0)
    request_log_retention_days: float | None = Field(default=None, gt=0, description="`alter-serve gc` deletes "
                                                     "request-log rows older than this many days (None: keep all)")
    request_log_retention_rows: int | None = Field(default=None, ge=1, description="`alter-serve gc` keeps at most "
                                                   "this many newest request-log rows (None: no limit)")
    gc_grace_s: float = Field(default=3600, ge=0, description="`alter-serve gc` leaves unreferenced files younger "
                              "than this alone: a bundle or view being stored, an upload in progress")
    max_queued_sequences: int | None = Field(default=1024, ge=1, description="sequences (n × prompts of every "
                                             "admitted, unfinished request, all tenants) this server process holds "
                                             "at most; one more answers 503 with Retry-After (None: no cap)")
    registry_poll_s: float = Field(default=2.0, ge=0, description="how often a replica checks the registry for "
                                   "views changed by other replicas (0: never; one single-row query per poll)")
    log_level: str = "info"
    feedback_per_minute: int = Field(default=120, ge=1, le=1_000_000, description="feedback ratings a tenant may "
                                     "send per minute (per server process); more answer 429")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="serve Prometheus metrics, "
                                     "without authentication, on this separate port (None: only /metrics on the "
                                     "API port, which needs an admin key)")
    metrics_host: str = Field(default="127.0.0.1", description="interface of the metrics port: only Prometheus "
                              "should reach it (their labels name every tenant, view and arm)")
    openapi_docs: bool = Field(default=False, description="publish /docs, /redoc and /openapi.json to anyone; "
                               "they list the admin API, so by default /openapi.json needs an admin key and the "
                               "browser pages are off")

    @field_validator("admin_key")
    @classmethod
    def _admin_key_is_a_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse a weak bootstrap key at start, naming the variable, rather than at first login."""
        problem = None if value is None else imported_secret_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(f"ALTER_SERVE_ADMIN_KEY (admin_key) cannot be an admin key: {problem}")
        return value

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"


def load_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """Read YAML (if given); the environment overrides it; non-None `overrides` override both."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    # Environment beats the file: pydantic-settings reads the environment; lay the file under it.
    env_only = ServeConfig().model_dump(exclude_unset=True)
    merged = _deep_merge(values, env_only)
    engine_overrides = {k[len("engine_"):]: v for k, v in overrides.items() if k.startswith("engine_") and v is not None}
    top = {k: v for k, v in overrides.items() if not k.startswith("engine_") and v is not None}
    merged = _deep_merge(merged, {**top, **({"engine": engine_overrides} if engine_overrides else {})})
    return ServeConfig.model_validate(merged)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
