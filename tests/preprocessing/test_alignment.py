"""CTC forced alignment (speechllm_hf.preprocessing.alignment), mixed speech-text spans (data.mixed), `speechllm-hf
align`."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllm_hf.cli import main
from speechllm_hf.data.collators import mixed_labels
from speechllm_hf.data.mixed import cut_audio, mixed_sequence_layout, sample_spans, strip_punctuation
from speechllm_hf.preprocessing import load_prepared
from speechllm_hf.preprocessing.alignment import (
    align_words,
    ctc_viterbi,
    frame_seconds,
    load_aligner,
    normalize_word,
    token_spans,
)
from speechllm_hf.quickstart.corpus import load_split

# Stated tolerances of the bundled aligner on the 12 `aligned` clips (seconds; measured figures are printed by
# test_bundled_aligner_finds_known_boundaries and recorded in docs/data.md). CTC places a word's start well; its end
# comes early when the word's last sound outlasts the last letter's spike, hence the looser end tolerance.
START_TOLERANCE_S = {"mean": 0.02, "max": 0.05}
END_TOLERANCE_S = {"mean": 0.1, "max": 0.35}


@pytest.fixture(scope="module")
def aligner():
    torch.manual_seed(0)
    return load_aligner()


def reference_viterbi(log_probs: np.ndarray, targets: list[int], blank: int) -> tuple[list[int] | None, float]:
    """Textbook CTC Viterbi, one state and one frame at a time, with the same tie order (stay, move, skip)."""
    extended = [blank]
    for label in targets:
        extended += [label, blank]
    num_frames, num_states = log_probs.shape[0], len(extended)
    score = [[-math.inf] * num_states for _ in range(num_frames)]
    back = [[0] * num_states for _ in range(num_frames)]
    for s in range(min(2, num_states)):
        score[0][s] = float(log_probs[0, extended[s]])
    for t in range(1, num_frames):
        for s in range(num_states):
            options = [score[t - 1][s], score[t - 1][s - 1] if s >= 1 else -math.inf]
            skip_ok = s >= 2 and extended[s] != blank and extended[s] != extended[s - 2]
            options.append(score[t - 1][s - 2] if skip_ok else -math.inf)
            best = max(range(3), key=lambda k: (options[k], -k))
            score[t][s] = options[best] + float(log_probs[t, extended[s]])
            back[t][s] = best
    ends = [num_states - 1] if num_states == 1 else [num_states - 1, num_states - 2]
    state = max(ends, key=lambda s: (score[-1][s], s))
    if score[-1][state] == -math.inf:
        return None, -math.inf
    best_score, path = score[-1][state], []
    for t in range(num_frames - 1, -1, -1):
        path.append(state)
        state -= back[t][state]
    return path[::-1], best_score


def test_viterbi_finds_hand_built_path() -> None:
    # Labels A=1, B=2; blank=0. Targets A A B need a blank between the two As. Each frame strongly prefers one token,
    # and the preferred tokens spell a valid path: A A _ A B B _ _.
    preferred = [1, 1, 0, 1, 2, 2, 0, 0]
    log_probs = torch.full((len(preferred), 3), math.log(0.05))
    log_probs[torch.arange(len(preferred)), torch.tensor(preferred)] = math.log(0.9)
    path = ctc_viterbi(log_probs, [1, 1, 2], blank=0)
    assert path.tolist() == [1, 1, 2, 3, 5, 5, 6, 6]
    assert token_spans(path, 3).tolist() == [[0, 2], [3, 4], [4, 6]]


def test_viterbi_refuses_targets_that_do_not_fit() -> None:
    log_probs = torch.randn(3, 4).log_softmax(-1)
    assert ctc_viterbi(log_probs, [1, 1, 2], blank=0) is None  # A _ A B needs 4 frames
    assert ctc_viterbi(log_probs, [1, 2, 3], blank=0) is not None


def test_viterbi_matches_reference_on_random_emissions() -> None:
    generator = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    feasible = 0
    for _ in range(60):
        num_frames, vocab = rng.randint(1, 30), rng.randint(2, 6)
        targets = [rng.randint(1, vocab - 1) for _ in range(rng.randint(1, 12))]
        log_probs = torch.randn(num_frames, vocab, generator=generator, dtype=torch.float64).mul(3).log_softmax(-1)
        expected, best = reference_viterbi(log_probs.numpy(), targets, blank=0)
        path = ctc_viterbi(log_probs, targets, blank=0)
        if expected is None:
            assert path is None
            continue
        feasible += 1
        assert path.tolist() == expected
        extended = [0] + [x for label in targets for x in (label, 0)]
        path_score = sum(float(log_probs[t, extended[s]]) for t, s in enumerate(path.tolist()))
        assert path_score == pytest.approx(best, abs=1e-9)
        spans = token_spans(path, len(targets))
        assert (spans[:, 1] > spans[:, 0]).all() and (spans[1:, 0] >= spans[:-1, 1]).all()
    assert feasible >= 20  # the comparison really ran on many paths


def test_frame_rate_and_word_normalisation(aligner) -> None:
    model, processor = aligner
    assert frame_seconds(model, processor.feature_extractor.sampling_rate) == pytest.approx(0.02)
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    assert normalize_word("Don't!", alphabet) == "DON'T"
    assert normalize_word("42%", alphabet) == ""


def test_bundled_aligner_finds_known_boundaries(aligner) -> None:
    model, processor = aligner
    start_errors, end_errors, boundary_errors = [], [], []
    for row in load_split("aligned"):
        truth = row["words"]
        words, interpolated = align_words(model, processor, row["audio"], row["text"], contiguous=False)
        assert interpolated == 0 and [w["word"] for w in words] == row["text"].split()
        start_errors += [abs(w["start"] - t["start"]) for w, t in zip(words, truth)]
        end_errors += [abs(w["end"] - t["end"]) for w, t in zip(words, truth)]
        joined, _ = align_words(model, processor, row["audio"], row["text"])
        assert [w["start"] for w in joined] == [w["start"] for w in words] and joined[-1]["end"] == words[-1]["end"]
        for left, right, true_left, true_right in zip(joined, joined[1:], truth, truth[1:]):
            assert left["end"] == right["start"]  # each word starts where the previous ended
            # The boundary is right anywhere in the true pause between the two words.
            boundary_errors.append(max(true_left["end"] - left["end"], left["end"] - true_right["start"], 0.0))
    errors = {"starts": start_errors, "ends": end_errors, "contiguous": boundary_errors}
    figures = {name: (float(np.mean(values)), float(np.max(values)), len(values)) for name, values in errors.items()}
    summary = "; ".join(f"{name} ({n}) {mean:.3f}, {worst:.3f}" for name, (mean, worst, n) in figures.items())
    print(f"\nBundled aligner on 12 aligned clips, abs error in s (mean, max): {summary}")
    for name, tolerance in (
        ("starts", START_TOLERANCE_S),
        ("ends", END_TOLERANCE_S),
        ("contiguous", START_TOLERANCE_S),
    ):
        mean, worst, _ = figures[name]
        assert mean < tolerance["mean"] and worst < tolerance["max"], (name, mean, worst)


def test_out_of_alphabet_words_are_interpolated_and_counted(aligner) -> None:
    model, processor = aligner
    row = load_split("aligned")[0]  # "three white balls are in the chair"
    words = row["text"].split()
    transcript = " ".join(["#1", *words[:3], "42", "%", *words[3:]])
    aligned, interpolated = align_words(model, processor, row["audio"], transcript)
    assert interpolated == 3
    assert [w["word"] for w in aligned] == transcript.split()
    starts, ends = [w["start"] for w in aligned], [w["end"] for w in aligned]
    assert starts[0] == 0.0 and all(s <= e for s, e in zip(starts, ends))
    assert all(nxt == prev for prev, nxt in zip(ends, starts[1:]))
    # The two inner ones share the pause between "balls" and "are".
    balls, are = aligned[3], aligned[6]
    assert balls["end"] <= aligned[4]["start"] <= aligned[5]["end"] <= are["start"] + 1e-9
    assert aligned[4]["end"] - aligned[4]["start"] == pytest.approx(aligned[5]["end"] - aligned[5]["start"], abs=2e-3)
    # Nothing placeable at all: the words share the clip evenly.
    audio, rate = sf.read(row["audio"], dtype="float32")
    nothing, count = align_words(model, processor, audio, "123 456", sampling_rate=rate)
    assert count == 2 and nothing[0]["start"] == 0.0
    assert nothing[1]["end"] == pytest.approx(len(audio) / rate, abs=1e-3)


def _words(count: int) -> list[dict]:
    return [{"word": f"w{i}", "start": i * 0.5, "end": i * 0.5 + 0.5} for i in range(count)]


def test_span_sampling_properties() -> None:
    kinds_first = set()
    for seed in range(200):
        words = _words(random.Random(seed).randint(1, 60))
        spans = sample_spans(words, random.Random(seed))
        assert spans == sample_spans(words, random.Random(seed))  # deterministic for a seed
        assert [w for span in spans for w in span["words"]] == [w["word"] for w in words]  # each word once, in order
        kinds_first.add(spans[0]["kind"])
        for span, nxt in zip(spans, spans[1:]):
            assert {span["kind"], nxt["kind"]} == {"text", "speech"}  # alternating
        for index, span in enumerate(spans):
            low, high = (4, 10) if span["kind"] == "text" else (2, 5)
            last = index == len(spans) - 1
            assert (1 if last else low) <= len(span["words"]) <= high
            first_word = sum(len(s["words"]) for s in spans[:index])
            assert span["start"] == words[first_word]["start"]
            assert span["end"] == words[first_word + len(span["words"]) - 1]["end"]
    assert kinds_first == {"text", "speech"}  # random start kind
    with pytest.raises(ValueError):
        sample_spans(_words(5), random.Random(0), text_span=(0, 3))


def test_span_sampling_removes_punctuation() -> None:
    assert strip_punctuation("\u201cHello,\u201d") == "Hello"
    assert strip_punctuation("don't") == "don't" and strip_punctuation("'quoted'") == "quoted"
    words = [
        {"word": "Hello,", "start": 0.0, "end": 0.4},
        {"word": "--", "start": 0.4, "end": 0.5},
        {"word": "world!", "start": 0.5, "end": 0.9},
    ]
    spans = sample_spans(words, random.Random(0), text_span=(5, 5), speech_span=(5, 5))
    assert spans == [{"kind": spans[0]["kind"], "words": ["Hello", "world"], "start": 0.0, "end": 0.9}]
    joined = sample_spans(words, random.Random(0), text_span=(1, 1), speech_span=(1, 1))
    assert [(s["start"], s["end"]) for s in joined] == [(0.0, 0.5), (0.5, 0.9)]  # "--" went to "Hello"


def test_cut_audio() -> None:
    waveform = np.arange(16000, dtype=np.float32)
    assert cut_audio(waveform, 16000, 0.25, 0.5).tolist() == list(range(4000, 8000))
    assert cut_audio(waveform, 16000, -1.0, 2.0).size == 16000 and cut_audio(waveform, 16000, 0.9, 0.1).size == 0


def test_mixed_sequence_layout_and_labels() -> None:
    from speechllm_hf.presets import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    spans = [
        {"kind": "text", "words": ["the", "cat"], "start": 0.0, "end": 0.5},
        {"kind": "speech", "words": ["is", "on"], "start": 0.5, "end": 1.0},
        {"kind": "text", "words": ["the", "mat"], "start": 1.0, "end": 1.5},
    ]
    text, is_audio = mixed_sequence_layout(spans, tokenizer)
    assert text == "<s>the cat<audio> the mat<|end|>" and is_audio == [False, True, False]
    expanded = text.replace("<audio>", "<audio>" * 3)  # what the processor does for a 3-token clip
    batch = tokenizer([expanded, "<s>ab<|end|>"], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = mixed_labels(batch["input_ids"], batch["attention_mask"], tokenizer.convert_tokens_to_ids("<audio>"))
    kept = [i for i in labels[0].tolist() if i != -100]
    assert tokenizer.decode(kept) == "the cat the mat<|end|>"  # text and end-of-turn only: no BOS, no audio
    assert tokenizer.decode([i for i in labels[1].tolist() if i != -100]) == "ab<|end|>"
    assert (labels[1][batch["attention_mask"][1] == 0] == -100).all()  # left padding ignored


def test_align_command_end_to_end(tmp_path, capsys) -> None:
    rows = load_split("aligned")[:3]
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"not audio at all")
    manifest = tmp_path / "manifest.jsonl"
    entries = [
        {"audio": rows[0]["audio"], "text": rows[0]["text"]},
        {"audio": rows[1]["audio"], "text": rows[1]["text"] + " 2024"},  # one word out of the alphabet
        {"audio": "broken.ogg", "text": "this file cannot be decoded"},
        {"audio": rows[2]["audio"], "text": rows[2]["text"]},
    ]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    output = tmp_path / "out"
    assert main(["align", "--manifest", str(manifest), "--output_dir", str(output)]) == 0
    report = json.loads((output / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    num_words = sum(len(r["text"].split()) for r in rows) + 1
    assert {k: report[k] for k in ("total", "aligned", "failed", "words")} == {
        "total": 4,
        "aligned": 3,
        "failed": {"unreadable": 1, "missing_text": 0, "alignment_error": 0},
        "words": num_words,
    }
    assert report["interpolated_words"] == 1 and report["rows_with_interpolated_words"] == 1
    failed = [json.loads(line) for line in (output / "failed.jsonl").read_text().splitlines()]
    assert [(f["index"], f["reason"]) for f in failed] == [(2, "unreadable")]
    assert failed[0]["audio"].endswith("broken.ogg")
    dataset = load_prepared(output)
    assert dataset.num_rows == 3 and dataset["num_interpolated"] == [0, 1, 0]
    texts = [e["text"] for i, e in enumerate(entries) if i != 2]
    assert [[w["word"] for w in words] for words in dataset["words"]] == [t.split() for t in texts]
    assert dataset["words"][1][-1]["word"] == "2024"
    # The output folder is a manifest for next-word training on mixed speech-text sequences.
    run = tmp_path / "mixed"
    argv = ["train", "--task", "mixed", "--train_manifest", str(output), "--output_dir", str(run), "--max_steps", "1"]
    assert main([*argv, "--per_device_train_batch_size", "3", "--use_cpu", "--report_to", "none"]) == 0
    assert "config.json" in os.listdir(run)
