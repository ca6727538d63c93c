"""The bad-input matrix of docs/reliability.md: one test per row, each over the entry points where the input can
occur (`load_audio`, the processor, the training collator, `prepare`, batched generation, the pipeline), then
property tests over the processor and the collator."""

from __future__ import annotations

import copy
import json
import logging
import re
import string
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import ENCODERS, PROJECTORS, clip, tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, HubertModel, PreTrainedTokenizerFast, pipeline

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor, from_preset
from speechllm_hf.data import audio_duration, load_audio
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator, special_token_strings
from speechllm_hf.inference import generate_responses
from speechllm_hf.inference.generate import default_prompts
from speechllm_hf.preprocessing import prepare_dataset
from speechllm_hf.presets import TINY_CHAT_TEMPLATE, tiny_encoder_config, tiny_text_config

RATE = 16000
TOKENS = 2  # new tokens per generated row: only whether a row is answered matters here


@pytest.fixture(scope="module")
def hubert():
    return tiny("hubert", "qformer")


@pytest.fixture(scope="module")
def pipe(hubert):
    model, processor = hubert
    return pipeline("speech-llm", model=model, processor=processor, max_new_tokens=TOKENS)


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dropped(report: dict) -> dict[str, int]:
    return {reason: count for reason, count in report["dropped"].items() if count}


def array_row(samples, rate: int = RATE, text: str = "hello there") -> dict:
    return {"audio": {"array": samples, "sampling_rate": rate}, "text": text}


def errors_of(model, processor, requests) -> dict[int, str]:
    results = generate_responses(model, processor, requests, batch_size=2, max_new_tokens=TOKENS)
    assert all((r.error is None) == (r.response is not None) for r in results)
    return {index: r.error for index, r in enumerate(results) if r.error is not None}


def test_unreadable_file(tmp_path, hubert, pipe):
    model, processor = hubert
    good, missing, garbage = tmp_path / "good.wav", tmp_path / "missing.wav", tmp_path / "garbage.wav"
    sf.write(good, clip(1.0), RATE)
    garbage.write_bytes(b"not audio at all" * 100)
    for path, message in ((missing, "does not exist"), (garbage, "Cannot decode")):
        with pytest.raises(ValueError, match=message):
            load_audio(path)
        with pytest.raises(ValueError, match=message):
            processor(["<audio>"], audio=[str(path)])
        with pytest.raises(ValueError, match=message):
            pipe(str(path))
    # Encoded bytes are decoded from any buffer, never read as 8-bit samples.
    with pytest.raises(ValueError, match="Cannot decode"):
        processor(["<audio>"], audio=[bytearray(garbage.read_bytes())])
    np.testing.assert_array_equal(
        processor(["<audio>"], audio=[bytearray(good.read_bytes())])["input_features"],
        processor(["<audio>"], audio=[str(good)])["input_features"],
    )

    collator = SpeechLlmCollator(processor)
    with pytest.raises(
        ValueError, match=r"Batch row 1 \(audio .*missing\.wav\): Audio file .* does not exist.*prepare"
    ):
        collator([{"audio": str(good), "text": "hi"}, {"audio": str(missing), "text": "hi"}])

    rows = [{"audio": str(p), "text": "hi"} for p in (good, missing, garbage)]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))
    assert dropped(report) == {"unreadable": 2} and kept["audio"] == [str(good)]

    errors = errors_of(model, processor, [{"audio": str(p)} for p in (good, missing, garbage, good)])
    assert sorted(errors) == [1, 2] and "does not exist" in errors[1] and "Cannot decode" in errors[2]


