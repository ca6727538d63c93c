"""`speechllm-hf info --preset NAME`: build a preset and print its shape, parameter counts, weight memory and token
rate."""

from __future__ import annotations

import argparse

from .common import print_report


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.presets import PRESETS

    from .model_arguments import BackboneArguments, QuantizationArguments, add_arguments

    parser = subparsers.add_parser(
        "info", help="describe a preset: sub-models, parameter counts, weight memory, audio token rate"
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="preset name (default: tiny)")
    add_arguments(parser, BackboneArguments, QuantizationArguments)
    parser.set_defaults(func=run)


def memory_bytes(module) -> int:
    """The bytes a module's parameters and buffers hold. transformers' `get_memory_footprint` counts a quanto weight
    at its float size (`element_size()` of its dtype); a quantized tensor subclass is counted by its inner tensors
    (int8 or packed int4 data, scales), as they are stored."""

    def stored(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass made of plain tensors (quanto's QTensors)
            return sum(stored(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        return tensor.nbytes

    return sum(stored(tensor) for tensors in (module.parameters(), module.buffers()) for tensor in tensors)


def run(args: argparse.Namespace) -> int:
    return print_report("info", lambda: summary(args))


def summary(args: argparse.Namespace) -> dict:
    from speechllm_hf.models.speechllm.hub_speechllm import count_parameters

    from .model_arguments import load_model_and_processor

    model, processor = load_model_and_processor(args)
    config = model.config
    # Feature frames per second: raw samples for HuBERT/wav2vec2, mel frames (one per hop) for Whisper.
    feature_rate = processor.sampling_rate / getattr(processor.feature_extractor, "hop_length", 1)
    parts = {"encoder": model.encoder, "projector": model.projector, "language_model": model.language_model}
    return {
        **{name: type(part).__name__ for name, part in parts.items()},
        "parameters": {name: count_parameters(part) for name, part in parts.items()},
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "memory_bytes": {name: memory_bytes(part) for name, part in parts.items()},
        "audio_tokens_per_second": round(config.audio_tokens_per_second(feature_rate), 2),
    }


__all__ = ["register", "run", "memory_bytes"]
