"""The open-vocabulary synthetic corpus (`speechllm-hf synthesize`): WordNet sentences, espeak-ng clips, metadata.

The corpus tests build 20 train + 5 dev clips from a small fake WordNet folder (so they do not depend on the size of
the real one) with the real espeak-ng binary, and skip when it is missing. One test reads the real WordNet of Debian's
``wordnet-base``, and skips when it is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from speechllm_hf.cli import main
from speechllm_hf.preprocessing import synthetic
from speechllm_hf.preprocessing.openvocab import build_openvocab_corpus
from speechllm_hf.preprocessing.wordnet_sentences import DATA_FILES, WORDNET_DIR, load_wordnet_sentences, to_reference

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)

SUBJECTS = ["the old man", "my sister", "a tall farmer", "the young teacher", "our neighbour", "the tired doctor"]
VERBS = ["painted", "carried", "washed", "opened", "found"]
OBJECTS = ["the wooden gate", "a heavy basket", "the kitchen window", "his brother's boat", "a small garden"]
USABLE = [f"{s} {v} {o}" for s, v, o in zip(SUBJECTS * 5, VERBS * 6, OBJECTS * 6)][:28]
DIGITS = ["the track record was set in 1973", "he singled in the 9th inning", "over 25,000 troops came home"]
OTHERS = ["DNA is the substance of our genes", "the gang robbed a bank in St. Louis", "a big dog", USABLE[0]]


def write_fake_wordnet(folder: Path) -> None:
    """WordNet's data-file layout: licence lines indented by two spaces, then synsets whose glosses quote examples."""
    folder.mkdir()
    header = "  1 This software and database is being provided to you by Princeton University\n"
    examples = USABLE + DIGITS + OTHERS
    synsets = "".join(
        f'{i:08d} 05 n 01 thing 0 000 | a gloss with "{example}" and more; "{example}"\n'
        if i == 0  # an example quoted twice in one gloss is read twice: it counts once as usable, once as duplicate
        else f'{i:08d} 05 n 01 thing 0 000 | a gloss; "{example}"\n'
        for i, example in enumerate(examples)
    )
    for name in DATA_FILES:
        (folder / name).write_text(header + (synsets if name == "data.noun" else ""), encoding="utf-8")


@pytest.mark.parametrize(
    "example, reference, reason",
    [
        ("She didn't `really' like the U-boat!", "she didn't really like the u boat", None),
        ("the students' books are on the shelf", "the students books are on the shelf", None),
        ("the French annexation of Madagascar in 1896", None, "digits"),
        ("30 percent of the time", None, "digits"),
        ("half of them said 50% or more", None, "digits"),
        ("it costs five $ a day", None, "symbol"),
        ("the nickname for the U.S. Constitution", None, "period"),
        ("in conclusion I want to say...", None, "period"),
        ("lend-lease during World War II was generous", None, "acronym"),
        ("a big dog", None, "length"),
        (" ".join(["word"] * 21), None, "length"),
    ],
)
def test_examples_become_asr_references_or_a_counted_reason(example: str, reference: str, reason: str) -> None:
    assert to_reference(example) == (reference, reason)


def test_every_example_read_is_kept_or_counted(tmp_path: Path) -> None:
    write_fake_wordnet(tmp_path / "wordnet")
    source = load_wordnet_sentences(tmp_path / "wordnet")
    assert source.sentences == USABLE
    assert source.examples == 1 + len(USABLE) + len(DIGITS) + len(OTHERS)
    assert source.dropped == {"digits": 3, "symbol": 0, "period": 1, "acronym": 1, "length": 1, "duplicate": 2}
    assert len(source.sentences) + sum(source.dropped.values()) == source.examples


def test_missing_wordnet_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        load_wordnet_sentences(tmp_path)


def test_missing_espeak_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        synthetic.espeak_version()


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base is not installed")
def test_real_wordnet_is_large_enough_for_the_default_corpus() -> None:
    source = load_wordnet_sentences()
    assert len(source.sentences) >= 3000 + 200
    assert len({word for sentence in source.sentences for word in sentence.split()}) >= 1000
    assert source.dropped["digits"] > 0 and len(source.sentences) + sum(source.dropped.values()) == source.examples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("openvocab")
    write_fake_wordnet(root / "wordnet")
    argv = ["synthesize", "--output_dir", str(root / "corpus"), "--num_train", "20", "--num_dev", "5"]
    assert main([*argv, "--seed", "0", "--workers", "2", "--wordnet_dir", str(root / "wordnet")]) == 0
    return root


