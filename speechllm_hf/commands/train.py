"""`speechllm-hf train --method asr --preset NAME --train_manifest M --output_dir O [TrainingArguments flags]`.

Every `TrainingArguments` flag is accepted under its own name (`--max_steps`, `--save_steps`,
`--resume_from_checkpoint`, ...), and any of them from `--config cfg.yaml`; a flag given on the command line wins
over the same key in the file; `--resume_from_checkpoint last` resumes from the newest complete checkpoint of
`--output_dir`. Works unchanged under `accelerate launch`. Manifests are validated first (as
`speechllm-hf prepare` does, each row against its own task); a manifest may be given as `TASK=PATH` (e.g.
`st=mustc_de.parquet`) to set the task of its rows for multi-task fine-tuning. A manifest is anything
`load_manifest` reads, Hub dataset ids included (`--dataset_config`, `--split`); with `--streaming` the training
sources are read as they are used, each row validated as it is read, and the rows dropped are counted in
`OUTPUT_DIR/stream_report.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

from speechllm_hf.presets import PRESETS

from .model_arguments import BackboneArguments, PromptArguments, QuantizationArguments, load_model_and_processor

logger = logging.getLogger(__name__)

STREAM_REPORT_FILE = "stream_report.json"  # with --streaming: the rows read, kept and dropped per source


@dataclass
class ModelArguments(BackboneArguments, PromptArguments, QuantizationArguments):
    preset: str = field(default="tiny", metadata={"help": f"Preset to build: {', '.join(PRESETS)}."})
    model: str | None = field(default=None, metadata={"help": "A saved model (folder or Hub id) to continue from."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "The LLM's attention: sdpa (default), eager, flex_attention or flash_attention_2 (pip install "
            "flash-attn). With --padding_free only flex_attention and flash attention skip the padding's work. The "
            "encoder keeps its default."
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the frozen encoder and LLM: bfloat16, float16 or float32 (default float32). The "
            "projector keeps float32 weights; --bf16/--fp16 compute in half precision."
        },
    )

    def backbone_kwargs(self) -> dict:
        """What `from_preset` / `from_pretrained` take from these arguments for the backbones."""
        kwargs = {}
        if self.attn_implementation:
            kwargs["attn_implementation"] = {"text_config": self.attn_implementation}
        if self.dtype:
            kwargs["dtype"] = self.dtype
        return kwargs


@dataclass
class DataArguments:
    train_manifest: list[str] = field(
        default_factory=list,
        metadata={"help": "jsonl/parquet manifests (validated here as `prepare` does); TASK=PATH sets a task."},
    )
    eval_manifest: list[str] = field(default_factory=list, metadata={"help": "Held-out manifests."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "Config (subset) of the Hub datasets given as manifests."}
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the training sources that have splits (Hub datasets, saved DatasetDicts, audiofolders "
            "with split folders); default: the only one, else train."
        },
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split of the held-out sources (as --split)."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training sources as they are used (datasets.IterableDataset) instead of loading them "
            "first; needs --max_steps and --group_by_duration False. Rows are validated as they are read."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With --streaming: rows shuffled in a buffer of this many, seeded (0 keeps their order)."},
    )
    num_proc: int = field(default=1, metadata={"help": "Processes validating the manifests."})
    min_duration: float = field(default=0.0, metadata={"help": "Drop clips shorter than this (seconds)."})
    max_duration: float = field(default=30.0, metadata={"help": "Drop clips longer than this (seconds)."})
    source_language: str | None = field(
        default=None, metadata={"help": "ST rows without a `source_language` column get this one (default English)."}
    )
    target_language: str | None = field(
        default=None, metadata={"help": "ST rows without a `target_language` column get this one (e.g. German)."}
    )


def methods() -> dict:
    """--method -> (trainer class, arguments class); the pretraining methods register here as they land."""
    from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
    from speechllm_hf.training.continuation import ContinuationTrainer, ContinuationTrainingArguments
    from speechllm_hf.training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
    from speechllm_hf.training.trainer import SpeechLlmTrainer

    return {
        "asr": (SpeechLlmTrainer, SpeechLlmTrainingArguments),
        "continuation": (ContinuationTrainer, ContinuationTrainingArguments),
        "contrastive": (ContrastiveTrainer, ContrastiveTrainingArguments),
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train the projector (ASR pretraining, multi-task fine-tuning, LoRA)", add_help=False
    )
    parser.add_argument("--method", default="asr", help="training method (asr; see the docs for the others)")
    parser.add_argument("--config", help="YAML file with all arguments")
    parser.set_defaults(func=run, accepts_extra_args=True)


def parse_arguments(arguments_class, config: str | None, argv: list[str]):
    """(ModelArguments, DataArguments, arguments_class instance) from `argv`, over the YAML file `config` if given.

    A flag on the command line wins over the same key in the file; a key no argument class knows is an error.

    Raises:
        SystemExit: for an unreadable config or unknown keys in it (with the message), or bad flags (argparse's).
    """
    import yaml
    from transformers import HfArgumentParser

    classes = (ModelArguments, DataArguments, arguments_class)
    parser = HfArgumentParser(classes, prog="speechllm-hf train")
    if config:
        try:
            with open(config) as file:
                values = yaml.safe_load(file) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SystemExit(f"speechllm-hf train: cannot read --config {config}: {err}") from err
        if not isinstance(values, dict):
            raise SystemExit(f"speechllm-hf train: --config {config} must hold a mapping of argument names to values.")
        known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"speechllm-hf train: --config {config} has unknown keys {unknown}.")
        # The file's values become the parser's defaults, so that flags given on the command line override them.
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(argv)


def load_rows(
    manifests: list[str],
    args,
    data_args: DataArguments,
    audio_token: str = "<audio>",
    special_tokens: list[str] = (),
    *,
    split: str | None = None,
    streaming: bool = False,
    reports: list | None = None,
    processor=None,
):
    """Validate and concatenate manifests; `TASK=PATH` items get a `task` column, ST rows the languages given.

    Rows are validated after those columns are added, each against its own task's fields, so that an ST manifest
    relying on --target_language is kept and an ST row without a translation is dropped (and counted). Rows whose
    text holds the model's `audio_token`, or another of its tokenizer's `special_tokens`, are dropped too. With
    `streaming`, the rows are an `IterableDataset` validated as they are read, and `reports` gets one
    `StreamReport` per manifest. With the model's `processor`, clips too short for its encoder are dropped too
    (`too_short_for_encoder`): they would pass and then stop training at their batch.
    """
    import datasets

    from speechllm_hf.data.manifest import load_manifest
    from speechllm_hf.data.sources import column_names
    from speechllm_hf.data.tasks import TASKS, PromptConfig
    from speechllm_hf.preprocessing import prepare_dataset
    from speechllm_hf.preprocessing.streaming import StreamReport, validate_stream
    from speechllm_hf.training.arguments import MIXED_TASK
    from speechllm_hf.training.trainer import _data_seed

    from .common import flag_values

    prompts = PromptConfig.from_file(args.prompt_file)
    source = {"dataset_config": data_args.dataset_config, "split": split, "streaming": streaming}
    parts = []
    for item in manifests:
        task, _, path = item.partition("=") if item.split("=", 1)[0] in TASKS else (None, "", item)
        rows = load_manifest(path, audio_column=args.audio_column, text_column=None, **source)
        present = column_names(rows)
        if task is not None and "task" in present:
            raise ValueError(f"{path} has its own task column: give it without the {task}= prefix.")
        columns = {name: value for name, value in _added_columns(data_args, task).items() if name not in present}
        checks = {
            **flag_values(data_args, "min_duration", "max_duration"),
            **flag_values(args, "audio_column", "text_column", "task"),
            "prompts": prompts,
            # Mixed speech-text rows are not task rows: their word times are checked when they are aligned.
            "require_text": args.task != MIXED_TASK,
            "audio_token": audio_token,
            "special_tokens": special_tokens,
            "processor": processor,
        }
        if streaming:
            if data_args.shuffle_buffer_size > 0:
                rows = rows.shuffle(seed=_data_seed(args), buffer_size=data_args.shuffle_buffer_size)
            if columns:
                rows = rows.map(lambda row, columns=columns: columns)
            report = StreamReport(path)
            reports.append(report)
            parts.append(validate_stream(rows, report, **checks))
            continue
        for column, value in columns.items():
            rows = rows.add_column(column, [value] * len(rows))
        rows, report = prepare_dataset(rows, num_proc=data_args.num_proc, **checks)
        logger.info("%s: %s", path, json.dumps({k: report[k] for k in ("total", "kept", "dropped")}))
        if report["total"] and not report["kept"]:  # a whole manifest gone is a mistake, not a few bad rows
            reasons = ", ".join(f"{count} {reason}" for reason, count in report["dropped"].items() if count)
            raise ValueError(
                f"Every row of {path} was dropped ({reasons}); `speechllm-hf prepare` lists each with its reason. "
                "ST rows need target_language (and source_language, English by default): --target_language sets "
                "it for rows without the column."
            )
        parts.append(rows)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _added_columns(data_args: DataArguments, task: str | None) -> dict[str, str]:
    """The columns every row of a manifest gets: its `TASK=` prefix's task, the ST languages given."""
    columns = {"task": task} if task is not None else {}
    for column in ("source_language", "target_language"):
        if getattr(data_args, column) is not None:
            columns[column] = getattr(data_args, column)
    return columns


def check_streaming(data_args: DataArguments, training_args) -> None:
    """Refuses, before the model is built, a --streaming run the trainer would refuse later (see
    `training.streaming.check_stream`), or one whose dropped rows would be counted out of sight."""
    if not data_args.streaming:
        return
    if training_args.max_steps <= 0:
        raise ValueError("--streaming reads rows without knowing their number: give --max_steps N.")
    if training_args.group_by_duration:
        raise ValueError(
            "--streaming cannot group batches by duration, which sorts the whole training set first: pass "
            "--group_by_duration False (or drop --streaming)."
        )
    if training_args.dataloader_num_workers > 0:
        raise ValueError(
            "--streaming validates rows as they are read and counts those it drops in this process; with "
            f"--dataloader_num_workers {training_args.dataloader_num_workers} they would be counted in the worker "
            "processes and lost: drop --dataloader_num_workers."
        )


def write_stream_reports(reports: list, output_dir: str) -> None:
    """Logs the counts of each streamed source (rows read, kept and dropped per reason) and writes them to
    `output_dir/stream_report.json`, as `prepare` writes `report.json`."""
    import os

    summary = [report.as_dict() for report in reports]
    for report in summary:
        logger.info("%s (streamed): %s", report["source"], json.dumps({k: report[k] for k in ("total", "kept")}))
        dropped = {reason: count for reason, count in report["dropped"].items() if count}
        if dropped:
            logger.warning("%s (streamed): dropped %s", report["source"], json.dumps(dropped))
    with open(os.path.join(output_dir, STREAM_REPORT_FILE), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
        file.write("\n")


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint last` (or `True`, also a YAML `true`) resumes from the newest complete checkpoint of
    --output_dir; any other value is a checkpoint folder."""
    if isinstance(value, bool) or value is None:
        return value or None
    if value.lower() in ("last", "true"):
        return True
    return None if value.lower() == "false" else value


def run(args: argparse.Namespace) -> int:
    """The command; a refusal with a sentence for the user (a bad manifest, a changed resume, a busy output_dir)
    exits with status 2 and that sentence, its traceback shown with --log_level debug."""
    from speechllm_hf.training.run_lock import OutputDirInUseError

    try:
        return train(args)
    except (ValueError, OutputDirInUseError) as err:
        logger.debug("speechllm-hf train stopped:", exc_info=True)
        print(f"speechllm-hf train: error: {err}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from speechllm_hf.data.collators import special_token_strings
    from speechllm_hf.training.lora import add_lora

    available = methods()
    if args.method not in available:
        raise SystemExit(f"speechllm-hf train: unknown --method {args.method!r}; choose one of {sorted(available)}.")
    trainer_class, arguments_class = available[args.method]
    model_args, data_args, training_args = parse_arguments(arguments_class, args.config, args.extra_args)
    if not data_args.train_manifest:
        raise SystemExit("speechllm-hf train: give at least one --train_manifest.")
    try:
        check_streaming(data_args, training_args)
    except ValueError as err:
        raise SystemExit(f"speechllm-hf train: {err}") from err

    # Before the model is built, as transformers' examples do: --seed also decides the new projector's weights, the
    # same on every process and in every run.
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args, **model_args.backbone_kwargs())
    # The projector trains: it keeps float32 master weights whatever the frozen backbones are stored in.
    model.projector.float()
    if training_args.lora_r > 0:
        add_lora(
            model,
            training_args.lora_r,
            training_args.lora_alpha,
            training_args.lora_dropout,
            training_args.lora_target_modules.split(","),
        )
    row_checks = (processor.audio_token, special_token_strings(processor.tokenizer))
    reports = []
    train_rows = load_rows(
        data_args.train_manifest,
        training_args,
        data_args,
        *row_checks,
        split=data_args.split,
        streaming=data_args.streaming,
        reports=reports,
        processor=processor,
    )
    eval_rows = (
        load_rows(
            data_args.eval_manifest,
            training_args,
            data_args,
            *row_checks,
            split=data_args.eval_split,
            processor=processor,
        )
        if data_args.eval_manifest
        else None
    )
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=processor
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    trainer.save_model()
    if reports and trainer.is_world_process_zero():
        write_stream_reports(reports, training_args.output_dir)
    if eval_rows is not None:
        print(json.dumps(trainer.evaluate(), indent=2))
    return 0


__all__ = [
    "register",
    "run",
    "parse_arguments",
    "load_rows",
    "check_streaming",
    "write_stream_reports",
    "STREAM_REPORT_FILE",
    "resume_argument",
    "ModelArguments",
    "DataArguments",
    "methods",
]
