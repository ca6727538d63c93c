"""Continuation writing (BLSP, arXiv 2309.00916): a text LLM continues every transcript of a manifest.

The speech model is later trained to write the same continuation from the audio (`speechllm-hf train --method
continuation`), so that the LLM behaves the same whether it reads the transcript or hears it.

- Prompt: BLSP's `###[Human]:Continue the following text in a coherent and engaging style with less than 40 words.
  {transcript}\\n\\n\\n###[Assistant]:` after BOS, or (`style="chat"`) the tokenizer's chat template with a user
  message holding the same instruction and transcript, for instruct models. Greedy decoding, left padding, stop at EOS.
- Prompts of `max_input_tokens` (192) tokens or more (BOS included, as in the original's `length < 192` filter) and
  rows without a transcript are dropped; so are rows whose continuation comes out empty, which the continuation task
  could not train on. `F.report.json` beside the output counts every reason.
- Output column: each output row is the input row (all its fields) plus the continuation under `continuation`, the
  column `speechllm_hf.data.tasks` reads for the continuation task. BLSP's script wrote `{"audio", "text"}` with the
  continuation as `text`; here `text` keeps the transcript, which the KL teacher and ASR need (`output_column`
  overrides the name).
- Distribution: processes started by `accelerate launch` (or torchrun) take every `num_processes`-th pending row;
  each appends to its own part file in `F.parts/`, one flushed line `{"index", "continuation"}` per row, batch by
  batch. When all are done, the main process writes the rows in input order to `F` and removes `F.parts/`.
- Resume: rerunning the same command after a crash skips the rows already in `F.parts/` (a half-written last line is
  discarded), so the output has each kept row exactly once whatever the number of processes. `F.parts/settings.json`
  records the model, prompts and decoding settings; a rerun with other settings is refused instead of mixing
  continuations of two set-ups. Once `F` is complete `F.parts/` is gone, and running again writes `F` anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..data.manifest import load_manifest
from ..data.prompts import continuation_request
from ..data.tasks import RESPONSE_COLUMNS, PromptConfig

logger = logging.getLogger(__name__)

# The prompt files hold it, for the speech model's continuation task; one text serves both.
BLSP_CONTINUATION_INSTRUCTION = PromptConfig.from_file("blsp").instructions["continuation"]
# BLSP's data_process/asr_text_generation.py around `continuation_request`; the tokenizer adds BOS in front.
BLSP_TEXT_TEMPLATE = "###[Human]:{request}\n\n\n###[Assistant]:"
PROMPT_STYLES = ("blsp", "chat")
DROP_REASONS = ("missing_text", "too_long", "empty_continuation")
OUTPUT_COLUMN = RESPONSE_COLUMNS["continuation"]
OUTPUT_COLUMN_NOTE = (
    "The continuation is written under {column!r} and the input's fields are kept (relative audio paths made "
    "absolute), so 'text' still holds the transcript: BLSP's script wrote the continuation as 'text', but the "
    "continuation task reads 'continuation' and the KL teacher needs the transcript."
)
_TOKENIZE_CHUNK = 4096


@dataclass
class ContinuationPrompt:
    """Builds the text LLM's prompt for one transcript.

    Args:
        tokenizer: The text LLM's tokenizer.
        style: "blsp" (BLSP's `###[Human]:` format after BOS) or "chat" (the tokenizer's chat template).
        instruction: The instruction placed before the transcript.
        system_prompt: With "chat": a system message before the request (None: the template's default, if any).
    """

    tokenizer: object
    style: str = "blsp"
    instruction: str = BLSP_CONTINUATION_INSTRUCTION
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"Unknown prompt style {self.style!r}; choose one of {', '.join(PROMPT_STYLES)}.")
        if self.style == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("The tokenizer has no chat template: use the 'blsp' prompt style.")
        if self.style == "blsp" and self.system_prompt:
            raise ValueError("BLSP's prompt has no system message: a system prompt needs the 'chat' style.")

    def text(self, transcript: str) -> str:
        """The prompt as text (for "blsp" without the BOS token, which `encode` adds)."""
        request = continuation_request(self.instruction, transcript)
        if self.style == "blsp":
            return BLSP_TEXT_TEMPLATE.format(request=request)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": request})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, transcripts: Sequence[str]) -> list[list[int]]:
        """Token ids of the prompts, BOS first for "blsp" (when the tokenizer has one; chat templates write it)."""
        ids = self.tokenizer([self.text(t) for t in transcripts], add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.style == "blsp" and bos is not None:
            ids = [[bos] + row for row in ids]
        return ids


def make_normalizer(spelling_file: str | os.PathLike | None = None) -> Callable[[str], str]:
    """Whisper's English text normaliser, as transformers ships it.

    Its British -> American spelling table is `normalizer.json` of a Whisper tokenizer repo (what
    `WhisperTokenizer.normalize` loads), which is not part of transformers. Without `spelling_file` the normaliser
    runs with an empty table: everything else (lower case, punctuation, numbers, contractions, ...) is applied, and
    spellings stay as written.

    Args:
        spelling_file: A Whisper `normalizer.json` (e.g. from a local copy of `openai/whisper-small`).

    Returns:
        A function from text to normalised text.
    """
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = {}
    if spelling_file is not None:
        with open(spelling_file, encoding="utf-8") as file:
            mapping = json.load(file)
    return EnglishTextNormalizer(mapping)


def report_path(output_file: str | os.PathLike) -> Path:
    """`F.report.json` for the output `F.jsonl`."""
    return Path(output_file).with_suffix(".report.json")


def parts_dir(output_file: str | os.PathLike) -> Path:
    """`F.parts/`, where the processes write their rows until the output is complete."""
    return Path(output_file).with_suffix(".parts")


def write_continuations(
    model,
    tokenizer,
    source,
    output_file: str | os.PathLike,
    *,
    model_name: str,
    state=None,
    text_column: str = "text",
    audio_column: str = "audio",
    output_column: str = OUTPUT_COLUMN,
    style: str = "blsp",
    instruction: str = BLSP_CONTINUATION_INSTRUCTION,
    system_prompt: str | None = None,
    max_new_tokens: int = 64,
    max_input_tokens: int = 192,
    batch_size: int = 16,
    normalizer: Callable[[str], str] | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
) -> dict | None:
    """Writes one continuation per usable row of `source` to the JSON-lines file `output_file`.

    Call it on every process (see the module docstring for the split, the part files and resuming).

    Args:
        model: The text LLM (a causal LM), on `state.device`.
        tokenizer: Its tokenizer.
        source: Anything `load_manifest` accepts: a manifest (jsonl, parquet file or folder), a `datasets` source
            (a saved dataset, an audiofolder, a Hub dataset id or repo folder, ...) or a `datasets.Dataset`, whose
            rows can be written as JSON lines (audio as file paths, not bytes); audio paths in file manifests are
            written back resolved to absolute paths, so that the output can live in any folder.
        output_file: The output `.jsonl`; the report goes to `report_path(output_file)`.
        model_name: What the model is (an id, a folder, a preset and seed), recorded to refuse a resume with another.
        state: An `accelerate.PartialState`; a new one by default.
        text_column: The transcript column.
        audio_column: The audio column (must exist; kept as is).
        output_column: The column that receives the continuation.
        style: "blsp" or "chat" (see `ContinuationPrompt`).
        instruction: The instruction before the transcript.
        system_prompt: With style "chat": a system message before the request.
        max_new_tokens: Longest continuation, in tokens.
        max_input_tokens: Prompts of this many tokens or more are dropped.
        batch_size: Prompts per `generate` call on each process.
        normalizer: Applied to transcripts before prompting (e.g. `make_normalizer()`); the output keeps the row's
            own text.
        dataset_config: The config of a Hub dataset `source` (`load_manifest`).
        split: The split of a `source` that has splits (`load_manifest`).

    Returns:
        On the main process the report `{"total", "kept", "dropped": {reason: count}, "output_column", ...}`
        (also written to `F.report.json`); None on the other processes.

    Raises:
        ValueError: If the manifest cannot be read or written as JSON lines, or `F.parts/` holds rows written with
            other settings.
    """
    from accelerate import PartialState

    state = state if state is not None else PartialState()
    prompt = ContinuationPrompt(tokenizer, style, instruction, system_prompt)
    output_file = Path(output_file)
    with state.main_process_first():  # the main process fills the datasets cache, the others read it
        dataset = load_manifest(
            source, audio_column=audio_column, text_column=text_column, dataset_config=dataset_config, split=split
        )
    if len(dataset):
        try:
            json.dumps(dataset[0])
        except TypeError as err:
            raise ValueError(
                f"The rows of {source} cannot be written as JSON lines ({err}): store the audio as file paths."
            ) from err

    transcripts, lengths, dropped, fingerprint = _prepare_prompts(
        dataset[text_column], prompt, normalizer, max_input_tokens
    )
    kept = sorted(lengths)
    settings = {
        "model": model_name,
        "style": style,
        "instruction": instruction,
        "max_new_tokens": max_new_tokens,
        "max_input_tokens": max_input_tokens,
        "text_column": text_column,
        "normalize": normalizer is not None,
        "prompts_sha256": fingerprint,
    }
    parts = parts_dir(output_file)
    part_file = parts / f"part-{state.process_index:05d}.jsonl"
    _check_settings(parts, settings)
    _drop_partial_line(part_file)
    state.wait_for_everyone()  # every part file is whole and unchanged while each process reads them all
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        (parts / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    done = _read_parts(parts)
    state.wait_for_everyone()  # nobody appends before everyone has the same view of what is done
    pending = [i for i in kept if i not in done]
    if done:
        logger.info(
            "Resuming from %s: %d of %d continuations already written.", parts, len(kept) - len(pending), len(kept)
        )
    # Longest prompts first within each process: batches of similar length pad little, and memory peaks early.
    mine = sorted(pending[state.process_index :: state.num_processes], key=lambda i: -lengths[i])
    logger.info("Process %d of %d: %d continuations to write.", state.process_index, state.num_processes, len(mine))
    if mine:
        _generate(model, tokenizer, prompt, transcripts, mine, part_file, max_new_tokens, batch_size, state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    report = _merge(dataset, kept, parts, output_file, output_column, dropped, settings, source)
    shutil.rmtree(parts)
    return report


def _prepare_prompts(
    texts: list, prompt: ContinuationPrompt, normalizer: Callable[[str], str] | None, max_input_tokens: int
) -> tuple[dict[int, str], dict[int, int], dict[str, int], str]:
    """(usable transcripts by row, prompt lengths of the kept rows, drop counts, fingerprint of the kept prompts)."""
    transcripts: dict[int, str] = {}
    dropped = {reason: 0 for reason in DROP_REASONS}
    for index, text in enumerate(texts):
        text = normalizer(text) if normalizer is not None and isinstance(text, str) else text
        if isinstance(text, str) and text.strip():
            transcripts[index] = text.strip()
        else:
            dropped["missing_text"] += 1
    lengths: dict[int, int] = {}
    digest = hashlib.sha256()
    indices = list(transcripts)
    for start in range(0, len(indices), _TOKENIZE_CHUNK):  # lengths only: token ids of a large manifest would not fit
        chunk = indices[start : start + _TOKENIZE_CHUNK]
        for index, ids in zip(chunk, prompt.encode([transcripts[i] for i in chunk])):
            if len(ids) >= max_input_tokens:
                dropped["too_long"] += 1
                continue
            lengths[index] = len(ids)
            digest.update(json.dumps([index, ids]).encode())
    return transcripts, lengths, dropped, digest.hexdigest()


def _check_settings(parts: Path, settings: dict) -> None:
    path = parts / "settings.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
    if changed:
        raise ValueError(
            f"{parts} holds continuations written with other settings ({', '.join(changed)} differ): resume with the "
            "same manifest, model and options, or delete that folder to start over."
        )


def _drop_partial_line(path: Path) -> None:
    """Cut a line that a killed process left half-written, so that appended lines start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def _read_parts(parts: Path) -> dict[int, str]:
    """Continuations by row index from every part file (of this run or of an earlier one with other processes)."""
    done: dict[int, str] = {}
    for path in sorted(parts.glob("part-*.jsonl")):
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed process
                    continue
                done.setdefault(row["index"], row["continuation"])
    return done


def _generate(
    model,
    tokenizer,
    prompt: ContinuationPrompt,
    transcripts: dict[int, str],
    indices: list[int],
    part_file: Path,
    max_new_tokens: int,
    batch_size: int,
    state,
) -> None:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # An explicit config: the checkpoint's sampling defaults (temperature, top_p) would otherwise be mixed in.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad
    )
    device = state.device
    model.eval()
    progress = tqdm(total=len(indices), desc="Writing continuations", unit="row", disable=not state.is_main_process)
    with open(part_file, "a", encoding="utf-8") as part:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            ids = prompt.encode([transcripts[i] for i in batch])
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
            attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
                )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            part.writelines(
                json.dumps({"index": i, "continuation": text.strip()}, ensure_ascii=False) + "\n"
                for i, text in zip(batch, texts)
            )
            part.flush()
            os.fsync(part.fileno())  # a batch survives a crash once it is written
            progress.update(len(batch))
    progress.close()