def test_zero_length_clip(tmp_path, hubert, pipe):
    model, processor = hubert
    empty = np.zeros(0, dtype=np.float32)
    with pytest.raises(ValueError, match=r"empty \(0 samples at 16000 Hz\)"):
        load_audio(empty, RATE)
    with pytest.raises(ValueError, match=r"Audio clip 1 is empty"):
        processor(["<audio><audio>"], audio=[clip(1.0), empty], sampling_rate=RATE)
    # One sample at 48 kHz leaves none at 16 kHz: checked after resampling.
    with pytest.raises(ValueError, match=r"Audio clip 0 is empty \(0 samples at 16000 Hz\)"):
        processor(["<audio>"], audio=[np.full(1, 0.1, dtype=np.float32)], sampling_rate=48000)
    with pytest.raises(ValueError, match="empty"):
        pipe({"audio": empty, "sampling_rate": RATE})

    with pytest.raises(ValueError, match=r"Batch row 0 \(audio <array>\): Audio clip is empty"):
        SpeechLlmCollator(processor)([array_row(empty)])

    sf.write(tmp_path / "empty.wav", empty, RATE)
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    rows = [{"audio": str(tmp_path / name), "text": "hi"} for name in ("empty.wav", "good.wav")]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))
    assert dropped(report) == {"empty": 1} and report["kept"] == 1
    tiny_rows = datasets.Dataset.from_dict({"audio": [{"array": [0.1], "sampling_rate": 48000}], "text": ["hi"]})
    assert dropped(prepare_dataset(tiny_rows)[1]) == {"empty": 1}  # 1 sample at 48 kHz: none at 16 kHz

    errors = errors_of(
        model, processor, [{"audio": str(tmp_path / "empty.wav")}, {"audio": str(tmp_path / "good.wav")}]
    )
    assert list(errors) == [0] and "empty" in errors[0]


def test_nan_inf_samples(tmp_path, hubert, pipe):
    model, processor = hubert
    bad = []
    for value, dtype in ((np.nan, np.float32), (np.inf, np.float64), (-np.inf, np.float32)):
        samples = clip(1.0).astype(dtype)
        samples[100] = value
        bad.append(samples)
        with pytest.raises(ValueError, match="NaN or infinite"):
            load_audio(samples, RATE)
        with pytest.raises(ValueError, match="Audio clip 0 holds NaN or infinite samples"):
            processor(["<audio>"], audio=[samples], sampling_rate=RATE)
        with pytest.raises(ValueError, match="NaN or infinite"):
            pipe({"audio": samples, "sampling_rate": RATE})
    with pytest.raises(ValueError, match=r"Batch row 1 \(audio <array>\): Audio clip holds NaN"):
        SpeechLlmCollator(processor)([array_row(clip(1.0)), array_row(bad[0])])

    sf.write(tmp_path / "nan.wav", bad[0], RATE, subtype="FLOAT")
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    rows = [{"audio": str(tmp_path / name), "text": "hi"} for name in ("good.wav", "nan.wav")]
    assert dropped(prepare_dataset(write_manifest(tmp_path, rows))[1]) == {"non_finite": 1}

    errors = errors_of(model, processor, [{"audio": samples, "sampling_rate": RATE} for samples in [clip(1.0), *bad]])
    assert sorted(errors) == [1, 2, 3] and all("NaN" in e for e in errors.values())


