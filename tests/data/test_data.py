"""Data: audio loading, manifests, the validation report (`speechllm_hf.preprocessing`) and the `prepare` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechllm_hf.cli import main
from speechllm_hf.data import audio_duration, decode_audio, load_audio, load_manifest
from speechllm_hf.data.audio import unwrap_audio
from speechllm_hf.data.feature_cache import audio_key
from speechllm_hf.data.tasks import PromptConfig, build_turns
from speechllm_hf.preprocessing import REASONS, load_prepared, prepare_dataset
from speechllm_hf.quickstart.corpus import load_split, manifest_path

SECONDS, RATE = 0.5, 16000


def stereo_8k(path: Path) -> np.ndarray:
    """Writes an 8 kHz stereo int16 wav (right channel = half the left) and returns its int16 samples."""
    t = np.arange(12000) / 8000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    samples = (np.stack([left, 0.5 * left], axis=1) * 32767).astype(np.int16)
    sf.write(path, samples, 8000, subtype="PCM_16")
    return samples


@pytest.fixture
def corpus_clip() -> Path:
    return Path(load_split("dev")[0]["audio"])


def test_load_audio_accepts_every_kind_of_source(corpus_clip: Path) -> None:
    reference = load_audio(str(corpus_clip))
    assert reference.dtype == np.float32 and reference.ndim == 1
    assert len(reference) == sf.info(str(corpus_clip)).frames  # the corpus is already at 16 kHz
    data = corpus_clip.read_bytes()
    for source in (corpus_clip, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(corpus_clip)}):
        np.testing.assert_array_equal(load_audio(source), reference)
    samples, rate = sf.read(str(corpus_clip), dtype="float32")
    for source, sampling_rate in (
        (samples, rate),
        (torch.from_numpy(samples), rate),
        ({"array": samples.tolist(), "sampling_rate": rate}, None),
    ):
        np.testing.assert_allclose(load_audio(source, sampling_rate), reference, atol=1e-6)
    assert len(load_audio(samples, rate, target_rate=8000)) == pytest.approx(len(samples) / 2, abs=1)
    with pytest.raises(ValueError, match="sampling rate"):
        load_audio(samples)


def test_stereo_int16_8k_wav_loads_as_16k_mono_float32(tmp_path: Path) -> None:
    samples = stereo_8k(tmp_path / "stereo.wav")
    waveform = load_audio(tmp_path / "stereo.wav")
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert len(waveform) == 2 * len(samples)
    # Mono is the mean of the channels: 0.75 x the left channel's 0.5 peak, scaled from int16 to [-1, 1].
    assert np.abs(waveform[1000:-1000]).max() == pytest.approx(0.375, abs=0.01)
    assert audio_duration(tmp_path / "stereo.wav") == pytest.approx(1.5)
    # Raw int16 arrays are scaled and downmixed the same way.
    np.testing.assert_allclose(load_audio(samples, 8000), waveform, atol=1e-4)


def test_audio_duration_reads_headers_and_shapes(tmp_path: Path, corpus_clip: Path) -> None:
    expected = load_split("dev")[0]["duration"]
    assert audio_duration(corpus_clip) == pytest.approx(expected, abs=1e-3)
    assert audio_duration(corpus_clip.read_bytes()) == pytest.approx(expected, abs=1e-3)
    assert audio_duration({"bytes": None, "path": str(corpus_clip)}) == pytest.approx(expected, abs=1e-3)
    assert audio_duration(np.zeros((32000, 2)), 16000) == 2.0
    assert audio_duration({"array": np.zeros(8000), "sampling_rate": 16000}) == 0.5
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(ValueError, match="Cannot read the audio header"):
        audio_duration(tmp_path / "garbage.wav")
    waveform, rate = decode_audio(np.array([0.0, np.nan]), 8000)  # decoding does not judge: validation does
    assert rate == 8000 and np.isnan(waveform[1])


@pytest.fixture
def bad_manifest(tmp_path: Path, make_clip) -> Path:
    """8 rows: 2 good (one an 8 kHz stereo wav given by a relative path), 6 bad for 5 different reasons."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "good.wav", make_clip(2.0), RATE)
    stereo_8k(audio / "stereo.wav")
    (audio / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(audio / "empty.wav", np.zeros(0, dtype=np.float32), RATE)
    nan = make_clip(1.0)
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, RATE, subtype="FLOAT")
    sf.write(audio / "long.wav", make_clip(4.0), RATE)
    sf.write(audio / "notext.wav", make_clip(1.0), RATE)
    rows = [
        {"id": "good", "audio": str(audio / "good.wav"), "text": "hello there", "speaker": "a"},
        {"id": "garbage", "audio": "audio/garbage.wav", "text": "x", "speaker": "b"},
        {"id": "missing", "audio": "audio/missing.wav", "text": "x", "speaker": "b"},
        {"id": "empty", "audio": "audio/empty.wav", "text": "x", "speaker": "b"},
        {"id": "nan", "audio": "audio/nan.wav", "text": "x", "speaker": "b"},
        {"id": "long", "audio": "audio/long.wav", "text": "x", "speaker": "b"},
        {"id": "notext", "audio": "audio/notext.wav", "text": "  ", "speaker": "b"},
        {"id": "stereo", "audio": "audio/stereo.wav", "text": "stereo at eight kilohertz", "speaker": "c"},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


EXPECTED_DROPPED = {
    "unreadable": 2,
    "truncated": 0,
    "empty": 1,
    "too_short": 0,
    "too_long": 1,
    "non_finite": 1,
    "too_short_for_encoder": 0,
    "unknown_task": 0,
    "non_string_text": 0,
    "missing_text": 1,
    "missing_field": 0,
    "audio_token_in_text": 0,
    "special_token_in_text": 0,
    "duplicate_id": 0,
}


def test_prepare_reports_every_bad_row(bad_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    kept, report = prepare_dataset(bad_manifest, out, max_duration=3.0)
    assert report["total"] == 8 and report["kept"] == 2
    assert report["dropped"] == EXPECTED_DROPPED and tuple(report["dropped"]) == REASONS
    assert report["hours"]["kept"] == pytest.approx(3.5 / 3600, abs=1e-6)
    assert report["hours"]["dropped"] == pytest.approx(6.0 / 3600, abs=1e-6)  # empty 0 + nan 1 + long 4 + notext 1
    assert report["source"] == str(bad_manifest.resolve())
    assert kept["id"] == ["good", "stereo"] and kept["speaker"] == ["a", "c"]
    assert kept["audio"] == [str(tmp_path / "audio" / "good.wav"), str(tmp_path / "audio" / "stereo.wav")]
    assert kept["duration"] == pytest.approx([2.0, 1.5])
    assert json.loads((out / "report.json").read_text()) == report
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"]) for d in dropped] == [
        (1, "unreadable"),
        (2, "unreadable"),
        (3, "empty"),
        (4, "non_finite"),
        (5, "too_long"),
        (6, "missing_text"),
    ]
    assert dropped[1]["audio"] == str(tmp_path / "audio" / "missing.wav") and dropped[1]["detail"]
    reloaded = load_prepared(out)
    assert reloaded["id"] == kept["id"] and reloaded["audio"] == kept["audio"]
    # The output folder is itself a manifest (`--train_manifest prepared/`), as is its saved dataset.
    for source in (out, out / "dataset"):
        assert load_manifest(source)["id"] == kept["id"]


def test_prepare_in_parallel_matches_serial(bad_manifest: Path) -> None:
    serial_kept, serial = prepare_dataset(bad_manifest, max_duration=3.0, num_proc=1)
    parallel_kept, parallel = prepare_dataset(bad_manifest, max_duration=3.0, num_proc=2)
    assert parallel == serial
    assert parallel_kept.to_dict() == serial_kept.to_dict()


def test_prepare_without_text_requirement(bad_manifest: Path) -> None:
    kept, report = prepare_dataset(bad_manifest, max_duration=3.0, min_duration=1.2, require_text=False)
    assert report["dropped"] == {**EXPECTED_DROPPED, "missing_text": 0, "too_short": 2, "non_finite": 0}
    assert kept["id"] == ["good", "stereo"]  # the 1 s clips (nan, notext) are now too short


def test_prepare_bundled_corpus_measures_durations() -> None:
    rows = load_split("dev")
    median = float(np.median([r["duration"] for r in rows]))
    kept, report = prepare_dataset(manifest_path("dev"), max_duration=median)
    assert report["kept"] + report["dropped"]["too_long"] == report["total"] == len(rows)
    expected = {r["id"]: r["duration"] for r in rows}
    for row_id, duration in zip(kept["id"], kept["duration"]):
        assert duration == pytest.approx(expected[row_id], abs=2e-3) and duration <= median


def test_parquet_with_array_structs(tmp_path: Path, make_clip) -> None:
    bad = make_clip(1.0)
    bad[5] = np.inf
    data = {
        "audio": [
            {"array": make_clip(1.0).tolist(), "sampling_rate": RATE},
            {"array": bad.tolist(), "sampling_rate": RATE},
            {"array": make_clip(0.5, seed=1)[::2].tolist(), "sampling_rate": 8000},
        ],
        "duration": [1.0, 1.0, 0.5],
        "sentence": ["one", "two", "three"],
        "translation": ["eins", "zwei", "drei"],
    }
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict(data).to_parquet(str(folder / "part-0.parquet"))
    datasets.Dataset.from_dict({k: v[:1] for k, v in data.items()}).to_parquet(str(folder / "part-1.parquet"))
    kept, report = prepare_dataset(folder / "part-0.parquet", tmp_path / "out", text_column="sentence")
    assert report["kept"] == 2 and report["dropped"]["non_finite"] == 1
    assert kept["translation"] == ["eins", "drei"]
    assert kept[1]["audio"]["sampling_rate"] == 8000 and len(kept[1]["audio"]["array"]) == 4000  # stays an array
    assert kept["duration"] == pytest.approx([1.0, 0.5])
    assert json.loads((tmp_path / "out" / "dropped.jsonl").read_text())["audio"] == "<array>"
    assert len(load_manifest(folder, text_column="sentence")) == 4  # a folder reads every parquet file in it


def test_parquet_with_encoded_bytes(tmp_path: Path, corpus_clip: Path) -> None:
    rows = {
        "audio": [{"bytes": corpus_clip.read_bytes(), "path": corpus_clip.name}],
        "question": ["q"],
        "answer": ["a"],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "squad.parquet"))
    kept, report = prepare_dataset(tmp_path / "squad.parquet", text_column="answer")
    assert report["kept"] == 1 and kept[0]["audio"]["bytes"] == corpus_clip.read_bytes()


