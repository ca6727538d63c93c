"""Batched generation: (audio, instruction) requests -> response texts, robust to unusable audio.

Each request's audio is loaded and checked on its own first (unreadable, empty, NaN/inf, too short or too long for
the encoder), and so is its instruction (which must not hold the audio token), and its prompt must leave room for
`max_new_tokens` in the LLM's context: a bad row gets an `error` and never reaches a batch. Usable rows are sorted by
duration within a window of `sort_window` requests (similar lengths share a batch, so little padding is computed),
left-padded, generated together, and returned in input order. A batch whose generation fails is generated again row
by row, so that a row the model cannot answer costs only itself. Greedy decoding by default; only the new tokens are
decoded.

`stream_generate` yields the text of one request piece by piece with transformers' `TextIteratorStreamer`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from speechllm_hf.compat import text_iterator_streamer
from speechllm_hf.data.audio import AudioSource, load_audio
from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.models.speechllm.pipeline_speechllm import (
    DEFAULT_GENERATE_KWARGS,
    build_generation_config,
    finish_text,
    generate_texts,
    model_inputs,
    newline_token_ids,
    render_prompt,
)

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One clip to answer.

    Attributes:
        audio: A file path, encoded bytes, an array of samples (with `sampling_rate`) or a `datasets` Audio dict.
        instruction: The task instruction; None uses the prompt file's ASR instruction.
        sampling_rate: The rate of `audio` when it is an array without one.
    """

    audio: AudioSource
    instruction: str | None = None
    sampling_rate: int | None = None


@dataclass
class GenerationResult:
    """The answer to one request: `response` when it succeeded, else `error` saying why the row was unusable."""

    response: str | None = None
    error: str | None = None


def _as_request(request: GenerationRequest | dict) -> GenerationRequest:
    if isinstance(request, GenerationRequest):
        return request
    if request.get("audio") is None:
        raise ValueError(f"A request needs an 'audio' field; got the fields {sorted(request)}.")
    return GenerationRequest(request["audio"], request.get("instruction"), request.get("sampling_rate"))


class GenerationFailedError(RuntimeError):
    """Every row of a batch failed when generated alone as well: the cause is not one bad row (the model, the device,
    the settings), so going on would only turn every remaining row into an error."""


def context_length(model) -> int | None:
    """The LLM's context in tokens (`max_position_embeddings`), or None when its config does not say."""
    return getattr(model.language_model.config, "max_position_embeddings", None)


def check_settings(model, config, batch_size: int, sort_window: int | None) -> None:
    """Refuses batching and generation settings that no row could run with, before any row is read.

    Raises:
        ValueError: for a `batch_size` or `sort_window` that is not a positive integer, or a `max_new_tokens` that
            leaves no room for a prompt in the LLM's context.
    """
    for name, value in (("batch_size", batch_size), ("sort_window", sort_window)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    context = context_length(model)
    if context is not None and config.max_new_tokens is not None and config.max_new_tokens >= context:
        raise ValueError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for the prompt: the LLM's context is {context} "
            "tokens (prompt and response together). Ask for fewer new tokens."
        )


def check_prompt_length(model, processor, prompt: str, feature_length: int, max_new_tokens: int | None) -> None:
    """Refuses a request whose prompt (instruction and audio tokens) and `max_new_tokens` overflow the LLM's context:
    the model never saw positions beyond it, and a huge prompt would exhaust memory for the whole batch.
    `feature_length` is the clip's feature frames (`processor.feature_length`), which fix its audio-token count.

    Raises:
        ValueError: naming the prompt's length, `max_new_tokens` and the context.
    """
    context = context_length(model)
    if context is None:
        return
    [text] = processor.expand_audio_placeholders([prompt], [feature_length])
    length = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    if length + (max_new_tokens or 0) > context:
        raise ValueError(
            f"The prompt is {length} tokens (instruction, chat template and audio) and max_new_tokens is "
            f"{max_new_tokens}: together more than the LLM's context of {context} tokens. Shorten the instruction "
            "or the clip, or ask for fewer new tokens."
        )


@functools.cache
def default_prompts() -> PromptConfig:
    """The packaged prompt file, read once (callers must not modify it)."""
    return PromptConfig.from_file()


