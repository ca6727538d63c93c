"""Trains each trainer for 3 optimizer steps on the same 48 corpus clips and writes, per case, the final projector,
the logged losses and the clip ids of every micro-batch this process collated. Every case fixes the GLOBAL
micro-batch; each of the N processes takes 1/N of it. Run once in 1 process and once under `accelerate launch` on
2 processes: the global batches, and so the projectors, must be the same.

    python ddp_equivalence.py OUT

- asr: `SpeechLlmTrainer` (HuBERT + Q-Former with dropout 0), with the length-grouped sampler (the clips have a
  duration), as asr_random_order with the Trainer's own random sampler (`group_by_duration=False`), and as
  asr_feature_cache on an encoder-feature cache that the trainer builds (each process writes how many caches it
  built to builds_rank<N>.json: only the main process may build it);
- contrastive: `ContrastiveTrainer` with gathered negatives (Whisper + MLP), the setting in which N x b equals 1 x Nb;
- continuation: `ContinuationTrainer` with cross-entropy and KL (Whisper + CNN adapter, BLSP prompt);
each with gradient accumulation 1 (global micro-batch 8) and 2 (global micro-batch 4).

SGD with lr 1 makes each update minus the (clipped) gradient, so equal projectors mean equal gradients; AdamW would
divide by sqrt(v) + eps and turn float rounding in near-zero gradient entries into visible differences. Nothing
random acts after initialisation (no dropout), and the initialisation is seeded identically in both runs.
"""

import json
import os
import sys

import datasets
import torch
from safetensors.torch import save_file

from speechllm_hf import from_preset
from speechllm_hf.compat import WARMUP_RATIO_FIELD
from speechllm_hf.data import feature_cache
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training import (
    ContinuationTrainer,
    ContinuationTrainingArguments,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    SpeechLlmTrainer,
    SpeechLlmTrainingArguments,
)

STEPS = 3
ROWS = 48  # more than 3 global batches, so that the sampler's grouping decides which clips each step sees
# (case name, trainer, global micro-batch, gradient accumulation steps, extra arguments)
CASES = [
    ("asr", "asr", 8, 1, {}),
    ("asr_accumulation", "asr", 4, 2, {}),
    ("asr_random_order", "asr", 8, 1, {"group_by_duration": False}),
    ("asr_feature_cache", "asr", 8, 1, {"feature_cache_dir": "cache"}),  # a folder of the case's own
    ("contrastive", "contrastive", 8, 1, {}),
    ("contrastive_accumulation", "contrastive", 4, 2, {}),
    ("continuation", "continuation", 8, 1, {}),
    ("continuation_accumulation", "continuation", 4, 2, {}),
]

TRAINERS = {
    "asr": (
        SpeechLlmTrainer,
        SpeechLlmTrainingArguments,
        dict(encoder_type="hubert", projector_type="qformer", projector_config={"dropout": 0.0}),
        {},
    ),
    "contrastive": (
        ContrastiveTrainer,
        ContrastiveTrainingArguments,
        dict(encoder_type="whisper", projector_type="mlp"),
        dict(gather_negatives=True, contrastive_layers="all"),
    ),
    "continuation": (
        ContinuationTrainer,
        ContinuationTrainingArguments,
        dict(encoder_type="whisper", projector_type="cnn"),
        dict(ce_weight=1.0, kl_weight=1.0),
    ),
}


class RecordingCollator:
    """The trainer's collator, recording the clip ids of every batch it builds (in order)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, rows):
        self.batches.append([row["id"] for row in rows])
        return self.collator(rows)


def rows() -> list[dict]:
    train = load_split("train")[:ROWS]
    for index, row in enumerate(train):  # a continuation for ContinuationTrainer: the next clip's sentence
        row["continuation"] = train[(index + 1) % len(train)]["text"]
    return train


def run(output_dir: str, name: str, global_micro_batch: int, accumulation: int, extra: dict) -> None:
    trainer_class, arguments_class, model_settings, settings = TRAINERS[name]
    torch.manual_seed(0)
    model, processor = from_preset("tiny", **model_settings)
    initial = {k: v.clone() for k, v in model.projector.state_dict().items()}
    per_device, remainder = divmod(global_micro_batch, int(os.environ.get("WORLD_SIZE", 1)))  # set by torchrun
    assert remainder == 0, "the global micro-batch must split evenly over the processes"
    warmup = {"warmup_steps": 0, **({"warmup_ratio": 0.0} if WARMUP_RATIO_FIELD else {})}
    if "feature_cache_dir" in extra:
        extra = {**extra, "feature_cache_dir": os.path.join(output_dir, extra["feature_cache_dir"])}
    args = arguments_class(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **warmup,
        **settings,
        **extra,
    )
    builds = []
    build = feature_cache.build_feature_cache
    feature_cache.build_feature_cache = lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs)
    try:
        trainer = trainer_class(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows()), processing_class=processor
        )
    finally:
        feature_cache.build_feature_cache = build
    recorder = trainer.data_collator = RecordingCollator(trainer.data_collator)
    trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(output_dir, f"builds_rank{rank}.json"), "w") as file:
        json.dump(len(builds), file)
    # The loader may collate one batch ahead of the last step: keep the micro-batches that were trained on.
    with open(os.path.join(output_dir, f"batches_rank{rank}.json"), "w") as file:
        json.dump(recorder.batches[: STEPS * accumulation], file)
    if trainer.accelerator.is_main_process:
        projector = {k: v.contiguous() for k, v in model.projector.state_dict().items()}
        save_file(projector, os.path.join(output_dir, "projector.safetensors"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        update = max(float((projector[k] - initial[k]).abs().max()) for k in initial)
        with open(os.path.join(output_dir, "result.json"), "w") as file:
            json.dump({"losses": losses, "world_size": trainer.args.world_size, "largest_update": update}, file)


if __name__ == "__main__":
    for case, *settings in CASES:
        run(os.path.join(sys.argv[1], case), *settings)
