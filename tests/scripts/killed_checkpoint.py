"""Trains the tiny model with a checkpoint every 2 steps and kills itself with SIGKILL (nothing cleans up) half-way
through writing checkpoint-4: after its projector and optimizer state, before its RNG and trainer state. The run is
the one the tests' `make_trainer` builds (backbones in BACKBONES, no warmup), so that they may resume it.

    python killed_checkpoint.py OUTPUT_DIR BACKBONES
"""

import os
import signal
import sys

import datasets
import torch
from transformers import Trainer

from speechllm_hf import from_preset
from speechllm_hf.compat import WARMUP_RATIO_FIELD
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training import SpeechLlmTrainer, SpeechLlmTrainingArguments

save_rng_state = Trainer._save_rng_state


def killed_at_step_4(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)


Trainer._save_rng_state = killed_at_step_4
torch.manual_seed(0)
model, processor = from_preset(
    "tiny",
    projector_type="mlp",
    encoder_name_or_path=os.path.join(sys.argv[2], "hubert"),
    text_name_or_path=os.path.join(sys.argv[2], "llm"),
)
args = SpeechLlmTrainingArguments(
    output_dir=sys.argv[1],
    max_steps=6,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    save_strategy="steps",
    save_steps=2,
    use_cpu=True,
    disable_tqdm=True,
    report_to="none",
    seed=0,
    warmup_steps=0,
    **({"warmup_ratio": 0.0} if WARMUP_RATIO_FIELD else {}),
)
trainer = SpeechLlmTrainer(
    model=model,
    args=args,
    train_dataset=datasets.Dataset.from_list(load_split("train")[:16]),
    processing_class=processor,
)
trainer.train()
