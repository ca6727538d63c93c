"""Training: losses and trainers for the projector."""

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

__all__ = [
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
