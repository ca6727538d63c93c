"""The "speech-llm" transformers pipeline: audio (+ optional instruction) -> generated text.

```python
import speechllm_hf.inference  # registers the task
from transformers import pipeline

pipe = pipeline("speech-llm", model=model, processor=processor)  # or model="saved/folder", trust_remote_code=True
pipe("clip.wav")                                           # {"generated_text": "..."}
pipe({"audio": waveform, "sampling_rate": 16000, "instruction": "Translate the audio from English to German."})
pipe(["a.wav", "b.wav", "c.wav"], batch_size=8, max_new_tokens=64)  # a list of results, in order
```

An input is anything `speechllm_hf.data.audio.load_audio` reads (a path, encoded bytes, a numpy array with
`sampling_rate=`, a `datasets` Audio dict), or a dict with `audio` and optional `instruction` / `sampling_rate`; a
plain Python list is read as a list of inputs, so give samples as a numpy array. Call keywords: `instruction`,
`sampling_rate`, `prompts` (a `PromptConfig`), `stop_at_newline`, `generate_kwargs` (a dict) and any generation
setting (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `num_beams`, ...). Greedy, 128 new tokens by default,
as `speechllm_hf.inference.generate`; an unusable clip raises `ValueError`. The pipeline batches inputs in the order
given; for large jobs, `generate_responses` also sorts them by duration and reports bad clips instead of raising.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from speechllm_hf.data.tasks import PromptConfig

from .generate import (
    GenerationRequest,
    build_generation_config,
    build_prompt,
    finish_text,
    generate_texts,
    load_request_audio,
)

TASK = "speech-llm"


class SpeechLlmPipeline(Pipeline):
    """Generates text from speech (and an optional instruction) with a `SpeechLlmForConditionalGeneration`.

    Batches (`batch_size=`) are padded by the model's processor, as in `speechllm_hf.inference.generate`; results
    equal that module's for the same requests and settings.
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
        prompts: PromptConfig | None = None,
        stop_at_newline: bool | None = None,
        generate_kwargs: dict | None = None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"instruction": instruction, "sampling_rate": sampling_rate, "prompts": prompts}
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
        prompts: PromptConfig | None = None,
    ) -> dict[str, Any]:
        if isinstance(inputs, dict) and "audio" in inputs:
            request = GenerationRequest(
                inputs["audio"],
                inputs.get("instruction", instruction),
                inputs.get("sampling_rate", sampling_rate),
            )
        else:
            request = GenerationRequest(inputs, instruction, sampling_rate)
        waveform = load_request_audio(self.processor, request)
        return {"prompt": build_prompt(self.processor, request.instruction, prompts), "waveform": waveform}

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


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SpeechLlmPipeline, pt_model=AutoModel, type="multimodal")

__all__ = ["SpeechLlmPipeline", "TASK"]
