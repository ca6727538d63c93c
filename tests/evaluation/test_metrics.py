"""Tests of speechllm_hf.evaluation.metrics; every expected number is derived by hand in a comment."""

import sys

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechllm_hf.evaluation import (
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

# ----------------------------------------------------------------------------------------------------------------- WER


def test_corpus_and_mean_utterance_wer_differ():
    refs, preds = ["a b c d", "e f"], ["a x c d", ""]
    # Utterance 1: 1 substitution / 4 words = 0.25; utterance 2: 2 deletions / 2 words = 1.0.
    # Corpus: (1 + 2) edits / (4 + 2) words = 0.5; mean of utterances: (0.25 + 1.0) / 2 = 0.625.
    assert corpus_wer(refs, preds) == pytest.approx(0.5)
    assert mean_utterance_wer(refs, preds) == pytest.approx(0.625)


def test_insertions_can_push_wer_above_one():
    # "a" -> "a b c": 2 insertions / 1 reference word = 2.0, for both definitions (a single utterance).
    assert corpus_wer(["a"], ["a b c"]) == pytest.approx(2.0)
    assert mean_utterance_wer(["a"], ["a b c"]) == pytest.approx(2.0)


def test_normalisation_removes_case_and_punctuation():
    refs, preds = ["Hello, World!"], ["hello world"]
    assert corpus_wer(refs, preds) == 0.0
    assert mean_utterance_wer(refs, preds) == 0.0
    # Raw: "Hello," != "hello" and "World!" != "world": 2 substitutions / 2 words = 1.0.
    assert corpus_wer(refs, preds, normalize=False) == pytest.approx(1.0)
    assert mean_utterance_wer(refs, preds, normalize=False) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Hello,   World!\t", "hello world"),
        # Apostrophes are deleted, straight or curly (U+2019 is Unicode punctuation, not in string.punctuation).
        ("Don't", "dont"),
        ("Don\u2019t", "dont"),
        # Unicode punctuation: inverted question mark (Po) and guillemets (Pi / Pf); letters with accents stay.
        ("¿Qué tal? «Bien»", "qué tal bien"),
        # ASCII symbols in string.punctuation go too, as in the original's strip (Unicode calls them S*, not P*).
        ("$5 + 10%", "5 10"),
        ("well-known", "wellknown"),
        ("?!", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_empty_reference_rule():
    # Utterance 1 has an empty reference and an empty prediction: 0.0; utterance 2 is exact: 0.0.
    assert mean_utterance_wer(["", "a"], ["", "a"]) == 0.0
    # Empty reference, non-empty prediction: 1.0 by convention; mean (1.0 + 0.0) / 2 = 0.5.
    assert mean_utterance_wer(["", "a"], ["x y", "a"]) == pytest.approx(0.5)
    # Corpus: the 2 predicted words are insertions, over the 1 reference word: 2.0.
    assert corpus_wer(["", "a"], ["x y", "a"]) == pytest.approx(2.0)
    # A reference that normalisation empties follows the same rule; raw, "?!" vs "" is 1 deletion / 1 word.
    assert mean_utterance_wer(["?!"], [""]) == 0.0
    assert mean_utterance_wer(["?!"], [""], normalize=False) == pytest.approx(1.0)


def test_corpus_wer_without_reference_words_raises():
    with pytest.raises(ValueError, match="empty"):
        corpus_wer(["?!", ""], ["a", ""])


sentence = st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), min_size=1, max_size=6).map(" ".join)
maybe_empty = st.lists(st.text(alphabet="abcxyz,.!", min_size=1, max_size=4), max_size=6).map(" ".join)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(sentence, maybe_empty), min_size=1, max_size=5))
def test_wer_properties(pairs):
    refs, preds = [r for r, _ in pairs], [p for _, p in pairs]
    assert corpus_wer(refs, refs) == 0.0
    assert mean_utterance_wer(refs, refs) == 0.0
    assert corpus_wer(refs, preds) >= 0.0
    assert mean_utterance_wer(refs, preds) >= 0.0


# --------------------------------------------------------------------------------------------------------- BLEU, chrF
HYPS = ["The cat sat on the mat.", "It is raining today in Paris."]
REFS = ["The cat is on the mat.", "Today it rains in Paris."]
REFS_2 = ["A cat was sitting on the mat.", "It rains today in Paris."]


def test_bleu_and_chrf_match_sacrebleu():
    assert bleu(REFS, HYPS) == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert chrf(REFS, HYPS) == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    # Options reach sacrebleu: chrF++ is CHRF(word_order=2).
    assert chrf(REFS, HYPS, word_order=2) == sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score


