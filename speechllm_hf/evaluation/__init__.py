"""Evaluation metrics: WER, BLEU / chrF / COMET, SQuAD exact match / F1 and retrieval recall@k."""

from .metrics import (
    CorpusScore,
    bleu,
    chrf,
    comet,
    corpus_wer,
    mean_utterance_wer,
    normalize_text,
    retrieval_metrics,
    retrieval_recall_at_k,
    sacrebleu_score,
    squad_em_f1,
)

__all__ = [
    "CorpusScore",
    "bleu",
    "chrf",
    "comet",
    "corpus_wer",
    "mean_utterance_wer",
    "normalize_text",
    "retrieval_metrics",
    "retrieval_recall_at_k",
    "sacrebleu_score",
    "squad_em_f1",
]
