"""What several sub-commands share: flags passed on under their own names, and the report-or-error convention."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


def flag_values(args, *names: str) -> dict:
    """`{name: args.name}` for flags named like the parameters they are passed to."""
    return {name: getattr(args, name) for name in names}


def add_source_arguments(parser) -> None:
    """--dataset_config and --split, for a manifest that is a `datasets` source with configs or splits."""
    parser.add_argument("--dataset_config", help="config (subset) of a Hub dataset given as the manifest")
    parser.add_argument(
        "--split", help="split of a manifest that has splits (Hub dataset, saved DatasetDict, audiofolder)"
    )


def print_report(command: str, make_report: Callable[[], dict]) -> int:
    """Prints the report `make_report` returns as JSON (exit status 0), or, for a bad input it raises on (a
    ValueError or OSError: a bad manifest, task, prompt file, model), a one-line message instead of a traceback (2).
    """
    try:
        report = make_report()
    except (ValueError, OSError) as err:
        print(f"speechllm-hf {command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


__all__ = ["add_source_arguments", "flag_values", "print_report"]