def build_prompt(processor, instruction: str | None = None, prompts: PromptConfig | None = None) -> str:
    """The generation prompt of one request: the chat template around the prompt file's user turn.

    Args:
        processor: A `SpeechLlmProcessor`.
        instruction: The instruction; None uses the prompt file's ASR instruction.
        prompts: The prompt file (`user_template`, instructions); None uses the packaged defaults.

    Returns:
        The rendered prompt, ending with the assistant header, holding one audio placeholder.
    """
    prompts = prompts or default_prompts()
    return render_prompt(
        processor, prompts.instructions["asr"] if instruction is None else instruction, prompts.user_template
    )


def load_request_audio(processor, request: GenerationRequest | dict) -> np.ndarray:
    """Loads a request's clip at the processor's rate and checks that the model accepts it on its own.

    Raises:
        ValueError: If the clip is unreadable, empty, holds NaN/inf samples, or is too short or too long for the
            encoder; the message names the problem.
    """
    return _checked_clip(processor, request)[0]


def _checked_clip(processor, request: GenerationRequest | dict) -> tuple[np.ndarray, int]:
    """`load_request_audio`'s clip and its feature frames: the processor's check of a clip gives its length too."""
    request = _as_request(request)
    waveform = load_audio(request.audio, request.sampling_rate, target_rate=processor.sampling_rate)
    return waveform, processor.feature_length(waveform)


def iter_generate(
    model,
    processor,
    requests: Iterable[GenerationRequest | dict],
    *,
    batch_size: int = 8,
    sort_window: int | None = None,
    prompts: PromptConfig | None = None,
    stop_at_newline: bool = False,
    **generate_kwargs,
) -> Iterator[tuple[int, GenerationResult]]:
    """Generates responses batch by batch, yielding `(input index, result)` as each batch finishes.

    Requests are read lazily, `sort_window` at a time: those are loaded and checked one by one (a bad clip is
    yielded at once with its `error`), sorted by duration, longest first (a batch that does not fit in memory fails
    early), and generated `batch_size` at a time. So results come in input order only across windows.

    Args:
        model: A `SpeechLlmForConditionalGeneration` (in eval mode).
        processor: Its `SpeechLlmProcessor`.
        requests: `GenerationRequest`s or dicts with `audio` and optional `instruction` / `sampling_rate`.
        batch_size: Rows generated together.
        sort_window: Requests sorted together; default 32 batches. A larger window pads less, a smaller one returns
            results in input order sooner (what a resumable writer can save).
        prompts: The prompt file; None uses the packaged defaults.
        stop_at_newline: See `build_generation_config`.
        **generate_kwargs: Generation settings (`max_new_tokens=128`, greedy by default).

    Yields:
        `(index, GenerationResult)` for every request, each exactly once. A request that cannot be answered (unusable
        audio or instruction, a prompt too long for the context, a generation that fails for this row alone) gets
        an `error`, and the others are answered.

    Raises:
        ValueError: for settings no row could run with (see `check_settings`), before any row is read.
        GenerationFailedError: when every row of a batch of several also fails alone.
    """
    config = build_generation_config(model, processor, stop_at_newline=stop_at_newline, **generate_kwargs)
    check_settings(model, config, batch_size, sort_window)
    prompts = prompts or default_prompts()
    window = sort_window or 32 * batch_size
    numbered = enumerate(requests)
    while chunk := list(itertools.islice(numbered, window)):
        ready = []
        for index, request in chunk:
            try:
                request = _as_request(request)
                waveform, feature_length = _checked_clip(processor, request)
                prompt = build_prompt(processor, request.instruction, prompts)
                check_prompt_length(model, processor, prompt, feature_length, config.max_new_tokens)
            except ValueError as err:
                logger.warning("Request %d skipped: %s", index, err)
                yield index, GenerationResult(error=str(err))
                continue
            ready.append((index, prompt, waveform))
        ready.sort(key=lambda item: -len(item[2]))  # stable: equal lengths keep their input order
        for start in range(0, len(ready), batch_size):
            batch = ready[start : start + batch_size]
            for index, result in _generate_batch(model, processor, batch, config):
                if result.response is not None:
                    result.response = finish_text(result.response, stop_at_newline)
                yield index, result


