"""Training: losses and trainers for the projector."""

from .arguments import SpeechLlmTrainingArguments
from .continuation import ContinuationTrainer, ContinuationTrainingArguments
from .contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from .contrastive_losses import (
    ContrastiveOutput,
    LearnableTemperature,
    contrastive_layer_indices,
    gather_batch_sizes,
    gather_with_grad,
    global_targets,
    info_nce,
    mean_pool,
    similarity,
    sinkhorn_distance,
    summed_layer_loss,
    wasserstein_contrastive_loss,
)
from .lora import add_lora
from .trainer import SpeechLlmTrainer

__all__ = [
    "SpeechLlmTrainer",
    "SpeechLlmTrainingArguments",
    "ContrastiveTrainer",
    "ContrastiveTrainingArguments",
    "ContinuationTrainer",
    "ContinuationTrainingArguments",
    "add_lora",
    "ContrastiveOutput",
    "mean_pool",
    "contrastive_layer_indices",
    "summed_layer_loss",
    "similarity",
    "info_nce",
    "LearnableTemperature",
    "gather_batch_sizes",
    "gather_with_grad",
    "global_targets",
    "sinkhorn_distance",
    "wasserstein_contrastive_loss",
]
