"""The `retrack` command: a thin layer that parses flags, calls the API and prints.

Each subcommand lives in retrack/commands/<name>.py and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Errors a user can cause (UserError) become one sentence
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from retrack import __version__
from retrack.errors import UserError

COMMANDS = ("unlearn", "sample", "evaluate", "audit", "sd_sets", "pretrain", "demo", "experiment", "prepare_data",
            "report", "verify")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # argparse's own errors (unknown flag, missing value, a flag's type check): one line, exit 2.
        print(f"retrack: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retrack", description="Data unlearning for diffusion models.")
    parser.add_argument("--version", action="version", version=f"retrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"retrack.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"retrack.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"retrack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retrack: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
