"""SpeechLlmTrainer: the one Trainer behind ASR pretraining, multi-task fine-tuning and both pretraining methods.

It adds to `transformers.Trainer`: a default collator built from its arguments (`default_collator`), with
padding-free packing (`--padding_free`, done by the collator and checked against the LLM's attention here),
length-grouped batches, the encoder-feature cache, projector-only checkpoints that still resume exactly (optimizer,
scheduler and RNG state are the Trainer's own) and that `load_best_model_at_end` reloads, per-task losses on
multi-task data, per-loss metrics that subclasses record with `record_metric`, a stop at the first step whose loss or
weights are not finite (`DivergenceGuard`), checkpoints marked complete once fully written and resumed only then
(`checkpoints`), a push of the projector only (`push_to_hub`), and augmentation of the training clips only, its
draws following the epoch (`data.augmentation`, off by default).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from functools import partial

import datasets
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from ..compat import TRAINER_ALIGNS_SPECIAL_TOKENS, dataloader_settings, requested_sampling, rotate_checkpoints
from ..data.augmentation import AugmentationEpoch
from ..data.collators import (
    IGNORE_INDEX,
    TASK_IDS,
    MixedSpeechTextCollator,
    SpeechLlmCollator,
    collator_from_args,
    is_packed,
    padding_free_unsupported,
)
from ..data.feature_cache import with_feature_cache
from ..data.sampler import LengthGroupedSampler
from ..data.tasks import TASKS, check_columns
from ..models.speechllm.loading_speechllm import LORA_FOLDER, PROJECTOR_WEIGHTS_NAME
from .arguments import MIXED_TASK, SpeechLlmTrainingArguments
from .checkpoints import mark_complete, resolve_resume, unmark
from .divergence import DivergenceGuard
from .run_lock import RunLock, check_output_dir
from .run_record import check_resume, run_record, write_run_record
from .streaming import check_stream

logger = logging.getLogger(__name__)


class SpeechLlmTrainer(Trainer):
    """`Trainer` for `SpeechLlmForConditionalGeneration`.

    Args:
        model: the speech LLM (encoder and LLM frozen; optionally a LoRA adapter on the LLM).
        args: `SpeechLlmTrainingArguments` (`arguments_class`).
        train_dataset, eval_dataset: `datasets.Dataset`s of rows (audio, text, ...), e.g. from `prepare_dataset`;
            `eval_dataset` may be a dict of them. With `args.feature_cache_dir`, both are encoded once and read from
            the cache (the evaluation sets under `<feature_cache_dir>/eval` or `eval_<name>`). `train_dataset` may
            be a stream (`datasets.IterableDataset`), with `max_steps` and without the options that need map-style
            data (`training.streaming.check_stream`).
        processing_class: the model's `SpeechLlmProcessor` (saved with every checkpoint).
        data_collator: defaults to `default_collator(...)`, configured from `args` (a `SpeechLlmCollator` adds
            `task_ids` when a dataset has a `task` column, and the trainer then logs `loss_<task>` beside `loss`).
        **kwargs: passed to `Trainer`.

    Raises:
        ValueError: before any row is read, for a dataset that lacks a column its tasks need, a feature cache with a
            collator that does not read it, `remove_unused_columns=True` with a speech collator, a transformers
            sampling strategy that duration grouping would override, `padding_free` with a collator that does not
            pack or an LLM attention that cannot keep packed sequences apart, or `push_to_hub=True` (see
            `push_to_hub`).
        TrainingDivergedError: from `train`, at the first step whose loss or trainable weights are not finite (or
            after `max_skipped_steps` skipped fp16 steps), before that step is logged or saved.
    """

    arguments_class = SpeechLlmTrainingArguments

    def __init__(
        self,
        model=None,
        args: SpeechLlmTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        self._check_arguments(args)
        check_stream(args, train_dataset)
        if args.data_subset is not None and train_dataset is not None:
            train_dataset = subset(train_dataset, args.data_subset, _data_seed(args))
        datasets_by_name = _named_datasets(train_dataset, eval_dataset)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("Pass processing_class (the SpeechLlmProcessor) or a data_collator.")
            with_task_ids = any("task" in _columns(d) for d in datasets_by_name.values())
            data_collator = self.default_collator(args, processing_class, _llm_attention(model), with_task_ids)
        tasks = _check_setup(args, model, data_collator, train_dataset, datasets_by_name)
        if args.feature_cache_dir is not None:
            train_dataset, eval_dataset = _with_feature_caches(
                args, model, processing_class, train_dataset, eval_dataset
            )
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class=processing_class, **kwargs
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Every process reduces these names at every log, whether or not its own batches held the task.
        self._task_metric_names = (
            {f"loss_{task}" for task in tasks} if getattr(data_collator, "return_task_ids", False) else set()
        )
        self.divergence_guard = DivergenceGuard(self.accelerator, args.max_skipped_steps)
        self.add_callback(self.divergence_guard)
        if getattr(data_collator, "augmentation", None) is not None:
            self.add_callback(AugmentationEpoch(data_collator.augmentation))

    if TRAINER_ALIGNS_SPECIAL_TOKENS:

        def _align_special_tokens(self) -> None:
            """Leaves model.config as it is, as 5.x does (transformers 4.57 only; see
            compat.TRAINER_ALIGNS_SPECIAL_TOKENS): a save after training writes the config it would write on 5.x."""

    def _check_arguments(self, args) -> None:
        if not isinstance(args, self.arguments_class):
            raise ValueError(f"{type(self).__name__} needs {self.arguments_class.__name__} (at least an output_dir).")
        check_output_dir(args.output_dir)  # before the Trainer creates it

    def default_collator(self, args, processor, llm_attention: str | None, with_task_ids: bool):
        """The collator used when none is given (`collator_from_args`): mixed speech-text sequences for task "mixed",
        else a `SpeechLlmCollator` that returns `task_ids` when `with_task_ids` (a dataset has a `task` column).
        Subclasses return their own."""
        if args.task == MIXED_TASK:
            return collator_from_args(MixedSpeechTextCollator, args, processor, llm_attention)
        return collator_from_args(SpeechLlmCollator, args, processor, llm_attention, return_task_ids=with_task_ids)

    # ---------------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Length-grouped batches when the dataset has a `duration` column (see `speechllm-hf prepare`), otherwise the
        Trainer's own loader.

        The grouped loader takes every DataLoader setting the Trainer's loader takes (workers and their seeding,
        persistent workers, prefetching, ...); only the sampler differs. Its columns are all kept, as the speech
        collators need them (`remove_unused_columns=True` is refused with them).
        """
        dataset = self.train_dataset
        args = self.args
        if not (args.group_by_duration and "duration" in _columns(dataset)):
            return super().get_train_dataloader()
        # Grouped by the global batch of an optimizer step (transformers groups by the per-device one): the order
        # is then the same whatever the number of processes, and accelerate deals its consecutive micro-batches out
        # to them, so N processes x b clips train on the clips of 1 process x N*b.
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        sampler = LengthGroupedSampler(dataset["duration"], global_batch, _data_seed(args))
        params = {
            "batch_size": args.train_batch_size,
            "sampler": sampler,
            "collate_fn": self.data_collator,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "drop_last": args.dataloader_drop_last,
            "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        }
        return self.accelerator.prepare(DataLoader(dataset, **params, **dataloader_settings(args)))

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """The Trainer's evaluation loader, with the collator's augmentation left out (`unaugmented_collator`)."""
        with self.unaugmented_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """The Trainer's prediction loader, with the collator's augmentation left out (`unaugmented_collator`)."""
        with self.unaugmented_collator():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def unaugmented_collator(self):
        """`data_collator` without its augmentation while a loader is built: evaluation and prediction see the clips
        as they are, while training batches are augmented."""
        collator = self.data_collator
        if getattr(collator, "augmentation", None) is not None:
            self.data_collator = copy.copy(collator)
            self.data_collator.augmentation = None
        try:
            yield
        finally:
            self.data_collator = collator

    # ---------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest *complete* checkpoint of `output_dir`
        (newer ones whose writing was interrupted are skipped with a warning), and a path must be complete.

        The main process holds `output_dir`'s lock for the run (`run_lock`); a resume must have the arguments that
        define the run as the checkpoint recorded them (`run_record`).

        Raises:
            ValueError: for a checkpoint path that is incomplete, `True` when no checkpoint is complete, or a
                checkpoint written by a run with other defining arguments (each change named).
            RuntimeError: when another training run holds `output_dir`.
        """
        with RunLock(self.args.output_dir) if self.args.should_save else contextlib.nullcontext():
            resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
            self.run_definition = run_record(self)
            if resume is not None:
                check_resume(resume, self.run_definition)
            return super().train(resume, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.divergence_guard.observe_loss(loss)
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then its completeness marker once every process has written its files; older
        checkpoints are rotated out (`save_total_limit`) only after that, so an interrupted write never costs the last
        complete one."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(folder)  # a folder written again is incomplete until this write ends
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # the Trainer would rotate too early
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # each process has written its RNG state (and shards)
        if not self.args.should_save:
            return
        write_run_record(folder, getattr(self, "run_definition", None) or run_record(self))
        mark_complete(folder)
        rotate_checkpoints(self, os.path.dirname(folder), limit)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        allow_full_model: bool = False,
        extra_files: tuple[str, ...] | list[str] = (),
        **kwargs,
    ):
        """Save the model to `output_dir` and upload what `speechllm-hf push` would: the projector (and LoRA adapter),
        config, code, processor and model card; no training state, backbone weights only with `allow_full_model`, and
        another file of `output_dir` only when named in `extra_files` (any other stops the upload).

        The repository is `args.hub_model_id`, else the name of `output_dir`. `blocking` is accepted for the Trainer's
        signature: the upload always completes before returning. The Trainer's model-card fields (other keyword
        arguments) are ignored with a warning: the saved model card describes the model.

        Raises:
            ValueError: see `upload_saved_folder` (full weights not allowed, backbones named by local folders).
        """
        from ..publishing import upload_saved_folder  # here: publishing imports training.checkpoints

        if kwargs:
            logger.warning("push_to_hub ignores %s: the saved model card describes the model.", sorted(kwargs))
        self.save_model()
        if not self.is_world_process_zero():
            return None
        return upload_saved_folder(
            self.args.output_dir,
            self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            allow_full_model=allow_full_model,
            extra_files=extra_files,
            commit_message=commit_message or "End of training",
            private=private if private is not None else self.args.hub_private_repo,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else getattr(self.args, "hub_revision", None),
        )

    # ---------------------------------------------------------------------------------------------------------------

    def augment_encoder(self, model) -> None:
        """`--encoder_train_mode_augment`: the frozen encoder in train mode for a training step's forward.

        Set per step, because the Trainer's `model.train()` has just put the frozen encoder back in eval mode, and
        never in the model config, which checkpoints save and a later fine-tune would read.
        """
        if self.args.encoder_train_mode_augment and model.training:
            model.encoder.train()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; a batch with `task_ids` (multi-task data) also records each task's loss per response
        token as `loss_<task>`.

        The model computes logits only from the position before the batch's first label on (`logits_to_keep`, as
        TRL's `use_logits_to_keep`), not at the prompt and audio positions, unless something beyond the model's own
        loss reads the logits (label smoothing, `compute_loss_func`, or metrics at evaluation) or the batch is packed
        (`padding_free`: the last positions of one packed row are not those of each sequence).
        """
        self.augment_encoder(self.accelerator.unwrap_model(model))
        inputs = dict(inputs)
        task_ids = inputs.pop(TASK_IDS, None)
        if "labels" in inputs and "logits_to_keep" not in inputs and not self._keeps_every_logit(model, inputs):
            inputs["logits_to_keep"] = logits_to_keep(inputs["labels"])
        # A copy: the Trainer pops the labels of the inputs it is given when it smooths them.
        loss, outputs = super().compute_loss(
            model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if task_ids is not None:
            self._record_task_losses(model, inputs, outputs, task_ids)
        return (loss, outputs) if return_outputs else loss

    def _keeps_every_logit(self, model, inputs) -> bool:
        """Whether logits are read beyond the model's loss, or the batch is packed, so that every position needs
        them."""
        if self.label_smoother is not None or self.compute_loss_func is not None or is_packed(inputs):
            return True
        return not model.training and (self.compute_metrics or self.preprocess_logits_for_metrics) is not None

    def _loss_labels(self, model, inputs, outputs) -> torch.Tensor:
        """The labels the model's loss pairs with `outputs.logits`: audio positions ignored (the model ignores them
        whatever they hold), at the positions whose logits were kept."""
        audio_token_id = self.accelerator.unwrap_model(model).config.audio_token_id
        labels = inputs["labels"].masked_fill(inputs["input_ids"] == audio_token_id, IGNORE_INDEX)
        return labels[:, -outputs.logits.shape[1] :]

    @torch.no_grad()
    def _record_task_losses(self, model, inputs, outputs, task_ids: torch.Tensor) -> None:
        """`loss_<task>`: each task's mean loss per response token, from task ids per row (B,) or, in a packed batch,
        per token (1, N)."""
        labels = self._loss_labels(model, inputs, outputs)
        if task_ids.dim() == 1:
            task_ids = task_ids[:, None].expand_as(inputs["labels"])
        labelled = labels[:, 1:] != IGNORE_INDEX  # (B, kept - 1): position t predicts token t + 1
        token_losses = F.cross_entropy(
            outputs.logits[:, :-1][labelled].float(), labels[:, 1:][labelled], reduction="none"
        )  # (N,)
        token_tasks = task_ids[:, -labels.shape[1] :][:, 1:].to(labelled.device)[labelled]  # (N,)
        for index in token_tasks.unique().tolist():
            self.record_metric(f"loss_{TASKS[index]}", token_losses[token_tasks == index].mean())

    # ---------------------------------------------------------------------------------------------------------------
    # Per-loss metrics, averaged over the logging interval and merged into the Trainer's logs.

    def record_metric(self, name: str, value: float | torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value.detach().float().mean() if torch.is_tensor(value) else value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        recorded = self._metrics[mode]
        names = sorted({name for name, values in recorded.items() if values} | self._task_metric_names)
        totals = [[sum(recorded.get(name, ())), len(recorded.get(name, ()))] for name in names]
        recorded.clear()
        if names and self.args.world_size > 1:
            # A process whose batches lacked a task has no value for it: sum values and counts over processes.
            reduced = self.accelerator.reduce(torch.tensor(totals, device=self.args.device), reduction="sum")
            totals = reduced.tolist()
        averaged = {f"{prefix}{name}": total / count for name, (total, count) in zip(names, totals) if count}
        super().log({**logs, **averaged}, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Projector-only checkpoints load their projector (and LoRA adapter); others as the Trainer does.

        Raises:
            ValueError: when the checkpoint has a LoRA adapter and the model none, or the other way round: loading
                would freeze the adapter outside the optimizer, or resume with a fresh one.
        """
        if not os.path.isfile(os.path.join(resume_from_checkpoint, PROJECTOR_WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        saved_lora = os.path.isdir(os.path.join(resume_from_checkpoint, LORA_FOLDER))
        if saved_lora and not target.has_lora:
            raise ValueError(
                f"{resume_from_checkpoint} holds a LoRA adapter of the LLM ({LORA_FOLDER}/) but the model being "
                "trained has none: resume with the LoRA settings of the run that wrote it (--lora_r, --lora_alpha, "
                "--lora_target_modules)."
            )
        if target.has_lora and not saved_lora:
            raise ValueError(
                f"The model carries a LoRA adapter but {resume_from_checkpoint} holds none: resume without --lora_r, "
                "or from a checkpoint of a LoRA run."
            )
        logger.info("Loading the projector from %s.", resume_from_checkpoint)
        target.load_trained_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint's projector (and LoRA adapter) when it is projector-only;
        the Trainer's own path looks for full model files only, and would warn and keep the last weights."""
        best = self.state.best_model_checkpoint
        if not os.path.isfile(os.path.join(best, PROJECTOR_WEIGHTS_NAME)):
            return super()._load_best_model()
        logger.info("Loading the best projector from %s (score %s).", best, self.state.best_metric)
        self._load_from_checkpoint(best)


def _data_seed(args) -> int:
    """The seed of data order and subsets: `data_seed` when set (0 included), else `seed`."""
    return args.data_seed if args.data_seed is not None else args.seed


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions' logits the loss of `labels` needs: from the position before the earliest label of
    any row to the end (the response, not the prompt and audio before it); 0 (all) when nothing is labelled."""
    labelled = (labels != IGNORE_INDEX).any(0)  # (L,)
    if not bool(labelled.any()):
        return 0
    return min(labels.shape[1] - int(labelled.int().argmax()) + 1, labels.shape[1])


def subset(dataset, fraction: float, seed: int):
    """A seeded random `fraction` of `dataset` (the contrastive paper's 10%, seed 42, fine-tuning runs)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data_subset must be in (0, 1]; got {fraction}.")
    count = max(1, round(len(dataset) * fraction))
    logger.info("Training on %d of %d rows (data_subset=%s, seed %d).", count, len(dataset), fraction, seed)
    return dataset.shuffle(seed=seed).select(range(count))


def _columns(dataset) -> list[str]:
    return list(getattr(dataset, "column_names", None) or [])


def _named_datasets(train_dataset, eval_dataset) -> dict[str, datasets.Dataset]:
    """The `datasets.Dataset`s a trainer was given, named as error messages call them."""
    named = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        named |= {f"eval_dataset[{name!r}]": dataset for name, dataset in eval_dataset.items()}
    else:
        named["eval_dataset"] = eval_dataset
    return {name: dataset for name, dataset in named.items() if isinstance(dataset, datasets.Dataset)}


def _row_tasks(dataset: datasets.Dataset, default: str) -> set[str]:
    """The tasks of a dataset's rows: its `task` column's values, `default` where a row has none."""
    if "task" not in dataset.column_names:
        return {default}
    return {task or default for task in dataset.unique("task")}


def _llm_attention(model) -> str | None:
    return None if model is None else model.language_model.config._attn_implementation


def _check_setup(args, model, data_collator, train_dataset, datasets_by_name: dict[str, datasets.Dataset]) -> set[str]:
    """Refuse, before any row is read, a set-up that would fail or silently do something else later; return the tasks
    of the datasets' rows (for a `SpeechLlmCollator`; none otherwise)."""
    if args.push_to_hub:
        raise ValueError(
            "push_to_hub=True uploads the output folder as it is at every save: the full weights of backbones "
            "that have no Hub id, training_args.bin, and backbone ids that are local folders. Train without it, "
            "then call trainer.push_to_hub() or run `speechllm-hf push --model OUTPUT_DIR --repo_id ID`, which "
            "upload the projector only unless full weights are allowed explicitly."
        )
    if args.remove_unused_columns and isinstance(data_collator, (SpeechLlmCollator, MixedSpeechTextCollator)):
        raise ValueError(
            "remove_unused_columns=True drops the audio and text columns the speech collators read: leave it off."
        )
    tasks = set()
    if isinstance(data_collator, SpeechLlmCollator):
        for name, dataset in datasets_by_name.items():
            dataset_tasks = _row_tasks(dataset, data_collator.task)
            try:
                check_columns(_columns(dataset), dataset_tasks, data_collator.prompts, data_collator.text_column)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            tasks |= dataset_tasks
    if args.feature_cache_dir is not None and not getattr(data_collator, "use_cached_features", False):
        raise ValueError(
            f"feature_cache_dir is set but the collator ({type(data_collator).__name__}) does not read cached "
            "features, so the cache would never be used: drop feature_cache_dir."
        )
    packs = getattr(data_collator, "padding_free", False)
    if args.padding_free and not packs:
        raise ValueError(
            f"padding_free is set but the collator ({type(data_collator).__name__}) does not pack: build it with "
            "padding_free=True (collator_from_args does), or drop padding_free."
        )
    problem = padding_free_unsupported(_llm_attention(model)) if packs and model is not None else None
    if problem:
        raise ValueError(problem)
    if args.group_by_duration and "duration" in _columns(train_dataset) and requested_sampling(args):
        raise ValueError(
            f"The training set has a duration column, so group_by_duration batches it by clip duration, which "
            f"overrides the requested transformers sampling ({requested_sampling(args)}): pass "
            "--group_by_duration False to use that sampling, or drop it to keep duration grouping."
        )
    return tasks


def _with_feature_caches(args, model, processor, train_dataset, eval_dataset):
    """The training and evaluation sets with their encoder-feature caches; the main process builds a missing cache
    while the others wait (`main_process_first`), and they then read it."""

    def cached(dataset, subfolder: str | None):
        folder = args.feature_cache_dir if subfolder is None else os.path.join(args.feature_cache_dir, subfolder)
        return with_feature_cache(dataset, folder, model, processor, audio_column=args.audio_column)

    with args.main_process_first(local=False, desc="encoder-feature cache"):
        if train_dataset is not None:
            train_dataset = cached(train_dataset, None)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: cached(dataset, f"eval_{name}") for name, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = cached(eval_dataset, "eval")
    return train_dataset, eval_dataset


__all__ = ["SpeechLlmTrainer", "logits_to_keep", "subset"]
