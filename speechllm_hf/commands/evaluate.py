"""`speechllm-hf evaluate --model DIR_OR_ID | --preset NAME --data_config cfg.yaml --results_dir R`.

Generates answers for every partition of a data config (the contrastive-pretraining code's YAML format:
docs/evaluation.md and `speechllm_hf.evaluation.data_config`) greedily, at most `--max_new_tokens` (200) new
tokens, stopping at a newline, and writes `R/<cfg>_preds.json` and `R/<cfg>_scores.json` (see
`speechllm_hf.evaluation.runner`).
"""

from __future__ import annotations

import argparse
import json
import sys

from .generate import add_batch_parser, load_model_and_processor


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_batch_parser(
        subparsers, "evaluate", help="score a model on a YAML data config (ASR WER, ST BLEU/chrF, spoken-QA EM/F1)"
    )
    parser.add_argument("--data_config", required=True, help="YAML with a DATA list (format: docs/evaluation.md)")
    parser.add_argument("--results_dir", required=True, help="gets <cfg>_preds.json and <cfg>_scores.json")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--no_comet", dest="comet", action="store_false", help="skip COMET even when installed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.evaluation.data_config import load_data_config
    from speechllm_hf.evaluation.runner import evaluate

    try:
        config = load_data_config(args.data_config)
        model, processor = load_model_and_processor(args)
        scores = evaluate(
            model,
            processor,
            config,
            args.results_dir,
            batch_size=args.batch_size,
            sort_window=args.sort_window,
            max_new_tokens=args.max_new_tokens,
            prompts=PromptConfig.from_file(args.prompts),
            comet=args.comet,
            model_name=args.model or f"preset:{args.preset}",
        )
    except (OSError, ValueError) as err:
        # A bad config, model or data (every split the config names is read before any generation): a message.
        print(f"speechllm-hf evaluate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores["results"], indent=2, ensure_ascii=False))
    return 0


__all__ = ["register", "run"]