def _merge(
    dataset,
    kept: list[int],
    parts: Path,
    output_file: Path,
    output_column: str,
    dropped: dict[str, int],
    settings: dict,
    source,
) -> dict:
    """Writes the kept rows in input order with their continuations, then the report."""
    done = _read_parts(parts)
    missing = [i for i in kept if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no continuation in {parts} (first: row {missing[0]}).")
    if output_column in dataset.column_names:
        logger.warning("The input already has a %r column: it is replaced by the new continuations.", output_column)
    dropped = dict(dropped)
    written = 0
    wanted = set(kept)
    temporary = output_file.with_name(output_file.name + ".tmp")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    with open(temporary, "w", encoding="utf-8") as output:
        for index, row in enumerate(dataset):
            if index not in wanted:
                continue
            if not done[index]:
                dropped["empty_continuation"] += 1
                continue
            output.write(json.dumps({**row, output_column: done[index]}, ensure_ascii=False) + "\n")
            written += 1
    os.replace(temporary, output_file)  # the output appears complete or not at all
    report = {
        "total": len(dataset),
        "kept": written,
        "dropped": dropped,
        "output_column": output_column,
        "output_column_note": OUTPUT_COLUMN_NOTE.format(column=output_column),
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "output": str(output_file),
        "settings": settings,
    }
    assert report["kept"] + sum(dropped.values()) == report["total"], f"rows went missing: {report}"
    report_path(output_file).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "Wrote %d continuations of %d rows to %s; dropped %s.",
        written,
        report["total"],
        output_file,
        ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count) or "none",
    )
    return report


__all__ = [
    "BLSP_CONTINUATION_INSTRUCTION",
    "BLSP_TEXT_TEMPLATE",
    "PROMPT_STYLES",
    "DROP_REASONS",
    "OUTPUT_COLUMN",
    "ContinuationPrompt",
    "make_normalizer",
    "report_path",
    "parts_dir",
    "write_continuations",
]
