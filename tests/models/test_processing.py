"""SpeechLlmProcessor: placeholder expansion, audio normalisation, chat template and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ENCODERS, PROJECTORS, clip, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from speechllm_hf import SpeechLlmProcessor


@pytest.mark.parametrize("encoder_type", ENCODERS)
@pytest.mark.parametrize("projector_type", PROJECTORS)
@settings(max_examples=8, deadline=None)
@given(num_samples=st.integers(min_value=1200, max_value=40000))
def test_placeholder_expansion_equals_projector_output_length(encoder_type, projector_type, num_samples):
    model, processor = tiny(encoder_type, projector_type)
    inputs = processor(["<audio>"], audio=[clip(num_samples / 16000)], sampling_rate=16000)
    num_tokens = int((inputs["input_ids"] == processor.audio_token_id).sum())
    with torch.no_grad():
        embeds, lengths = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert num_tokens == int(lengths[0]) == embeds.shape[1] >= 1


def test_expansion_per_clip_in_a_batch():
    model, processor = tiny("hubert", "qformer")
    seconds = [0.3, 1.0, 2.2]
    inputs = processor(
        ["<audio><audio>", "x <audio> y"], audio=[clip(s, i) for i, s in enumerate(seconds)], sampling_rate=16000
    )
    expected = [processor.num_audio_tokens(int(s * 16000)) for s in seconds]
    counts = (inputs["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert counts == [expected[0] + expected[1], expected[2]]
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [int(s * 16000) for s in seconds]
    # HuBERT: 320 samples per frame, Q-Former: 4 tokens per 17 frames -> 1 s = 49 frames = 3 windows = 12 tokens.
    assert expected[1] == 12


def test_audio_is_never_padded_to_30_seconds():
    _, processor = tiny("whisper", "cnn")
    inputs = processor(["<audio>"], audio=[clip(1.0)], sampling_rate=16000)
    assert inputs["input_features"].shape == (1, 80, 100)


def test_resampling_downmix_and_integer_pcm():
    _, processor = tiny()
    mono16k = processor(["<audio>"], audio=[clip(1.0)], sampling_rate=16000)
    at8k = processor(["<audio>"], audio=[clip(1.0, rate=8000)], sampling_rate=8000)
    assert at8k["input_features"].shape == mono16k["input_features"].shape
    assert torch.equal(at8k["input_ids"], mono16k["input_ids"])

    wave = clip(0.5)
    stereo_last = np.stack([wave, wave], axis=1)  # (samples, channels), as soundfile reads
    stereo_first = np.stack([wave, 0 * wave], axis=0)  # (channels, samples), as torchaudio reads
    out_last = processor(["<audio>"], audio=[stereo_last], sampling_rate=16000)["input_features"]
    out_mono = processor(["<audio>"], audio=[wave], sampling_rate=16000)["input_features"]
    torch.testing.assert_close(out_last, out_mono)
    half = processor(
        ["<audio>"],
        audio=[wave / 2],
        sampling_rate=16000,
    )["input_features"]
    torch.testing.assert_close(
        processor(["<audio>"], audio=[stereo_first], sampling_rate=16000)["input_features"], half
    )

    pcm = np.round(wave * 32767).astype(np.int16)
    from_pcm = processor(["<audio>"], audio=[pcm], sampling_rate=16000)["input_features"]
    torch.testing.assert_close(
        from_pcm, processor(["<audio>"], audio=[pcm / 32768.0], sampling_rate=16000)["input_features"]
    )


def test_datasets_audio_dict_and_per_clip_rates():
    _, processor = tiny()
    a = {"array": clip(0.5), "sampling_rate": 16000}
    b = {"array": clip(0.5, rate=8000), "sampling_rate": 8000}
    inputs = processor(["<audio>", "<audio>"], audio=[a, b])
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [8000, 8000]
    listed = processor(["<audio>", "<audio>"], audio=[a["array"], b["array"]], sampling_rate=[16000, 8000])
    torch.testing.assert_close(listed["input_features"], inputs["input_features"])


@pytest.mark.parametrize(
    ("texts", "audio", "kwargs", "message"),
    [
        (["<audio>"], [np.zeros(0, dtype=np.float32)], {"sampling_rate": 16000}, "empty"),
        (["<audio>"], [np.full(16000, np.nan, dtype=np.float32)], {"sampling_rate": 16000}, "NaN or infinite"),
        (["<audio>"], [np.full(16000, np.inf, dtype=np.float32)], {"sampling_rate": 16000}, "NaN or infinite"),
        (["<audio>"], [clip(1.0)], {}, "no sampling rate"),
        (["<audio> <audio>"], [clip(1.0)], {"sampling_rate": 16000}, "2 audio placeholders .* 1 audio clips"),
        (["no placeholder"], [clip(1.0)], {"sampling_rate": 16000}, "0 audio placeholders .* 1 audio clips"),
        (["<audio>"], [clip(0.01)], {"sampling_rate": 16000}, "too short"),
        (["<audio><audio>"], [clip(1.0), clip(1.0)], {"sampling_rate": [16000]}, "1 sampling rates for 2"),
    ],
)
def test_bad_input_raises_a_clear_value_error(texts, audio, kwargs, message):
    _, processor = tiny()
    with pytest.raises(ValueError, match=message):
        processor(texts, audio=audio, **kwargs)


def test_clip_over_max_audio_seconds_is_refused():
    _, processor = tiny("whisper", "cnn")
    guarded = SpeechLlmProcessor(
        processor.feature_extractor,
        processor.tokenizer,
        audio_length_spec=processor.audio_length_spec,
        max_audio_seconds=30,
    )
    with pytest.raises(ValueError, match=r"lasts 31\.00 s, longer than max_audio_seconds=30"):
        guarded(["<audio>"], audio=[np.zeros(31 * 16000, dtype=np.float32) + 0.01], sampling_rate=16000)


def test_tokenizer_without_the_audio_token_is_refused():
    _, processor = tiny()
    with pytest.raises(ValueError, match="does not know the audio token"):
        SpeechLlmProcessor(
            processor.feature_extractor,
            processor.tokenizer,
            audio_token="<speech>",
            audio_length_spec=processor.audio_length_spec,
        )


def test_apply_chat_template_with_audio_content():
    _, processor = tiny()
    wave = clip(0.8)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": wave, "sampling_rate": 16000},
                {"type": "text", "text": "\nTranscribe."},
            ],
        },
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == "<s><|user|><audio>\nTranscribe.<|end|><|assistant|>"
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    direct = processor([text], audio=[wave], sampling_rate=16000, add_special_tokens=False)
    assert torch.equal(inputs["input_ids"], direct["input_ids"])
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert (inputs["input_ids"][0] == processor.tokenizer.bos_token_id).sum() == 1

    with_system = SpeechLlmProcessor(
        processor.feature_extractor,
        processor.tokenizer,
        audio_length_spec=processor.audio_length_spec,
        system_prompt="Be brief.",
    )
    assert with_system.apply_chat_template(conversation).startswith("<s><|system|>Be brief.<|end|><|user|>")


def test_truncation_that_cuts_audio_tokens_is_refused():
    _, processor = tiny()
    needed = processor.num_audio_tokens(16000)
    inputs = processor(["<audio> hello"], audio=[clip(1.0)], sampling_rate=16000, truncation=True, max_length=64)
    assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == needed  # room for every audio token
    with pytest.raises(
        ValueError, match=rf"Text 1 holds 4 audio tokens after tokenization but its audio needs {needed}"
    ):
        processor(["hi", "<audio> hello"], audio=[clip(1.0)], sampling_rate=16000, truncation=True, max_length=5)


def test_audio_content_item_without_audio_is_named():
    _, processor = tiny()
    wave = clip(0.5)
    conversation = [
        {"role": "user", "content": [{"type": "audio", "array": wave, "sampling_rate": 16000}]},
        {"role": "user", "content": [{"type": "audio", "sampling_rate": 16000}, {"type": "text", "text": "hi"}]},
    ]
    assert processor.apply_chat_template(conversation).count("<audio>") == 2  # rendering text needs no audio
    with pytest.raises(ValueError, match=r"Audio content items \[1\] .* hold no audio: .*'audio' \(or 'array'\)"):
        processor.apply_chat_template(conversation, tokenize=True)
    inputs = processor.apply_chat_template(conversation[:1], tokenize=True)
    assert int(inputs["feature_attention_mask"].sum()) == len(wave)


def test_batch_decode_round_trip():
    _, processor = tiny()
    ids = processor(["hello there", "hi"])["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["hello there", "hi"]


def test_loading_a_saved_processor_warns_of_nothing_deprecated(tmp_path):
    """Issue 19, item 4: every load warned that `feature_extractor_class = 'AutoFeatureExtractor'` is deprecated
    (transformers 5.x loads sub-processors through the Auto class of their modality). In a fresh process, since
    transformers warns once per process."""
    tiny()[1].save_pretrained(tmp_path / "processor")
    code = (
        "import sys; from transformers import AutoProcessor; "
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(type(p.feature_extractor).__name__, type(p.tokenizer).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "processor")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["Wav2Vec2FeatureExtractor", type(tiny()[1].tokenizer).__name__]
    assert "deprecated" not in result.stderr, result.stderr
