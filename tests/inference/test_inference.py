"""Batched generation core, `speechllm-hf generate` (resumable jsonl), the "speech-llm" pipeline and streaming."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import clip, fill_deterministically, tiny
from transformers import pipeline

import speechllm_hf.inference.generate as core
from speechllm_hf import from_preset
from speechllm_hf.cli import main
from speechllm_hf.inference import (
    GenerationRequest,
    SpeechLlmPipeline,
    build_generation_config,
    generate_responses,
    stream_generate,
)
from speechllm_hf.quickstart.corpus import load_split

# The tiny preset with the BLSP CNN adapter: its random outputs differ from clip to clip (the Q-Former's barely do),
# so comparisons between code paths mean something. Same seed as `--preset tiny --projector_type cnn --seed 0`.
CLI_MODEL = ["--preset", "tiny", "--projector_type", "cnn", "--seed", "0"]
TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny("hubert", "cnn")


@pytest.fixture(scope="module")
def dev():
    return load_split("dev")


def newline_id(tokenizer) -> int:
    (token,) = [i for i in core.newline_token_ids(tokenizer) if tokenizer.decode([i]) == "\n"]
    return token


@pytest.fixture(scope="module")
def newline_model(dev):
    """A tiny model that writes newlines: the newline token's output embedding becomes a slightly longer copy of the
    token the model writes most, so greedy decoding writes a newline wherever it wrote that token. Its weights are the
    same on every transformers version: 4.57's random initialisation wrote one row without a space or newline, which
    streams as a single piece."""
    model, processor = from_preset("tiny", projector_type="cnn")
    model.eval()
    for seed, part in enumerate((model.encoder, model.projector, model.language_model), start=1):
        fill_deterministically(part, seed)
    waveform = core.load_request_audio(processor, {"audio": dev[0]["audio"]})
    inputs = core.model_inputs(model, processor, [core.build_prompt(processor)], [waveform])
    written = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    common = Counter(written.tolist()).most_common(1)[0][0]
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[newline_id(processor.tokenizer)] = 1.05 * head[common]
    return model, processor


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(folder / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    return {"missing": str(folder / "missing.wav"), "empty": str(folder / "empty.wav"), "nan": str(folder / "nan.wav")}


def mixed_requests(dev) -> list[GenerationRequest]:
    """Files of different durations, arrays at another rate, and per-row instructions."""
    requests = [GenerationRequest(row["audio"]) for row in dev[:7]]
    requests.insert(2, GenerationRequest(clip(2.5, seed=1, rate=8000), "Say it.", sampling_rate=8000))
    requests.insert(5, GenerationRequest(clip(0.4, seed=2), sampling_rate=16000))
    requests[0].instruction = "Repeat after me."
    return requests


def test_batched_generation_equals_one_at_a_time(model_and_processor, dev):
    model, processor = model_and_processor
    requests = mixed_requests(dev)
    batched = generate_responses(model, processor, requests, batch_size=4, max_new_tokens=TOKENS)
    single = generate_responses(model, processor, requests, batch_size=1, max_new_tokens=TOKENS)
    assert all(r.error is None and r.response for r in batched)
    assert batched == single
    assert len({r.response for r in batched}) > 2  # the rows really differ, so the order check below bites
    reversed_run = generate_responses(model, processor, requests[::-1], batch_size=5, max_new_tokens=TOKENS)
    assert reversed_run == batched[::-1]


def test_batches_are_length_sorted_and_results_in_input_order(model_and_processor, dev, monkeypatch):
    model, processor = model_and_processor
    requests = mixed_requests(dev)
    batches = []
    original = core.generate_texts

    def recording(model, processor, prompts, waveforms, config):
        batches.append([len(w) for w in waveforms])
        return original(model, processor, prompts, waveforms, config)

    monkeypatch.setattr(core, "generate_texts", recording)
    results = list(core.iter_generate(model, processor, requests, batch_size=4, max_new_tokens=2))
    lengths = [n for batch in batches for n in batch]
    assert [len(b) for b in batches] == [4, 4, 1]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(index for index, _ in results) == list(range(len(requests)))
    # A window smaller than the input sorts within the window only.
    batches.clear()
    list(core.iter_generate(model, processor, requests, batch_size=2, sort_window=4, max_new_tokens=2))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]


def test_unusable_rows_get_an_error_and_the_rest_complete(model_and_processor, dev, bad_files):
    model, processor = model_and_processor
    good = [GenerationRequest(row["audio"]) for row in dev[:5]]
    mixed = list(good)
    mixed.insert(1, GenerationRequest(bad_files["missing"]))
    mixed.insert(3, GenerationRequest(bad_files["empty"]))
    mixed.insert(4, {"audio": bad_files["nan"], "instruction": "x"})
    mixed.append(GenerationRequest(clip(0.01), sampling_rate=16000))  # too short for one audio token
    mixed.append({"instruction": "no audio"})
    results = generate_responses(model, processor, mixed, batch_size=3, max_new_tokens=TOKENS)
    errors = {i: r.error for i, r in enumerate(results) if r.error is not None}
    assert sorted(errors) == [1, 3, 4, 8, 9]
    assert "does not exist" in errors[1] and "empty" in errors[3] and "NaN" in errors[4]
    assert "too short" in errors[8] and "audio" in errors[9]
    assert all(results[i].response is None for i in errors)
    clean = generate_responses(model, processor, good, batch_size=3, max_new_tokens=TOKENS)
    assert [r for i, r in enumerate(results) if i not in errors] == clean


def test_stop_at_newline_cuts_the_greedy_output(newline_model):
    model, processor = newline_model
    requests = [GenerationRequest(row["audio"]) for row in load_split("dev")[:4]]
    full = generate_responses(model, processor, requests, max_new_tokens=24)
    stopped = generate_responses(model, processor, requests, max_new_tokens=24, stop_at_newline=True)
    assert any("\n" in r.response for r in full)
    assert [r.response for r in stopped] == [r.response.split("\n")[0].strip() for r in full]


def test_generation_config_is_greedy_by_default_and_leaves_the_model_alone(model_and_processor):
    model, processor = model_and_processor
    before = model.generation_config.to_dict()
    config = build_generation_config(model, processor, stop_at_newline=True)
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, 128)
    assert newline_id(processor.tokenizer) in config.eos_token_id
    assert model.generation_config.to_dict() == before
    with pytest.raises(ValueError, match="Unknown generation settings"):
        build_generation_config(model, processor, max_new_tokenz=3)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def input_file(tmp_path, dev, bad_files):
    """A BLSP-style jsonl: relative and absolute audio paths, instructions, references, extra fields, a bad row."""
    rows = [
        {"audio": os.path.relpath(row["audio"], tmp_path), "reference": row["text"], "id": row["id"]}
        for row in dev[:7]
    ]
    rows[2]["instruction"] = "Write it down."
    rows[4]["audio"] = dev[4]["audio"]
    rows.insert(6, {"audio": bad_files["missing"], "reference": "gone"})
    path = tmp_path / "in.jsonl"
    write_jsonl(path, rows)
    return path


def run_generate(input_file: Path, output_file: Path, *extra: str) -> int:
    args = ["generate", *CLI_MODEL, "--input_file", str(input_file), "--output_file", str(output_file)]
    return main([*args, "--batch_size", "3", "--max_new_tokens", str(TOKENS), *extra])


def test_generate_cli_end_to_end(input_file, tmp_path, model_and_processor):
    output_file = tmp_path / "out" / "out.jsonl"
    assert run_generate(input_file, output_file) == 0
    rows, out = read_jsonl(input_file), read_jsonl(output_file)
    assert len(out) == len(rows)
    for row, written in zip(rows, out):
        assert {k: v for k, v in written.items() if k not in ("response", "error", "row")} == row  # all fields kept
    assert out[6]["response"] is None and "does not exist" in out[6]["error"] and out[6]["row"] == 6
    assert all("error" not in row and row["response"] for i, row in enumerate(out) if i != 6)
    model, processor = model_and_processor
    requests = [
        {"audio": str(tmp_path / row["audio"]), "instruction": row.get("instruction")} for row in rows
    ]  # relative paths resolve against the input file's folder
    expected = generate_responses(model, processor, requests, batch_size=2, max_new_tokens=TOKENS)
    assert [row["response"] for row in out] == [r.response for r in expected]


def test_generate_cli_loads_a_saved_model(input_file, tmp_path, model_and_processor):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "saved", processor=processor)
    args = ["generate", "--model", str(tmp_path / "saved"), "--input_file", str(input_file)]
    assert main([*args, "--output_file", str(tmp_path / "saved.jsonl"), "--max_new_tokens", str(TOKENS)]) == 0
    assert run_generate(input_file, tmp_path / "preset.jsonl") == 0
    assert (tmp_path / "saved.jsonl").read_text() == (tmp_path / "preset.jsonl").read_text()


def test_generate_cli_resumes_without_duplicates(input_file, tmp_path):
    full = tmp_path / "full.jsonl"
    assert run_generate(input_file, full, "--sort_window", "4") == 0
    lines = full.read_text().splitlines(keepends=True)
    for kept in (4, len(lines) - 1):
        partial = tmp_path / f"partial{kept}.jsonl"
        # A kill after `kept` rows, in the middle of writing the next one.
        partial.write_text("".join(lines[:kept]) + lines[kept][: len(lines[kept]) // 2])
        assert run_generate(input_file, partial, "--sort_window", "4") == 0
        assert partial.read_text() == full.read_text()
    assert run_generate(input_file, full) == 0  # complete: nothing to do
    assert full.read_text() == "".join(lines)


def test_generate_cli_refuses_an_output_of_another_input(input_file, tmp_path):
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"audio": "elsewhere.wav", "response": "x"}])
    assert run_generate(input_file, other) == 2
    assert read_jsonl(other) == [{"audio": "elsewhere.wav", "response": "x"}]


def test_pipeline_equals_the_core(model_and_processor, dev, tmp_path):
    model, processor = model_and_processor
    audio = [row["audio"] for row in dev[:5]]
    expected = [r.response for r in generate_responses(model, processor, audio_requests(audio), max_new_tokens=TOKENS)]
    pipe = pipeline("speech-llm", model=model, processor=processor, max_new_tokens=TOKENS)
    assert isinstance(pipe, SpeechLlmPipeline)
    assert pipe(audio[0]) == {"generated_text": expected[0]}
    assert pipe(audio[0], num_beams=1) == {"generated_text": expected[0]}  # call settings add to the pipeline's
    assert [o["generated_text"] for o in pipe(audio, batch_size=3)] == expected
    waveform = clip(1.2, seed=4)
    request = {"audio": waveform, "sampling_rate": 16000, "instruction": "Say it."}
    assert (
        pipe(request)["generated_text"]
        == generate_responses(model, processor, [request], max_new_tokens=TOKENS)[0].response
    )
    with pytest.raises(ValueError, match="does not exist"):
        pipe(str(tmp_path / "missing.wav"))


def test_pipeline_takes_the_inputs_of_transformers_speech_recognition_pipeline(model_and_processor, dev):
    """Every input form transformers' automatic-speech-recognition pipeline documents gives the same answer."""
    model, processor = model_and_processor
    path = dev[0]["audio"]
    waveform, rate = sf.read(path, dtype="float32")
    assert rate == processor.sampling_rate
    pipe = pipeline("speech-llm", model=model, processor=processor, max_new_tokens=TOKENS)
    expected = pipe(path)
    forms = {
        "bytes": Path(path).read_bytes(),
        "array": waveform,
        "tensor": torch.from_numpy(waveform),
        "raw dict": {"raw": waveform, "sampling_rate": rate},
        "raw dict with an empty array key": {"raw": waveform, "array": None, "sampling_rate": rate},
        "array dict": {"array": waveform, "sampling_rate": rate, "path": path},
    }
    for name, form in forms.items():
        assert pipe(form) == expected, name
    assert pipe(waveform, generate_kwargs={"max_new_tokens": TOKENS}) == expected
    with pytest.raises(ValueError, match="'stride'"):
        pipe({"raw": waveform, "sampling_rate": rate, "stride": (0, 0)})


