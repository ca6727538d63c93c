"""SpeechLlmTrainingArguments: TrainingArguments with the data, prompt, cache and LoRA settings of speechllm_hf."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

# transformers 5.x folded `warmup_ratio` into `warmup_steps` (a float below 1 is a ratio).
_WARMUP_RATIO_FIELD = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclass
class SpeechLlmTrainingArguments(TrainingArguments):
    """Defaults follow arXiv 2412.15712 (AdamW, lr 1e-4, cosine, 3% warmup, no weight decay); `remove_unused_columns`
    is off because the collator needs the raw audio column."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    if _WARMUP_RATIO_FIELD:
        warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent warming up."})
    else:
        warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the collator reads the audio and text columns."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

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
    data_subset: float | None = field(
        default=None, metadata={"help": "Train on a random fraction of the data (seeded by `data_seed` or `seed`)."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM for fine-tuning (0: no LoRA)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated LLM modules that get LoRA."}
    )


__all__ = ["SpeechLlmTrainingArguments"]
