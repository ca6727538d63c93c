"""The papers' metrics: WER (ASR), BLEU / chrF / COMET (ST), SQuAD EM / F1 (spoken QA), recall@k (retrieval).

WER comes from jiwer and BLEU / chrF from sacrebleu (the optional `eval` extra, imported lazily); COMET from
`unbabel-comet`, which is not part of any extra because it downloads model weights. What those packages lack is
written here: the papers' text normalisation, the mean of per-utterance WERs with a defined empty-reference rule,
SQuAD v1.1 exact match / F1 and retrieval recall@k.

Word error rates are fractions (0.25, not 25); BLEU, chrF and SQuAD scores are percentages (0-100), as their
reference implementations report them; recall@k is a fraction in [0, 1].
"""

from __future__ import annotations

import importlib
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

_EVAL_EXTRA_HINT = 'pip install "speechllm_hf[eval]"'
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def require_optional(module: str, hint: str = _EVAL_EXTRA_HINT) -> ModuleType:
    """Imports an optional dependency, or raises an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"This metric needs the `{module}` package: {hint}") from err


def _check_pairs(
    references: Sequence, predictions: Sequence, names: tuple[str, str] = ("references", "predictions")
) -> None:
    """Rejects a bare string, empty inputs and inputs of different lengths."""
    for name, values in zip(names, (references, predictions)):
        if isinstance(values, str):
            raise TypeError(f"`{name}` must be a list of strings, not a single string.")
    if len(references) != len(predictions):
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same length; got {len(references)} and {len(predictions)}."
        )
    if len(references) == 0:
        raise ValueError(f"`{names[0]}` and `{names[1]}` are empty: there is nothing to score.")


# ----------------------------------------------------------------------------------------------------------------- WER
def normalize_text(text: str) -> str:
    """The papers' WER normalisation: lower-case, delete punctuation, collapse whitespace, strip.

    Deleted characters are every Unicode punctuation character (category P*) and every ASCII `string.punctuation`
    character: the original deleted `string.punctuation`, so on ASCII text this matches it exactly (symbols such as
    `$`, `%` or `+` included, although Unicode classes them as S*), and it also removes the curly quotes, dashes and
    non-Latin punctuation that the ASCII set misses. Punctuation is deleted, not replaced by a space, as in the
    original: apostrophes inside words join them ("don't" and "don’t" both become "dont", so contractions still match
    each other), and hyphenated words join too ("well-known" -> "wellknown").

    Args:
        text: Any string.

    Returns:
        The normalised string; words are separated by single spaces.
    """
    lowered = text.lower()
    kept = (ch for ch in lowered if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    return " ".join("".join(kept).split())


def _words(texts: Iterable[str], normalize: bool) -> list[str]:
    # Whitespace is always collapsed, normalised or not: jiwer would otherwise count "a\tb" as one word.
    return [normalize_text(t) if normalize else " ".join(t.split()) for t in texts]


def corpus_wer(references: Sequence[str], predictions: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate: total edits (S + D + I) over the corpus / total reference words.

    A reference that is empty (after normalisation) adds no reference words, and each predicted word counts as an
    insertion.

    Args:
        references: One reference transcript per utterance.
        predictions: One predicted transcript per utterance.
        normalize: Apply `normalize_text` to both sides first.

    Returns:
        The corpus WER as a fraction (it can exceed 1 when there are many insertions).

    Raises:
        ValueError: On empty or mismatched inputs, or when every reference is empty (a zero denominator).
    """
    _check_pairs(references, predictions)
    jiwer = require_optional("jiwer")
    refs, hyps = _words(references, normalize), _words(predictions, normalize)
    total_ref_words = sum(len(r.split()) for r in refs)
    if total_ref_words == 0:
        raise ValueError("Every reference is empty (after normalisation): the corpus WER is undefined.")
    # Empty references are scored here rather than passed to jiwer: jiwer 3 rejects them.
    edits = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    scored = [(r, h) for r, h in zip(refs, hyps) if r]
    out = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
    edits += out.substitutions + out.deletions + out.insertions
    return edits / total_ref_words


