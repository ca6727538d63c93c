"""`datasets` sources (issue 20 item 2): save_to_disk folders, audiofolders, Arrow files and local folders laid out as
Hub dataset repos, map-style and streamed, read as manifests by `load_manifest`, the train command and the trainer;
clips decoded by the library (soundfile + soxr), never by datasets' torchcodec decoder. Offline."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import CPU_TRAINING, SOURCE_ROWS, audio_dataset, audiofolder, hub_folder, tiny

from speechllm_hf import from_preset
from speechllm_hf.cli import main
from speechllm_hf.data import load_audio, load_manifest
from speechllm_hf.inference.generate import iter_generate
from speechllm_hf.preprocessing.streaming import StreamReport, validate_stream
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    audio_dataset(SOURCE_ROWS[:6]).save_to_disk(str(root / "saved"))
    return {"saved": root / "saved", "audiofolder": audiofolder(root / "af"), "hub": hub_folder(root / "hub")}


def _decoded(rows) -> list[tuple[str, np.ndarray]]:
    return [(row["text"], load_audio(row["audio"])) for row in rows]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", ["saved", "audiofolder", "hub"])
def test_each_source_reads_the_manifest_rows(sources, name, streaming) -> None:
    rows = load_manifest(sources[name], streaming=streaming)
    assert isinstance(rows, datasets.IterableDataset) == streaming
    expected = _decoded(SOURCE_ROWS[:6])
    got = _decoded(rows)
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, clip), (_, reference) in zip(got, expected):
        np.testing.assert_array_equal(clip, reference)


def test_arrow_files_and_hub_splits(sources) -> None:
    arrow = next(sources["saved"].glob("*.arrow"))
    assert load_manifest(arrow)["text"] == [row["text"] for row in SOURCE_ROWS[:6]]
    assert load_manifest(sources["hub"], split="validation")["text"] == [row["text"] for row in SOURCE_ROWS[6:]]
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        load_manifest(sources["hub"], split="test")
    with pytest.raises(ValueError, match="no configs or splits, so --split cannot apply"):
        load_manifest(sources["saved"], split="train")


def test_a_missing_column_names_the_columns_there_are(sources) -> None:
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"no text column 'sentence'; its columns are \['audio', 'text'\]"):
            load_manifest(sources["hub"], text_column="sentence", streaming=streaming)


def test_a_stream_counts_the_rows_it_drops(tmp_path) -> None:
    broken = audio_dataset(SOURCE_ROWS[:4]).to_list()
    broken[1]["audio"] = {"bytes": b"not audio", "path": "broken.ogg"}
    broken[2]["text"] = " "
    stream = datasets.Dataset.from_list(broken).to_iterable_dataset()
    report = StreamReport("in memory")
    kept = list(validate_stream(stream, report))
    assert [row["text"] for row in kept] == [SOURCE_ROWS[0]["text"], SOURCE_ROWS[3]["text"]]
    assert kept[0]["audio"]["sampling_rate"] == 16000 and isinstance(kept[0]["audio"]["array"], np.ndarray)
    counts = report.as_dict()
    assert (counts["total"], counts["kept"]) == (4, 2)
    assert {k: v for k, v in counts["dropped"].items() if v} == {"unreadable": 1, "missing_text": 1}


def _arguments(tmp_path: Path, **overrides) -> SpeechLlmTrainingArguments:
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, **CPU_TRAINING)
    return SpeechLlmTrainingArguments(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"max_steps": -1}, "max_steps"),
        ({}, "group_by_duration"),
        ({"group_by_duration": False, "feature_cache_dir": "cache"}, "feature_cache_dir"),
        ({"group_by_duration": False, "data_subset": 0.5}, "data_subset"),
    ],
)
def test_the_trainer_refuses_what_a_stream_cannot_do(sources, tmp_path, overrides, option) -> None:
    model, processor = tiny()
    stream = load_manifest(sources["hub"], streaming=True)
    with pytest.raises(ValueError, match=rf"stream.*{option}"):
        SpeechLlmTrainer(
            model=model, args=_arguments(tmp_path, **overrides), train_dataset=stream, processing_class=processor
        )


def test_the_trainer_trains_on_a_validated_stream(sources, tmp_path) -> None:
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    before = {name: p.detach().clone() for name, p in model.projector.named_parameters()}
    stream = validate_stream(load_manifest(sources["hub"], streaming=True), StreamReport("hub"))
    args = _arguments(tmp_path, group_by_duration=False, learning_rate=1e-2)
    trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=stream, processing_class=processor)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(not torch.equal(before[name], p) for name, p in model.projector.named_parameters())


TRAIN = ["train", "--preset", "tiny", "--per_device_train_batch_size", "2", "--use_cpu", "--save_strategy", "no"]


@pytest.mark.parametrize(
    ("name", "flags"),
    [("saved", []), ("audiofolder", []), ("hub", ["--streaming", "--group_by_duration", "False"])],
)
def test_cli_trains_from_each_source(sources, tmp_path, name, flags) -> None:
    out = tmp_path / "run"
    argv = [*TRAIN, "--output_dir", str(out), "--train_manifest", str(sources[name]), "--max_steps", "2", *flags]
    assert main(argv) == 0
    assert (out / "config.json").is_file()
    if "--streaming" in flags:
        (report,) = json.loads((out / "stream_report.json").read_text())
        assert report["kept"] == report["total"] >= 4 and report["source"] == str(sources[name])


def test_cli_maps_audio_and_text_columns(tmp_path, capsys) -> None:
    # Not named "hub": datasets caches a local repo folder by its name and its files' mtimes, which can match.
    folder = hub_folder(tmp_path / "renamed_columns", audio_column="speech", text_column="sentence")
    base = [*TRAIN, "--output_dir", str(tmp_path / "run"), "--train_manifest", str(folder), "--max_steps", "1"]
    assert main(base) == 2
    assert "no audio column 'audio'; its columns are ['speech', 'sentence']" in capsys.readouterr().err
    assert main([*base, "--audio_column", "speech", "--text_column", "sentence", "--split", "validation"]) == 0


def test_cli_refuses_streaming_without_max_steps(sources, tmp_path) -> None:
    argv = [*TRAIN, "--output_dir", str(tmp_path / "run"), "--train_manifest", str(sources["hub"]), "--streaming"]
    with pytest.raises(SystemExit, match="--streaming .* give --max_steps N"):
        main(argv)


@pytest.mark.parametrize(("name", "streaming"), [("saved", False), ("audiofolder", False), ("hub", True)])
def test_generation_from_each_source(sources, name, streaming) -> None:
    """Batched generation reads the source's rows (the clip, decoded by the library) as the jsonl's rows."""
    model, processor = tiny()
    expected = dict(
        iter_generate(model, processor, [{"audio": row["audio"]} for row in SOURCE_ROWS[:6]], max_new_tokens=3)
    )
    rows = load_manifest(sources[name], streaming=streaming)
    got = dict(iter_generate(model, processor, ({"audio": row["audio"]} for row in rows), max_new_tokens=3))
    assert {i: r.response for i, r in got.items()} == {i: r.response for i, r in expected.items()}
    assert all(result.error is None for result in got.values())


def test_cli_prepare_reads_one_split_of_a_hub_style_folder(sources, tmp_path, capsys) -> None:
    argv = ["prepare", "--manifest", str(sources["hub"]), "--split", "validation", "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["kept"]) == (2, 2) and report["source"] == str(sources["hub"].resolve())
    assert main([*argv[:3], "--split", "test", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "no split 'test'; its splits are ['train', 'validation']" in capsys.readouterr().err
