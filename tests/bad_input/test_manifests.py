"""Bad manifests, rows and texts (docs/reliability.md): each case over the entry points where it can occur (`prepare`,
the training collator, the processor, batched generation, the pipeline), asserting the message and that the valid
rows around it are kept; then property tests over the collator."""

from __future__ import annotations

import json
import logging
import re

import datasets
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import yaml
from conftest import clip, tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bad_input.conftest import (
    RATE,
    TOKENS,
    WORDS,
    array_row,
    clip_specs,
    dropped,
    errors_of,
    expected_error,
    make_clip,
    write_manifest,
)
from speechllm_hf.cli import main
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator, special_token_strings
from speechllm_hf.evaluation.runner import evaluate
from speechllm_hf.inference import generate_responses
from speechllm_hf.inference.generate import default_prompts
from speechllm_hf.preprocessing import load_prepared, prepare_dataset


def test_text_with_no_or_too_many_audio_tokens(tmp_path, hubert, pipe):
    model, processor = hubert
    wave = clip(1.0)
    for texts, clips, counts in (
        (["no placeholder"], [wave], "0 audio placeholders .* but 1 audio clips"),
        (["<audio> and <audio>"], [wave], "2 audio placeholders .* but 1 audio clips"),
        (["<audio>"], None, "1 audio placeholders .* but 0 audio clips"),
    ):
        with pytest.raises(ValueError, match=counts):
            processor(texts, audio=clips, sampling_rate=RATE)
    ids = processor(["<audio> hi"], audio=[wave], sampling_rate=RATE)["input_ids"]
    with pytest.raises(ValueError, match="audio tokens .* but no audio was given"):
        model(input_ids=ids)

    # The audio token inside a row's text would be a second placeholder (or an audio position in the labels).
    collator = SpeechLlmCollator(processor)
    with pytest.raises(ValueError, match=r"Batch row 0 .*\['text'\] field\(s\) hold the audio token '<audio>'"):
        collator([array_row(wave, text="the <audio> tag")])
    question = {"task": "instruction", "instruction": "What is in <audio>?", "response": "speech"}
    with pytest.raises(ValueError, match=r"Batch row 1 .*\['instruction'\] field\(s\) hold the audio token"):
        collator([array_row(wave), {**array_row(wave), **question}])

    sf.write(tmp_path / "a.wav", wave, RATE)
    rows = [
        {"audio": str(tmp_path / "a.wav"), "text": "fine"},
        {"audio": str(tmp_path / "a.wav"), "text": "the <audio> tag"},
        {"audio": str(tmp_path / "a.wav"), **question},
    ]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), output_dir=tmp_path / "out")
    assert dropped(report) == {"audio_token_in_text": 2} and kept["text"] == ["fine"]
    details = [json.loads(line)["detail"] for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert details == ["'<audio>' in text", "'<audio>' in instruction"]

    requests = [{"audio": wave, "sampling_rate": RATE, "instruction": i} for i in ("Say it.", "Say <audio>.")]
    errors = errors_of(model, processor, requests)
    assert list(errors) == [1] and "instruction holds the audio token" in errors[1]
    with pytest.raises(ValueError, match="instruction holds the audio token"):
        pipe(requests[1])


def test_text_holding_a_special_token(tmp_path, hubert):
    """An end-of-sequence token written inside a transcript would be tokenized as the real one: the model would learn
    to stop mid-sentence. The collator refuses it; `train` (prepare_dataset with the tokenizer's special tokens) drops
    the row as special_token_in_text."""
    model, processor = hubert
    wave = clip(1.0)
    eos = processor.tokenizer.eos_token
    assert processor.tokenizer(f"stop {eos} here", add_special_tokens=False)["input_ids"].count(
        processor.tokenizer.eos_token_id
    )  # what would reach the labels
    collator = SpeechLlmCollator(processor)
    with pytest.raises(ValueError, match=r"Batch row 0 .*\['text'\] field\(s\) hold special tokens"):
        collator([array_row(wave, text=f"stop {eos} here")])
    assert collator([array_row(wave, text="stop here")])["labels"].shape[0] == 1

    sf.write(tmp_path / "a.wav", wave, RATE)
    rows = [{"audio": str(tmp_path / "a.wav"), "text": text} for text in ("fine", f"stop {eos} here", "<|end|> x")]
    special_tokens = special_token_strings(processor.tokenizer)
    assert eos in special_tokens and "<|end|>" in special_tokens
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), special_tokens=special_tokens)
    assert dropped(report) == {"special_token_in_text": 2} and kept["text"] == ["fine"]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))  # prepare alone knows no tokenizer
    assert dropped(report) == {}


