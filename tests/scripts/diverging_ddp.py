"""Two processes train the tiny model with a checkpoint every step; on process 1 alone, the loss of step 3 is NaN.
Each process writes the error it stopped with to OUT/rank<N>.txt, then both meet at a barrier: a process that did
not stop would train on and never reach it.

    accelerate launch --multi_gpu --num_processes 2 diverging_ddp.py OUT
"""

import sys
from pathlib import Path

import datasets
import torch

from speechllm_hf import from_preset
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training import SpeechLlmTrainer, SpeechLlmTrainingArguments
from speechllm_hf.training.divergence import TrainingDivergedError


class NanOnProcess1AtStep3(SpeechLlmTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.args.process_index == 1 and self.state.global_step == 2:
            loss = loss * float("nan")
        return loss


output_dir = Path(sys.argv[1])
torch.manual_seed(0)
model, processor = from_preset("tiny", projector_type="mlp")
args = SpeechLlmTrainingArguments(
    output_dir=str(output_dir),
    max_steps=5,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="steps",
    save_steps=1,
    use_cpu=True,
    disable_tqdm=True,
    report_to="none",
    seed=0,
)
trainer = NanOnProcess1AtStep3(
    model=model,
    args=args,
    train_dataset=datasets.Dataset.from_list(load_split("train")[:16]),
    processing_class=processor,
)
try:
    trainer.train()
except TrainingDivergedError as err:
    (output_dir / f"rank{args.process_index}.txt").write_text(str(err))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
