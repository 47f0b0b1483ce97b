"""Reading docker-compose.yml and .env.example the way Docker Compose does, for the cases they use:
shared by the structural deploy tests (test_deploy.py) and the test that runs the compose service's
own command without Docker (server/test_compose_start.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICE = "alter-serve"

# ${VAR}, ${VAR:-default}, ${VAR:?message}: compose interpolation.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping at the top level"
    return data


def interpolate(value, env: dict[str, str]):
    """Resolve compose interpolation in a string the way compose does for the cases used here."""
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"${{{name}}} is required ({arg}) and .env.example does not set it")
        return ""

    return INTERPOLATION.sub(one, value)


def env_example() -> dict[str, str]:
    """The variables .env.example sets (commented lines are not set)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def volume_mounts(service: dict) -> list[dict]:
    """Every volume entry as {type, source, target, read_only}, from short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            parts = entry.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "$", "~")) else "volume"
            mounts.append({"type": kind, "source": source, "target": target,
                           "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            mounts.append({"read_only": False, **entry})
    return mounts


def service_environment(service: dict, env: dict[str, str]) -> dict[str, str]:
    """A service's environment as the container gets it: interpolated with `env` (an .env file);
    a bare `NAME:` entry passes `NAME` through from `env` only where it is set there."""
    raw = service.get("environment") or {}
    assert isinstance(raw, dict), "use the mapping form of environment"
    out = {}
    for name, value in raw.items():
        if value is None:
            if env.get(name):
                out[name] = env[name]
        else:
            out[name] = str(interpolate(str(value), env))
    return out


def image_entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form)."""
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(match[1])