def test_int16_int32_float64_arrays(tmp_path, hubert):
    _, processor = hubert
    wave = clip(1.0)  # float32 in [-1, 1]
    reference = load_audio(wave, RATE)
    reference_features = processor(["<audio>"], audio=[wave], sampling_rate=RATE)["input_features"]
    # Integer PCM is scaled by its full scale (2^15, 2^31; unsigned 8-bit around 128); floats are kept as they are.
    forms = {
        "int16": (np.round(wave * 32767).astype(np.int16), 1e-4),
        "int32": (np.round(wave * (2**31 - 1)).astype(np.int32), 1e-6),
        "uint8": ((np.round(wave * 127) + 128).astype(np.uint8), 1e-2),
        "float64": (wave.astype(np.float64), 1e-7),
        "torch.bfloat16": (torch.from_numpy(wave).bfloat16(), 4e-3),
    }
    for name, (samples, atol) in forms.items():
        waveform = load_audio(samples, RATE)
        assert waveform.dtype == np.float32, name
        np.testing.assert_allclose(waveform, reference, atol=atol, err_msg=name)
        features = processor(["<audio>"], audio=[samples], sampling_rate=RATE)["input_features"]
        torch.testing.assert_close(features, reference_features, atol=20 * atol, rtol=0)  # normalised: x ~ 1 / std
    # 64-bit integers (a Python list of ints) have no PCM width: refused rather than scaled to silence by 2^63.
    for samples in (np.round(wave * 32767).astype(np.int64), [int(x) for x in np.round(wave * 32767)]):
        with pytest.raises(ValueError, match="no PCM scale .* int16 or int32"):
            processor(["<audio>"], audio=[samples], sampling_rate=RATE)
    # Integer PCM converted to float without scaling is kept, with a warning saying how to scale it.
    with pytest.warns(UserWarning, match="above full scale"):
        processor(["<audio>"], audio=[wave.astype(np.float64) * 32768], sampling_rate=RATE)

    for subtype, dtype in (("PCM_16", np.int16), ("PCM_32", np.int32), ("DOUBLE", np.float64)):
        path = tmp_path / f"{subtype}.wav"
        sf.write(path, wave, RATE, subtype=subtype)
        np.testing.assert_allclose(load_audio(path), reference, atol=1e-4)
        assert sf.read(path, dtype=dtype)[0].dtype == dtype
    rows = [{"audio": str(tmp_path / f"{s}.wav"), "text": "hi"} for s in ("PCM_16", "PCM_32", "DOUBLE")]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))
    assert report["kept"] == 3 and kept["duration"] == pytest.approx([1.0] * 3)
    batch = SpeechLlmCollator(processor)([array_row(forms["int16"][0]), array_row(forms["float64"][0])])
    torch.testing.assert_close(batch["input_features"][0], batch["input_features"][1], atol=1e-3, rtol=0)


def tone(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_sampling_rates_8_44_1_48_khz(tmp_path, hubert):
    _, processor = hubert
    _, whisper = tiny("whisper", "cnn")
    native = tone(RATE)
    for rate in (8000, 44100, 48000):
        waveform = load_audio(tone(rate), rate)
        assert len(waveform) == RATE
        np.testing.assert_allclose(waveform[200:-200], native[200:-200], atol=1e-2)  # soxr, not nearest-sample
        inputs = processor(["<audio>"], audio=[tone(rate)], sampling_rate=rate)
        assert int(inputs["feature_attention_mask"].sum()) == RATE
        assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == processor.num_audio_tokens(RATE)
        assert whisper(["<audio>"], audio=[tone(rate)], sampling_rate=rate)["input_features"].shape == (1, 80, 100)
        sf.write(tmp_path / f"{rate}.wav", tone(rate), rate)
        np.testing.assert_allclose(load_audio(tmp_path / f"{rate}.wav"), load_audio(tone(rate), rate), atol=1e-4)
    rows = [{"audio": str(tmp_path / f"{rate}.wav"), "text": "hi"} for rate in (8000, 44100, 48000)]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))
    assert report["kept"] == 3 and kept["duration"] == pytest.approx([1.0] * 3)
    for rate, message in (
        (None, "has no sampling rate"),
        (0, "has sampling rate 0"),
        (-8000, "has sampling rate -8000"),
    ):
        with pytest.raises(ValueError, match=f"Audio clip 0 {message}"):
            processor(["<audio>"], audio=[native], sampling_rate=rate)
        with pytest.raises(ValueError, match="An audio array"):
            audio_duration(native, rate)


def test_stereo_and_multichannel(tmp_path, hubert):
    _, processor = hubert
    channels = np.stack([clip(1.0, seed=i) for i in range(6)], axis=1)  # (samples, channels), as soundfile reads
    mean = channels.mean(axis=1)
    for count in (2, 6):  # stereo, 5.1
        expected = channels[:, :count].mean(axis=1)
        for samples in (channels[:, :count], channels[:, :count].T):  # .T: (channels, samples), torchaudio's layout
            np.testing.assert_allclose(load_audio(samples, RATE), expected, atol=1e-6)
    torch.testing.assert_close(
        processor(["<audio>"], audio=[channels], sampling_rate=RATE)["input_features"],
        processor(["<audio>"], audio=[mean], sampling_rate=RATE)["input_features"],
    )
    with pytest.raises(ValueError, match=r"1-D \(samples\) or 2-D .* got shape \(1, 16000, 6\)"):
        processor(["<audio>"], audio=[channels[None]], sampling_rate=RATE)

    sf.write(tmp_path / "surround.wav", channels, 48000, subtype="FLOAT")  # 5.1 at 48 kHz
    np.testing.assert_allclose(load_audio(tmp_path / "surround.wav"), load_audio(mean, 48000), atol=1e-6)
    assert audio_duration(tmp_path / "surround.wav") == pytest.approx(1 / 3)
    assert audio_duration(channels.T, RATE) == audio_duration(channels, RATE) == 1.0
    kept, report = prepare_dataset(write_manifest(tmp_path, [{"audio": str(tmp_path / "surround.wav"), "text": "a"}]))
    assert report["kept"] == 1 and kept["duration"] == pytest.approx([1 / 3])
    batch = SpeechLlmCollator(processor)([array_row(channels), array_row(mean)])
    torch.testing.assert_close(batch["input_features"][0], batch["input_features"][1])


