"""`speechllm-hf quickstart --output_dir OUT`: the whole pipeline on the tiny preset and the bundled corpus
(stage-1 text tuning, contrastive pretraining, ASR fine-tuning, projector-only save, reload through AutoModel,
transcription of the dev split), offline on a CPU; writes OUT/report.md with plots."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.quickstart import QuickstartConfig

    defaults = QuickstartConfig()
    parser = subparsers.add_parser("quickstart", help="tiny end-to-end run on the bundled corpus, with a report")
    parser.add_argument("--output_dir", required=True, help="where the model, plots and report.md go")
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"(default {value})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(**{name: getattr(args, name) for name in vars(QuickstartConfig())})
    results = run_quickstart(args.output_dir, config)
    print(json.dumps({k: results[k] for k in ("seconds", "retrieval_R@1", "wer")}, indent=2))
    print(f"report: {args.output_dir}/report.md")
    return 0


__all__ = ["register", "run"]
