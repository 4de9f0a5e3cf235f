"""The `retrack` command: a thin layer that parses flags, calls the API and prints.

Each subcommand lives in retrack/commands/<name>.py and exposes `register(subparsers, help)`, which adds
its parser and sets `func(args) -> int`. Errors a user can cause (UserError) become one sentence
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from retrack import __version__
from retrack.errors import UserError
from retrack.outputs import disk_error, release_all

# Command → (module in retrack/commands, the line `retrack --help` shows). Only the module of the
# command being run is imported: the others' flags need torch and diffusers to declare.
COMMANDS = {
    "unlearn": ("unlearn", "make a model forget some training images"),
    "sample": ("sample", "draw images from a model"),
    "evaluate": ("evaluate", "measure forgetting and quality of a model"),
    "audit": ("audit", "find the training images a model copies"),
    "sd-sets": ("sd_sets", "build the forget/remain sets of a text-to-image prompt from its samples"),
    "pretrain": ("pretrain", "train a small diffusers model from a YAML recipe"),
    "demo": ("demo", "forget the T-shirt memorised by the shipped MNIST model (CPU, minutes)"),
    "experiment": ("experiment", "run a paper-style comparison from a YAML config (resumable)"),
    "prepare-data": ("prepare_data", "convert images once into a memory-mapped store"),
    "report": ("report", "write one self-contained HTML page for a run, demo or experiment folder"),
    "verify": ("verify", "check that forgotten images are really gone (membership inference, relearning)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # argparse's own errors (unknown flag, missing value, a flag's type check): one line, exit 2.
        print(f"retrack: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `retrack`; of the commands, only the one named in `argv` (all of them when
    `argv` is None) declares its flags, the others are listed by name and help line."""
    chosen = set(COMMANDS) if argv is None else {a for a in argv if a in COMMANDS}
    parser = _Parser(prog="retrack", description="Data unlearning for diffusion models.")
    parser.add_argument("--version", action="version", version=f"retrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, line) in COMMANDS.items():
        if name in chosen:
            importlib.import_module(f"retrack.commands.{module}").register(sub, line)
        else:
            sub.add_parser(name, help=line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
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
    except OSError as e:  # a full disk met outside the atomic writers (a cache, a log)
        full = disk_error(e, e.filename or "a file")
        if full is None:
            raise
        print(f"retrack: error: {full}", file=sys.stderr)
        return 2
    finally:
        release_all()  # the outputs this command held


if __name__ == "__main__":
    raise SystemExit(main())
