"""The same data-source flags (--dataset_config, --split) and --quantization on every command that takes them."""

import importlib.util
import json

import datasets
import pytest
from conftest import training_rows

from speechllm_hf.cli import main
from speechllm_hf.preprocessing.continuation import report_path


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory):
    """A saved DatasetDict with 3 train rows and 1 validation row, audio as paths (continue-writing writes them)."""
    rows = training_rows(4).remove_columns("continuation")
    folder = tmp_path_factory.mktemp("two_splits") / "dataset"
    datasets.DatasetDict(train=rows.select(range(3)), validation=rows.select([3])).save_to_disk(str(folder))
    return folder, rows["id"]


def test_align_reads_the_split_it_is_given(two_splits, tmp_path, capsys):
    folder, ids = two_splits
    assert main(["align", "--manifest", str(folder), "--split", "validation", "--output_dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 1
    aligned = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert aligned["id"] == ids[3:]


def test_continue_writing_reads_the_split_it_is_given(two_splits, tmp_path):
    folder, ids = two_splits
    output = tmp_path / "out.jsonl"
    argv = ["continue-writing", "--preset", "tiny", "--manifest", str(folder), "--split", "validation"]
    assert main([*argv, "--output_file", str(output), "--max_new_tokens", "2"]) == 0
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ids[3:]


@pytest.mark.parametrize("command", ["align", "continue-writing"])
def test_a_split_the_source_lacks_exits_2_naming_its_splits(two_splits, tmp_path, capsys, command):
    folder, _ = two_splits
    output = ["--output_dir", str(tmp_path)] if command == "align" else ["--output_file", str(tmp_path / "o.jsonl")]
    extra = ["--preset", "tiny"] if command == "continue-writing" else []
    assert main([command, *extra, "--manifest", str(folder), "--split", "test", *output]) == 2
    assert "no split 'test'; its splits are ['train', 'validation']" in capsys.readouterr().err


quantized = pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None, reason="the CPU quantization backend: pip install optimum-quanto"
)


def llm_flags(local_backbones) -> list[str]:
    """The tiny preset with its LLM loaded from a folder: a randomly built LLM has no weights to quantize."""
    return ["--preset", "tiny", "--text_name_or_path", str(local_backbones / "llm")]


@quantized
def test_info_reports_the_memory_quantization_saves(local_backbones, capsys):
    memory = {}
    for method in (None, "quanto-int8"):
        assert main(["info", *llm_flags(local_backbones), *(["--quantization", method] if method else [])]) == 0
        memory[method] = json.loads(capsys.readouterr().out)["memory_bytes"]
    assert memory["quanto-int8"]["language_model"] < 0.6 * memory[None]["language_model"]
    assert memory["quanto-int8"]["encoder"] == memory[None]["encoder"]  # quantized only with --quantize_encoder


def test_quantizing_a_randomly_built_llm_exits_2_saying_why(capsys):
    assert main(["info", "--preset", "tiny", "--quantization", "quanto-int8"]) == 2
    assert "built randomly" in capsys.readouterr().err


@quantized
def test_retrieval_runs_on_a_quantized_llm(local_backbones, two_splits, tmp_path):
    folder, _ = two_splits
    argv = ["retrieval", *llm_flags(local_backbones), "--quantization", "quanto-int8", "--manifest", str(folder)]
    assert main([*argv, "--layers", "1", "--output_dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "retrieval.json").read_text())["data"]["kept"] == 3


@quantized
def test_continue_writing_runs_a_quantized_llm(local_backbones, two_splits, tmp_path):
    folder, ids = two_splits
    output = tmp_path / "out.jsonl"
    argv = ["continue-writing", *llm_flags(local_backbones), "--quantization", "quanto-int8"]
    assert main([*argv, "--manifest", str(folder), "--output_file", str(output), "--max_new_tokens", "2"]) == 0
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ids[:3]
    report = json.loads(report_path(output).read_text())
    assert report["settings"]["model"] == f"{local_backbones / 'llm'} (quanto-int8)"  # a resume keeps the method


def test_continue_writing_refuses_to_quantize_a_randomly_built_llm(tmp_path, capsys):
    argv = ["continue-writing", "--preset", "tiny", "--quantization", "quanto-int8", "--manifest", "unread.jsonl"]
    assert main([*argv, "--output_file", str(tmp_path / "out.jsonl")]) == 2
    assert "builds its LLM randomly: name a checkpoint with --text_name_or_path" in capsys.readouterr().err
