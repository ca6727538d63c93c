"""`speechllm-hf quickstart --output_dir OUT`: the whole pipeline on the tiny preset and the bundled corpus
(stage-1 text tuning, contrastive pretraining, ASR fine-tuning, projector-only save, reload through AutoModel,
transcription of the dev split), offline on a CPU; writes OUT/report.md with plots.

`--backbones real` runs the real-backbone stages instead (Whisper-base baseline, ASR, contrastive, continuation
writing on Whisper-base's encoder + SmolLM2-135M-Instruct; see speechllm_hf/quickstart/real.py)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.quickstart.real import RealQuickstartConfig
    from speechllm_hf.quickstart.tiny import QuickstartConfig

    parser = subparsers.add_parser("quickstart", help="end-to-end run on the bundled corpus, with a report")
    parser.add_argument("--output_dir", required=True, help="where the model, plots and report.md go")
    parser.add_argument(
        "--backbones",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: random tiny models, about a CPU minute (default); real: Whisper-base + SmolLM2-135M-Instruct "
        "(Hub ids by default; offline, pass the folders of scripts/offline_backbones.py)",
    )
    # One flag per config field; each set of backbones keeps its own defaults, so a flag not given stays unset here.
    defaults: dict[str, dict] = {}
    for backbones, config in (("tiny", QuickstartConfig()), ("real", RealQuickstartConfig())):
        for name, value in vars(config).items():
            defaults.setdefault(name, {})[backbones] = value
    for name, by_backbones in defaults.items():
        kind = type(next(iter(by_backbones.values())))
        shown = "; ".join(f"{backbones}: {value}" for backbones, value in by_backbones.items())
        parser.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=f"(default {shown})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.quickstart.real import RealQuickstartConfig, run_real_quickstart
    from speechllm_hf.quickstart.tiny import QuickstartConfig, run_quickstart

    config_class = RealQuickstartConfig if args.backbones == "real" else QuickstartConfig
    fields = vars(config_class())
    every_field = set(vars(QuickstartConfig())) | set(vars(RealQuickstartConfig()))
    foreign = sorted(f"--{name}" for name in every_field - set(fields) if hasattr(args, name))
    if foreign:
        raise SystemExit(f"{', '.join(foreign)}: not an option of --backbones {args.backbones} (see quickstart -h).")
    config = config_class(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    if args.backbones == "real":
        results = run_real_quickstart(args.output_dir, config)
        print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2, default=str)[:4000])
    else:
        results = run_quickstart(args.output_dir, config)
        print(json.dumps({k: results[k] for k in ("seconds", "retrieval_R@1", "wer")}, indent=2))
    print(f"report: {args.output_dir}/report.md")
    return 0


__all__ = ["register", "run"]
