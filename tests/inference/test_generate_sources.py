"""`speechllm-hf generate --input_file` from `datasets` sources (a save_to_disk folder, an audiofolder with split
folders, a folder laid out as a Hub dataset repo holding its clips as bytes): jsonl out, the audio named by a path or
a reference, never its bytes; resumable; a source that cannot be read is refused with exit status 2. Offline."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SOURCE_ROWS, audiofolder, hub_folder, training_rows

from speechllm_hf.cli import main
from speechllm_hf.commands.generate import output_fields

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_generate(input_file: Path, output_file: Path, *extra: str) -> int:
    args = ["generate", "--preset", "tiny", "--input_file", str(input_file), "--output_file", str(output_file)]
    return main([*args, "--batch_size", "2", "--max_new_tokens", "1", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_answered(rows: list[dict]) -> None:
    assert rows and all(isinstance(row["response"], str) and "error" not in row for row in rows)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A Hub-style folder whose splits (train: 6 rows, validation: 2) hold the clips as {bytes, path} structs."""
    return hub_folder(tmp_path_factory.mktemp("sources") / "hub")


def test_a_saved_dataset_is_answered_as_its_jsonl_is(tmp_path) -> None:
    rows = training_rows(3)
    rows.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run_generate(tmp_path / "saved", tmp_path / "saved.jsonl") == 0
    assert run_generate(tmp_path / "rows.jsonl", tmp_path / "jsonl.jsonl") == 0
    written = read_jsonl(tmp_path / "saved.jsonl")
    assert_answered(written)
    assert written == read_jsonl(tmp_path / "jsonl.jsonl")


def test_an_audiofolder_split_is_chosen_with_split(tmp_path) -> None:
    (tmp_path / "af").mkdir()
    audiofolder(tmp_path / "af" / "train")
    test = audiofolder(tmp_path / "af" / "test")
    metadata = (test / "metadata.jsonl").read_text().splitlines(keepends=True)[:2]
    (test / "metadata.jsonl").write_text("".join(metadata))
    assert run_generate(tmp_path / "af", tmp_path / "out.jsonl", "--split", "test") == 0
    written = read_jsonl(tmp_path / "out.jsonl")
    assert_answered(written)
    expected = [json.loads(line) for line in metadata]
    assert [row["audio"] for row in written] == [str((test / row["file_name"]).resolve()) for row in expected]
    assert [row["text"] for row in written] == [row["text"] for row in expected]


def test_clips_held_as_bytes_are_written_as_references_and_resume(hub, tmp_path, capsys) -> None:
    output = tmp_path / "out.jsonl"
    assert run_generate(hub, output, "--split", "validation") == 0
    written = read_jsonl(output)
    assert_answered(written)
    # The struct's path names the clip; its bytes never reach the output file.
    assert [(row["audio"], row["text"]) for row in written] == [
        (Path(r["audio"]).name, r["text"]) for r in SOURCE_ROWS[6:]
    ]

    full = output.read_text()
    capsys.readouterr()
    assert run_generate(hub, output, "--split", "validation") == 0
    assert output.read_text() == full
    assert "(0 written by this run" in capsys.readouterr().err
    output.write_text(full.splitlines(keepends=True)[0])  # a run stopped after its first row
    assert run_generate(hub, output, "--split", "validation") == 0
    assert output.read_text() == full
    assert "(1 written by this run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("audio", "written"),
    [
        ({"array": np.zeros(4, np.float32), "sampling_rate": 16000}, "<array>"),
        ({"array": [0.0, 0.1], "sampling_rate": 16000, "path": "clip.wav"}, "clip.wav"),
        ({"bytes": b"RIFF", "path": None}, "<bytes>"),
        (np.zeros(4, np.float32), "<array>"),
        ("clips/a.wav", "clips/a.wav"),
    ],
)
def test_an_output_row_names_its_audio_and_keeps_the_fields_json_can_hold(audio, written) -> None:
    row = {"speech": audio, "text": "a", "blob": b"raw", "tags": ["x"]}
    assert output_fields(row, "speech") == {"speech": written, "text": "a", "tags": ["x"]}


@pytest.mark.parametrize(
    ("source", "flags", "message"),
    [
        ("hub", ["--split", "test"], "has no split 'test'; its splits are ['train', 'validation']"),
        ("hub", ["--audio_column", "speech"], "no audio column 'speech'; its columns are ['audio', 'text']"),
        ("missing", [], "does not exist"),
        ("jsonl", ["--split", "test"], "has no configs or splits, so --split cannot apply"),
    ],
)
def test_a_source_that_cannot_be_read_is_refused(hub, tmp_path, capsys, source, flags, message) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"audio": SOURCE_ROWS[0]["audio"]}) + "\n")
    paths = {"hub": hub, "missing": tmp_path / "missing", "jsonl": tmp_path / "rows.jsonl"}
    assert run_generate(paths[source], tmp_path / "out.jsonl", *flags) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith("speechllm-hf generate: error: ") and message in line
    assert not (tmp_path / "out.jsonl").exists()