def test_audio_without_text(tmp_path, hubert, pipe):
    model, processor = hubert
    wave = clip(1.0)
    with pytest.raises(ValueError, match="needs text: put the audio placeholder"):
        processor(audio=[wave], sampling_rate=RATE)
    with pytest.raises(ValueError, match="empty list of texts"):
        processor([], audio=[wave], sampling_rate=RATE)
    for text in (None, "  "):
        with pytest.raises(ValueError, match=r"Batch row 0 .* needs non-empty \['text'\]"):
            SpeechLlmCollator(processor)([array_row(wave, text=text)])
    sf.write(tmp_path / "a.wav", wave, RATE)
    rows = [{"audio": str(tmp_path / "a.wav"), "text": text} for text in ("words", None, "")]
    assert dropped(prepare_dataset(write_manifest(tmp_path, rows))[1]) == {"missing_text": 2}
    # Generation needs no text: a request without an instruction is asked the prompt file's ASR instruction.
    request = {"audio": wave, "sampling_rate": RATE}
    asked = {**request, "instruction": default_prompts().instructions["asr"]}
    plain = generate_responses(model, processor, [request, asked], max_new_tokens=TOKENS)
    assert plain[0] == plain[1] and plain[0].response is not None
    assert pipe(request)["generated_text"] == plain[0].response


def test_very_long_text(hubert, caplog):
    _, processor = hubert
    wave, needed = clip(1.0), processor.num_audio_tokens(RATE)
    long_text = "<audio> " + "word " * 3000
    full = processor([long_text], audio=[wave], sampling_rate=RATE)
    assert full["input_ids"].shape[1] > 3000  # nothing is cut unless truncation is asked for
    cut = processor([long_text], audio=[wave], sampling_rate=RATE, truncation=True, max_length=64)
    assert cut["input_ids"].shape[1] == 64 and int((cut["input_ids"] == processor.audio_token_id).sum()) == needed
    with pytest.raises(ValueError, match=f"holds .* audio tokens after tokenization but its audio needs {needed}"):
        processor(["word " * 100 + "<audio>"], audio=[wave], sampling_rate=RATE, truncation=True, max_length=64)

    # The collator cuts the end of a too-long response, counts it and says so; a too-long prompt is refused.
    collator = SpeechLlmCollator(processor, max_length=128)
    with caplog.at_level(logging.WARNING, logger="speechllm_hf.data.collators"):
        batch = collator([array_row(wave, text="word " * 3000), array_row(wave, text="short")])
    assert batch["input_ids"].shape[1] == 128 and collator.num_truncated == 1
    assert "Truncated a response to fit max_length=128 (1 so far)" in caplog.text
    response = collator.prompt_and_response(array_row(wave, text="word " * 3000))[1]
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels == processor.tokenizer(response, add_special_tokens=False)["input_ids"][: len(labels)]
    with pytest.raises(ValueError, match=r"Batch row 0: its prompt .* over max_length=128"):
        collator([{**array_row(wave), "task": "instruction", "instruction": "why " * 200, "response": "x"}])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Mostly usable rows (the processor's test covers short clips; test_audio_without_text blank texts), so that
    # most batches are collated; a short clip, the audio token or a low max_length still refuse some.
    rows=st.lists(
        st.tuples(clip_specs(min_samples=1500), st.builds(str.__add__, st.sampled_from("abc"), WORDS)),
        min_size=1,
        max_size=4,
    ),
    tainted=st.sampled_from([None] * 6 + [0, 1, 2, 3]),  # the row whose text gets the audio token, if any
    max_length=st.integers(min_value=32, max_value=256),
)
def test_collator_properties(rows, tainted, max_length):
    model, processor = tiny("hubert", "cnn")
    collator = SpeechLlmCollator(processor, max_length=max_length)
    rows = [(c, text + " <audio>" if index == tainted else text) for index, (c, text) in enumerate(rows)]
    batch_rows = [array_row(make_clip(*c), rate=c[1], text=text) for c, text in rows]
    try:
        batch = collator(batch_rows)
    except ValueError as err:
        message = str(err)
        assert message.startswith("Batch row") or "clip numbers are batch rows" in message, message
        bad_text = any(not text.strip() or "<audio>" in text for _, text in rows)
        error = expected_error(model, processor, [c for c, _ in rows])
        assert re.search("over max_length", message) or bad_text or error is not None, message
        reason = re.search("empty|too short|needs non-empty|hold the audio token|over max_length", message)
        assert reason, message
        event(f"refused: {reason.group()}")
        return
    assert all(text.strip() and "<audio>" not in text for _, text in rows)
    assert expected_error(model, processor, [c for c, _ in rows]) is None
    event("collated")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= max_length
    # Right padding; pads are masked and never learnt.
    assert torch.equal(mask, mask.sort(dim=-1, descending=True).values)
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    # Labels are the response's tokens (cut at max_length) and nothing else: never the prompt or an audio token.
    truncated = 0
    for row, row_ids, row_labels, length in zip(batch_rows, ids, labels, batch["feature_attention_mask"].sum(-1)):
        _, response = collator.prompt_and_response(row)
        response_ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
        learnt = row_labels[row_labels != IGNORE_INDEX].tolist()
        assert learnt == response_ids[: len(learnt)] and len(learnt) >= 1
        truncated += len(learnt) < len(response_ids)
        assert torch.equal(row_ids[row_labels != IGNORE_INDEX], row_labels[row_labels != IGNORE_INDEX])
        assert int((row_ids == processor.audio_token_id).sum()) == processor.num_audio_tokens(int(length))
    assert collator.num_truncated == truncated
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------------------------------------------------------------
# Manifests that cannot be read, and rows whose fields are wrong in a way the report must name. A manifest-level error
# stops before anything is written: an earlier prepare's output stays as it was.


