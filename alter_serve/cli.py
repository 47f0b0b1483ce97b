"""`alter-serve` console entry point.

    alter-serve serve --model DIR [--config configs/serve.yaml] [--host H] [--port P] [--data-dir D]
    alter-serve demo  --assets var/demo/assets.json      (what `make serve` runs)
    alter-serve tenants|keys|views|experiments|bundles|gc ...  (the admin API over HTTP; see admin_cli.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .admin_cli import add_admin_commands
from .config import ServeConfig, load_config

DEMO_TENANT = "demo"
# In data_dir: where a server started without ALTER_SERVE_ADMIN_KEY leaves the admin key it created.
BOOTSTRAP_KEY_FILE = "admin-key"


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML server config (configs/serve*.yaml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--database-url")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-loras", type=int)
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-gib", type=float)


def _config_from(args: argparse.Namespace, model: str | None) -> ServeConfig:
    return load_config(
        args.config, host=args.host, port=args.port, data_dir=args.data_dir, database_url=args.database_url,
        engine_model=model, engine_dtype=args.dtype, engine_max_loras=args.max_loras,
        engine_max_lora_rank=args.max_lora_rank, engine_max_model_len=args.max_model_len,
        engine_kv_cache_gib=args.kv_cache_gib)


def run_server(config: ServeConfig, prepare=None) -> None:
    """Build the service, run `prepare(service)` (sync), then serve until interrupted."""
    import uvicorn

    from .api.app import create_app
    from .serving.service import AlterService

    if config.engine.model is None:
        raise SystemExit("no model: pass --model DIR (a Hugging Face causal-LM folder) or set engine.model")
    service = AlterService(config, config.engine.model)
    service.prepare()
    if prepare is not None:
        prepare(service)
    admin_secret = service.ensure_admin_key()
    if admin_secret:
        save_bootstrap_admin_key(config.data_dir / BOOTSTRAP_KEY_FILE, admin_secret)
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level=config.log_level)


def save_bootstrap_admin_key(path: Path, secret: str) -> None:
    """Hand a created admin key to the operator through a 0600 file, never through the log: logs
    are shipped, kept and read by more people than the admins (only the demo prints its keys)."""
    from .registry.keys import write_secret_file

    write_secret_file(path, secret + "\n")
    print(f"no admin key was configured (ALTER_SERVE_ADMIN_KEY), so one was created and written to {path} "
          "(mode 0600). Read it, keep it in your secret store, and delete the file.", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    run_server(_config_from(args, args.model))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    assets = json.loads(Path(args.assets).read_text())
    config = _config_from(args, assets["model_dir"])
    if args.data_dir is None and args.config is None:
        config = config.model_copy(update={"data_dir": Path(assets.get("serve_dir", "var/demo/serve"))})
    config.bundle_dirs.append(Path(assets["bundle_dir"]).parent)

    def prepare(service) -> None:
        from .demo_setup import register_demo

        keys = register_demo(service.registry, Path(assets["bundle_dir"]), config.data_dir / "demo-keys.json")
        print(demo_banner(config, keys, assets), flush=True)

    run_server(config, prepare)
    return 0


def demo_banner(config: ServeConfig, keys: dict, assets: dict) -> str:
    base = f"http://{config.host}:{config.port}"
    prompt = json.dumps(assets["example_prompt"])
    curl = (f'curl -s {base}/v1/completions -H "Authorization: Bearer {keys["tenant_key"]}" '
            f'-H "Content-Type: application/json" \\\n    -d \'{{"model": "%s", "prompt": {prompt}, '
            f'"max_tokens": 24, "temperature": 0}}\'')
    return f"""
alter-serve demo
  server:      {base}   (OpenAI-compatible: {base}/v1, dashboard: {base}/dashboard#key=<admin key>)
  views:       {", ".join(keys["views"])}
  tenant key:  {keys["tenant_key"]}
  admin key:   {keys["admin_key"]}
  (keys are kept in {config.data_dir / "demo-keys.json"})

  The original model knows: {assets["example_answer"]}
  {curl % "original"}
  The view {assets["example_view"]} has forgotten it:
  {curl % assets["example_view"]}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alter-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a base model and its registered views")
    serve.add_argument("--model", help="Hugging Face causal-LM folder")
    _add_server_flags(serve)
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="serve the demo model with the demo bundle's views")
    demo.add_argument("--assets", default="var/demo/assets.json", help="written by `alter-train demo-assets`")
    _add_server_flags(demo)
    demo.set_defaults(func=cmd_demo)
    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ALTER_SERVE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"alter-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
