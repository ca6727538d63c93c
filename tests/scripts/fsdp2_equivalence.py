"""Three SGD steps of the tiny model wrapped as examples/accelerate/fsdp.yaml has accelerate wrap it: FSDP2's
`fully_shard` on each `LlamaDecoderLayer`, then on the whole model, whose root unit mixes the frozen encoder,
embeddings and output layer with the trainable projector. On 2 CPU processes (gloo), each on its half of every 8-clip
batch; each process also trains an unsharded copy on the whole batches. Writes both projectors (the sharded one
gathered as FULL_STATE_DICT gathers it) and whether the model was sharded.

    accelerate launch --multi_gpu --num_processes 2 fsdp2_equivalence.py OUT

accelerate applies FSDP on GPUs only (a CPU run with fsdp.yaml trains without it), so this calls `fully_shard` as
accelerate's `fsdp2_prepare_model` does, and normalises the loss as the Trainer does: the sum over the process's
response tokens divided by the global batch's, times the number of processes, since FSDP averages gradients.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from speechllm_hf import from_preset
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator
from speechllm_hf.models.speechllm.loading_speechllm import is_projector_key
from speechllm_hf.quickstart.corpus import load_split

STEPS, BATCH = 3, 8


def train(model, batches, num_items, scale):
    """SGD at lr 1 (the update is minus the gradient) on the trainable parameters."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for batch, count in zip(batches, num_items):
        loss = model(**batch, num_items_in_batch=count).loss * scale
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = load_split("train")[: STEPS * BATCH]
    steps = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    half = BATCH // world_size

    torch.manual_seed(0)
    reference, processor = from_preset("tiny", encoder_type="whisper", projector_type="mlp")  # no dropout
    initial = {k: v.clone() for k, v in reference.state_dict().items() if is_projector_key(k)}
    collate = SpeechLlmCollator(processor)
    whole = [collate(step) for step in steps]
    num_items = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in whole]
    train(reference, whole, num_items, scale=1)

    torch.manual_seed(0)
    model, _ = from_preset("tiny", encoder_type="whisper", projector_type="mlp")
    for module in reversed(list(model.modules())):
        if isinstance(module, LlamaDecoderLayer):
            fully_shard(module)
    fully_shard(model)
    train(model, [collate(step[rank * half : (rank + 1) * half]) for step in steps], num_items, scale=world_size)
    sharded = isinstance(model.projector.linear_in.weight, DTensor)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        save_file({k: v for k, v in full.items() if is_projector_key(k)}, f"{output_dir}/fsdp.safetensors")
        expected = {k: v.contiguous() for k, v in reference.state_dict().items() if is_projector_key(k)}
        save_file(expected, f"{output_dir}/reference.safetensors")
        update = max(float((expected[k] - initial[k]).abs().max()) for k in initial)
        with open(f"{output_dir}/result.json", "w") as file:
            json.dump({"world_size": world_size, "sharded": sharded, "largest_update": update}, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
