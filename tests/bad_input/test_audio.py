"""Bad audio (docs/reliability.md): each case over the entry points where it can occur (`load_audio`, the processor,
the training collator, `prepare`, batched generation, the pipeline), asserting the message and that the valid clips
beside it are kept; then property tests over the processor."""

from __future__ import annotations

import copy
import io
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ENCODERS, PROJECTORS, clip, tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bad_input.conftest import (
    RATE,
    WORDS,
    array_row,
    clip_specs,
    dropped,
    errors_of,
    expected_error,
    feature_length,
    make_clip,
    write_manifest,
)
from speechllm_hf.cli import main
from speechllm_hf.data import audio_duration, load_audio
from speechllm_hf.data.collators import SpeechLlmCollator
from speechllm_hf.preprocessing import prepare_dataset
from speechllm_hf.preprocessing.prepare import shortest_clip_samples


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


def test_clip_longer_than_max_audio_seconds(tmp_path, hubert):
    model, processor = tiny("whisper", "cnn")
    # Whisper's 30 s is no limit: longer clips go through the encoder in 30 s windows
    # (tests/models/test_long_audio.py).
    inputs = processor(["<audio>"], audio=[clip(30.01)], sampling_rate=RATE)
    assert inputs["input_features"].shape[-1] == 3001
    with pytest.raises(ValueError, match="at most 3000 mel frames"):
        model.encoder(torch.zeros(1, 80, 3002))  # the encoder alone still ends at 30 s

    # The guard against accidents is the processor's max_audio_seconds: refused, never cut, at every entry point.
    processor = copy.copy(processor)
    processor.max_audio_seconds = 30.5
    sf.write(tmp_path / "long.wav", clip(31.0), RATE)
    sf.write(tmp_path / "short.wav", clip(1.0), RATE)
    rows = [{"audio": str(tmp_path / name), "text": "hi"} for name in ("long.wav", "short.wav")]
    assert dropped(prepare_dataset(write_manifest(tmp_path, rows))[1]) == {"too_long": 1}  # max_duration 30 s
    refusal = r"Audio clip 1 lasts 31\.00 s, longer than max_audio_seconds=30\.5"
    with pytest.raises(ValueError, match=refusal + ".*clip numbers are batch rows"):
        SpeechLlmCollator(processor)([{"audio": str(tmp_path / "short.wav"), "text": "hi"}, rows[0]])
    errors = errors_of(model, processor, [{"audio": str(tmp_path / n)} for n in ("short.wav", "long.wav")])
    assert list(errors) == [1] and "longer than max_audio_seconds=30.5" in errors[1]

    # HuBERT has no length limit of its own: a long clip is limited by the LLM context (the collator's max_length).
    _, processor = hubert
    inputs = processor(["<audio>"], audio=[clip(40.0)], sampling_rate=RATE)
    assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == processor.num_audio_tokens(40 * RATE)
    with pytest.raises(ValueError, match=r"Batch row 0: its prompt .* over max_length=256"):
        SpeechLlmCollator(processor, max_length=256)([array_row(clip(40.0))])


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


# ---------------------------------------------------------------------------------------------------------------------
# Clips that decode but cannot be trained on, and paths that are not audio files: each is dropped by `prepare` with its
# own reason and a detail that says what is wrong, and refused by `load_audio` and the processor in the same words.