def read_split(corpus_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (corpus_dir / f"{split}.jsonl").read_text().splitlines()]


@needs_espeak
def test_dev_sentences_are_not_in_train(corpus: Path) -> None:
    train, dev = read_split(corpus / "corpus", "train"), read_split(corpus / "corpus", "dev")
    assert [len(train), len(dev)] == [20, 5]
    assert [r["id"] for r in dev] == [f"dev-{i:04d}" for i in range(5)]
    assert not {r["text"] for r in dev} & {r["text"] for r in train}
    assert len({r["text"] for r in train + dev}) == 25 and {r["text"] for r in train + dev} <= set(USABLE)


@needs_espeak
def test_clips_are_16khz_with_the_stated_duration_and_voices_vary(corpus: Path) -> None:
    rows = read_split(corpus / "corpus", "train") + read_split(corpus / "corpus", "dev")
    for row in rows:
        info = sf.info(corpus / "corpus" / row["audio"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.frames / 16000 == pytest.approx(row["duration"], abs=1e-3)
        assert 1.0 < row["duration"] < 10.0  # a spoken 5-7 word sentence, not silence or an error beep
    assert len({r["voice"] for r in rows}) == len(synthetic.VOICES)
    assert len({r["speed"] for r in rows}) > 5 and len({r["pitch"] for r in rows}) > 5
    assert all(synthetic.SPEED_RANGE[0] <= r["speed"] <= synthetic.SPEED_RANGE[1] for r in rows)


@needs_espeak
def test_metadata_counts_match_the_manifests(corpus: Path) -> None:
    metadata = json.loads((corpus / "corpus" / "metadata.json").read_text())
    rows = {split: read_split(corpus / "corpus", split) for split in ("train", "dev")}
    vocabulary = {split: {w for r in split_rows for w in r["text"].split()} for split, split_rows in rows.items()}
    dev_tokens = [w for r in rows["dev"] for w in r["text"].split()]
    assert metadata["counts"] == {"train": 20, "dev": 5}
    assert metadata["distinct_words"] == {split: len(words) for split, words in vocabulary.items()}
    oov = sum(w not in vocabulary["train"] for w in dev_tokens) / len(dev_tokens)
    assert metadata["dev_oov_rate"] == pytest.approx(oov, abs=1e-4)
    assert metadata["hours"]["dev"] == pytest.approx(sum(r["duration"] for r in rows["dev"]) / 3600, abs=1e-4)
    source = metadata["text_source"]
    assert source["dropped"]["digits"] == len(DIGITS)  # counted, not silently dropped
    assert source["usable_distinct_sentences"] + sum(source["dropped"].values()) == source["examples_read"]
    assert "Princeton" in source["licence"]["notice"] and metadata["settings"]["synthesiser"].startswith("eSpeak NG")


@needs_espeak
def test_same_settings_reuse_the_corpus_and_new_ones_rebuild_it(corpus: Path) -> None:
    kwargs = dict(num_train=20, num_dev=5, seed=0, workers=2, wordnet_dir=corpus / "wordnet")
    clip = corpus / "corpus" / "train" / "0000.ogg"
    written = clip.stat().st_mtime_ns
    _, reused = build_openvocab_corpus(corpus / "corpus", **kwargs)
    assert reused and clip.stat().st_mtime_ns == written
    _, reused = build_openvocab_corpus(corpus / "rebuilt", **{**kwargs, "num_train": 3, "num_dev": 1})
    assert not reused and len(read_split(corpus / "rebuilt", "train")) == 3
    clip.unlink()  # an incomplete folder is rebuilt, not trusted
    _, reused = build_openvocab_corpus(corpus / "corpus", **kwargs)
    assert not reused and clip.is_file()


@needs_espeak
def test_too_many_clips_for_the_source_is_an_error(corpus: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["synthesize", "--output_dir", str(corpus / "too_many"), "--num_train", "28", "--num_dev", "1"]
    assert main([*argv, "--wordnet_dir", str(corpus / "wordnet")]) == 2
    assert "num_train + num_dev <= 28" in capsys.readouterr().err
