"""`speechllm-hf generate --model DIR_OR_ID | --preset NAME --input_file in.jsonl --output_file out.jsonl`.

BLSP's jsonl format: each input line holds `audio` (a path; relative paths resolve against the input file's folder)
and optionally `instruction` (else `--instruction`, else the prompt file's ASR instruction) and `reference`; every
field is kept and `response` is added. A row that cannot be answered (unusable audio or instruction, a prompt too long
for the model's context, a generation that fails for that row alone) gets `response: null`, an `error` field with the
reason and its `row` number (from 0), and the others are answered; the summary at the end counts both.

`--input_file` may also be any other source `load_manifest` reads (a parquet or Arrow file, a `save_to_disk` folder, an
audiofolder, a Hub dataset or a folder laid out as one; `--dataset_config`, `--split`, `--audio_column`). The output
is jsonl all the same: its audio is a path or a reference such as "<bytes>" (`audio_ref`), never the clip's data, and
fields JSON cannot hold are left out.

Output rows are written in input order and flushed as soon as the rows before them are done. Rerunning with the same
files resumes: the rows already in the output file are skipped (a line cut off by a kill is dropped and redone),
so the finished file equals one uninterrupted run, without duplicates. Error rows count as done: a rerun does not try
them again (docs/reliability.md says how to retry them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import add_source_arguments

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to load (`--model` or `--preset` with its backbones), its prompt format and prompts, where to run
    it."""
    from speechllm_hf.presets import PRESETS

    from .model_arguments import BackboneArguments, PromptArguments, QuantizationArguments, add_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved model folder or Hub id (projector-only or full save)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="build a preset instead (tiny: random, offline)")
    add_arguments(parser, BackboneArguments, PromptArguments, QuantizationArguments)
    parser.add_argument("--prompts", help="prompt file: default, blsp or a YAML path (user_template, instructions)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights' dtype")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling and a preset's random weights")


def add_batch_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """The parser of a command that loads a model and answers many rows in duration-sorted batches."""
    parser = subparsers.add_parser(name, help=help)
    add_model_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sort_window", type=int, help="rows sorted by duration together (default 32 batches)")
    return parser


def load_model_and_processor(args: argparse.Namespace):
    """`(model, processor)` from `--model` or `--preset`, in eval mode on `--device`."""
    import torch

    from . import model_arguments

    torch.manual_seed(args.seed)
    dtype = {"dtype": args.dtype} if args.dtype else {}
    model, processor = model_arguments.load_model_and_processor(args, **dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def generation_settings(args: argparse.Namespace) -> dict:
    """The generation keywords the command line set (sampling ones only when given)."""
    settings = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.do_sample}
    settings.update({k: getattr(args, k) for k in ("temperature", "top_p") if getattr(args, k) is not None})
    return settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_batch_parser(
        subparsers,
        "generate",
        help="answer audio (+ instruction) rows in batches (BLSP's jsonl, or a datasets source); resumable",
    )
    parser.add_argument(
        "--input_file",
        required=True,
        help="BLSP's jsonl (audio, optional instruction and reference), or a datasets source: parquet or Arrow file, "
        "save_to_disk folder, audiofolder, Hub dataset id or a folder laid out as one",
    )
    add_source_arguments(parser)
    parser.add_argument("--audio_column", default="audio", help="the column holding each row's audio")
    parser.add_argument("--output_file", required=True, help="jsonl: the input rows with `response` added")
    parser.add_argument("--instruction", help="instruction for rows without one (default: the ASR instruction)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--stop_at_newline", action="store_true", help="end each response at its first newline")
    parser.add_argument(
        "--max_audio_seconds", type=float, help="longest clip answered (default: the processor's, 600 s)"
    )
    parser.set_defaults(func=run)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def is_jsonl(path: Path) -> bool:
    """Whether an input is read as BLSP's jsonl: any file but parquet and Arrow ones, whatever its name says."""
    from speechllm_hf.data.manifest import PARQUET_SUFFIX
    from speechllm_hf.data.sources import ARROW_SUFFIX

    return path.is_file() and path.suffix.lower() not in (PARQUET_SUFFIX, ARROW_SUFFIX)


def read_input(args: argparse.Namespace) -> Sequence[dict]:
    """The input rows: BLSP's jsonl line by line, a line that is not a JSON object kept under `input` (a bad row like
    any other, reported in its error row); any other source through `load_manifest`, its audio left undecoded.

    Raises:
        ValueError: If the source cannot be read (`load_manifest`'s message), or --dataset_config / --split is given
            for a jsonl.
        OSError, json.JSONDecodeError: If the jsonl cannot be read.
    """
    from speechllm_hf.data import sources
    from speechllm_hf.data.manifest import load_manifest

    path = Path(args.input_file)
    if not is_jsonl(path):
        return load_manifest(
            args.input_file,
            audio_column=args.audio_column,
            text_column=None,
            dataset_config=args.dataset_config,
            split=args.split,
        )
    sources.no_split_options(f"Input file {args.input_file!r}", args.dataset_config, args.split)
    return [row if isinstance(row, dict) else {"input": row} for row in read_jsonl(path)]


def completed_rows(path: Path) -> list[dict]:
    """The complete rows of an output file left by an earlier run; a trailing partial line is cut off the file."""
    if not path.exists():
        return []
    rows, keep = [], 0
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            rows.append(row)
            keep += len(line)
    if keep < path.stat().st_size:
        logger.warning("Dropping an incomplete last line of %s (an interrupted write); it is redone.", path)
        with open(path, "r+b") as file:
            file.truncate(keep)
    return rows


