"""Word timestamps by CTC forced alignment, for the mixed speech-text data of "audio_nwp" (arXiv 2412.15712).

A CTC model (`Wav2Vec2ForCTC`, `HubertForCTC`, ...) gives per-frame log-probabilities over its characters; the Viterbi
path through the CTC trellis of the transcript (blank-interleaved, 2L+1 states) assigns every character a span of
frames, and the characters of a word give the word's start and end. As in the paper's pipeline, words are upper-cased
and restricted to the aligner's alphabet; a word left with no character (digits, symbols) cannot be placed and gets
times interpolated between its neighbours; and each word starts where the previous one ended (the previous word is
extended to the next one's start: CTC places starts more surely than ends).

The Viterbi search is written here, vectorised over the trellis states, instead of calling
`torchaudio.functional.forced_align` (the maintained implementation) because torchaudio cannot be installed next to
the torch this package supports: its newest wheel (2.11.1) carries compiled extensions built for torch 2.11, and the
aligner packages on PyPI (e.g. ctc-forced-aligner, whose torch backend imports torchaudio) pull it in as well. A
search of a few lines of tensor code is not worth a hard dependency on an extension that must match the torch build.

The default aligner is the tiny one trained on the bundled corpus (`speechllm_hf/quickstart/corpus/ctc_aligner`, see
its README): it only knows that corpus. Real data needs a real aligner, e.g. `facebook/wav2vec2-base-960h` (the
paper's).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from speechllm_hf.quickstart.corpus import CORPUS_DIR

from ..data.audio import AudioSource, audio_ref, load_audio
from ..data.manifest import SAVED_DATASET_DIR, load_manifest
from .prepare import REPORT_FILE, describe_source

logger = logging.getLogger(__name__)

DEFAULT_ALIGNER: str = str(CORPUS_DIR / "ctc_aligner")
# Why a row of `align_dataset` failed: its audio cannot be loaded (missing, undecodable, empty, NaN), it has no text,
# or the aligner raised.
FAILURE_REASONS: tuple[str, ...] = ("unreadable", "missing_text", "alignment_error")
FAILED_FILE = "failed.jsonl"
WORDS_FEATURE = [
    {"word": datasets.Value("string"), "start": datasets.Value("float64"), "end": datasets.Value("float64")}
]
_REASON, _DETAIL, _REF = "__align_reason", "__align_detail", "__align_audio_ref"
_ALIGNERS: dict[str, tuple[Any, Any]] = {}  # one loaded aligner per process (Dataset.map workers load their own)


def load_aligner(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Loads a CTC model and its processor for `align_words`.

    Args:
        name_or_path: A Hub id or local folder holding a CTC model (`Wav2Vec2ForCTC`, `HubertForCTC`, ...) and its
            processor (feature extractor + CTC tokenizer); `None` loads the tiny aligner bundled with the corpus,
            which only knows that corpus (use e.g. `facebook/wav2vec2-base-960h` for real speech).
        device: Where the model runs.

    Returns:
        `(model, processor)`, the model in eval mode and in float32 (the bundled one is stored in float16).
    """
    from transformers import AutoModelForCTC, AutoProcessor

    path = DEFAULT_ALIGNER if name_or_path is None else os.fspath(name_or_path)
    model = AutoModelForCTC.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def ctc_viterbi(log_probs: torch.Tensor, targets: Sequence[int] | torch.Tensor, blank: int = 0) -> torch.Tensor | None:
    """Best CTC path of a target sequence through per-frame log-probabilities (Viterbi forced alignment).

    The trellis has the 2L+1 states of the blank-interleaved targets (blank, y1, blank, y2, ..., yL, blank). From
    state s a path may stay in s, move to s+1, or skip the blank between two labels (s-2 -> s) when they differ; it
    starts in one of the first two states and ends in one of the last two. The recursion runs over frames and is
    vectorised over all states at once; ties prefer stay, then move, then skip.

    Args:
        log_probs: (T, V) per-frame log-probabilities (log-softmax of the CTC logits).
        targets: The L label ids, none of them `blank`.
        blank: The blank id (the pad token of HF CTC models).

    Returns:
        (T,) the trellis state of every frame (label `j` is state `2j + 1`), non-decreasing; `None` when the targets
        do not fit in T frames (L labels plus one blank between each pair of equal neighbours).
    """
    targets = torch.as_tensor(targets, dtype=torch.long)  # (L,)
    num_frames, num_states = log_probs.shape[0], 2 * targets.numel() + 1
    extended = torch.full((num_states,), blank, dtype=torch.long)  # (S,)
    extended[1::2] = targets
    # float64: the path must not depend on rounding in long accumulations.
    emissions = log_probs.detach().to("cpu", torch.float64)[:, extended]  # (T, S)
    # A label may be reached from the label two states back (skipping the blank) only when the two differ.
    can_skip = torch.zeros(num_states, dtype=torch.bool)  # (S,)
    can_skip[3::2] = targets[1:] != targets[:-1]
    score = torch.full((num_states,), -math.inf, dtype=torch.float64)  # (S,)
    score[:2] = emissions[0, :2]
    backpointers = torch.zeros(num_frames, num_states, dtype=torch.int8)  # (T, S): 0 stay, 1 move, 2 skip
    blocked = torch.full((2,), -math.inf, dtype=torch.float64)
    for t in range(1, num_frames):
        moved = torch.cat([blocked[:1], score[:-1]])  # (S,) score of s - 1
        skipped = torch.cat([blocked, score[:-2]]).masked_fill(~can_skip, -math.inf)  # (S,) score of s - 2
        best, choice = torch.stack([score, moved, skipped]).max(dim=0)  # (S,), (S,)
        score = best + emissions[t]
        backpointers[t] = choice.to(torch.int8)
    final = num_states - 1 if num_states == 1 or score[-1] >= score[-2] else num_states - 2
    if score[final] == -math.inf:
        return None
    steps = backpointers.numpy()
    path = np.empty(num_frames, dtype=np.int64)
    for t in range(num_frames - 1, -1, -1):
        path[t] = final
        final -= steps[t, final]
    return torch.from_numpy(path)


