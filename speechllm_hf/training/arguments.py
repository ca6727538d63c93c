"""SpeechLlmTrainingArguments: TrainingArguments with the data, prompt, cache and LoRA settings of speechllm_hf."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..compat import WARMUP_RATIO_FIELD
from ..data.augmentation import AugmentationConfig
from ..data.tasks import TASKS
from .lora import LORA_TARGET_MODULES

logger = logging.getLogger(__name__)

# Next-word prediction on mixed speech-text sequences: a training mode of its own, not a row task of data.tasks.
MIXED_TASK = "mixed"


@dataclass
class SpeechLlmTrainingArguments(TrainingArguments):
    """Defaults follow arXiv 2412.15712 (AdamW, lr 1e-4, cosine, 3% warmup, no weight decay); `remove_unused_columns`
    is off because the collator needs the raw audio column; bf16 is on where the accelerator supports it (see
    `default_bf16`)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    if WARMUP_RATIO_FIELD:
        warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent warming up."})
    else:
        warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the collator reads the audio and text columns."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    # None = decide from the hardware (`default_bf16`); nargs/const keep a bare `--bf16` meaning True.
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on for a GPU with bf16 in hardware (Ampere and later) unless "
            "--fp16 or accelerate's mixed_precision is set; off on CPU. --bf16 False keeps fp32.",
            "nargs": "?",
            "const": True,
        },
    )
    max_skipped_steps: int = field(
        default=25,
        metadata={
            "help": "fp16: stop training when this many optimizer steps in a row were skipped for overflowing "
            "gradients (the loss scale has collapsed); 0 never stops for it."
        },
    )

    task: str = field(
        default="asr",
        metadata={
            "help": "Task of rows without a `task` column: asr, st, sqa, continuation, instruction; or "
            "'mixed': next-word prediction on mixed speech-text sequences (rows need word times from align)."
        },
    )
    prompt_file: str | None = field(
        default=None, metadata={"help": "Prompt YAML (user_template, instructions); 'default', 'blsp' or a path."}
    )
    text_column: str = field(default="text", metadata={"help": "Transcript column of ASR rows."})
    audio_column: str = field(default="audio", metadata={"help": "Audio column."})
    max_length: int = field(default=2048, metadata={"help": "Longest token sequence; longer responses are cut."})
    group_by_duration: bool = field(
        default=True, metadata={"help": "Batch clips of similar duration (needs a `duration` column, see prepare)."}
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Encoder-feature cache folder: built on first use, then read instead of running the encoder."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "The collator packs each batch's sequences into one row without padding (flash-attention varlen "
            "kernels, or a block-diagonal mask with sdpa/eager/flex_attention keep them apart); the loss is "
            "unchanged. Checked against the LLM's attention when the trainer is built."
        },
    )
    encoder_train_mode_augment: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen encoder in train mode (SpecAugment, dropout, LayerDrop) in training steps, "
            "as the contrastive paper's trainer did by accident. A switch of this run: the saved model config is "
            "unchanged, so a fine-tune from its checkpoints does not augment. Excludes a feature cache."
        },
    )
    # Augmentation of the training clips (data.augmentation), all off by default; draws are seeded by `seed`.
    augment_speeds: list[float] | None = field(
        default=None,
        metadata={
            "help": "Speed perturbation: one factor drawn per clip and epoch, e.g. 0.9 1.0 1.1 (resampled with soxr: "
            "a clip lasts 1/factor as long, tempo and pitch change together)."
        },
    )
    augment_gain_db: list[float] | None = field(
        default=None, metadata={"help": "Gain: LOW HIGH in dB, one drawn uniformly per clip, e.g. -6 6."}
    )
    augment_noise_dir: str | None = field(
        default=None,
        metadata={
            "help": "Additive noise: a folder of audio files (searched recursively), a random stretch per clip."
        },
    )
    augment_noise_snr_db: list[float] = field(
        default_factory=lambda: [5.0, 20.0],
        metadata={"help": "LOW HIGH signal-to-noise ratio in dB of the added noise, drawn uniformly per clip."},
    )
    augment_noise_prob: float = field(
        default=1.0, metadata={"help": "Probability that a clip gets noise (with augment_noise_dir)."}
    )
    augment_mask_time_prob: float = field(
        default=0.0,
        metadata={
            "help": "SpecAugment time masks on log-mel input features (Whisper encoders): about this share of each "
            "clip's frames set to 0, in spans of augment_mask_time_length, at least 2 spans (as transformers' "
            "mask_time_prob)."
        },
    )
    augment_mask_time_length: int = field(default=10, metadata={"help": "Frames per time mask span."})
    augment_mask_feature_prob: float = field(
        default=0.0,
        metadata={
            "help": "SpecAugment frequency masks: about this share of mel bins set to 0 (as mask_feature_prob)."
        },
    )
    augment_mask_feature_length: int = field(default=10, metadata={"help": "Mel bins per frequency mask span."})
    data_subset: float | None = field(
        default=None, metadata={"help": "Train on a random fraction of the data (seeded by `data_seed` or `seed`)."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM for fine-tuning (0: no LoRA)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=",".join(LORA_TARGET_MODULES), metadata={"help": "Comma-separated LLM modules that get LoRA."}
    )

    def __post_init__(self):
        # Checked here, so that a typo fails when the arguments are parsed rather than at the first batch.
        if self.task not in (*TASKS, MIXED_TASK):
            raise ValueError(f"Unknown task {self.task!r}; choose one of {', '.join((*TASKS, MIXED_TASK))}.")
        if self.task == MIXED_TASK and self.feature_cache_dir is not None:
            raise ValueError(
                "feature_cache_dir with task 'mixed': mixed speech-text sequences encode word-level audio spans, "
                "never whole clips, so the cache would never be read. Drop feature_cache_dir."
            )
        if self.encoder_train_mode_augment and self.feature_cache_dir is not None:
            raise ValueError("encoder_train_mode_augment changes the encoder outputs: it excludes a feature cache.")
        if AugmentationConfig.from_args(self) is not None and self.feature_cache_dir is not None:
            raise ValueError(
                "augment_* changes the encoder's input at every step, so it excludes a feature cache (encoded once "
                "from the clean audio): drop feature_cache_dir or the augment_* flags."
            )
        if self.data_subset is not None and not 0 < self.data_subset <= 1:
            raise ValueError(f"data_subset must be in (0, 1]; got {self.data_subset}.")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: no LoRA); got {self.lora_r}.")
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0 (0: never stop); got {self.max_skipped_steps}.")
        if self.bf16 is None:
            self.bf16 = default_bf16(self)
            if self.bf16:
                logger.info("bf16 mixed precision is on: this GPU supports it (--bf16 False keeps fp32).")
        super().__post_init__()


def default_bf16(args: TrainingArguments) -> bool:
    """bf16 when nothing else was asked for: not with --fp16, --use_cpu or a mixed precision set through accelerate
    (`accelerate launch --mixed_precision`, which the Trainer reads from the environment), and only on a GPU with
    native bf16 (`native_bf16_gpu`)."""
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.fp16 or args.use_cpu or launched_with != "no":
        return False
    return native_bf16_gpu()


def native_bf16_gpu() -> bool:
    """A CUDA (or ROCm) GPU with bf16 in hardware, from Ampere on. transformers' `is_torch_bf16_gpu_available` also
    counts the bf16 that torch emulates on older GPUs (no bf16 tensor cores: not a default); other accelerators take
    --bf16 by hand."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


__all__ = ["SpeechLlmTrainingArguments", "MIXED_TASK", "default_bf16", "native_bf16_gpu"]
