"""Evaluation metrics: WER, BLEU / chrF / COMET, SQuAD exact match / F1 and retrieval recall@k."""

from . import metrics
from .metrics import *  # noqa: F403  (the metrics, listed once in metrics.__all__)

__all__ = list(metrics.__all__)