def test_clip_too_short_for_the_encoder(tmp_path, hubert, capsys):
    """300 samples decode and pass every duration bound, then the processor refuses them (HuBERT's convolutions need
    400 for one frame): in training that stopped the run. Given the model's processor, prepare drops them."""
    model, processor = hubert
    assert shortest_clip_samples(processor) == 400
    assert shortest_clip_samples(tiny("whisper", "cnn")[1]) == 201  # Whisper's STFT needs over 200
    with pytest.raises(ValueError, match="too short"):
        processor(["<audio>"], audio=[clip(1.0)[:399]], sampling_rate=RATE)
    processor(["<audio>"], audio=[clip(1.0)[:400]], sampling_rate=RATE)

    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    sf.write(tmp_path / "blip.wav", clip(1.0)[:300], RATE)
    sf.write(tmp_path / "blip48k.wav", clip(1.0, rate=48000)[:1000], 48000)  # 333 samples once at 16 kHz
    sf.write(tmp_path / "edge.wav", clip(1.0)[:400], RATE)
    names = ("good.wav", "blip.wav", "blip48k.wav", "edge.wav")
    manifest = write_manifest(tmp_path, [{"audio": str(tmp_path / n), "text": "hi"} for n in names])
    assert dropped(prepare_dataset(manifest)[1]) == {}  # without the model, nothing tells the encoder's field
    kept, report = prepare_dataset(manifest, tmp_path / "out", processor=processor)
    assert dropped(report) == {"too_short_for_encoder": 2}
    assert [Path(a).name for a in kept["audio"]] == ["good.wav", "edge.wav"]
    details = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"]) for d in details] == [(1, "too_short_for_encoder"), (2, "too_short_for_encoder")]
    assert details[0]["detail"] == "300 samples at 16000 Hz; the encoder needs 400 for one audio token"
    assert SpeechLlmCollator(processor)(kept.to_list())["input_ids"].shape[0] == 2  # what training reads: no error

    with pytest.raises(ValueError, match="target_rate=8000 but the processor reads 16000 Hz"):
        prepare_dataset(manifest, processor=processor, target_rate=8000)

    # The command reads the processor of a saved model (no weights needed).
    processor.save_pretrained(tmp_path / "model")
    assert (
        main(
            [
                "prepare",
                "--manifest",
                str(manifest),
                "--output_dir",
                str(tmp_path / "cli"),
                "--model",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    assert dropped(json.loads(capsys.readouterr().out)) == {"too_short_for_encoder": 2}


def wav_bytes(samples: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_truncated_wav(tmp_path):
    """A copy cut short: libsndfile reads the part that is there without a word, so the clip looked like a shorter
    one, whose transcript no longer matches. Only the header's data size tells."""
    whole = wav_bytes(clip(1.0))
    (tmp_path / "good.wav").write_bytes(whole)
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut_float.wav").write_bytes(wav_bytes(clip(2.0), "FLOAT")[:-1000])
    assert sf.info(tmp_path / "cut.wav").frames == len(
        load_audio(tmp_path / "cut.wav")
    )  # libsndfile agrees with itself
    # A header that leaves the length open (0xFFFFFFFF, as streaming writers do) is no claim.
    streamed = bytearray(whole)
    streamed[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))

    names = ("cut.wav", "good.wav", "cut_float.wav", "streamed.wav")
    rows = [{"audio": str(tmp_path / n), "text": "hi"} for n in names]
    kept, report = prepare_dataset(datasets.Dataset.from_list(rows[:4]), tmp_path / "out")
    assert dropped(report) == {"truncated": 2} and [Path(a).name for a in kept["audio"]] == [
        "good.wav",
        "streamed.wav",
    ]
    detail = json.loads((tmp_path / "out" / "dropped.jsonl").read_text().splitlines()[0])["detail"]
    assert detail == (
        "the WAV header declares 32000 bytes of samples but the file holds 15978 (0.499 s): the copy was cut short; "
        "copy or export it again"
    )
    # Parquet's {bytes, path} clips are checked the same way.
    clips = [{"audio": {"bytes": b, "path": "lost.wav"}, "text": t} for b, t in ((whole, "a"), (whole[:-99], "b"))]
    kept, report = prepare_dataset(datasets.Dataset.from_list(clips))
    assert dropped(report) == {"truncated": 1} and kept["text"] == ["a"]


def test_directory_given_as_audio(tmp_path, hubert, pipe):
    """A folder (a path column pointing at the clips' folder) was 'Format not recognised'; an empty path in a
    manifest was resolved to the manifest's own folder and is now reported as empty."""
    _, processor = hubert
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    message = r"Audio path '.*clips' is a directory, not an audio file\."
    with pytest.raises(ValueError, match=message):
        load_audio(tmp_path / "clips")
    with pytest.raises(ValueError, match=message):
        processor(["<audio>"], audio=[str(tmp_path / "clips")])
    with pytest.raises(ValueError, match=message):
        pipe(str(tmp_path / "clips"))
    with pytest.raises(ValueError, match=r"Batch row 1 .* is a directory"):
        SpeechLlmCollator(processor)([{"audio": str(tmp_path / p), "text": "hi"} for p in ("good.wav", "clips")])
    rows = [{"audio": a, "text": "hi"} for a in ("good.wav", "clips", "")]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"unreadable": 2} and [Path(a).name for a in kept["audio"]] == ["good.wav"]
    details = [json.loads(line)["detail"] for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert "is a directory, not an audio file" in details[0] and "The audio path is empty" in details[1], details
    # An empty path in a dataset says so too.
    with pytest.raises(ValueError, match="The audio path is empty"):
        load_audio("")
    kept, report = prepare_dataset(
        datasets.Dataset.from_list([{"audio": "", "text": "a"}, rows[0] | {"audio": str(tmp_path / "good.wav")}]),
        tmp_path / "out2",
    )
    assert dropped(report) == {"unreadable": 1} and kept.num_rows == 1
    assert "The audio path is empty" in (tmp_path / "out2" / "dropped.jsonl").read_text()


def test_symbolic_link_loop_and_broken_link(tmp_path, hubert):
    """Both were reported as a missing file ('does not exist'), which sends the user looking for a file that is
    there, as a link."""
    _, processor = hubert
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    (tmp_path / "loop_a.wav").symlink_to(tmp_path / "loop_b.wav")
    (tmp_path / "loop_b.wav").symlink_to(tmp_path / "loop_a.wav")
    (tmp_path / "moved.wav").symlink_to(tmp_path / "gone" / "clip.wav")
    (tmp_path / "linked.wav").symlink_to(tmp_path / "good.wav")  # a working link is a file like any other
    loop = r"Audio file '.*loop_a\.wav' is a symbolic link loop: it never reaches a file\."
    broken = r"Audio file '.*moved\.wav' is a broken symbolic link to '.*gone/clip\.wav', which does not exist\."
    for path, message in ((tmp_path / "loop_a.wav", loop), (tmp_path / "moved.wav", broken)):
        with pytest.raises(ValueError, match=message):
            load_audio(path)
        with pytest.raises(ValueError, match=message):
            processor(["<audio>"], audio=[str(path)])
    names = ("loop_a.wav", "good.wav", "moved.wav", "linked.wav")
    kept, report = prepare_dataset(
        write_manifest(tmp_path, [{"audio": n, "text": "hi"} for n in names]), tmp_path / "o"
    )
    assert dropped(report) == {"unreadable": 2}
    assert [Path(a).name for a in kept["audio"]] == ["good.wav", "linked.wav"]
    details = [json.loads(line)["detail"] for line in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert re.search(loop, details[0]) and re.search(broken, details[1]), details


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode: no permission error to test")
def test_audio_file_without_read_permission(tmp_path, hubert):
    """Reported as 'Cannot decode ... System error' (prepare's header read) instead of a permission problem."""
    _, processor = hubert
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    sf.write(tmp_path / "locked.wav", clip(1.0), RATE)
    (tmp_path / "locked.wav").chmod(0)
    message = r"Audio file '.*locked\.wav' cannot be read: Permission denied\. Make it readable by this user"
    with pytest.raises(ValueError, match=message):
        load_audio(tmp_path / "locked.wav")
    with pytest.raises(ValueError, match=message):
        processor(["<audio>"], audio=[str(tmp_path / "locked.wav")])
    rows = [{"audio": n, "text": "hi"} for n in ("good.wav", "locked.wav")]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"unreadable": 1} and [Path(a).name for a in kept["audio"]] == ["good.wav"]
    assert re.search(message, (tmp_path / "out" / "dropped.jsonl").read_text())


def test_pipe_given_as_audio(tmp_path, hubert):
    """A named pipe (or a device) as a clip's path: reading it blocked prepare for ever, waiting for a writer."""
    _, processor = hubert
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    os.mkfifo(tmp_path / "fifo.wav")
    message = r"Audio path '.*fifo\.wav' is not a regular file \(a pipe, socket or device\)"
    with pytest.raises(ValueError, match=message):
        load_audio(tmp_path / "fifo.wav")
    with pytest.raises(ValueError, match=r"Audio path '/dev/zero' is not a regular file"):
        processor(["<audio>"], audio=["/dev/zero"])
    rows = [{"audio": n, "text": "hi"} for n in ("fifo.wav", "good.wav", "/dev/zero")]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows))
    assert dropped(report) == {"unreadable": 2} and [Path(a).name for a in kept["audio"]] == ["good.wav"]


def test_row_without_audio(tmp_path, hubert):
    """`"audio": null` was reported as 'An audio array has no sampling rate'."""
    _, processor = hubert
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    message = r"No audio: the clip is null \(a row without audio\?\)"
    with pytest.raises(ValueError, match=message):
        load_audio(None)
    with pytest.raises(ValueError, match=r"Batch row 1 \(no audio\): The row has no audio"):  # as it was
        SpeechLlmCollator(processor)(
            [{"audio": str(tmp_path / "good.wav"), "text": "a"}, {"audio": None, "text": "b"}]
        )
    rows = [{"audio": None, "text": "a"}, {"audio": "good.wav", "text": "b"}]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"unreadable": 1} and kept["text"] == ["b"]
    assert re.search(message, (tmp_path / "out" / "dropped.jsonl").read_text())


def test_number_given_as_audio(tmp_path):
    """An audio column holding numbers (durations, ids: the wrong column) was 'An audio array has no sampling rate'."""
    sf.write(tmp_path / "good.wav", clip(1.0), RATE)
    message = r"A clip is a file path, encoded bytes, samples or an audio dict; got the int 3: is the audio column"
    with pytest.raises(ValueError, match=message):
        load_audio(3)
    with pytest.raises(ValueError, match="got the float 2.5"):
        audio_duration(2.5)
    rows = [{"audio": 3, "text": "a"}, {"audio": str(tmp_path / "good.wav"), "text": "b"}]
    kept, report = prepare_dataset(write_manifest(tmp_path, rows), tmp_path / "out")
    assert dropped(report) == {"unreadable": 1} and kept["text"] == ["b"]
    assert re.search(message, (tmp_path / "out" / "dropped.jsonl").read_text())
