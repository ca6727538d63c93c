"""`speechllm-hf continue-writing --preset NAME | --text_name_or_path ID --manifest M --output_file F.jsonl`.

The text LLM continues every transcript (BLSP's continuation data, arXiv 2309.00916; see
`speechllm_hf.preprocessing.continuation`). Runs on one process as is, or split over several under `accelerate launch
--num_processes N -m speechllm_hf continue-writing ...`; rerunning the same command after an interruption resumes it.
Several CPU processes: `accelerate launch --multi_gpu --num_processes N -m speechllm_hf continue-writing --cpu ...`
(`accelerate launch --cpu` starts a single process; `--cpu` here puts the processes in one gloo group).
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_source_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.presets import PRESETS
    from speechllm_hf.quantization import QUANTIZATION_METHODS

    from .model_arguments import PromptArguments, add_arguments

    parser = subparsers.add_parser(
        "continue-writing",
        help="let the text LLM continue each transcript (BLSP continuation data for `train --method continuation`)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="use the LLM of this preset")
    # Only the LLM writes: of the backbone flags, the LLM's path. --text_model is its older name.
    parser.add_argument(
        "--text_name_or_path",
        "--text_model",
        dest="text_model",
        help="a causal LM: Hub id or local folder (e.g. the stage-1 instruction-tuned LLM); with --preset, instead "
        "of the preset's LLM",
    )
    parser.add_argument(
        "--manifest", required=True, help="jsonl or parquet file, folder of parquet files, or a datasets source"
    )
    add_source_arguments(parser)
    parser.add_argument("--output_file", required=True, help="output .jsonl; F.report.json is written beside it")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest continuation, in tokens")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call on each process")
    parser.add_argument(
        "--prompt", choices=["blsp", "chat"], default="blsp", help="BLSP's ###[Human]: format, or the chat template"
    )
    parser.add_argument("--instruction", help="replace BLSP's continuation instruction")
    add_arguments(parser, PromptArguments)
    parser.add_argument("--max_input_tokens", type=int, default=192, help="drop prompts of this many tokens or more")
    parser.add_argument("--normalize", action="store_true", help="apply Whisper's English normaliser to transcripts")
    parser.add_argument(
        "--normalizer_file", help="Whisper's normalizer.json (British -> American spellings); implies --normalize"
    )
    parser.add_argument("--text_column", default="text", help="transcript column")
    parser.add_argument("--audio_column", default="audio", help="audio column (kept as is)")
    parser.add_argument("--output_column", default=None, help="column of the continuation (default: continuation)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype of the LLM"
    )
    # The LLM alone: --quantize_encoder has no encoder to apply to here.
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATION_METHODS,
        help="load the LLM quantized: bnb-8bit / bnb-4bit (bitsandbytes, CUDA) or quanto-int8 / quanto-int4 (also on "
        "the CPU); the LLM must be loaded from a checkpoint, not built randomly",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (random presets such as tiny are built from it)")
    parser.add_argument(
        "--cpu", action="store_true", help="run on CPU even where a GPU is available (also ACCELERATE_USE_CPU=1)"
    )
    parser.set_defaults(func=run)


def load_text_model(
    preset: str | None, text_model: str | None, dtype: str = "auto", seed: int = 0, quantization: str | None = None
):
    """The text LLM and its tokenizer: `text_model` (with or without a preset), else the LLM the preset names (built
    randomly from `seed` for "tiny"), loaded quantized with `quantization` (one of `QUANTIZATION_METHODS`) if given.

    Returns:
        `(model, tokenizer, name)`, name saying what the model is and how it is quantized (for the resume check).

    Raises:
        ValueError: for neither a text model nor a known preset, a quantization of an LLM that is built randomly (it
            has no weights to quantize), or a quantization that cannot apply (see `quantization_config`).
    """
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechllm_hf.models.speechllm.loading_speechllm import from_pretrained_or_explain
    from speechllm_hf.presets import PRESETS, from_preset
    from speechllm_hf.quantization import quantization_kwargs

    if text_model is None:
        if preset not in PRESETS:
            raise ValueError(f"Give --text_name_or_path or --preset (one of {', '.join(PRESETS)}); got {preset!r}.")
        text_model = PRESETS[preset].text_name_or_path
        if text_model is None:  # a random LLM with its own tokenizer; the encoder is built (and discarded) too
            if quantization is not None:
                raise ValueError(
                    f"--quantization applies to loaded weights, and preset {preset!r} builds its LLM randomly: name "
                    "a checkpoint with --text_name_or_path, or drop --quantization."
                )
            set_seed(seed)  # every process builds the same weights
            speech_model, processor = from_preset(preset)
            model = speech_model.language_model
            if dtype != "auto":
                model = model.to(getattr(torch, dtype))
            return model, processor.tokenizer, f"preset:{preset} (random, seed {seed})"
    quantized = quantization_kwargs(quantization)
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, text_model, "tokenizer")
    model = from_pretrained_or_explain(
        AutoModelForCausalLM.from_pretrained, text_model, "text model", dtype=dtype, **quantized
    )
    # A resume must not mix continuations of the quantized and the full-precision LLM.
    return model, tokenizer, text_model if quantization is None else f"{text_model} ({quantization})"


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from speechllm_hf.preprocessing.continuation import (
        BLSP_CONTINUATION_INSTRUCTION,
        OUTPUT_COLUMN,
        make_normalizer,
        write_continuations,
    )

    from .model_arguments import chat_template_text

    if args.prompt != "chat" and args.chat_template is not None:
        raise SystemExit("speechllm-hf continue-writing: --chat_template applies to --prompt chat only.")

    # Without cpu=True, processes on a machine without GPU do not form a group (each would write everything).
    state = PartialState(cpu=args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    try:
        model, tokenizer, name = load_text_model(
            args.preset, args.text_model, args.dtype, args.seed, args.quantization
        )
        if args.chat_template is not None:
            tokenizer.chat_template = chat_template_text(args.chat_template)
        normalize = args.normalize or args.normalizer_file is not None
        normalizer = make_normalizer(args.normalizer_file) if normalize else None
        report = write_continuations(
            model.to(state.device),
            tokenizer,
            args.manifest,
            args.output_file,
            model_name=name,
            state=state,
            text_column=args.text_column,
            audio_column=args.audio_column,
            output_column=args.output_column or OUTPUT_COLUMN,
            style=args.prompt,
            instruction=args.instruction or BLSP_CONTINUATION_INSTRUCTION,
            system_prompt=args.system_prompt or None,
            max_new_tokens=args.max_new_tokens,
            max_input_tokens=args.max_input_tokens,
            batch_size=args.batch_size,
            normalizer=normalizer,
            dataset_config=args.dataset_config,
            split=args.split,
        )
    except ValueError as err:  # a bad manifest, preset or resume: a message, not a traceback
        print(f"speechllm-hf continue-writing: error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(json.dumps(report, indent=2))
    return 0


__all__ = ["register", "run", "load_text_model"]
