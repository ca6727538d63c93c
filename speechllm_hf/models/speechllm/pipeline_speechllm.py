"""The "speech-llm" pipeline (audio + optional instruction -> text) and the generation helpers it shares with
`speechllm_hf.inference`.

A saved model carries this file beside its code, and its config.json names it under `custom_pipelines`
(`hub_speechllm.write_hub_entries`), so that `pipeline(model=repo_or_folder, trust_remote_code=True)` works where
speechllm_hf is not installed. It imports only numpy, transformers and the standard library, and its siblings with
single-dot imports.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import GenerationConfig, Pipeline

from .configuration_speechllm import PIPELINE_TASK

# The user turn and ASR instruction of speechllm_hf's packaged prompt file (prompts/default.yaml; a test keeps them
# equal): what a request without an instruction is asked, where the prompt file cannot be read.
DEFAULT_USER_TEMPLATE = "<audio>\n{instruction}"
DEFAULT_INSTRUCTION = "Transcribe the audio."
# BLSP's generate.py: greedy, at most 128 new tokens. `do_sample=False` is explicit so that a checkpoint whose
# generation_config samples (Llama-3.1-Instruct: temperature 0.6, top_p 0.9) still decodes greedily unless asked.
DEFAULT_GENERATE_KWARGS = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
# Token ids whose text holds a newline, per tokenizer (computing them decodes the whole vocabulary once).
_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def render_prompt(processor, instruction: str | None = None, user_template: str = DEFAULT_USER_TEMPLATE) -> str:
    """The generation prompt of one request: the chat template around the user turn, ending with the assistant header.

    Args:
        processor: A `SpeechLlmProcessor`.
        instruction: The instruction; None asks `DEFAULT_INSTRUCTION`.
        user_template: Where the audio (`<audio>`) and the instruction (`{instruction}`) go in the user turn.

    Returns:
        The rendered prompt, holding one audio placeholder.

    Raises:
        ValueError: If the instruction holds the audio token (the model would look for a second clip).
    """
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    if processor.audio_token in instruction:
        raise ValueError(
            f"The instruction holds the audio token {processor.audio_token!r}: the audio goes where the user "
            "template puts it, so remove the token from the instruction (or change user_template)."
        )
    user = user_template.replace("<audio>", processor.audio_token).format(instruction=instruction)
    return processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)


def check_clip(processor, audio, sampling_rate: int | None = None) -> np.ndarray:
    """Loads one clip at the processor's rate and checks that the model accepts it on its own.

    Raises:
        ValueError: If the clip is unreadable, empty, holds NaN/inf samples, or is too short or too long for the
            encoder; the message names the problem.
    """
    waveform = processor.load_waveform(audio, sampling_rate)
    # The processor alone knows the limits (too few samples for one audio token, its max_audio_seconds).
    processor.feature_length(waveform)
    return waveform


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of the (non-special) tokens whose text holds a newline, e.g. "\\n", "\\n\\n" or ".\\n" in Llama-3."""
    if tokenizer not in _NEWLINE_IDS:
        special = set(tokenizer.all_special_ids)
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        _NEWLINE_IDS[tokenizer] = [i for i, text in enumerate(texts) if "\n" in text and i not in special]
    return _NEWLINE_IDS[tokenizer]


def build_generation_config(model, processor, *, stop_at_newline: bool = False, **generate_kwargs) -> GenerationConfig:
    """The model's generation config with this call's settings on top.

    Args:
        model: The `SpeechLlmForConditionalGeneration`.
        processor: Its processor (for the pad and newline tokens).
        stop_at_newline: Also stop a row at the first token holding a newline (the contrastive paper's evaluation
            stopped "at newline or <|eot_id|>"); the text after the newline is dropped when decoding.
        **generate_kwargs: Any `GenerationConfig` field (`max_new_tokens`, `do_sample`, `temperature`, `top_p`,
            `num_beams`, ...) over `DEFAULT_GENERATE_KWARGS`.

    Returns:
        A new `GenerationConfig`; the model's own is left untouched.

    Raises:
        ValueError: On a keyword that is not a generation setting.
    """
    settings = {**DEFAULT_GENERATE_KWARGS, **generate_kwargs}
    if not settings["do_sample"]:
        # The model's sampling defaults would only make generate() warn that they are ignored.
        settings = {**dict.fromkeys(_SAMPLING_ONLY), **settings}
    config = copy.deepcopy(model.generation_config)
    unknown = config.update(**settings, return_dict_in_generate=False)
    if unknown:
        raise ValueError(f"Unknown generation settings: {sorted(unknown)}.")
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if stop_at_newline:
        eos += [i for i in newline_token_ids(processor.tokenizer) if i not in eos]
    config.eos_token_id = eos or None
    if config.pad_token_id is None:
        config.pad_token_id = processor.tokenizer.pad_token_id
    return config


def model_inputs(model, processor, prompts: Sequence[str], waveforms: Sequence[np.ndarray]):
    """A left-padded batch of prompts and their (validated, resampled) clips on the model's device."""
    batch = processor(
        text=list(prompts),
        audio=list(waveforms),
        sampling_rate=processor.sampling_rate,
        padding=True,
        padding_side="left",  # generation appends on the right; explicit, whatever the saved tokenizer says
        add_special_tokens=False,  # the chat template writes BOS where it belongs
        return_tensors="pt",
    )
    return batch.to(model.device)


