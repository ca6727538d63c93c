"""`speechllm-hf align --manifest M --output_dir D`: word timestamps by CTC forced alignment, saved with a report."""

from __future__ import annotations

import argparse

from .common import add_source_arguments, flag_values, print_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "align", help="word-align transcripts to their audio with a CTC model (for mixed speech-text data)"
    )
    parser.add_argument(
        "--manifest", required=True, help="jsonl or parquet file, folder of parquet files, or a datasets source"
    )
    add_source_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="gets dataset/ (rows + words), report.json, failed.jsonl")
    parser.add_argument(
        "--aligner",
        default=None,
        help="CTC model id or folder (Wav2Vec2ForCTC, HubertForCTC, ...); default: the tiny aligner bundled with the "
        "corpus, which only knows that corpus: for real speech use e.g. facebook/wav2vec2-base-960h (the paper's)",
    )
    parser.add_argument("--num_proc", type=int, default=1, help="processes aligning rows in parallel")
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.preprocessing.alignment import align_dataset

    flags = flag_values(args, "aligner", "num_proc", "audio_column", "text_column", "dataset_config", "split")
    return print_report("align", lambda: align_dataset(args.manifest, args.output_dir, **flags)[1])


__all__ = ["register", "run"]