def mean_utterance_wer(references: Sequence[str], predictions: Sequence[str], normalize: bool = True) -> float:
    """Mean of per-utterance WERs: what the contrastive paper reported (not `corpus_wer`, which weights by length).

    Empty-reference rule: an utterance whose reference is empty (after normalisation) scores 0.0 if its prediction is
    empty too, else 1.0. Its WER is otherwise undefined (zero reference words); capping it at 1.0, the WER of a fully
    wrong non-empty utterance, keeps a single hallucination from dominating the mean.

    Args:
        references: One reference transcript per utterance.
        predictions: One predicted transcript per utterance.
        normalize: Apply `normalize_text` to both sides first.

    Returns:
        The mean per-utterance WER as a fraction.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    _check_pairs(references, predictions)
    jiwer = require_optional("jiwer")
    refs, hyps = _words(references, normalize), _words(predictions, normalize)
    scores = [jiwer.wer(r, h) if r else float(bool(h)) for r, h in zip(refs, hyps)]
    return sum(scores) / len(scores)


# -------------------------------------------------------------------------------------------------- BLEU, chrF, COMET
@dataclass(frozen=True)
class CorpusScore:
    """A sacrebleu corpus score with the signature that makes it reproducible.

    Attributes:
        score: The score, 0-100.
        signature: sacrebleu's signature string, e.g. "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0".
    """

    score: float
    signature: str


def _reference_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Turns one reference (or one list of references) per prediction into sacrebleu's reference streams.

    sacrebleu wants one stream per reference index; predictions with fewer references are padded with None, which
    sacrebleu ignores.
    """
    if all(isinstance(r, str) for r in references):
        return [list(references)]
    if any(isinstance(r, str) or len(r) == 0 for r in references):
        raise ValueError("`references` must hold one string per prediction, or one non-empty list per prediction.")
    n_streams = max(len(r) for r in references)
    return [[r[i] if i < len(r) else None for r in references] for i in range(n_streams)]


def sacrebleu_score(
    metric: str,
    references: Sequence[str] | Sequence[Sequence[str]],
    predictions: Sequence[str],
    **kwargs,
) -> CorpusScore:
    """A sacrebleu corpus score and its signature.

    Args:
        metric: "bleu" or "chrf".
        references: One reference per prediction, or one list of references per prediction (lengths may differ).
        predictions: The system outputs, detokenised.
        **kwargs: Options of `sacrebleu.metrics.BLEU` / `CHRF` (e.g. `tokenize="intl"`, `lowercase=True`,
            `word_order=2` for chrF++).

    Returns:
        The score (0-100) and sacrebleu's signature.

    Raises:
        ValueError: On an unknown metric, or on empty or mismatched inputs.
    """
    classes = {"bleu": "BLEU", "chrf": "CHRF"}
    if metric not in classes:
        raise ValueError(f"`metric` must be one of {sorted(classes)}; got {metric!r}.")
    _check_pairs(references, predictions)
    sacrebleu = require_optional("sacrebleu")
    scorer = getattr(sacrebleu, classes[metric])(**kwargs)
    result = scorer.corpus_score(list(predictions), _reference_streams(references))
    return CorpusScore(score=float(result.score), signature=str(scorer.get_signature()))


def bleu(references: Sequence[str] | Sequence[Sequence[str]], predictions: Sequence[str], **kwargs) -> float:
    """sacrebleu corpus BLEU, 0-100: `sacrebleu_score("bleu", ...)` (which documents the arguments) without the
    signature."""
    return sacrebleu_score("bleu", references, predictions, **kwargs).score


def chrf(references: Sequence[str] | Sequence[Sequence[str]], predictions: Sequence[str], **kwargs) -> float:
    """sacrebleu corpus chrF, 0-100 (chrF++ with `word_order=2`): `sacrebleu_score("chrf", ...)` (which documents the
    arguments) without the signature."""
    return sacrebleu_score("chrf", references, predictions, **kwargs).score


def comet(
    sources: Sequence[str],
    references: Sequence[str],
    predictions: Sequence[str],
    model: str = "Unbabel/wmt22-comet-da",
    batch_size: int = 16,
) -> float:
    """COMET system score (the mean segment score, about 0-1 for wmt22-comet-da, not a percentage).

    Needs `unbabel-comet`, which downloads the model on first use; it runs on one GPU when CUDA is available.

    Args:
        sources: The source-language transcripts.
        references: One reference translation per source.
        predictions: One system translation per source.
        model: A COMET model id on the Hub.
        batch_size: Segments per forward pass.

    Returns:
        The COMET system score.

    Raises:
        ImportError: When `unbabel-comet` is not installed.
        ValueError: On empty or mismatched inputs.
    """
    _check_pairs(sources, references, ("sources", "references"))
    _check_pairs(sources, predictions, ("sources", "predictions"))
    comet_module = require_optional(
        "comet", hint="pip install unbabel-comet (it downloads the COMET model on first use)"
    )
    scorer = comet_module.load_from_checkpoint(comet_module.download_model(model))
    data = [{"src": s, "mt": p, "ref": r} for s, r, p in zip(sources, references, predictions)]
    output = scorer.predict(data, batch_size=batch_size, gpus=int(torch.cuda.is_available()))
    return float(output.system_score)