def earlier_output(tmp_path):
    """An output folder from an earlier, successful prepare run, and its report's text."""
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    manifest = write_manifest(tmp_path, [{"audio": "good.wav", "text": "kept"}])
    prepare_dataset(manifest, tmp_path / "out")
    return tmp_path / "out", (tmp_path / "out" / "report.json").read_text()


def test_empty_manifest(tmp_path, capsys):
    """An empty jsonl raised a bare StopIteration (datasets' split inference), a blank one 'Instruction "train"
    corresponds to no data!'; an empty parquet file or dataset was prepared into an empty training set."""
    out, report = earlier_output(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "array.json").write_text("[]")
    empty = datasets.Dataset.from_dict(
        {"audio": [], "text": []},
        features=datasets.Features({"audio": datasets.Value("string"), "text": datasets.Value("string")}),
    )
    empty.to_parquet(tmp_path / "empty.parquet")
    for source, message in (
        (tmp_path / "empty.jsonl", r"Manifest '.*empty\.jsonl' holds no rows: it is empty\."),
        (tmp_path / "blank.jsonl", r"Manifest '.*blank\.jsonl' holds no rows: it is empty\."),
        (tmp_path / "array.json", r"Manifest '.*array\.json' holds no rows: it is an empty JSON array\."),
        (tmp_path / "empty.parquet", r"Manifest '.*empty\.parquet' holds no rows: its parquet data is empty\."),
        (empty, r"The manifest datasets\.Dataset\(num_rows=0, .* holds no rows"),
    ):
        with pytest.raises(ValueError, match=message):
            prepare_dataset(source, out)
        assert (out / "report.json").read_text() == report and load_prepared(out)["text"] == ["kept"]
    assert main(["prepare", "--manifest", str(tmp_path / "empty.jsonl"), "--output_dir", str(out)]) == 2
    assert re.search(r"speechllm-hf prepare: error: Manifest '.*empty\.jsonl' holds no rows", capsys.readouterr().err)


def test_jsonl_with_a_broken_line(tmp_path, capsys):
    """A broken line (a hand edit, or a writer killed mid-line) was 'An error occurred while generating the dataset',
    without saying where."""
    out, report = earlier_output(tmp_path)
    good = json.dumps({"audio": "good.wav", "text": "fine"})
    for lines, message in (
        ([good, "{'audio': 'good.wav'}", good], r"line 2 is not valid JSON \(Expecting property name enclosed in "),
        ([good, good, '{"audio": "good.wav", "te'], r"line 3 is not valid JSON \(Unterminated string"),
        ([good, "", '"good.wav"'], r"line 3 holds \"good\.wav\", not a JSON object with an audio field"),
    ):
        (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=r"Manifest '.*broken\.jsonl' " + message):
            prepare_dataset(tmp_path / "broken.jsonl", out)
        assert (out / "report.json").read_text() == report
    assert main(["prepare", "--manifest", str(tmp_path / "broken.jsonl"), "--output_dir", str(out)]) == 2
    assert "line 3 holds" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text(good + "\n" + good + "\n")  # mended: every row is there
    assert prepare_dataset(tmp_path / "broken.jsonl")[1]["kept"] == 2


