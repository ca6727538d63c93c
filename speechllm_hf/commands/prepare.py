"""`speechllm-hf prepare --manifest M --output_dir D`: validate every row, save the kept ones and a report."""

from __future__ import annotations

import argparse

from .common import add_source_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="validate a manifest (decode every clip), drop bad rows with a reason, save dataset + report"
    )
    parser.add_argument(
        "--manifest", required=True, help="jsonl or parquet file, folder of parquet files, or a datasets source"
    )
    add_source_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="gets dataset/, report.json and dropped.jsonl")
    parser.add_argument("--num_proc", type=int, default=1, help="processes validating rows in parallel")
    parser.add_argument("--min_duration", type=float, default=0.0, help="shortest clip kept, in seconds")
    parser.add_argument("--max_duration", type=float, default=30.0, help="longest clip kept, in seconds")
    parser.add_argument(
        "--model",
        help="a saved model folder or Hub id: its processor drops clips too short for the encoder "
        "(too_short_for_encoder), sets the rate and checks texts for its audio token and special tokens",
    )
    parser.add_argument(
        "--target_rate", type=int, help="sampling rate the model reads (default: the --model's, else 16000)"
    )
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="text", help="transcript column of ASR rows")
    parser.add_argument("--task", default="asr", help="task of rows without a `task` column: asr, st, sqa, ...")
    parser.add_argument("--prompt_file", help="prompt YAML whose instruction fields rows must fill in")
    parser.add_argument(
        "--audio_token",
        help="the model's audio placeholder, which row texts must not hold (default: the --model's, else <audio>)",
    )
    parser.add_argument(
        "--no_require_text",
        dest="require_text",
        action="store_false",
        help="check the audio only, not the fields each row's task needs",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.data.collators import special_token_strings
    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.preprocessing import prepare_dataset

    from .common import flag_values, print_report

    flags = flag_values(
        args,
        "num_proc",
        "min_duration",
        "max_duration",
        "target_rate",
        "audio_column",
        "text_column",
        "task",
        "require_text",
        "dataset_config",
        "split",
    )

    def prepare() -> dict:
        # The prompt file and the processor are read inside the reported call: a bad one is a message, as a bad
        # manifest is.
        prompts = PromptConfig.from_file(args.prompt_file)
        processor, special_tokens = None, ()
        if args.model:
            from speechllm_hf import SpeechLlmProcessor

            processor = SpeechLlmProcessor.from_pretrained(args.model)
            special_tokens = special_token_strings(processor.tokenizer)
        return prepare_dataset(
            args.manifest,
            args.output_dir,
            prompts=prompts,
            processor=processor,
            audio_token=args.audio_token or (processor.audio_token if processor else "<audio>"),
            special_tokens=special_tokens,
            **flags,
        )[1]

    return print_report("prepare", prepare)


__all__ = ["register", "run"]
