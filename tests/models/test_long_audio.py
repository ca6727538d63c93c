"""Long audio: the encoder runs in fixed windows (Whisper: 30 s), its outputs concatenated per clip, and the
processor expands placeholders to what the model emits; `max_audio_seconds` guards against accidents."""

import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES, clip, run_loader, save_expected_outputs, tiny
from transformers import pipeline

from speechllm_hf import SpeechLlmConfig, SpeechLlmProcessor, from_preset
from speechllm_hf.cli import main
from speechllm_hf.data.collators import SpeechLlmCollator
from speechllm_hf.inference import generate_responses, stream_generate
from speechllm_hf.models.speechllm.configuration_speechllm import audio_token_count
from speechllm_hf.models.speechllm.processing_speechllm import DEFAULT_MAX_AUDIO_SECONDS
from speechllm_hf.preprocessing import prepare_dataset

RATE = 16000


def encoder_calls(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The input lengths (last axis) of every encoder call, recorded into the returned list."""
    calls = []

    def record(module, args, kwargs):
        features = args[0] if args else kwargs[module.main_input_name]
        calls.append(features.shape[-1])

    return calls, model.encoder.register_forward_pre_hook(record, with_kwargs=True)


def audio_tokens(processor, inputs) -> list[int]:
    return (inputs["input_ids"] == processor.audio_token_id).sum(-1).tolist()


def window_by_window(model, features: torch.Tensor, window: int) -> torch.Tensor:
    """One clip's encoder outputs computed by hand: each window encoded as a clip of its own, outputs concatenated."""
    pieces = []
    for start in range(0, features.shape[-1], window):
        part = features[..., start : start + window][None]
        hidden, lengths = model.encode_audio(part)
        pieces.append(hidden[0, : int(lengths[0])])
    return torch.cat(pieces)


def test_75_second_whisper_clip_is_three_windows_with_the_right_audio_token_count():
    model, processor = tiny("whisper", "qformer")
    inputs = processor(["<audio> what is said?", "<audio>"], audio=[clip(75.0), clip(3.0, 1)], sampling_rate=RATE)
    assert inputs["input_features"].shape[-1] == 7500  # 100 mel frames a second, never cut at 30 s
    calls, hook = encoder_calls(model)
    with torch.no_grad():
        hidden, lengths = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
        embeds, audio_lengths = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    hook.remove()
    # Three windows of the long clip (the short clip rides in the first one's batch), each at most 30 s.
    assert calls[:3] == [3000, 3000, 1500]
    assert lengths.tolist() == [1500 + 1500 + 750, 150]
    # Q-Former: 17 encoder frames per window of 4 tokens, over the concatenated frames.
    assert audio_tokens(processor, inputs) == audio_lengths.tolist() == [-(-3750 // 17) * 4, -(-150 // 17) * 4]
    with torch.no_grad():
        expected = window_by_window(model, inputs["input_features"][0], 3000)
    torch.testing.assert_close(hidden[0, :3750], expected)
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[0] == 2


def extractor_calls(monkeypatch, extractor) -> list[int]:
    """The lengths of the clips `extractor` is called on from now on (until `monkeypatch.undo()`), in a list."""
    seen, extract = [], type(extractor).__call__

    def recording(self, waveform, *args, **kwargs):
        seen.append(len(waveform))
        return extract(self, waveform, *args, **kwargs)

    monkeypatch.setattr(type(extractor), "__call__", recording)
    return seen


@pytest.mark.parametrize("encoder_type, hop", [("whisper", 160), ("hubert", 1)])
@pytest.mark.parametrize("seconds", [75.0, 60.0 + 100 / RATE])  # the second one ends in a 100-sample tail
def test_features_of_a_long_clip_are_extracted_window_by_window(encoder_type, hop, seconds, monkeypatch):
    """The extractor never sees more than one window (Whisper's float64 STFT of a whole 10-minute clip took 340 MB,
    wav2vec2's copies of it 180 MB), each window's features are those of the window as a clip of its own (its own
    log-mel range, or its own mean and variance), and the frames add up to the whole clip's."""
    _, processor = tiny(encoder_type, "qformer")
    extractor = processor.feature_extractor
    seen = extractor_calls(monkeypatch, extractor)
    audio = clip(seconds)
    features = processor(["<audio>"], audio=[audio], sampling_rate=RATE, return_tensors="np")["input_features"][0]
    monkeypatch.undo()
    assert max(seen) == 30 * RATE and features.shape[-1] == len(audio) // hop
    for start in range(0, len(audio), 30 * RATE):
        piece = audio[start : start + 30 * RATE]
        if len(piece) < hop:  # Whisper: a 100-sample tail makes no frame (and is below its FFT)
            continue
        window = extractor(piece, sampling_rate=RATE, padding="longest", truncation=False, return_tensors="np")
        expected = window[extractor.model_input_names[0]][0]
        np.testing.assert_allclose(features[..., start // hop : start // hop + expected.shape[-1]], expected)


def test_checking_a_long_clip_before_generating_extracts_one_window(monkeypatch):
    """`generate` checks each clip on its own before batching it; the check extracts at most one window (a longer
    clip gives audio tokens in any case), so a long clip's features are computed once, not twice."""
    model, processor = tiny("whisper", "mlp")
    seen = extractor_calls(monkeypatch, processor.feature_extractor)
    audio = clip(75.0)
    [result] = generate_responses(model, processor, [{"audio": audio, "sampling_rate": RATE}], max_new_tokens=1)
    assert result.error is None and max(seen) == 30 * RATE
    assert seen.count(15 * RATE) == 1  # the clip's tail: only the features the model gets cover the whole clip


@pytest.mark.parametrize("seconds, windows", [(30.0, [3000]), (30.01, [3000, 1])])
def test_30_and_30_01_second_whisper_clips_both_work(seconds, windows):
    model, processor = tiny("whisper", "cnn")
    inputs = processor(["<audio>"], audio=[clip(seconds)], sampling_rate=RATE)
    calls, hook = encoder_calls(model)
    with torch.no_grad():
        output = model(**inputs)
    hook.remove()
    assert calls == windows
    assert audio_tokens(processor, inputs) == output.audio_lengths.tolist()
    assert processor.num_audio_tokens(sum(windows)) == output.audio_lengths.tolist()[0]


def test_clips_within_one_window_take_one_encoder_pass_as_before():
    model, processor = tiny("whisper", "mlp")
    inputs = processor(["<audio>", "<audio>"], audio=[clip(12.0), clip(29.5, 1)], sampling_rate=RATE)
    with torch.no_grad():
        hidden, _ = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
        whole = model.encoder(inputs["input_features"], attention_mask=inputs["feature_attention_mask"])
    assert torch.equal(hidden, whole.last_hidden_state)


def test_hubert_windows_of_samples_with_a_tail_too_short_for_a_frame():
    torch.manual_seed(0)
    model, processor = from_preset("tiny", encoder_type="hubert", projector_type="mlp")
    model.eval()
    assert model.config.encoder_window == 480_000  # 30 s at 16 kHz by default
    model.config.encoder_window_length = RATE  # 1 s windows, so that a test clip spans several
    processor = SpeechLlmProcessor(
        processor.feature_extractor, processor.tokenizer, audio_length_spec=model.config.audio_length_spec
    )
    long, short = clip(2.5), clip(0.5, 1)
    tail = np.concatenate([clip(2.0, 2), clip(0.005, 3)])  # 80 samples past 2 windows: no encoder frame
    inputs = processor(["<audio>"] * 3, audio=[long, short, tail], sampling_rate=RATE)
    calls, hook = encoder_calls(model)
    with torch.no_grad():
        hidden, lengths = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
        output = model(**inputs)
    hook.remove()
    assert calls[:3] == [RATE, RATE, RATE // 2]  # the tail's 80 samples are never encoded
    assert lengths.tolist() == [49 + 49 + 24, 24, 49 + 49]
    assert audio_tokens(processor, inputs) == output.audio_lengths.tolist()
    with torch.no_grad():
        expected = window_by_window(model, inputs["input_features"][0], RATE)
    torch.testing.assert_close(hidden[0, :122], expected)


def test_max_audio_seconds_refuses_naming_the_clip_and_how_to_raise_it(tmp_path):
    model, processor = tiny("whisper", "cnn")
    assert processor.max_audio_seconds == DEFAULT_MAX_AUDIO_SECONDS >= 600
    guarded = SpeechLlmProcessor(
        processor.feature_extractor,
        processor.tokenizer,
        audio_length_spec=processor.audio_length_spec,
        chat_template=processor.chat_template,
        max_audio_seconds=40,
    )
    with pytest.raises(ValueError, match=r"Audio clip 1 lasts 40\.50 s, longer than max_audio_seconds=40.*Raise"):
        guarded(["<audio>", "<audio>"], audio=[clip(1.0), clip(40.5)], sampling_rate=RATE)
    guarded.save_pretrained(tmp_path)
    assert SpeechLlmProcessor.from_pretrained(tmp_path).max_audio_seconds == 40
    guarded.max_audio_seconds = None
    assert audio_tokens(guarded, guarded(["<audio>"], audio=[clip(40.5)], sampling_rate=RATE)) == [
        guarded.num_audio_tokens(4050)
    ]
    errors = generate_responses(model, guarded, [{"audio": clip(2.0), "sampling_rate": RATE}], max_new_tokens=1)
    assert errors[0].error is None


def test_generate_command_sets_max_audio_seconds(tmp_path):
    sf.write(tmp_path / "long.wav", clip(35.0), RATE)
    sf.write(tmp_path / "short.wav", clip(1.0), RATE)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"audio": n}) + "\n" for n in ("short.wav", "long.wav")))
    args = ["generate", "--preset", "tiny", "--encoder_type", "whisper", "--max_new_tokens", "1"]
    args += ["--input_file", str(tmp_path / "in.jsonl")]
    assert main([*args, "--output_file", str(tmp_path / "default.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "default.jsonl").read_text().splitlines()]
    assert [row.get("error") for row in rows] == [None, None]  # 35 s: two Whisper windows
    assert main([*args, "--output_file", str(tmp_path / "limited.jsonl"), "--max_audio_seconds", "20"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "limited.jsonl").read_text().splitlines()]
    assert rows[0].get("error") is None and "longer than max_audio_seconds=20" in rows[1]["error"]


def test_pipeline_demo_and_training_take_long_clips(tmp_path):
    model, processor = tiny("whisper", "qformer")
    pipe = pipeline("speech-llm", model=model, processor=processor, max_new_tokens=2)
    # The pipeline, and the demo's streaming from a file, answer a 45 s clip.
    assert isinstance(pipe({"raw": clip(45.0), "sampling_rate": RATE})["generated_text"], str)
    sf.write(tmp_path / "long.wav", clip(45.0), RATE)
    assert isinstance("".join(stream_generate(model, processor, str(tmp_path / "long.wav"), max_new_tokens=2)), str)
    row = {"audio": {"array": clip(45.0), "sampling_rate": RATE}, "text": "hello there"}
    batch = SpeechLlmCollator(processor)([row, {**row, "audio": {"array": clip(2.0), "sampling_rate": RATE}}])
    model.projector.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.projector.linear.weight.grad is not None
    model.projector.zero_grad(set_to_none=True)
    model.projector.eval()
    # `prepare` keeps clips up to max_duration (30 s by default): raising it keeps a 45 s clip.
    (tmp_path / "rows.jsonl").write_text(json.dumps({"audio": str(tmp_path / "long.wav"), "text": "hi"}) + "\n")
    assert prepare_dataset(tmp_path / "rows.jsonl")[1]["kept"] == 0
    assert prepare_dataset(tmp_path / "rows.jsonl", max_duration=60)[1]["kept"] == 1


@pytest.mark.parametrize("name, seconds", [("whisper-mlp", 75.0), ("hubert-qformer", 75.0)])
def test_processors_saved_before_windows_count_what_the_model_now_emits(name, seconds):
    folder = FIXTURES / "saved-692bcdd" / name
    saved = json.loads((folder / "processor_config.json").read_text())["audio_length_spec"]
    assert "window_length" not in saved
    processor = SpeechLlmProcessor.from_pretrained(folder)
    config = SpeechLlmConfig.from_pretrained(folder)
    frames = int(seconds * (100 if config.is_whisper_like_encoder else RATE))
    for length in (frames, config.encoder_window, 2 * config.encoder_window + 1, 1234):
        assert processor.num_audio_tokens(length) == audio_token_count(length, config.audio_length_spec)
    assert processor.max_audio_seconds == DEFAULT_MAX_AUDIO_SECONDS


def test_encoder_window_length_is_checked():
    config = tiny("whisper", "cnn")[0].config
    for window in (3001, 0):
        with pytest.raises(ValueError, match=f"encoder_window_length is {window}; it must be"):
            SpeechLlmConfig(**{**config.to_dict(), "encoder_window_length": window})


@pytest.mark.parametrize("transformers_major", ["this", "4.57"])
def test_the_hub_copy_answers_a_long_clip_as_the_package_does(transformers_major, local_backbones, tmp_path, request):
    python = sys.executable if transformers_major == "this" else request.getfixturevalue("compat_python")
    torch.manual_seed(0)
    model, processor = from_preset(
        "tiny",
        encoder_type="whisper",
        encoder_name_or_path=str(local_backbones / "whisper"),
        text_name_or_path=str(local_backbones / "llm"),
    )
    model.save_pretrained(tmp_path / "saved", processor=processor)
    texts = ["<|user|><audio> hi<|end|><|assistant|>", "<|user|>x <audio><|end|><|assistant|>"]
    save_expected_outputs(tmp_path / "expected.npz", model.eval(), processor, texts, [clip(35.0), clip(2.0, 1)])
    # Placeholder counts, logits, generation and the shipped pipeline agree without the package (two windows).
    run_loader(python, tmp_path / "saved", tmp_path / "expected.npz")