def _resolve_audio(audio, base: Path | None):
    """A jsonl's relative audio path against its folder `base` (None for other sources: load_manifest resolves)."""
    if base is None or not isinstance(audio, str) or os.path.isabs(audio):
        return audio
    return str(base / audio)


def _instruction(row: dict, default: str | None) -> str | None:
    return row["instruction"] if row.get("instruction") is not None else default


def _request(row: dict, audio_column: str, base: Path | None, default_instruction: str | None) -> dict:
    """The generation request of an input row; a row without audio keeps its own fields, which its error names."""
    request = {**row, "instruction": _instruction(row, default_instruction)}
    request.pop("audio", None)  # the clip is the audio column's, whatever a field named `audio` holds
    if row.get(audio_column) is not None:
        request["audio"] = _resolve_audio(row[audio_column], base)
    return request


def _written_audio(audio):
    """An input row's audio as its output row holds it: a path (or any JSON scalar a jsonl line held) as it is, clip
    data (a `{"bytes", "path"}` or `{"array", "sampling_rate"}` dict, samples, bytes) as `audio_ref` names it: the
    output file stays small and JSON, and a rerun compares these references to resume."""
    from speechllm_hf.data.audio import audio_ref

    return audio if audio is None or isinstance(audio, (str, int, float)) else audio_ref(audio)


def _holds_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def output_fields(row: dict, audio_column: str) -> dict:
    """The fields of an input row that its output row keeps: every one JSON can hold (a jsonl line's are all kept),
    the audio written as `_written_audio` says."""
    if audio_column in row:
        row = {**row, audio_column: _written_audio(row[audio_column])}
    return {key: value for key, value in row.items() if _holds_json(value)}


def output_problem(input_path: Path, output_path: Path) -> str | None:
    """Why `output_path` cannot receive the output of `input_path` (None when it can); creates its folder."""
    if output_path.resolve() == input_path.resolve() or (output_path.exists() and output_path.samefile(input_path)):
        return (
            f"--output_file {output_path} is the input file: the output rows would replace the rows being read. "
            "Choose another --output_file."
        )
    if output_path.is_dir():
        return f"--output_file {output_path} is a folder: give a file path, e.g. {output_path / 'output.jsonl'}."
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the folder of --output_file {output_path}: {err}."
    return None


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.inference.generate import GenerationFailedError, iter_generate

    input_path, output_path = Path(args.input_file), Path(args.output_file)
    try:
        rows = read_input(args)
    except ValueError as err:  # load_manifest's sentence: a missing source, split or column
        print(f"speechllm-hf generate: error: {err}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as err:
        print(f"speechllm-hf generate: error: cannot read {input_path}: {err}", file=sys.stderr)
        return 2
    problem = output_problem(input_path, output_path)
    if problem:
        print(f"speechllm-hf generate: error: {problem}", file=sys.stderr)
        return 2
    done = completed_rows(output_path)
    column = args.audio_column
    mismatch = len(done) > len(rows) or any(d.get(column) != _written_audio(r.get(column)) for d, r in zip(done, rows))
    if mismatch:
        print(
            f"speechllm-hf generate: error: {output_path} does not continue {input_path} (more rows, or other audio): "
            "remove it or choose another --output_file.",
            file=sys.stderr,
        )
        return 2
    if done:
        logger.info("%s already holds %d of %d rows; generating the rest.", output_path, len(done), len(rows))
    if len(done) == len(rows):
        print(summary(output_path, done, 0), file=sys.stderr)
        return 0

    model, processor = load_model_and_processor(args)
    if args.max_audio_seconds is not None:
        processor.max_audio_seconds = args.max_audio_seconds
    prompts = PromptConfig.from_file(args.prompts)
    base = input_path.resolve().parent if is_jsonl(input_path) else None
    start = len(done)
    requests = (_request(rows[index], column, base, args.instruction) for index in range(start, len(rows)))
    results = iter_generate(
        model,
        processor,
        requests,
        batch_size=args.batch_size,
        sort_window=args.sort_window,
        prompts=prompts,
        stop_at_newline=args.stop_at_newline,
        **generation_settings(args),
    )
    pending, written, new_rows = {}, start, []
    with open(output_path, "a", encoding="utf-8") as out, tqdm(total=len(rows), initial=start, unit="row") as bar:
        try:
            for index, result in results:
                pending[start + index] = result
                bar.update()
                # Rows finish out of order (length sorting): write the done prefix, so a rerun knows where to go on.
                while written in pending:
                    result = pending.pop(written)
                    row = {**output_fields(rows[written], column), "response": result.response}
                    if result.error is not None:
                        row.update(error=result.error, row=written)
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    new_rows.append(row)
                    written += 1
                out.flush()
        except (ValueError, GenerationFailedError) as err:  # settings no row can run with, or a failing model
            print(summary(output_path, done + new_rows, len(new_rows)), file=sys.stderr)
            print(f"speechllm-hf generate: error: {err}", file=sys.stderr)
            return 2 if isinstance(err, ValueError) else 1
    print(summary(output_path, done + new_rows, len(new_rows)), file=sys.stderr)
    return 0


def summary(output_path: Path, rows: list[dict], new: int) -> str:
    """The closing line: rows answered and error rows in the whole output file, and how many this run wrote."""
    errors = sum("error" in row for row in rows)
    return (
        f"speechllm-hf generate: {output_path}: {len(rows) - errors} rows answered, {errors} error rows "
        f"({new} written by this run; error rows say why in their `error` field)."
    )


__all__ = [
    "register",
    "run",
    "add_model_arguments",
    "add_batch_parser",
    "load_model_and_processor",
    "generation_settings",
]
