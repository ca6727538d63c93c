"""`speechllm-hf quickstart --output_dir OUT`: the whole pipeline on the tiny preset and the bundled corpus
(stage-1 text tuning, contrastive pretraining, ASR fine-tuning, projector-only save, reload through AutoModel,
transcription of the dev split), offline on a CPU; writes OUT/report.md with plots.

`--backbones real` runs the real-backbone stages instead (Whisper-base baseline, ASR, contrastive, continuation
writing on Whisper-base's encoder + SmolLM2-135M-Instruct; see speechllm_hf/real_quickstart.py)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.quickstart import QuickstartConfig
    from speechllm_hf.real_quickstart import RealQuickstartConfig

    parser = subparsers.add_parser("quickstart", help="end-to-end run on the bundled corpus, with a report")
    parser.add_argument("--output_dir", required=True, help="where the model, plots and report.md go")
    parser.add_argument(
        "--backbones",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: random tiny models, about a CPU minute (default); real: Whisper-base + SmolLM2-135M-Instruct "
        "(Hub ids by default; offline, pass the folders of scripts/offline_backbones.py)",
    )
    seen = set()
    for config in (QuickstartConfig(), RealQuickstartConfig()):
        for name, value in vars(config).items():
            if name not in seen:
                seen.add(name)
                parser.add_argument(f"--{name}", type=type(value), default=value, help=f"(default {value})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.quickstart import QuickstartConfig, run_quickstart
    from speechllm_hf.real_quickstart import RealQuickstartConfig, run_real_quickstart

    if args.backbones == "real":
        config = RealQuickstartConfig(**{name: getattr(args, name) for name in vars(RealQuickstartConfig())})
        results = run_real_quickstart(args.output_dir, config)
        print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2, default=str)[:4000])
    else:
        config = QuickstartConfig(**{name: getattr(args, name) for name in vars(QuickstartConfig())})
        results = run_quickstart(args.output_dir, config)
        print(json.dumps({k: results[k] for k in ("seconds", "retrieval_R@1", "wer")}, indent=2))
    print(f"report: {args.output_dir}/report.md")
    return 0


__all__ = ["register", "run"]
