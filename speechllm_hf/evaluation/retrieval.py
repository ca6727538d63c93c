"""Speech <-> text retrieval on a held-out set, per LLM layer: R@1/R@5 both ways, the contrastive loss, heat maps.

The pooled embeddings are those the contrastive loss compares (see `ContrastiveTrainer`): transcript tokens alone and
projector outputs alone, each run after the same sink token as in training (left out of the pooling), mean-pooled at
each hidden-state layer. `similarity[i, j]` = cos(text_i, speech_j); R@k is
computed over the WHOLE held-out set (chance R@1 = 1 / N), the loss is the per-batch InfoNCE of training averaged
over the batches.
"""

from __future__ import annotations

import json
import os
import types

import torch
from tqdm.auto import tqdm

from ..data.collators import ContrastiveCollator
from ..training.contrastive import ContrastiveTrainingArguments, contrastive_states, sink_token_id
from ..training.contrastive_losses import contrastive_layer_indices, info_nce, mean_pool, similarity
from .metrics import retrieval_metrics


@torch.no_grad()
def evaluate_retrieval(
    model,
    processor,
    rows,
    layers: str | int | list[int] = "all",
    batch_size: int = 16,
    temperature: float = 0.1,
    text_column: str = "text",
    audio_column: str = "audio",
    sink_token: str = ContrastiveTrainingArguments.sink_token,
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Retrieval metrics and contrastive loss per layer on `rows` (a list of dicts or a `datasets.Dataset`).

    `layers` is any layer spec of `contrastive_layer_indices`: "all", an index, a list, or "0,32". `sink_token` is
    the leading token left out of the pooling, as in training (`ContrastiveTrainingArguments.sink_token`, with the
    same default): give the one the projector was trained with, 'none' for the published form.

    Returns:
        `(results, similarities)`: `results["layer_<i>"]` holds `text_to_speech/R@1`, `text_to_speech/R@5`,
        `speech_to_text/R@1`, `speech_to_text/R@5`, `loss` and `chance_R@1`; `similarities[i]` is the (N, N) cosine
        similarity matrix of layer i (rows text, columns speech).
    """
    model.eval()
    indices = contrastive_layer_indices(model.config.text_config.num_hidden_layers, layers)
    collator = ContrastiveCollator(processor, text_column=text_column, audio_column=audio_column)
    pooled: dict[int, tuple[list, list]] = {layer: ([], []) for layer in indices}
    losses: dict[int, list[float]] = {layer: [] for layer in indices}
    device = next(model.parameters()).device
    sink_id = sink_token_id(processor.tokenizer, sink_token, model.config.audio_token_id)
    for start in tqdm(range(0, len(rows), batch_size), desc="retrieval"):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        inputs = {k: v.to(device) for k, v in collator(batch).items()}
        states, _ = contrastive_states(
            model, model, inputs, indices, pad_token_id=processor.tokenizer.pad_token_id, sink_token_id=sink_id
        )
        for layer, (text, text_mask, speech, speech_mask) in states.items():
            text_pooled, speech_pooled = mean_pool(text, text_mask), mean_pool(speech, speech_mask)
            pooled[layer][0].append(text_pooled.cpu())
            pooled[layer][1].append(speech_pooled.cpu())
            if len(batch) > 1:
                losses[layer].append(float(info_nce(text_pooled, speech_pooled, temperature).loss))
    results, similarities = {}, {}
    for layer, (texts, speeches) in pooled.items():
        matrix = similarity(torch.cat(texts), torch.cat(speeches), 1.0)  # cosine similarity, (N, N)
        similarities[layer] = matrix
        results[f"layer_{layer}"] = {
            **retrieval_metrics(matrix),
            "loss": sum(losses[layer]) / len(losses[layer]) if losses[layer] else float("nan"),
            "chance_R@1": 1 / matrix.shape[0],
        }
    return results, similarities


def import_pyplot() -> types.ModuleType:
    """matplotlib's pyplot on its file-only Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError('Plots need matplotlib: pip install "speechllm_hf[plots]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(matrix: torch.Tensor, path: str | os.PathLike, title: str = "") -> None:
    """Save a heat map of a (text x speech) similarity matrix as PNG; the diagonal holds the true pairs."""
    plt = import_pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix.float().numpy(), cmap="viridis", aspect="auto")
    axis.set_xlabel("speech clip")
    axis.set_ylabel("transcript")
    axis.set_title(title or "cosine similarity (diagonal = true pairs)")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_retrieval_report(results: dict, similarities: dict, output_dir: str | os.PathLike) -> list[str]:
    """`retrieval.json` plus one heat map per layer in `output_dir`; returns the written paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "retrieval.json")]
    with open(paths[0], "w") as file:
        json.dump(results, file, indent=2)
    for layer, matrix in similarities.items():
        path = os.path.join(output_dir, f"similarity_layer_{layer}.png")
        plot_similarity(matrix, path, f"layer {layer}: cosine similarity, transcripts x speech")
        paths.append(path)
    return paths


__all__ = ["evaluate_retrieval", "import_pyplot", "plot_similarity", "write_retrieval_report"]
