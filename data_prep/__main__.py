"""ImageNet preparation commands: python -m data_prep <command> --help.

Each command lives in its own module exposing ``add_parser``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from data_prep.arguments import OneLineParser
from quantize.core.errors import QuantizeError, one_line

COMMANDS = ["calib_set", "labels", "class_names", "sort_val", "cache"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m data_prep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        importlib.import_module(f"data_prep.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.run(args)
    except QuantizeError as exc:
        print(f"error: {one_line(exc, limit=2000)}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unwritable, full or missing output location: the environment, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; choose another location or fix its permissions",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
