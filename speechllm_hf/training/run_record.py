"""What defines a training run, recorded in each checkpoint and compared on resume.

The Trainer resumes optimizer, scheduler and data order from a checkpoint and takes everything else from the new
arguments without a word: a new `--learning_rate` is ignored (the scheduler state keeps the old one), a new prompt
file trains on other instructions than the steps before, and a new `--projector_type` fails deep inside weight
loading. So every checkpoint records the arguments that define the run (`run_record`, in `run_record.json`: JSON,
never the Trainer's pickled `training_args.bin`), and a resume with different values is refused with each change
named. To change them, start a new run from the checkpoint's weights (`--model checkpoint-N` and a new
`--output_dir`). Arguments that only say how long or how visibly to train (`max_steps`, `save_steps`, logging,
evaluation) may change. A checkpoint without a record (written before this check) resumes with a warning.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

RUN_RECORD = "run_record.json"

# TrainingArguments that decide what each step computes and in what order it sees the data.
DEFINING_ARGUMENTS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "task",
    "text_column",
    "audio_column",
    "max_length",
    "padding_free",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)
# The model config's entries that decide the projector's shape and what it sits between.
MODEL_FIELDS = ("projector_type", "audio_token", "encoder_name_or_path", "text_name_or_path")


def _jsonable(value):
    """`value` as it reads back from JSON, so that a record compares equal to itself after a save."""
    return json.loads(json.dumps(value, default=str))


def run_record(trainer) -> dict:
    """The values that define `trainer`'s run: its class, the defining arguments its `args` has, the model's
    projector and backbones, the instructions its collator prompts with, its augmentation, and the number of training
    rows."""
    from dataclasses import asdict

    config = trainer.model.config
    record = {"trainer": type(trainer).__name__}
    record.update({name: getattr(trainer.args, name) for name in DEFINING_ARGUMENTS if hasattr(trainer.args, name)})
    record.update({name: getattr(config, name) for name in MODEL_FIELDS})
    projector = config.projector_config.to_dict()
    projector.pop("transformers_version", None)  # not the run's: an upgrade between two sessions may change it
    record.update(
        projector_config=projector, encoder=config.encoder_config.model_type, text=config.text_config.model_type
    )
    prompts = getattr(trainer.data_collator, "prompts", None)
    if prompts is not None:
        record["prompts"] = asdict(prompts)
    augmentation = getattr(trainer.data_collator, "augmentation", None)
    if augmentation is not None:  # only when on, so that records written before augmentation existed still match
        record["augmentation"] = asdict(augmentation.config)
    dataset = trainer.train_dataset
    record["train_rows"] = len(dataset) if hasattr(dataset, "__len__") else None
    return _jsonable(record)


def write_run_record(folder: str | os.PathLike, record: dict) -> None:
    with open(os.path.join(folder, RUN_RECORD), "w") as file:
        json.dump(record, file, indent=1, sort_keys=True)


def check_resume(checkpoint: str | os.PathLike, record: dict) -> None:
    """Refuses to resume `checkpoint` with a run whose defining values differ from those it recorded.

    Raises:
        ValueError: naming each changed value, as recorded and as now.
    """
    path = os.path.join(checkpoint, RUN_RECORD)
    try:
        with open(path) as file:
            recorded = json.load(file)
    except FileNotFoundError:
        logger.warning("%s has no %s: the run's arguments cannot be compared with it.", checkpoint, RUN_RECORD)
        return
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}): resume from another checkpoint.") from err
    changed = [name for name in sorted(recorded.keys() | record.keys()) if recorded.get(name) != record.get(name)]
    if changed:
        lines = "\n".join(f"  {name}: {_shown(recorded.get(name))} -> {_shown(record.get(name))}" for name in changed)
        raise ValueError(
            f"Cannot resume from {checkpoint}: this run differs from the one that wrote it in what defines a run "
            f"(checkpoint -> now):\n{lines}\nResume with the checkpoint's values, or start a new run from its weights "
            "(--model <checkpoint> with a new --output_dir)."
        )


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


__all__ = ["DEFINING_ARGUMENTS", "MODEL_FIELDS", "RUN_RECORD", "check_resume", "run_record", "write_run_record"]