def finish_text(text: str, stop_at_newline: bool) -> str:
    """A decoded response as returned: cut at the first newline when stopping there, stripped."""
    if stop_at_newline:
        text = text.split("\n", 1)[0]
    return text.strip()


def generate_texts(
    model, processor, prompts: Sequence[str], waveforms: Sequence[np.ndarray], config: GenerationConfig
) -> list[str]:
    """Generates one batch (no validation, no sorting): the decoded new tokens of each row, untrimmed."""
    batch = model_inputs(model, processor, prompts, waveforms)
    sequences = model.generate(**batch, generation_config=config)
    return processor.batch_decode(sequences[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class SpeechLlmPipeline(Pipeline):
    """Generates text from speech (and an optional instruction) with a `SpeechLlmForConditionalGeneration`.

    ```python
    from transformers import pipeline

    pipe = pipeline(model="me/my-speech-llm", trust_remote_code=True)  # the saved config names this class
    pipe("clip.wav")                                                    # {"generated_text": "..."}
    pipe({"audio": waveform, "sampling_rate": 16000, "instruction": "Translate the audio from English to German."})
    pipe(["a.wav", "b.wav", "c.wav"], batch_size=8, max_new_tokens=64)  # a list of results, in order
    ```

    An input is what transformers' speech-recognition pipeline takes (a path, encoded bytes, a numpy array or torch
    tensor of samples, at the model's rate unless `sampling_rate=` says otherwise, a `{"raw" | "array",
    "sampling_rate"}` dict, a `datasets` Audio dict), or a dict with `audio` and optional `instruction` /
    `sampling_rate`; a plain Python list is read as a list of inputs, so give samples as an array. Call keywords:
    `instruction`, `sampling_rate`, `user_template` (where the audio and the instruction go in the user turn: the one
    the model was trained with, e.g. BLSP's `"{instruction}<audio>"`), `stop_at_newline`, `generate_kwargs` (a
    dict) and any generation setting (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `num_beams`, ...).
    Greedy, 128 new tokens by default. An unusable clip raises `ValueError`. Batches (`batch_size=`) are padded by
    the model's processor, in the order given.
    """

    # The SpeechLlmProcessor carries tokenizer and feature extractor; nothing else is loaded.
    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError('The "speech-llm" pipeline needs the model\'s SpeechLlmProcessor: pass `processor=`.')
        # Pipeline takes the processor's feature extractor to pad batches (right) with the tokenizer (left) and
        # refuses the mismatch; here preprocess emits no tensors, so the stock collation only gathers lists and
        # _forward pads with the processor.
        self.feature_extractor = None

    def _sanitize_parameters(
        self,
        instruction: str | None = None,
        sampling_rate: int | None = None,
        user_template: str | None = None,
        stop_at_newline: bool | None = None,
        generate_kwargs: dict | None = None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"instruction": instruction, "sampling_rate": sampling_rate, "user_template": user_template}
        preprocess = {key: value for key, value in preprocess.items() if value is not None}
        # Generation settings travel key by key, so that a call's settings update (not replace) the pipeline's.
        forward = {**(generate_kwargs or {}), **kwargs}
        postprocess = {}
        if stop_at_newline is not None:
            forward["stop_at_newline"] = postprocess["stop_at_newline"] = stop_at_newline
        return preprocess, forward, postprocess

    def preprocess(
        self,
        inputs: Any,
        instruction: str | None = None,
        sampling_rate: int | None = None,
        user_template: str = DEFAULT_USER_TEMPLATE,
    ) -> dict[str, Any]:
        if isinstance(inputs, dict) and "audio" in inputs:
            instruction = inputs.get("instruction", instruction)
            sampling_rate = inputs.get("sampling_rate", sampling_rate)
            inputs = inputs["audio"]
        if sampling_rate is None and hasattr(inputs, "shape"):
            # As transformers' speech-recognition pipeline reads a bare array or tensor: at the model's own rate.
            sampling_rate = self.processor.sampling_rate
        waveform = check_clip(self.processor, inputs, sampling_rate)
        return {"prompt": render_prompt(self.processor, instruction, user_template), "waveform": waveform}

    def _forward(
        self, model_inputs: dict[str, Any], stop_at_newline: bool = False, **generate_kwargs
    ) -> dict[str, Any]:
        config = build_generation_config(
            self.model, self.processor, stop_at_newline=stop_at_newline, **generate_kwargs
        )
        single = isinstance(model_inputs["prompt"], str)  # batch_size=1 items arrive uncollated
        prompts = [model_inputs["prompt"]] if single else model_inputs["prompt"]
        waveforms = [model_inputs["waveform"]] if single else model_inputs["waveform"]
        texts = generate_texts(self.model, self.processor, prompts, waveforms, config)
        # A list is split back into one item per input by the pipeline's batch iterator.
        return {"text": texts[0] if single else texts}

    def postprocess(self, model_outputs: dict[str, Any], stop_at_newline: bool = False) -> dict[str, str]:
        return {"generated_text": finish_text(model_outputs["text"], stop_at_newline)}


__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_USER_TEMPLATE",
    "PIPELINE_TASK",
    "SpeechLlmPipeline",
    "build_generation_config",
    "check_clip",
    "finish_text",
    "generate_texts",
    "model_inputs",
    "newline_token_ids",
    "render_prompt",
]
