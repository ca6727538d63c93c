"""Quantized backbones: the transformers `quantization_config` that a method name (`--quantization`) stands for.

bitsandbytes (CUDA only) is what QLoRA and Ultravox users load large LLMs with; optimum-quanto also runs on the CPU,
so that the quantized path is tested without a GPU. Both are optional: transformers imports them only while loading,
and says what to install when one is missing.
"""

from __future__ import annotations

import importlib.util

import torch

QUANTIZATION_METHODS = ("bnb-8bit", "bnb-4bit", "quanto-int8", "quanto-int4")


def quantization_config(method: str):
    """The `quantization_config` of `method`, one of `QUANTIZATION_METHODS`: bitsandbytes LLM.int8() or NF4 with
    double quantization computing in bfloat16 (QLoRA's settings), or optimum-quanto int8 / int4 weights.

    Raises:
        ValueError: for an unknown method, or a bitsandbytes one without CUDA.
        ImportError: for a bitsandbytes method without bitsandbytes installed (transformers 4.57 would fail on
            building the config with an unexplained `PackageNotFoundError`).
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"Unknown quantization {method!r}; choose one of {', '.join(QUANTIZATION_METHODS)}.")
    if method.startswith("bnb-"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{method} (bitsandbytes) needs a CUDA GPU and none is available: use quanto-int8 or quanto-int4 on "
                "the CPU (pip install optimum-quanto)."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"{method} needs bitsandbytes: pip install bitsandbytes (or speechllm_hf[bnb]).")
        from transformers import BitsAndBytesConfig

        if method == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    from transformers import QuantoConfig

    return QuantoConfig(weights=method.removeprefix("quanto-"))


def quantization_kwargs(method: str | None, quantize_encoder: bool = False) -> dict:
    """The `from_preset` / `from_pretrained` keywords that load the LLM (and, with `quantize_encoder`, the encoder)
    quantized with `method`; none for None.

    Raises:
        ValueError: for `quantize_encoder` without a method, or as `quantization_config` does.
    """
    if method is None:
        if quantize_encoder:
            raise ValueError("--quantize_encoder needs --quantization (the method to quantize the encoder with).")
        return {}
    kwargs = {"quantization_config": quantization_config(method)}
    if quantize_encoder:
        kwargs["encoder_quantization_config"] = quantization_config(method)
    return kwargs


__all__ = ["QUANTIZATION_METHODS", "quantization_config", "quantization_kwargs"]