def token_spans(path: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Frame spans of the labels from a `ctc_viterbi` state path.

    Args:
        path: (T,) non-decreasing trellis states.
        num_tokens: L, the number of target labels.

    Returns:
        (L, 2) `[start, end)` frame indices of each label (blank frames belong to no label).
    """
    label_states = torch.arange(num_tokens) * 2 + 1  # (L,)
    starts = torch.searchsorted(path, label_states, right=False)  # (L,)
    ends = torch.searchsorted(path, label_states, right=True)  # (L,)
    return torch.stack([starts, ends], dim=1)


def frame_seconds(model: Any, sampling_rate: int) -> float:
    """Seconds per CTC frame: the product of the conv feature encoder's strides over the sampling rate.

    Args:
        model: A wav2vec2-style CTC model (its config has `conv_stride`).
        sampling_rate: The rate of the audio the model reads.

    Returns:
        E.g. 320 / 16000 = 0.02 for HuBERT and wav2vec2.
    """
    return math.prod(model.config.conv_stride) / sampling_rate


def _alphabet(tokenizer: Any) -> tuple[set[str], bool]:
    """The characters the aligner can place (single-character tokens but specials and "|") and whether upper-case."""
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    specials = set(tokenizer.all_special_tokens) | {delimiter}
    alphabet = {token for token in tokenizer.get_vocab() if len(token) == 1 and token not in specials}
    # wav2vec2-base-960h and HuBERT spell in capitals; some aligners (e.g. MMS) in lower case.
    upper = sum(c.isupper() for c in alphabet) >= sum(c.islower() for c in alphabet)
    return alphabet, upper


def normalize_word(word: str, alphabet: set[str], upper: bool = True) -> str:
    """Upper-cases (or lower-cases, for a lower-case aligner) a word and drops characters outside the alphabet.

    Args:
        word: One word of the transcript.
        alphabet: The characters the aligner knows.
        upper: Upper-case (else lower-case) before filtering.

    Returns:
        The characters to align; empty when none is in the alphabet (the word is then interpolated).
    """
    word = word.upper() if upper else word.lower()
    return "".join(c for c in word if c in alphabet)


@torch.no_grad()
def ctc_log_probs(model: Any, processor: Any, waveform: np.ndarray) -> torch.Tensor:
    """(T, V) log-probabilities of one clip at the processor's sampling rate."""
    inputs = processor.feature_extractor(
        waveform, sampling_rate=processor.feature_extractor.sampling_rate, return_tensors="pt"
    )
    logits = model(inputs.input_values.to(model.device, model.dtype)).logits  # (1, T, V)
    return logits[0].float().log_softmax(dim=-1).cpu()


def _interpolate(times: list[tuple[float, float] | None], duration: float) -> list[tuple[float, float]]:
    """Fills each run of unplaced words by splitting the gap between its placed neighbours (or clip edges) evenly."""
    filled = list(times)
    i = 0
    while i < len(filled):
        if filled[i] is not None:
            i += 1
            continue
        j = i
        while j < len(filled) and filled[j] is None:
            j += 1
        low = filled[i - 1][1] if i > 0 else 0.0
        high = filled[j][0] if j < len(filled) else duration
        step = (high - low) / (j - i)
        for k in range(i, j):
            filled[k] = (low + (k - i) * step, low + (k - i + 1) * step)
        i = j
    return filled


def align_words(
    model: Any,
    processor: Any,
    waveform: AudioSource,
    transcript: str,
    *,
    sampling_rate: int | None = None,
    contiguous: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Word timestamps of a transcript in a clip, by CTC forced alignment.

    Words (whitespace-separated) are upper-cased and restricted to the aligner's alphabet, joined by its word delimiter
    ("|") and aligned with `ctc_viterbi`; a word spans its characters' frames. A word with no character in the alphabet
    (or every word, when the transcript does not fit in the clip's frames) gets times interpolated between its
    neighbours.

    Args:
        model: A CTC model (`Wav2Vec2ForCTC`, `HubertForCTC`, ...) whose config has `conv_stride`; see `load_aligner`.
        processor: Its processor (feature extractor + CTC tokenizer with `word_delimiter_token`).
        waveform: The clip: anything `load_audio` accepts (a path, bytes, a `datasets` Audio dict or samples).
        transcript: Its transcript.
        sampling_rate: The rate of `waveform` when it is an array at another rate than the processor's.
        contiguous: Leave no gap between words, the paper's convention (each word starts where the previous one
            ended, so speech spans cut from these times cover the pauses too). The boundary is the next word's
            aligned start, whose time CTC gets right; a word's end is less sure (its last letter fires before its
            sound ends), so each word is extended to the next one. `False` keeps the aligned ends, e.g. to measure
            alignment.

    Returns:
        `(words, num_interpolated)`: one `{"word", "start", "end"}` dict per transcript word, the word as written in
        the transcript and the times in seconds (rounded to ms, non-decreasing), and how many words were
        interpolated.

    Raises:
        ValueError: If the clip cannot be decoded.
    """
    rate = processor.feature_extractor.sampling_rate
    audio = load_audio(waveform, sampling_rate or rate, target_rate=rate)
    words = transcript.split()
    if not words:
        return [], 0
    tokenizer = processor.tokenizer
    alphabet, upper = _alphabet(tokenizer)
    normalized = [normalize_word(word, alphabet, upper) for word in words]
    vocab = tokenizer.get_vocab()
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    delimiter_id = vocab.get(delimiter) if delimiter else None
    targets: list[int] = []
    token_ranges: dict[int, tuple[int, int]] = {}  # word index -> its first and last target index
    for index, chars in enumerate(normalized):
        if not chars:
            continue
        if targets and delimiter_id is not None:
            targets.append(delimiter_id)
        token_ranges[index] = (len(targets), len(targets) + len(chars) - 1)
        targets.extend(vocab[c] for c in chars)

    times: list[tuple[float, float] | None] = [None] * len(words)
    if targets:
        blank = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
        path = ctc_viterbi(ctc_log_probs(model, processor, audio), targets, blank)
        if path is None:
            logger.warning("The transcript (%d tokens) does not fit in the clip; interpolating it.", len(targets))
        else:
            spans = token_spans(path, len(targets)).tolist()
            seconds = frame_seconds(model, rate)
            for index, (first, last) in token_ranges.items():
                times[index] = (spans[first][0] * seconds, spans[last][1] * seconds)
    num_interpolated = sum(t is None for t in times)
    filled = _interpolate(times, len(audio) / rate)
    if contiguous:
        filled = [(start, filled[i + 1][0] if i + 1 < len(filled) else end) for i, (start, end) in enumerate(filled)]
    timed = [{"word": w, "start": round(s, 3), "end": round(e, 3)} for w, (s, e) in zip(words, filled)]
    return timed, num_interpolated


def _align_row(audio: Any, text: Any, *, aligner: str, contiguous: bool, threads: int | None) -> dict[str, Any]:
    """`Dataset.map` function: one row's words, or its failure reason and detail."""
    if aligner not in _ALIGNERS:
        if threads is not None:  # one thread per worker process: num_proc workers share the cores
            torch.set_num_threads(threads)
        _ALIGNERS[aligner] = load_aligner(aligner)
    model, processor = _ALIGNERS[aligner]
    result = {"words": [], "num_interpolated": 0, _REASON: "", _DETAIL: "", _REF: audio_ref(audio)}
    if not isinstance(text, str) or not text.strip():
        return {**result, _REASON: "missing_text", _DETAIL: f"text {text!r}"}
    try:
        waveform = load_audio(audio, target_rate=processor.feature_extractor.sampling_rate)
    except Exception as err:  # any failure is this row's problem, never the run's
        return {**result, _REASON: "unreadable", _DETAIL: f"{type(err).__name__}: {err}"}
    try:
        words, num_interpolated = align_words(model, processor, waveform, text, contiguous=contiguous)
    except Exception as err:
        return {**result, _REASON: "alignment_error", _DETAIL: f"{type(err).__name__}: {err}"}
    return {**result, "words": words, "num_interpolated": num_interpolated}


def align_dataset(
    source: str | os.PathLike | datasets.Dataset,
    output_dir: str | os.PathLike | None = None,
    *,
    aligner: str | os.PathLike | None = None,
    num_proc: int = 1,
    audio_column: str = "audio",
    text_column: str = "text",
    contiguous: bool = True,
    dataset_config: str | None = None,
    split: str | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Word-aligns every row of a manifest with `align_words`; rows that fail are reported, never silently dropped.

    Args:
        source: Anything `load_manifest` accepts: a jsonl file, a parquet file or folder, a `datasets` source (a
            saved dataset, an audiofolder, a Hub dataset id or repo folder, ...), or a `datasets.Dataset`.
        output_dir: If given, the aligned rows are saved to `output_dir/dataset` (`load_prepared(output_dir)` reads
            them back), the report to `output_dir/report.json` and, when rows failed, one line per failed row
            (`index`, `audio`, `reason`, `detail`) to `output_dir/failed.jsonl`.
        aligner: A CTC model id or folder for `load_aligner`; `None` is the tiny aligner bundled with the corpus
            (only good for that corpus: use e.g. `facebook/wav2vec2-base-960h`, the paper's, for real speech).
        num_proc: Processes for `Dataset.map` (each loads the aligner and runs one torch thread).
        audio_column: The audio column (path, `{"bytes", "path"}` or `{"array", "sampling_rate"}`).
        text_column: The transcript column.
        contiguous: Each word starts where the previous ended (see `align_words`).
        dataset_config: The config of a Hub dataset `source` (`load_manifest`).
        split: The split of a `source` that has splits (`load_manifest`).

    Returns:
        `(aligned, report)`: the aligned rows with every input column plus `words` (`[{"word", "start", "end"}]`,
        seconds) and `num_interpolated`; and the report `{"total", "aligned", "failed": {reason: count for every
        reason in FAILURE_REASONS}, "words", "interpolated_words", "rows_with_interpolated_words", "aligner",
        "source"}`, where aligned + failed = total.

    Raises:
        ValueError: If the manifest cannot be loaded (see `load_manifest`), e.g. `split` names none of its splits.
    """
    aligner_path = DEFAULT_ALIGNER if aligner is None else os.fspath(aligner)
    dataset = load_manifest(
        source, audio_column=audio_column, text_column=text_column, dataset_config=dataset_config, split=split
    )
    feature = dataset.features[audio_column]
    if isinstance(feature, dict) and "array" in feature:
        dataset = dataset.with_format("numpy", columns=[audio_column], output_all_columns=True)
    checked = dataset.map(
        _align_row,
        input_columns=[audio_column, text_column],
        fn_kwargs={"aligner": aligner_path, "contiguous": contiguous, "threads": 1 if num_proc > 1 else None},
        num_proc=num_proc if num_proc > 1 else None,
        load_from_cache_file=False,  # the audio or the aligner may have changed behind the same arguments
        desc="Aligning words",
    ).with_format(None)
    checked = checked.cast_column("words", WORDS_FEATURE)  # an all-failed run would infer a null type
    rows = checked.select_columns([_REASON, _DETAIL, _REF, "words", "num_interpolated"]).to_dict()
    reasons = rows[_REASON]
    kept = [i for i, reason in enumerate(reasons) if not reason]
    failed = {reason: sum(r == reason for r in reasons) for reason in FAILURE_REASONS}
    interpolated = [rows["num_interpolated"][i] for i in kept]
    report = {
        "total": len(dataset),
        "aligned": len(kept),
        "failed": failed,
        "words": sum(len(rows["words"][i]) for i in kept),
        "interpolated_words": sum(interpolated),
        "rows_with_interpolated_words": sum(n > 0 for n in interpolated),
        "aligner": aligner_path,
        "source": describe_source(source),
    }
    assert report["aligned"] + sum(failed.values()) == report["total"], f"rows went missing: {report}"
    logger.info(
        "Aligned %d of %d rows with %s; %d of %d words interpolated; failed: %s.",
        report["aligned"],
        report["total"],
        aligner_path,
        report["interpolated_words"],
        report["words"],
        ", ".join(f"{count} {reason}" for reason, count in failed.items() if count) or "none",
    )
    aligned = checked.select(kept).remove_columns([_REASON, _DETAIL, _REF])
    if output_dir is not None:
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        aligned.save_to_disk(str(output / SAVED_DATASET_DIR))
        (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        failures = [
            {"index": i, "audio": ref, "reason": reason, "detail": detail}
            for i, (reason, detail, ref) in enumerate(zip(reasons, rows[_DETAIL], rows[_REF]))
            if reason
        ]
        failed_path = output / FAILED_FILE
        if failures:
            with open(failed_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in failures)
        else:
            failed_path.unlink(missing_ok=True)  # a stale list from an earlier run would blame rows that now align
    return aligned, report


__all__ = [
    "DEFAULT_ALIGNER",
    "FAILURE_REASONS",
    "align_dataset",
    "load_aligner",
    "ctc_viterbi",
    "token_spans",
    "frame_seconds",
    "normalize_word",
    "ctc_log_probs",
    "align_words",
]
