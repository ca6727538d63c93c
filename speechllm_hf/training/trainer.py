"""SpeechLlmTrainer: the one Trainer behind ASR pretraining, multi-task fine-tuning and both pretraining methods.

It adds to `transformers.Trainer`: the speech collator by default, length-grouped batches, the encoder-feature cache,
projector-only checkpoints that still resume exactly (optimizer, scheduler and RNG state are the Trainer's own), and
per-loss metrics that subclasses record with `record_metric`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ..data.collator import SpeechLlmCollator
from ..data.feature_cache import attach_feature_cache, build_feature_cache
from ..data.mixed_collator import MixedSpeechTextCollator
from ..data.sampler import LengthGroupedSampler
from ..data.tasks import PromptConfig
from ..models.speechllm.hub_speechllm import PROJECTOR_WEIGHTS_NAME
from .arguments import SpeechLlmTrainingArguments

logger = logging.getLogger(__name__)


class SpeechLlmTrainer(Trainer):
    """`Trainer` for `SpeechLlmForConditionalGeneration`.

    Args:
        model: the speech LLM (encoder and LLM frozen; optionally a LoRA adapter on the LLM).
        args: `SpeechLlmTrainingArguments`.
        train_dataset, eval_dataset: `datasets.Dataset`s of rows (audio, text, ...), e.g. from `prepare_dataset`.
        processing_class: the model's `SpeechLlmProcessor` (saved with every checkpoint).
        data_collator: defaults to a `SpeechLlmCollator` configured from `args`.
        **kwargs: passed to `Trainer`.
    """

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
        if args is None:
            raise ValueError("SpeechLlmTrainer needs SpeechLlmTrainingArguments (at least an output_dir).")
        if args.data_subset is not None and train_dataset is not None:
            train_dataset = subset(train_dataset, args.data_subset, args.data_seed or args.seed)
        use_cache = args.feature_cache_dir is not None
        if use_cache and train_dataset is not None:
            train_dataset = self._with_feature_cache(model, processing_class, train_dataset, args)
        if data_collator is None and processing_class is None:
            raise ValueError("Pass processing_class (the SpeechLlmProcessor) or a data_collator.")
        if data_collator is None and args.task == "mixed":
            data_collator = MixedSpeechTextCollator(
                processing_class, audio_column=args.audio_column, text_column=args.text_column, seed=args.seed
            )
        elif data_collator is None:
            data_collator = SpeechLlmCollator(
                processing_class,
                task=args.task,
                prompts=PromptConfig.from_file(args.prompt_file),
                text_column=args.text_column,
                audio_column=args.audio_column,
                max_length=args.max_length,
                use_cached_features=use_cache,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def _with_feature_cache(model, processor, dataset, args):
        folder = args.feature_cache_dir
        if not os.path.exists(os.path.join(folder, "cache_key.json")):
            if args.process_index == 0:
                build_feature_cache(model, processor, dataset, folder, audio_column=args.audio_column)
            if args.world_size > 1:
                torch.distributed.barrier()
        return attach_feature_cache(dataset, folder, model, processor, audio_column=args.audio_column)

    # ---------------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Length-grouped batches when the dataset has a `duration` column (see `speechllm-hf prepare`)."""
        dataset = self.train_dataset
        if not (self.args.group_by_duration and "duration" in getattr(dataset, "column_names", [])):
            return super().get_train_dataloader()
        group = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        sampler = LengthGroupedSampler(dataset["duration"], group, seed=self.args.data_seed or self.args.seed)
        loader = DataLoader(
            dataset,
            batch_size=self.args.train_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            drop_last=self.args.dataloader_drop_last,
        )
        return self.accelerator.prepare(loader)

    # ---------------------------------------------------------------------------------------------------------------
    # Per-loss metrics, averaged over the logging interval and merged into the Trainer's logs.

    def record_metric(self, name: str, value: float | torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value.detach().float().mean() if torch.is_tensor(value) else value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        averaged = {f"{prefix}{k}": sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        self._metrics[mode].clear()
        if averaged and self.args.world_size > 1:  # every process logs at the same steps: average over them
            keys = sorted(averaged)
            values = torch.tensor([averaged[k] for k in keys], device=self.args.device)
            averaged = dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist()))
        super().log({**logs, **averaged}, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Projector-only checkpoints load their projector (and LoRA adapter); others as the Trainer does."""
        if not os.path.isfile(os.path.join(resume_from_checkpoint, PROJECTOR_WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("Loading the projector from %s.", resume_from_checkpoint)
        target.load_trained_weights(resume_from_checkpoint)


def subset(dataset, fraction: float, seed: int):
    """A seeded random `fraction` of `dataset` (the contrastive paper's 10%, seed 42, fine-tuning runs)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data_subset must be in (0, 1]; got {fraction}.")
    count = max(1, round(len(dataset) * fraction))
    logger.info("Training on %d of %d rows (data_subset=%s, seed %d).", count, len(dataset), fraction, seed)
    return dataset.shuffle(seed=seed).select(range(count))


__all__ = ["SpeechLlmTrainer", "subset"]
