"""`speechllm-hf synthesize --output_dir D`: generate the open-vocabulary synthetic ASR corpus (WordNet, espeak-ng)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="generate an open-vocabulary English ASR corpus: WordNet sentences read by several espeak-ng voices",
    )
    parser.add_argument("--output_dir", required=True, help="gets train.jsonl, dev.jsonl, train/, dev/, metadata.json")
    parser.add_argument("--num_train", type=int, default=3000, help="train clips (distinct sentences)")
    parser.add_argument("--num_dev", type=int, default=200, help="dev clips (sentences never in train)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sentence draw, speeds and pitches")
    parser.add_argument("--workers", type=int, help="parallel synthesis threads (default: the CPU count)")
    parser.add_argument(
        "--wordnet_dir", help="folder of WordNet's data.* files (default /usr/share/wordnet, Debian's wordnet-base)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.preprocessing.openvocab import build_openvocab_corpus
    from speechllm_hf.preprocessing.wordnet_sentences import WORDNET_DIR

    start = time.perf_counter()
    try:
        metadata, reused = build_openvocab_corpus(
            args.output_dir,
            num_train=args.num_train,
            num_dev=args.num_dev,
            seed=args.seed,
            workers=args.workers,
            wordnet_dir=args.wordnet_dir or WORDNET_DIR,
        )
    except (RuntimeError, ValueError, OSError) as err:  # no espeak-ng, no WordNet, bad counts: a message
        print(f"speechllm-hf synthesize: error: {err}", file=sys.stderr)
        return 2
    keys = ("counts", "hours", "distinct_words", "distinct_words_total", "dev_oov_rate", "dev_oov_type_rate")
    print(json.dumps({key: metadata[key] for key in keys}, indent=2))
    action = "reused the complete corpus in" if reused else f"wrote in {time.perf_counter() - start:.1f} s:"
    print(f"{action} {args.output_dir}")
    return 0