def test_manifest_that_is_not_utf8(tmp_path):
    """A manifest saved as UTF-16 (Windows editors' 'Unicode') was 'An error occurred while generating the dataset';
    UTF-8 with a byte-order mark reads as it is."""
    out, report = earlier_output(tmp_path)
    row = json.dumps({"audio": "good.wav", "text": "fine"}) + "\n"
    (tmp_path / "utf16.jsonl").write_text(row, encoding="utf-16")
    with pytest.raises(
        ValueError, match=r"Manifest '.*utf16\.jsonl' is not UTF-8 text \(invalid start byte at byte 0\)"
    ):
        prepare_dataset(tmp_path / "utf16.jsonl", out)
    assert (out / "report.json").read_text() == report
    (tmp_path / "bom.jsonl").write_text(row, encoding="utf-8-sig")
    assert prepare_dataset(tmp_path / "bom.jsonl")[0]["text"] == ["fine"]


def test_duplicate_ids(tmp_path):
    """Two rows with one id were both kept without a word: generation resumes and evaluation records by id, so one of
    them would be answered for the other. The first kept row keeps the id; a row whose earlier namesake was dropped is
    kept."""
    sf.write(tmp_path / "a.wav", clip(1.0), RATE)
    rows = [
        {"id": "utt-1", "audio": "a.wav", "text": "one"},
        {"id": "utt-2", "audio": "missing.wav", "text": "two"},
        {"id": "utt-1", "audio": "a.wav", "text": "one again"},
        {"id": "utt-2", "audio": "a.wav", "text": "two, readable"},
        {"id": "utt-3", "audio": "a.wav", "text": "three"},
        {"id": None, "audio": "a.wav", "text": "no id"},
        {"id": None, "audio": "a.wav", "text": "no id either"},
        {"id": "utt-1", "audio": "a.wav", "text": "one thrice"},
    ]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"unreadable": 1, "duplicate_id": 2}
    assert kept["text"] == ["one", "two, readable", "three", "no id", "no id either"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"], d["detail"]) for d in lines[1:]] == [
        (2, "duplicate_id", "id 'utt-1' is row 0's too, which is kept"),
        (7, "duplicate_id", "id 'utt-1' is row 0's too, which is kept"),
    ]


def test_text_that_is_not_a_string(tmp_path):
    """`"text": 123` was dropped as missing_text ('asr row without text 123'): the text is there, in the wrong type."""
    sf.write(tmp_path / "a.wav", clip(1.0), RATE)
    rows = [
        {"audio": "a.wav", "text": 123},
        {"audio": "a.wav", "text": "words"},
        {"audio": "a.wav", "text": True},
        {"audio": "a.wav", "text": None},
        {"audio": "a.wav", "task": "st", "translation": "Wörter", "target_language": 7},
        {"audio": "a.wav", "task": "sqa", "question": "Which?", "answer": ["words", "the words"]},  # gold answers
    ]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"non_string_text": 3, "missing_text": 1}
    assert [row["text"] or row["answer"][0] for row in kept] == ["words", "words"]
    details = [json.loads(line)["detail"] for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert details == [
        "text 123 is not a string",
        "text True is not a string",
        "asr row without text None",
        "target_language 7 is not a string",
    ]


def test_audio_only_rows(tmp_path, hubert):
    """Rows with audio and nothing else: `prepare` and the collator say what is missing; an evaluation split of them
    raised IndexError (its rows without the audio column had no columns, so no rows). Every row is now counted as
    skipped, the other splits scored."""
    model, processor = hubert
    sf.write(tmp_path / "a.wav", clip(1.0), RATE)
    write_manifest(tmp_path, [{"audio": "a.wav"}, {"audio": "a.wav"}])
    with pytest.raises(ValueError, match=r"asr rows need the column\(s\) \['text'\], which the dataset lacks"):
        prepare_dataset(tmp_path / "manifest.jsonl")
    assert prepare_dataset(tmp_path / "manifest.jsonl", require_text=False)[1]["kept"] == 2
    with pytest.raises(ValueError, match=r"Batch row 0 .* needs non-empty \['text'\]"):
        SpeechLlmCollator(processor)([{"audio": str(tmp_path / "a.wav")}])

    (tmp_path / "audio_only").mkdir()
    (tmp_path / "manifest.jsonl").rename(tmp_path / "audio_only" / "test.jsonl")
    (tmp_path / "a.wav").rename(tmp_path / "audio_only" / "a.wav")
    (tmp_path / "transcribed").mkdir()
    sf.write(tmp_path / "transcribed" / "a.wav", clip(1.0), RATE)
    write_manifest(tmp_path / "transcribed", [{"audio": "a.wav", "text": "hello"}]).rename(
        tmp_path / "transcribed" / "test.jsonl"
    )
    entries = [
        {name: {"datapath": name, "task": "ASR", "languages": ["en"], "partitions": {"test": {}}}}
        for name in ("audio_only", "transcribed")
    ]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"DATA": entries}))
    scores = evaluate(model, processor, tmp_path / "cfg.yaml", tmp_path / "results", max_new_tokens=TOKENS)
    results = scores["results"]["ASR"]["en"]
    assert results["audio_only/test"]["num_scored"] == 0
    assert results["audio_only/test"]["skipped"]["missing_fields"] == 2
    assert results["transcribed/test"]["num_scored"] == 1