def test_clip_longer_than_the_encoder_limit(tmp_path, hubert):
    model, processor = tiny("whisper", "cnn")
    limit = model.config.max_feature_length
    inputs = processor(["<audio>"], audio=[clip(30.0)], sampling_rate=RATE)  # exactly 30 s: accepted
    assert inputs["input_features"].shape[-1] == limit == 3000
    with torch.no_grad():
        _, lengths = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == int(lengths[0])
    # Refused, never cut: Whisper's positional table ends at 30 s.
    with pytest.raises(ValueError, match=r"Audio clip 0 lasts 30\.01 s, longer than .* \(3000 feature frames, 30 s\)"):
        processor(["<audio>"], audio=[clip(30.01)], sampling_rate=RATE)
    with pytest.raises(ValueError, match="at most 3000 mel frames"):
        model.encoder(torch.zeros(1, 80, limit + 2))

    sf.write(tmp_path / "long.wav", clip(31.0), RATE)
    sf.write(tmp_path / "short.wav", clip(1.0), RATE)
    rows = [{"audio": str(tmp_path / name), "text": "hi"} for name in ("long.wav", "short.wav")]
    assert dropped(prepare_dataset(write_manifest(tmp_path, rows))[1]) == {"too_long": 1}  # max_duration 30 s
    with pytest.raises(ValueError, match=r"Audio clip 1 lasts 31\.00 s.*clip numbers are batch rows"):
        SpeechLlmCollator(processor)([{"audio": str(tmp_path / "short.wav"), "text": "hi"}, rows[0]])
    errors = errors_of(model, processor, [{"audio": str(tmp_path / n)} for n in ("short.wav", "long.wav")])
    assert list(errors) == [1] and "longer than the encoder accepts" in errors[1]

    # HuBERT has no length limit of its own: a long clip is limited by the LLM context (the collator's max_length).
    _, processor = hubert
    inputs = processor(["<audio>"], audio=[clip(40.0)], sampling_rate=RATE)
    assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == processor.num_audio_tokens(40 * RATE)
    with pytest.raises(ValueError, match=r"Batch row 0: its prompt .* over max_length=256"):
        SpeechLlmCollator(processor, max_length=256)([array_row(clip(40.0))])


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


def test_unknown_projector_type(tmp_path, hubert):
    model, _ = hubert
    with pytest.raises(ValueError, match="Unknown projector_type 'transformer'; choose one of qformer, cnn, mlp"):
        SpeechLlmConfig(projector_type="transformer")
    with pytest.raises(ValueError, match="Unknown projector_type 'linear'"):
        from_preset("tiny", projector_type="linear")
    with pytest.raises(ValueError, match=r"Unknown qformer projector settings \['stack_factor'\]; valid ones"):
        SpeechLlmConfig(projector_type="qformer", projector_config={"stack_factor": 4})
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "projector_type": "perceiver"}))
    with pytest.raises(ValueError, match="Unknown projector_type 'perceiver'"):
        SpeechLlmConfig.from_pretrained(tmp_path)