def test_dataset_with_audio_feature_is_never_decoded_by_datasets(tmp_path: Path, corpus_clip: Path) -> None:
    dataset = datasets.Dataset.from_dict({"audio": [str(corpus_clip), str(tmp_path / "gone.wav")], "text": ["a", "b"]})
    dataset = dataset.cast_column("audio", datasets.Audio(sampling_rate=16000))  # decode=True would need torchcodec
    loaded = load_manifest(dataset)
    assert loaded.features["audio"].decode is False and loaded[0]["audio"]["path"] == str(corpus_clip)
    kept, report = prepare_dataset(dataset)
    assert report["kept"] == 1 and report["dropped"]["unreadable"] == 1
    assert report["source"].startswith("datasets.Dataset(num_rows=2")
    assert kept[0]["audio"] == {"bytes": None, "path": str(corpus_clip)}


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("audio,text\n")
    with pytest.raises(ValueError, match="Unknown manifest type '.csv'"):
        load_manifest(tmp_path / "rows.csv")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"path": "a.wav", "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"no audio column 'audio'; its columns are \['path', 'text'\]"):
        load_manifest(tmp_path / "rows.jsonl")
    assert load_manifest(tmp_path / "rows.jsonl", audio_column="path")["path"] == [str(tmp_path / "a.wav")]
    with pytest.raises(ValueError, match="no text column 'sentence'"):
        load_manifest(tmp_path / "rows.jsonl", audio_column="path", text_column="sentence")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="holds no .parquet or .arrow files, no saved dataset"):
        load_manifest(tmp_path / "empty_folder")
    with pytest.raises(ValueError, match="min_duration <= max_duration"):
        prepare_dataset(tmp_path / "rows.jsonl", min_duration=5, max_duration=1)
    with pytest.raises(ValueError, match="No prepared dataset"):
        load_prepared(tmp_path)