def test_empty_evaluation_split(tmp_path, hubert):
    """An empty split file raised StopIteration from inside datasets; it is now named, before anything is written."""
    model, processor = hubert
    for name, rows in (("empty", []), ("transcribed", [{"audio": "a.wav", "text": "hello"}])):
        (tmp_path / name).mkdir()
        sf.write(tmp_path / name / "a.wav", clip(1.0), RATE)
        (tmp_path / name / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    entries = [
        {name: {"datapath": name, "task": "ASR", "languages": ["en"], "partitions": {"test": {}}}}
        for name in ("transcribed", "empty")
    ]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"DATA": entries}))
    with pytest.raises(ValueError, match=r"Manifest '.*empty/test\.jsonl' holds no rows: it is empty\."):
        evaluate(model, processor, tmp_path / "cfg.yaml", tmp_path / "results", max_new_tokens=TOKENS)
    assert not (tmp_path / "results").exists()
    (tmp_path / "empty" / "test.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "hi"}) + "\n")
    scores = evaluate(model, processor, tmp_path / "cfg.yaml", tmp_path / "results", max_new_tokens=TOKENS)
    assert [group["num_scored"] for group in scores["results"]["ASR"]["en"].values()] == [1, 1]


@pytest.mark.parametrize("layout", ["jsonl_dict", "parquet_struct", "audio_feature"])
def test_relative_paths_inside_audio_dicts_resolve_against_the_manifest_folder(tmp_path, monkeypatch, layout):
    """Path strings always did; the `path` of an audio dict, a parquet struct or a `datasets.Audio` value resolved
    against the working directory instead (issue 18 item 4). Rows holding bytes keep their path as a name."""
    data = tmp_path / "corpus"
    (data / "clips").mkdir(parents=True)
    sf.write(data / "clips" / "a.wav", clip(1.0, seed=1), RATE)
    flac = data / "clips" / "b.flac"
    sf.write(flac, clip(1.0, seed=2), RATE)
    rows = [
        {"id": "a", "text": "one", "audio": {"path": "clips/a.wav", "bytes": None}},
        {"id": "b", "text": "two", "audio": {"path": "b.flac", "bytes": flac.read_bytes()}},  # a name only
        {"id": "c", "text": "three", "audio": {"path": "clips/missing.wav", "bytes": None}},
    ]
    if layout == "jsonl_dict":
        (data / "m.jsonl").write_text(
            "".join(json.dumps({**r, "audio": {"path": r["audio"]["path"]}}) + "\n" for r in rows[::2])
        )
        manifest = data / "m.jsonl"
    else:
        dataset = datasets.Dataset.from_list(rows)
        if layout == "audio_feature":
            dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
        # Written with pyarrow: datasets' to_parquet would itself look for the files from the working directory.
        pq.write_table(dataset.data.table, data / "m.parquet")
        manifest = data / "m.parquet"
    monkeypatch.chdir(tmp_path)  # a working directory where clips/a.wav does not exist
    kept, report = prepare_dataset(str(manifest))
    assert report["dropped"]["unreadable"] == 1  # the missing clip, whatever the working directory holds
    assert [row["id"] for row in kept] == (["a"] if layout == "jsonl_dict" else ["a", "b"])
    assert kept[0]["audio"]["path"] == str(data / "clips" / "a.wav")