def test_encoder_llm_dimension_mismatch_in_a_config(tmp_path, hubert):
    model, processor = hubert
    config = copy.deepcopy(model.config)  # 64-wide encoder and LLM
    narrow_encoder = tiny_encoder_config("hubert")
    narrow_encoder.hidden_size = 32
    with pytest.raises(ValueError, match="The encoder is 32 wide but the config's encoder_config says 64"):
        SpeechLlmForConditionalGeneration(config, encoder=HubertModel(narrow_encoder))
    # An LLM of another width used to take the audio features element by element, without an error.
    narrow_text = tiny_text_config(processor.tokenizer)
    narrow_text.hidden_size = 32
    AutoModelForCausalLM.from_config(narrow_text).save_pretrained(tmp_path / "llm")
    config.text_name_or_path = str(tmp_path / "llm")
    with pytest.raises(ValueError, match="The LLM is 32 wide but the config's text_config says 64.*AutoConfig"):
        SpeechLlmForConditionalGeneration.from_backbones(config)


def tokenizer_without_pad(specials: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built here (no download) with no pad token, like Llama's."""
    words = ["hello", "there", "word", "short"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"unk_token": "<unk>", "eos_token": "</s>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{key: token for key, token in named.items() if token in specials},
        additional_special_tokens=["<audio>"],
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="left",
    )
    assert tokenizer.pad_token is None
    return tokenizer


def test_tokenizer_without_a_pad_token(tmp_path, hubert):
    model, processor = hubert
    spec = processor.audio_length_spec
    # Llama-2 (pads with its unknown token, as BLSP did), Llama-3.1 (a dedicated pad token), neither (EOS).
    for specials, pad in (
        (["<unk>", "</s>", "<audio>"], "<unk>"),
        (["<unk>", "</s>", "<audio>", "<|finetune_right_pad_id|>"], "<|finetune_right_pad_id|>"),
        (["</s>", "<audio>"], "</s>"),
    ):
        tokenizer = tokenizer_without_pad(specials)
        built = SpeechLlmProcessor(processor.feature_extractor, tokenizer, audio_length_spec=spec)
        assert tokenizer.pad_token == pad and built.tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(pad)
        batch = built(["<audio> hello", "hello there word short"], audio=[clip(0.5)], sampling_rate=RATE)
        padding = batch["attention_mask"] == 0
        assert padding[1, 0] and (batch["input_ids"][padding] == built.tokenizer.pad_token_id).all()  # left padded
        collated = SpeechLlmCollator(built)(
            [array_row(clip(0.5), text="hello"), array_row(clip(0.5), text="word " * 5)]
        )
        padding = collated["attention_mask"] == 0
        assert padding.any() and (collated["input_ids"][padding] == built.tokenizer.pad_token_id).all()
        assert (collated["labels"][padding] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="no pad, unknown or EOS token"):
        SpeechLlmProcessor(processor.feature_extractor, tokenizer_without_pad(["<audio>"]), audio_length_spec=spec)

    # from_preset sets one for a local LLM whose tokenizer has none, saved with the processor and generation config.
    tokenizer = tokenizer_without_pad(["<unk>", "<s>", "</s>", "<audio>"])
    tokenizer.save_pretrained(tmp_path / "llm")
    AutoModelForCausalLM.from_config(tiny_text_config(tokenizer)).save_pretrained(tmp_path / "llm")
    model, built = from_preset("tiny", text_name_or_path=str(tmp_path / "llm"))
    assert (
        built.tokenizer.pad_token == "<unk>" and model.generation_config.pad_token_id == built.tokenizer.unk_token_id
    )
    built.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").pad_token == "<unk>"


# ---------------------------------------------------------------------------------------------------------------------
# Property tests: any mix of lengths, rates, dtypes, channel layouts and texts either gives consistent model inputs
# or one of the documented ValueErrors.

DTYPES = {"float32": 1.0, "float64": 1.0, "int16": 32767, "int32": 2**31 - 1}


def clip_specs(min_samples: int = 0):
    """(samples at its own rate, rate, dtype, channels, channels first?, seed): from none (or `min_samples`) to 3 s."""
    return st.tuples(
        st.integers(min_value=min_samples, max_value=24000),
        st.sampled_from([8000, 16000, 22050, 44100, 48000]),
        st.sampled_from(sorted(DTYPES)),
        st.integers(min_value=1, max_value=3),
        st.booleans(),  # channels first (torchaudio) or last (soundfile)
        st.integers(min_value=0, max_value=2**16),
    )


WORDS = st.text(alphabet=string.ascii_lowercase + " .,?'", max_size=40)


def make_clip(samples: int, rate: int, dtype: str, channels: int, first: bool, seed: int) -> np.ndarray:
    """A clip as a user could hand it over: mono (1-D), or channels last or first."""
    mono = clip(samples / rate, seed=seed, rate=rate)[:samples]
    data = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1)  # (samples, channels)
    data = np.round(data * DTYPES[dtype]).astype(dtype) if dtype.startswith("int") else data.astype(dtype)
    if channels == 1:
        return data[:, 0]
    return data.T if first else data


