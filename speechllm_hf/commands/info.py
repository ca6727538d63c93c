"""`speechllm-hf info --preset NAME`: build a preset and print its shape, parameter counts and token rate."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.presets import PRESETS

    from .model_arguments import BackboneArguments, add_arguments

    parser = subparsers.add_parser("info", help="describe a preset: sub-models, parameter counts, audio token rate")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="preset name (default: tiny)")
    add_arguments(parser, BackboneArguments)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.models.speechllm.hub_speechllm import count_parameters

    from .model_arguments import load_model_and_processor

    model, processor = load_model_and_processor(args)
    config = model.config
    # Feature frames per second: raw samples for HuBERT/wav2vec2, mel frames (one per hop) for Whisper.
    feature_rate = processor.sampling_rate / getattr(processor.feature_extractor, "hop_length", 1)
    summary = {
        "encoder": type(model.encoder).__name__,
        "projector": type(model.projector).__name__,
        "language_model": type(model.language_model).__name__,
        "parameters": {
            "encoder": count_parameters(model.encoder),
            "projector": count_parameters(model.projector),
            "language_model": count_parameters(model.language_model),
        },
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "audio_tokens_per_second": round(config.audio_tokens_per_second(feature_rate), 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["register", "run"]