def test_bleu_and_chrf_reproduce_sacrebleus_documented_example():
    # The example of sacrebleu's README (two reference sets), which documents BLEU = 48.53 and chrF2 = 59.73.
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    first = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    second = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    per_prediction = [list(pair) for pair in zip(first, second)]
    assert round(bleu(per_prediction, hypotheses), 2) == 48.53
    assert round(chrf(per_prediction, hypotheses), 2) == 59.73


def test_multiple_references():
    per_prediction = [[r1, r2] for r1, r2 in zip(REFS, REFS_2)]
    assert bleu(per_prediction, HYPS) == sacrebleu.corpus_bleu(HYPS, [REFS, REFS_2]).score
    # A variable number of references per prediction: sacrebleu ignores the None padding.
    uneven = [[REFS[0]], [REFS[1], REFS_2[1]]]
    assert bleu(uneven, HYPS) == sacrebleu.corpus_bleu(HYPS, [REFS, [None, REFS_2[1]]]).score
    # The extra reference counts: it shares "It" and "today in Paris ." with the second hypothesis.
    assert bleu(uneven, HYPS) > bleu(REFS, HYPS)


def test_bleu_and_chrf_hand_checkable():
    # Identical outputs: every n-gram precision is 1 and there is no brevity penalty (sentences of >= 4 tokens, so
    # 4-grams exist): 100. No shared word or character: every precision is 0: 0.
    same = ["the quick brown fox jumps", "over the lazy dog again"]
    assert bleu(same, same) == pytest.approx(100.0)
    assert chrf(same, same) == pytest.approx(100.0)
    assert bleu(["aaa bbb ccc ddd"], ["xxx yyy zzz www"]) == 0.0
    assert chrf(["aaa bbb ccc ddd"], ["xxx yyy zzz www"]) == 0.0


def test_sacrebleu_score_signature():
    result = sacrebleu_score("bleu", REFS, HYPS, tokenize="intl")
    assert isinstance(result, CorpusScore)
    assert result.score == sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="intl").score
    assert "tok:intl" in result.signature and "nrefs:1" in result.signature
    assert "nrefs:2" in sacrebleu_score("chrf", [[r1, r2] for r1, r2 in zip(REFS, REFS_2)], HYPS).signature
    with pytest.raises(ValueError, match="metric"):
        sacrebleu_score("ter", REFS, HYPS)
    with pytest.raises(ValueError, match="references"):
        bleu([REFS[0], [REFS[1]]], HYPS)
    with pytest.raises(ValueError, match="references"):
        bleu([[REFS[0]], []], HYPS)


# ------------------------------------------------------------------------------------------------------------ SQuAD


def test_squad_hand_computed():
    # Q1: "the cat" normalises to "cat" (article removed) = "cat": EM 100, F1 100.
    # Q2: gold "big red cat" vs "red cat": EM 0; overlap 2, precision 2/2 = 1, recall 2/3,
    # F1 = 2 * (1 * 2/3) / (1 + 2/3) = 0.8. Means: EM (100 + 0) / 2 = 50, F1 (100 + 80) / 2 = 90.
    scores = squad_em_f1([["the cat", "a dog"], ["big red cat"]], ["cat", "red cat"])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(90.0)


def test_squad_max_over_gold_answers_and_normalisation():
    # F1 is the max over golds: "green" shares nothing (0), "big red cat" gives 0.8 (above): 80.
    assert squad_em_f1([["green", "big red cat"]], ["red cat"])["f1"] == pytest.approx(80.0)
    # Case and punctuation go: "Paris." == "paris".
    assert squad_em_f1([["Paris."]], ["paris"]) == {"exact_match": 100.0, "f1": 100.0}
    # Repeated tokens count once each: common(cat cat dog, cat dog dog) = {cat: 1, dog: 1} = 2 tokens,
    # precision = recall = 2/3, F1 = 2/3 -> 66.67.
    assert squad_em_f1([["cat cat dog"]], ["cat dog dog"])["f1"] == pytest.approx(200 / 3)
    # Official v1.1 quirk kept: "the" and "a" both normalise to "": exact match, but F1 0 (no shared token).
    assert squad_em_f1([["the"]], ["a"]) == {"exact_match": 100.0, "f1": 0.0}


def test_squad_rejects_a_question_without_gold_answers():
    with pytest.raises(ValueError, match=r"gold_answers\[1\]"):
        squad_em_f1([["cat"], []], ["cat", "dog"])
    with pytest.raises(ValueError, match=r"gold_answers\[0\]"):
        squad_em_f1(["cat"], ["cat"])


