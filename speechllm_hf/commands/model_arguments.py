"""Flags shared by every command that builds a preset or loads a saved model: the backbones and the prompt format.

Defined once, as dataclasses: `speechllm-hf train` parses them with `HfArgumentParser` (its `ModelArguments` extends
them), the other commands add them to their argparse parser with `add_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from speechllm_hf.models.speechllm.configuration_speechllm import PROJECTOR_TYPES
from speechllm_hf.presets import BLSP_CHAT_TEMPLATE, ENCODER_TYPES
from speechllm_hf.quantization import QUANTIZATION_METHODS, quantization_kwargs


@dataclass
class BackboneArguments:
    encoder_type: str | None = field(
        default=None,
        metadata={"help": "With --preset: this encoder type instead of the preset's.", "choices": ENCODER_TYPES},
    )
    projector_type: str | None = field(
        default=None,
        metadata={"help": "With --preset: this projector instead of the preset's.", "choices": PROJECTOR_TYPES},
    )
    encoder_name_or_path: str | None = field(
        default=None,
        metadata={"help": "With --preset: the encoder checkpoint (Hub id or local folder) instead of the preset's."},
    )
    encoder_revision: str | None = field(
        default=None, metadata={"help": "Encoder revision (a commit hash pins it; default: the commit loaded now)."}
    )
    text_name_or_path: str | None = field(
        default=None,
        metadata={"help": "With --preset: the LLM checkpoint (Hub id or local folder) instead of the preset's."},
    )
    text_revision: str | None = field(
        default=None, metadata={"help": "LLM revision (a commit hash pins it; default: the commit loaded now)."}
    )


@dataclass
class PromptArguments:
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "The prompt format: a Jinja chat template, a file holding one, or 'blsp' (BLSP's ###[Human]: "
            "format). Default: a saved model's own; for a preset, the LLM's own chat template, else BLSP's."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System message for conversations without one ('' for none). Default: the saved model's or the "
            "preset's."
        },
    )


@dataclass
class QuantizationArguments:
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Load the frozen LLM quantized: bnb-8bit / bnb-4bit (bitsandbytes, CUDA; pip install "
            "bitsandbytes) or quanto-int8 / quanto-int4 (also on the CPU; pip install optimum-quanto). The projector "
            "keeps its own dtype, and a save records no quantization.",
            "choices": QUANTIZATION_METHODS,
        },
    )
    quantize_encoder: bool = field(
        default=False, metadata={"help": "With --quantization: quantize the speech encoder the same way."}
    )


def add_arguments(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Add the fields of these argument dataclasses to `parser` as `--name` flags (default None; switches for
    booleans, default False)."""
    for cls in classes:
        for spec in dataclasses.fields(cls):
            if spec.type == "bool":
                parser.add_argument(f"--{spec.name}", action="store_true", **spec.metadata)
            else:
                parser.add_argument(f"--{spec.name}", **spec.metadata)


def chat_template_text(value: str) -> str:
    """The template a `--chat_template` value names: "blsp", a file holding a template, or the template itself."""
    if value == "blsp":
        return BLSP_CHAT_TEMPLATE
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as file:
            return file.read()
    if "{{" in value or "{%" in value:
        return value
    raise SystemExit(f"--chat_template {value!r} is neither 'blsp', a file, nor a Jinja template.")


def load_model_and_processor(args, **kwargs):
    """`(model, processor)`: the saved model `args.model`, else the preset `args.preset` with the backbone flags;
    then the prompt flags. `kwargs` (dtype, attn_implementation, ...) and the quantization flags go to the
    backbones' `from_pretrained`.

    Raises:
        SystemExit: for backbone flags given with a saved model, which records its own backbones, and for
            quantization flags that cannot apply.
    """
    from speechllm_hf import SpeechLlmForConditionalGeneration, SpeechLlmProcessor, from_preset

    try:
        kwargs.update(
            quantization_kwargs(getattr(args, "quantization", None), getattr(args, "quantize_encoder", False))
        )
    except ValueError as err:
        raise SystemExit(str(err)) from err
    backbones = {spec.name: getattr(args, spec.name, None) for spec in dataclasses.fields(BackboneArguments)}
    if getattr(args, "model", None):
        given = [f"--{name}" for name, value in backbones.items() if value is not None]
        if given:
            raise SystemExit(f"{', '.join(given)} apply to --preset only: a saved model records its own backbones.")
        model = SpeechLlmForConditionalGeneration.from_pretrained(args.model, **kwargs)
        processor = SpeechLlmProcessor.from_pretrained(args.model)
    else:
        model, processor = from_preset(args.preset, **backbones, **kwargs)
    if getattr(args, "chat_template", None) is not None:
        processor.chat_template = chat_template_text(args.chat_template)
    if getattr(args, "system_prompt", None) is not None:
        processor.system_prompt = args.system_prompt or None
    return model, processor


__all__ = [
    "BackboneArguments",
    "PromptArguments",
    "QuantizationArguments",
    "add_arguments",
    "chat_template_text",
    "load_model_and_processor",
]