def test_cli_prepare_end_to_end(bad_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    argv = ["prepare", "--manifest", str(bad_manifest), "--output_dir", str(out), "--max_duration", "3"]
    assert main([*argv, "--num_proc", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["kept"] == 2 and printed["dropped"] == EXPECTED_DROPPED
    assert len(load_prepared(out)) == 2
    assert main([*argv, "--no_require_text"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"]["missing_text"] == 0


def test_cli_prepare_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "--manifest", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--manifest" in capsys.readouterr().err


ROW = st.tuples(
    st.sampled_from([0, 100, 400, 1000, 2500]),  # samples at 1 kHz: 0 s, 0.1 s (too short), ok, ok, too long
    st.booleans(),  # a NaN sample
    st.sampled_from(["words", "", None]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=8))
def test_counts_always_add_up(rows: list[tuple[int, bool, str | None]]) -> None:
    audio = []
    for samples, has_nan, _ in rows:
        waveform = np.full(samples, 0.1, dtype=np.float32)
        if has_nan and samples:
            waveform[samples // 2] = np.nan
        audio.append({"array": waveform.tolist(), "sampling_rate": 1000})
    dataset = datasets.Dataset.from_dict({"audio": audio, "text": [text for *_, text in rows]})
    kept, report = prepare_dataset(dataset, min_duration=0.2, max_duration=2.0, target_rate=1000)
    assert report["kept"] + sum(report["dropped"].values()) == report["total"] == len(rows)
    for row in kept:
        waveform = np.asarray(row["audio"]["array"])
        assert 0.2 <= row["duration"] <= 2.0 and np.isfinite(waveform).all() and row["text"].strip()
    valid = [0.2 <= n / 1000 <= 2.0 and not nan and bool(text) for n, nan, text in rows]
    assert report["kept"] == sum(valid)


def test_prepare_checks_each_row_against_its_own_task(tmp_path: Path, corpus_clip: Path) -> None:
    audio = str(corpus_clip)
    rows = [
        {"id": "asr", "text": "hello"},
        {"id": "asr-blank", "text": " "},
        {"id": "st", "task": "st", "translation": "hallo", "target_language": "German"},  # no `text`: kept
        {"id": "st-blank", "task": "st", "translation": "", "target_language": "German"},
        {"id": "st-no-language", "task": "st", "translation": "hallo"},
        {"id": "sqa", "task": "sqa", "question": "who?", "answer": ["me", "I"]},
        {"id": "sqa-no-answer", "task": "sqa", "question": "who?", "answer": []},
        {"id": "sqa-no-question", "task": "sqa", "answer": ["me"]},
        {"id": "summary", "task": "summarise", "text": "hello"},
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps({"audio": audio, **row}) + "\n" for row in rows))
    kept, report = prepare_dataset(manifest, tmp_path / "out")
    assert kept["id"] == ["asr", "st", "sqa"]
    assert {reason: count for reason, count in report["dropped"].items() if count} == {
        "unknown_task": 1,
        "missing_text": 3,
        "missing_field": 2,
    }
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"]) for d in dropped] == [
        (1, "missing_text"),
        (3, "missing_text"),
        (4, "missing_field"),
        (6, "missing_text"),
        (7, "missing_field"),
        (8, "unknown_task"),
    ]
    assert "target_language" in dropped[2]["detail"] and "'summarise'" in dropped[5]["detail"]
    # Every kept row makes a training example; every dropped one would have stopped the collator.
    prompts = PromptConfig.from_file()
    for row in kept:
        build_turns(row, row["task"] or "asr", prompts)
    for index in (3, 4, 6, 7):
        with pytest.raises(ValueError, match="needs non-empty"):
            build_turns(rows[index], rows[index]["task"], prompts)


def test_prepare_refuses_a_task_whose_columns_are_missing(bad_manifest: Path) -> None:
    with pytest.raises(ValueError, match=r"st rows need the column\(s\) \['target_language', 'translation'\]"):
        prepare_dataset(bad_manifest, task="st")
    with pytest.raises(ValueError, match="Unknown task 'transcribe'"):
        prepare_dataset(bad_manifest, task="transcribe")
    kept, report = prepare_dataset(bad_manifest, task="st", require_text=False, max_duration=3.0)
    assert report["kept"] == 3  # audio checks only: the good, stereo and text-less clips


def test_parquet_bytes_are_the_clip_whatever_their_path_says(corpus_clip: Path) -> None:
    data = corpus_clip.read_bytes()
    parquet_style = {"bytes": data, "path": corpus_clip.name}  # the original file name, not a file here
    assert unwrap_audio(parquet_style) == (data, None)
    assert audio_key(parquet_style) == audio_key(data) != audio_key({"bytes": data[:-2], "path": corpus_clip.name})
    assert audio_key({"bytes": None, "path": str(corpus_clip)}).startswith(os.path.abspath(corpus_clip))
    samples = np.zeros(160, dtype=np.float32)
    assert audio_key({"array": samples, "sampling_rate": 16000}) != audio_key(
        {"array": samples, "sampling_rate": 8000}
    )