# ------------------------------------------------------------------------------------------------------------ SQuAD
# The official SQuAD v1.1 script is not a package; the maintained ports (HF `evaluate`, torchmetrics) bring heavy
# dependencies for a dozen lines, so its normalisation and scoring are re-implemented here, unchanged.
def _squad_normalize(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower-case, delete ASCII punctuation, drop a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def _squad_f1(gold: str, prediction: str) -> float:
    """Token-level F1; as in the official v1.1 script it is 0 when either side normalises to nothing."""
    gold_tokens, pred_tokens = _squad_normalize(gold).split(), _squad_normalize(prediction).split()
    overlap = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(gold_answers: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1: the best score over each question's gold answers, averaged over questions.

    Args:
        gold_answers: For each question, its non-empty list of accepted answers.
        predictions: One predicted answer per question.

    Returns:
        `{"exact_match": ..., "f1": ...}`, both percentages (0-100).

    Raises:
        ValueError: On empty or mismatched inputs, or a question without gold answers.
    """
    _check_pairs(gold_answers, predictions, ("gold_answers", "predictions"))
    exact_match = f1 = 0.0
    for index, (golds, prediction) in enumerate(zip(gold_answers, predictions)):
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"gold_answers[{index}] must be a non-empty list of answers; got {golds!r}.")
        exact_match += max(float(_squad_normalize(g) == _squad_normalize(prediction)) for g in golds)
        f1 += max(_squad_f1(g, prediction) for g in golds)
    return {"exact_match": 100 * exact_match / len(predictions), "f1": 100 * f1 / len(predictions)}


# -------------------------------------------------------------------------------------------------------- Retrieval
def _square_scores(similarity: torch.Tensor | np.ndarray) -> np.ndarray:
    """`similarity` as a float64 numpy array, checked to be a non-empty, NaN-free square matrix."""
    if isinstance(similarity, torch.Tensor):
        # float64 first: numpy has no bfloat16, and the upcast keeps close scores distinct.
        similarity = similarity.detach().to(device="cpu", dtype=torch.float64).numpy()
    scores = np.asarray(similarity, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] == 0:
        raise ValueError(f"`similarity` must be a non-empty square matrix; got shape {scores.shape}.")
    if np.isnan(scores).any():
        raise ValueError("`similarity` holds NaN: ranks would be meaningless.")
    return scores


def _check_ks(ks: Sequence[int]) -> None:
    """Rejects an empty `ks` and any k that is not a positive integer (bools included)."""
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
    if bad or len(ks) == 0:
        raise ValueError(f"`ks` must be a non-empty list of positive integers; got {list(ks)}.")


def retrieval_recall_at_k(similarity: torch.Tensor | np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of the row queries of a square similarity matrix whose correct item for query i is item i.

    Tie rule (pessimistic): the rank of the correct item is 1 + the number of OTHER items scoring at least as high,
    so a tie never counts as a hit for free (a constant matrix gives rank n for every query). A k at or above the
    number of items makes every query a hit.

    Args:
        similarity: An (n, n) matrix; `similarity[i, j]` scores query i against item j. No NaN.
        ks: The cut-offs, positive integers.

    Returns:
        `{"R@1": ..., "R@5": ...}`: the fraction of queries whose correct item ranks within k, in [0, 1].

    Raises:
        ValueError: On a non-square, empty or NaN-holding matrix, or a non-positive k.
    """
    scores = _square_scores(similarity)
    _check_ks(ks)
    correct = np.diag(scores)[:, None]
    # Counts the correct item itself (>= its own score), which is the "1 +" of the rank.
    ranks = (scores >= correct).sum(axis=1)
    return {f"R@{k}": float((ranks <= k).mean()) for k in ks}


def retrieval_metrics(similarity: torch.Tensor | np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k in both directions for a text/speech similarity matrix.

    Orientation: `similarity[i, j]` = sim(text_i, speech_j), as in the contrastive loss (S = T @ S^T), and the
    correct pairs are on the diagonal. Text -> speech ranks each row; speech -> text ranks each column. Ties count
    against the correct item (see `retrieval_recall_at_k`).

    Args:
        similarity: An (n, n) text-by-speech similarity matrix.
        ks: The cut-offs, positive integers.

    Returns:
        `{"text_to_speech/R@1": ..., "speech_to_text/R@1": ..., ...}`, fractions in [0, 1].
    """
    scores = _square_scores(similarity)
    text_to_speech = retrieval_recall_at_k(scores, ks)
    speech_to_text = retrieval_recall_at_k(scores.T, ks)
    return {
        **{f"text_to_speech/{key}": value for key, value in text_to_speech.items()},
        **{f"speech_to_text/{key}": value for key, value in speech_to_text.items()},
    }


__all__ = [
    "CorpusScore",
    "bleu",
    "chrf",
    "comet",
    "corpus_wer",
    "mean_utterance_wer",
    "normalize_text",
    "require_optional",
    "retrieval_metrics",
    "retrieval_recall_at_k",
    "sacrebleu_score",
    "squad_em_f1",
]
