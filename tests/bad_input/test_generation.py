"""Bad input to batched generation (`generate_responses`, `speechllm-hf generate`): each case checks the message and
that every valid row is still answered, exactly once. docs/reliability.md lists the cases."""

import json
import os
from pathlib import Path

import pytest
from conftest import tiny

import speechllm_hf.inference.generate as core
from speechllm_hf.cli import main
from speechllm_hf.inference import generate_responses
from speechllm_hf.quickstart.corpus import load_split

CLI_MODEL = ["--preset", "tiny", "--projector_type", "cnn", "--seed", "0"]
TOKENS = 4
# The tiny LLM's context is 8192 tokens: this instruction alone is longer.
OVERSIZED = "word " * 9000
# A row the model fails on in the middle of generation (as an out-of-memory row would): see `failing_on_poison`.
POISON = "Poisoned instruction."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny("hubert", "cnn")


@pytest.fixture(scope="module")
def dev():
    return load_split("dev")


@pytest.fixture
def failing_on_poison(monkeypatch):
    """`generate_texts` raises on any batch holding the POISON instruction, as generation of an unfit row would."""
    generate_texts = core.generate_texts

    def failing(model, processor, prompts, waveforms, config):
        if any(POISON in prompt for prompt in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate_texts(model, processor, prompts, waveforms, config)

    monkeypatch.setattr(core, "generate_texts", failing)


def answers(model, processor, requests, **kwargs):
    return generate_responses(model, processor, requests, **{"max_new_tokens": TOKENS, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# generate_responses / iter_generate


def test_an_instruction_longer_than_the_context_is_an_error_row(model_and_processor, dev):
    model, processor = model_and_processor
    good = [{"audio": row["audio"]} for row in dev[:4]]
    requests = [*good[:2], {"audio": dev[9]["audio"], "instruction": OVERSIZED}, *good[2:]]
    results = answers(model, processor, requests, batch_size=3)
    assert results[2].response is None
    assert "tokens (instruction, chat template and audio) and max_new_tokens is 4" in results[2].error
    assert "more than the LLM's context of 8192 tokens" in results[2].error
    assert [r for i, r in enumerate(results) if i != 2] == answers(model, processor, good, batch_size=3)


def test_a_prompt_that_fits_only_without_its_new_tokens_is_an_error_row(model_and_processor, dev):
    model, processor = model_and_processor
    instruction = "word " * 1000  # fits the 8192-token context, but not with 7500 new tokens after it
    results = answers(model, processor, [{"audio": dev[0]["audio"], "instruction": instruction}], max_new_tokens=7500)
    assert results[0].response is None and "max_new_tokens is 7500" in results[0].error


def test_max_new_tokens_beyond_the_context_is_refused_before_any_row(model_and_processor, dev, monkeypatch):
    model, processor = model_and_processor

    def never(*args):
        raise AssertionError("generated with max_new_tokens beyond the context")

    monkeypatch.setattr(core, "generate_texts", never)
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 leaves no room .* context is 8192 tokens"):
        generate_responses(model, processor, [{"audio": dev[0]["audio"]}], max_new_tokens=10**9)


@pytest.mark.parametrize(
    "setting, value", [("sort_window", -1), ("sort_window", 1e9), ("batch_size", 0), ("batch_size", 2.5)]
)
def test_batch_and_window_sizes_must_be_positive_integers(model_and_processor, dev, setting, value):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=rf"{setting} must be a positive integer; got {value!r}\."):
        answers(model, processor, [{"audio": dev[0]["audio"]}], **{setting: value})


def test_a_window_of_a_billion_rows_answers_every_row(model_and_processor, dev):
    model, processor = model_and_processor
    requests = [{"audio": row["audio"]} for row in dev[:5]]
    assert answers(model, processor, requests, batch_size=2, sort_window=10**9) == answers(
        model, processor, requests, batch_size=2
    )


def test_a_row_that_fails_in_generation_costs_only_itself(model_and_processor, dev, failing_on_poison, caplog):
    model, processor = model_and_processor
    good = [{"audio": row["audio"]} for row in dev[:5]]
    requests = [*good[:3], {"audio": dev[7]["audio"], "instruction": POISON}, *good[3:]]
    results = answers(model, processor, requests, batch_size=3)
    assert results[3].error == "generation failed: RuntimeError: CUDA out of memory (simulated)"
    assert [r for i, r in enumerate(results) if i != 3] == answers(model, processor, good, batch_size=3)
    assert "generating its rows one by one" in caplog.text


def test_a_batch_whose_every_row_fails_alone_stops_the_run(model_and_processor, dev, monkeypatch):
    model, processor = model_and_processor

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(core, "generate_texts", broken)
    with pytest.raises(core.GenerationFailedError, match=r"A batch of 2 rows failed, and so did each row alone"):
        answers(model, processor, [{"audio": row["audio"]} for row in dev[:2]], batch_size=2)


# ---------------------------------------------------------------------------------------------------------------------
# speechllm-hf generate


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_generate(input_file: Path, output_file: Path, *extra: str) -> int:
    args = ["generate", *CLI_MODEL, "--input_file", str(input_file), "--output_file", str(output_file)]
    return main([*args, "--batch_size", "3", "--max_new_tokens", str(TOKENS), *extra])


@pytest.fixture
def good_file(tmp_path, dev):
    path = tmp_path / "good.jsonl"
    write_jsonl(path, [{"audio": row["audio"], "id": row["id"]} for row in dev[:4]])
    return path


@pytest.fixture
def bad_rows_file(tmp_path, dev):
    """Good rows with one bad row of each kind between them; `BAD` maps their positions to their errors."""
    rows = [{"audio": row["audio"], "id": row["id"]} for row in dev[:8]]
    rows.insert(1, {"audio": str(tmp_path / "missing.wav"), "id": "missing"})
    rows.insert(3, {"audio": dev[10]["audio"], "instruction": OVERSIZED, "id": "oversized"})
    rows.insert(5, {"id": "no audio column", "text": "hello"})
    rows.insert(7, ["not", "an", "object"])
    rows.insert(9, {"audio": dev[11]["audio"], "instruction": POISON, "id": "poisoned"})
    path = tmp_path / "bad_rows.jsonl"
    write_jsonl(path, rows)
    return path


BAD = {
    1: "does not exist",
    3: "more than the LLM's context of 8192 tokens",
    5: "A request needs an 'audio' field; got the fields ['id', 'instruction', 'text']",
    7: "A request needs an 'audio' field; got the fields ['input', 'instruction']",
    9: "generation failed: RuntimeError: CUDA out of memory (simulated)",
}


def test_an_output_file_that_is_the_input_file_is_refused(good_file, capsys):
    before = good_file.read_text()
    assert run_generate(good_file, good_file) == 2
    assert "is the input file: the output rows would replace the rows being read" in capsys.readouterr().err
    assert good_file.read_text() == before
    same = good_file.parent / "." / good_file.name  # another spelling of the same path
    assert run_generate(good_file, same) == 2 and good_file.read_text() == before


def test_an_output_file_under_a_file_or_naming_a_folder_is_refused(good_file, tmp_path, capsys):
    (tmp_path / "plain").write_text("a file, not a folder")
    assert run_generate(good_file, tmp_path / "plain" / "out.jsonl") == 2
    assert "cannot create the folder of --output_file" in capsys.readouterr().err
    assert run_generate(good_file, tmp_path) == 2
    assert f"--output_file {tmp_path} is a folder: give a file path" in capsys.readouterr().err


def test_an_output_file_in_a_missing_folder_is_written(good_file, tmp_path):
    output = tmp_path / "new" / "deeper" / "out.jsonl"
    assert run_generate(good_file, output) == 0
    assert [row["id"] for row in read_jsonl(output)] == [row["id"] for row in read_jsonl(good_file)]


def test_a_resumed_generate_over_bad_rows_answers_each_good_row_once_and_reports_each_bad_row(
    bad_rows_file, tmp_path, failing_on_poison, monkeypatch, capsys
):
    full = tmp_path / "full.jsonl"
    assert run_generate(bad_rows_file, full, "--sort_window", "3") == 0
    expected = read_jsonl(full)
    assert "8 rows answered, 5 error rows (13 written by this run" in capsys.readouterr().err

    # The same run killed after its second batch (of the rows that reach batches), then run again.
    generate_texts, calls = core.generate_texts, []

    def killed_at_the_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate_texts(*args)

    crashed = tmp_path / "crashed.jsonl"
    monkeypatch.setattr(core, "generate_texts", killed_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_generate(bad_rows_file, crashed, "--sort_window", "3")
    monkeypatch.setattr(core, "generate_texts", generate_texts)
    written = len(read_jsonl(crashed))
    assert 0 < written < len(expected)
    capsys.readouterr()
    assert run_generate(bad_rows_file, crashed, "--sort_window", "3") == 0
    assert read_jsonl(crashed) == expected
    assert f"8 rows answered, 5 error rows ({len(expected) - written} written by this run" in capsys.readouterr().err

    inputs = [json.loads(line) for line in bad_rows_file.read_text().splitlines()]
    for index, (row, out) in enumerate(zip(inputs, expected)):
        if index in BAD:
            assert out["response"] is None and out["row"] == index and BAD[index] in out["error"]
            assert {k: v for k, v in out.items() if k not in ("response", "error", "row")} == (
                row if isinstance(row, dict) else {"input": row}
            )
        else:
            assert out == {**row, "response": out["response"]} and out["response"]

    # Error rows count as done: a further run generates nothing, and says what the file holds.
    monkeypatch.setattr(core, "generate_texts", lambda *args: pytest.fail("an error row was generated again"))
    assert run_generate(bad_rows_file, crashed) == 0
    assert "8 rows answered, 5 error rows (0 written by this run" in capsys.readouterr().err


def test_generate_with_max_new_tokens_beyond_the_context_exits_with_the_reason(good_file, tmp_path, capsys):
    assert run_generate(good_file, tmp_path / "out.jsonl", "--max_new_tokens", "1000000000") == 2
    assert "max_new_tokens=1000000000 leaves no room for the prompt" in capsys.readouterr().err
    assert not os.path.getsize(tmp_path / "out.jsonl")
