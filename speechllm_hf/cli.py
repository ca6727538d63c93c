"""`speechllm-hf` command line: one sub-command per module in `speechllm_hf.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMANDS = (
    "info",
    "prepare",
    "synthesize",
    "align",
    "push",
    "train",
    "continue_writing",
    "generate",
    "evaluate",
    "retrieval",
    "quickstart",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechllm-hf", description="Speech LLMs on transformers: prepare data, train, evaluate, publish."
    )
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"speechllm_hf.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra_args = unknown
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
