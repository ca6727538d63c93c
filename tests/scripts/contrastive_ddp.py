"""One ContrastiveTrainer step with gathered negatives on a fixed 8-clip batch; writes the logged loss and the
updated projector. Run once in 1 process with a batch of 8 and once under `accelerate launch` with 2 x 4:
SGD with lr 1 and no clipping makes the update equal to minus the gradient, so equal projectors = equal gradients.

    python contrastive_ddp.py OUT PER_DEVICE_BATCH
"""

import json
import sys

import datasets
import torch
from safetensors.torch import save_file

from speechllm_hf import from_preset
from speechllm_hf.corpus import load_split
from speechllm_hf.training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments

output_dir, per_device = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model, processor = from_preset("tiny", encoder_type="whisper", projector_type="mlp")  # no dropout
args = ContrastiveTrainingArguments(
    output_dir=output_dir,
    max_steps=1,
    per_device_train_batch_size=per_device,
    optim="sgd",
    learning_rate=1.0,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=0.0,
    gather_negatives=True,
    contrastive_layers="all",
    logging_steps=1,
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
trainer = ContrastiveTrainer(
    model=model,
    args=args,
    train_dataset=datasets.Dataset.from_list(load_split("train")[:8]),
    processing_class=processor,
)
trainer.train()
if trainer.accelerator.is_main_process:
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    save_file(
        {k: v.contiguous() for k, v in model.projector.state_dict().items()}, f"{output_dir}/projector.safetensors"
    )
    with open(f"{output_dir}/result.json", "w") as file:
        json.dump({"loss": loss, "world_size": trainer.args.world_size}, file)