def audio_requests(audio: list[str]) -> list[dict]:
    return [{"audio": a} for a in audio]


def test_pipeline_from_a_saved_folder(model_and_processor, dev, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "saved", processor=processor)
    pipe = pipeline(task="speech-llm", model=str(tmp_path / "saved"), trust_remote_code=True)
    audio = [row["audio"] for row in dev[:3]]
    expected = generate_responses(model, processor, audio_requests(audio), max_new_tokens=TOKENS)
    assert [o["generated_text"] for o in pipe(audio, batch_size=2, max_new_tokens=TOKENS)] == [
        r.response for r in expected
    ]


@pytest.mark.parametrize("stop_at_newline", [False, True])
def test_streamed_pieces_concatenate_to_the_greedy_output(newline_model, dev, stop_at_newline):
    model, processor = newline_model  # the newline cut and the whitespace handling are exercised
    for row in dev[:3]:
        settings = {"max_new_tokens": 24, "stop_at_newline": stop_at_newline}
        pieces = list(stream_generate(model, processor, row["audio"], **settings))
        expected = generate_responses(model, processor, [{"audio": row["audio"]}], **settings)[0].response
        assert len(pieces) > 1 or stop_at_newline
        assert "".join(pieces) == expected


def test_stream_rejects_unusable_audio_before_generating(model_and_processor, bad_files):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="NaN"):
        next(stream_generate(model, processor, bad_files["nan"]))


def test_shipped_pipeline_defaults_are_the_prompt_files():
    # The Hub-shipped pipeline cannot read the package's prompt file, so it carries a copy of its ASR prompt.
    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.models.speechllm.pipeline_speechllm import DEFAULT_INSTRUCTION, DEFAULT_USER_TEMPLATE

    prompts = PromptConfig.from_file()
    assert (DEFAULT_USER_TEMPLATE, DEFAULT_INSTRUCTION) == (prompts.user_template, prompts.instructions["asr"])
