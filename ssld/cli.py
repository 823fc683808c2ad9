"""The ``ssld`` command line.

Each pipeline stage is a sub-command reading and writing plain files. Errors in arguments
give one line naming the argument and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ssld import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_info(args) -> int:
    from ssld_kernels._backends import describe

    print(f"ssld {__version__}")
    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssld",
        description=(
            "SSLD: distil an image backbone from a frozen teacher's softmax (JSD, no labels) "
            "on labeled + teacher-selected unlabeled images."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ssld {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    info = sub.add_parser("info", help="versions and available kernel backends")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