def _generate_batch(model, processor, batch: list, config) -> list[tuple[int, GenerationResult]]:
    """`(index, result)` of each `(index, prompt, waveform)` in `batch`, the responses untrimmed; when the batch fails,
    each row is generated alone and a row that fails alone gets the error.

    Raises:
        GenerationFailedError: when the batch has several rows and each of them fails alone too.
    """
    try:
        texts = generate_texts(model, processor, [p for _, p, _ in batch], [w for _, _, w in batch], config)
        return [(index, GenerationResult(response=text)) for (index, _, _), text in zip(batch, texts)]
    except Exception as err:  # noqa: BLE001 - any failure: the rows alone tell whether one of them caused it
        if len(batch) == 1:
            logger.warning("Request %d failed: %s: %s", batch[0][0], type(err).__name__, err)
            return [(batch[0][0], GenerationResult(error=f"generation failed: {type(err).__name__}: {err}"))]
        logger.warning(
            "A batch of %d rows failed (%s: %s); generating its rows one by one.", len(batch), type(err).__name__, err
        )
        batch_error = err
    results = [item for row in batch for item in _generate_batch(model, processor, [row], config)]
    if all(result.error is not None for _, result in results):
        raise GenerationFailedError(
            f"A batch of {len(batch)} rows failed, and so did each row alone ({type(batch_error).__name__}: "
            f"{batch_error}): the cause is not one bad row. Check the model, the device and the generation settings."
        ) from batch_error
    return results


def generate_responses(
    model, processor, requests: Sequence[GenerationRequest | dict], **kwargs
) -> list[GenerationResult]:
    """Generates a response for every request, batched and length-sorted; results in input order.

    Args:
        model: A `SpeechLlmForConditionalGeneration` (in eval mode).
        processor: Its `SpeechLlmProcessor`.
        requests: `GenerationRequest`s or dicts with `audio` and optional `instruction` / `sampling_rate`.
        **kwargs: `batch_size`, `sort_window`, `prompts`, `stop_at_newline` and generation settings, as for
            `iter_generate`.

    Returns:
        One `GenerationResult` per request: `response` set, or `error` for a row whose audio was unusable.
    """
    results: list[GenerationResult | None] = [None] * len(requests)
    for index, result in iter_generate(model, processor, requests, **kwargs):
        results[index] = result
    return results


class _StopEvent(StoppingCriteria):
    """Stops every row once `event` is set: a stream whose reader went away stops generating."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _tidy_stream(pieces: Iterable[str], stop_at_newline: bool) -> Iterator[str]:
    """The pieces of `finish_text(full text)`: leading whitespace dropped, trailing whitespace held back until more
    text follows, and nothing after the first newline when stopping there."""
    started, pending = False, ""
    for piece in pieces:
        done = stop_at_newline and "\n" in piece
        if done:
            piece = piece.split("\n", 1)[0]
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield pending + body
            pending = piece[len(body) :]
        else:
            pending += piece
        if done:
            return


def stream_generate(
    model,
    processor,
    audio: AudioSource,
    instruction: str | None = None,
    *,
    sampling_rate: int | None = None,
    prompts: PromptConfig | None = None,
    stop_at_newline: bool = False,
    **generate_kwargs,
) -> Iterator[str]:
    """Streams the response to one clip as text pieces while it is generated (in a background thread).

    The pieces concatenate to what `generate_responses` returns for the same request and settings.

    Args:
        model: A `SpeechLlmForConditionalGeneration` (in eval mode).
        processor: Its `SpeechLlmProcessor`.
        audio: The clip (path, bytes, array with `sampling_rate`, or `datasets` Audio dict).
        instruction: The instruction; None uses the prompt file's ASR instruction.
        sampling_rate: The rate of `audio` when it is an array.
        prompts: The prompt file; None uses the packaged defaults.
        stop_at_newline: See `build_generation_config`.
        **generate_kwargs: Generation settings (`max_new_tokens=128`, greedy by default).

    Yields:
        Text pieces.

    Raises:
        ValueError: If the clip or the instruction is unusable (before anything is yielded).
    """
    request = GenerationRequest(audio, instruction, sampling_rate)
    waveform = load_request_audio(processor, request)
    config = build_generation_config(model, processor, stop_at_newline=stop_at_newline, **generate_kwargs)
    batch = model_inputs(model, processor, [build_prompt(processor, instruction, prompts)], [waveform])
    streamer = text_iterator_streamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            model.generate(
                **batch,
                generation_config=config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopEvent(stop)]),
            )
        except Exception as err:  # re-raised in the reader's thread; end the stream so that the reader wakes up
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from _tidy_stream(streamer, stop_at_newline)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "GenerationFailedError",
    "GenerationRequest",
    "GenerationResult",
    "build_generation_config",
    "build_prompt",
    "check_prompt_length",
    "check_settings",
    "context_length",
    "default_prompts",
    "finish_text",
    "generate_responses",
    "generate_texts",
    "iter_generate",
    "load_request_audio",
    "model_inputs",
    "newline_token_ids",
    "stream_generate",
]