def feature_length(model, samples: int, rate: int) -> int:
    """Feature frames of a clip at the model's rate (soxr's length; Whisper: one mel frame per 160 samples)."""
    length = len(soxr.resample(np.zeros(samples, dtype=np.float32), rate, RATE))
    return length // 160 if model.config.is_whisper_like_encoder else length


def expected_error(model, processor, clips) -> str | None:
    """The documented error a batch of clips raises, if any, from the clips' lengths alone."""
    for samples, rate, _, channels, *_ in clips:
        if 0 < samples < channels:
            # A clip shorter than its channel count has no telling orientation: read as `channels` samples of one
            # channel (the shorter axis is taken as the channels), it is refused as too short, not as empty.
            return "empty|too short"
        resampled = len(soxr.resample(np.zeros(samples, dtype=np.float32), rate, RATE))
        if resampled == 0:
            return "empty"
        # Whisper's STFT needs over 200 samples (its reflection padding); every encoder needs one audio token.
        too_few = model.config.is_whisper_like_encoder and resampled <= 200
        if too_few or processor.num_audio_tokens(feature_length(model, samples, rate)) < 1:
            return "too short"
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_type=st.tuples(st.sampled_from(ENCODERS), st.sampled_from(PROJECTORS)),
    clips=st.lists(clip_specs(), max_size=3),
    data=st.data(),
)
def test_processor_properties(model_type, clips, data):
    model, processor = tiny(*model_type)
    # Each clip goes into one of up to three texts, in order, between random words.
    num_texts = data.draw(st.integers(min_value=1, max_value=3))
    owners = sorted(data.draw(st.lists(st.integers(0, num_texts - 1), min_size=len(clips), max_size=len(clips))))
    texts = [data.draw(WORDS) for _ in range(num_texts)]
    for owner in owners:
        texts[owner] += "<audio>" + data.draw(WORDS)
    audio = [make_clip(*c) for c in clips]
    error = expected_error(model, processor, clips)
    try:
        inputs = processor(texts, audio=audio or None, sampling_rate=[c[1] for c in clips])
    except ValueError as err:
        event(f"refused: {error}")
        assert error is not None and re.search(error, str(err)), err
        return
    event("processed")
    assert error is None, error

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # Left padding: zeros then ones; pads hold the pad id; the ones are the text's own tokens.
    assert torch.equal(mask, mask.sort(dim=-1).values)
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    if not clips:
        assert "input_features" not in inputs
        return
    feature_mask = inputs["feature_attention_mask"]
    lengths = feature_mask.sum(-1)
    assert torch.equal(feature_mask, (torch.arange(feature_mask.shape[1]) < lengths[:, None]).long())
    for (samples, rate, *_), length in zip(clips, lengths.tolist()):
        assert length == feature_length(model, samples, rate)
        hop = 160 if model.config.is_whisper_like_encoder else 1
        assert abs(length - samples * RATE / rate / hop) <= 1  # the clip's duration, whatever its rate
    # Every placeholder became exactly as many audio tokens as the projector emits for its clip.
    with torch.no_grad():
        _, audio_lengths = model.get_audio_features(inputs["input_features"], feature_mask)
    per_clip = iter(audio_lengths.tolist())
    for text, row in zip(texts, ids):
        expected = sum(next(per_clip) for _ in range(text.count("<audio>")))
        assert int((row == processor.audio_token_id).sum()) == expected


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