# -------------------------------------------------------------------------------------------------------- Retrieval
# similarity[i, j] = sim(text_i, speech_j); the correct pairs are on the diagonal.
SIM = np.array(
    [
        [0.90, 0.10, 0.20, 0.30],
        [0.80, 0.50, 0.70, 0.05],
        [0.10, 0.20, 0.30, 0.40],
        [0.95, 0.80, 0.70, 0.10],
    ]
)


def test_identity_matrix():
    assert retrieval_recall_at_k(np.eye(5), ks=(1,)) == {"R@1": 1.0}
    assert set(retrieval_metrics(torch.eye(3), ks=(1, 5)).values()) == {1.0}


def test_hand_built_ranks():
    # Rows (text -> speech), rank = 1 + items above the diagonal score:
    # row 0: 0.90 is the top -> 1; row 1: 0.80, 0.70 above 0.50 -> 3; row 2: 0.40 above 0.30 -> 2;
    # row 3: 0.95, 0.80, 0.70 above 0.10 -> 4. R@k = fraction of ranks <= k.
    assert retrieval_recall_at_k(SIM, ks=(1, 2, 3, 4)) == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 1.0}
    # Columns (speech -> text): col 0: 0.95 above 0.90 -> 2; col 1: 0.80 above 0.50 -> 2;
    # col 2: 0.70, 0.70 above 0.30 -> 3; col 3: 0.30, 0.40 above 0.10 -> 3.
    assert retrieval_metrics(SIM, ks=(1, 2, 3)) == {
        "text_to_speech/R@1": 0.25,
        "text_to_speech/R@2": 0.5,
        "text_to_speech/R@3": 0.75,
        "speech_to_text/R@1": 0.0,
        "speech_to_text/R@2": 0.5,
        "speech_to_text/R@3": 1.0,
    }


def test_ties_count_against_the_correct_item():
    # Row 0 ties its correct item with item 1: pessimistic rank 2, so no R@1 hit (strictly-greater ranking would say
    # 1). Rows 1 and 2 are clear wins. R@1 = 2/3, R@2 = 1.
    sim = np.array([[0.5, 0.5, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_recall_at_k(sim, ks=(1, 2)) == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}
    # A constant matrix: every correct item ties with all n = 4 items, rank 4.
    assert retrieval_recall_at_k(np.ones((4, 4)), ks=(1, 3, 4)) == {"R@1": 0.0, "R@3": 0.0, "R@4": 1.0}


def test_retrieval_accepts_tensors_and_large_k():
    tensor = torch.tensor(SIM, dtype=torch.bfloat16, requires_grad=True)
    # bfloat16 rounding keeps this matrix's order; k = 5 > n = 4 makes every query a hit.
    assert retrieval_recall_at_k(tensor, ks=(1, 5)) == {"R@1": 0.25, "R@5": 1.0}


@pytest.mark.parametrize(
    ("similarity", "ks", "match"),
    [
        (np.ones((2, 3)), (1,), "square"),
        (np.ones(3), (1,), "square"),
        (np.ones((0, 0)), (1,), "square"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), (1,), "NaN"),
        (np.eye(2), (0,), "ks"),
        (np.eye(2), (), "ks"),
    ],
)
def test_retrieval_validation(similarity, ks, match):
    with pytest.raises(ValueError, match=match):
        retrieval_recall_at_k(similarity, ks)


# ------------------------------------------------------------------------------------------- Validation, extras


@pytest.mark.parametrize("metric", [corpus_wer, mean_utterance_wer, bleu, chrf])
def test_input_validation(metric):
    with pytest.raises(ValueError, match="2 and 1"):
        metric(["a b", "c"], ["a b"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(TypeError, match="single string"):
        metric("a b", "a b")


def test_squad_and_comet_validate_lengths():
    with pytest.raises(ValueError, match="1 and 2"):
        squad_em_f1([["a"]], ["a", "b"])
    with pytest.raises(ValueError, match="`sources` and `predictions`.*2 and 1"):
        comet(["s1", "s2"], ["r1", "r2"], ["p1"])


def test_comet_without_the_package(monkeypatch):
    # A None entry in sys.modules makes `import comet` fail, whether or not unbabel-comet is installed.
    monkeypatch.setitem(sys.modules, "comet", None)
    with pytest.raises(ImportError, match="pip install unbabel-comet"):
        comet(["source"], ["reference"], ["prediction"])


def test_eval_extra_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jiwer", None)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"speechllm_hf\[eval\]"):
        corpus_wer(["a"], ["a"])
    with pytest.raises(ImportError, match=r"speechllm_hf\[eval\]"):
        bleu(["a"], ["a"])
