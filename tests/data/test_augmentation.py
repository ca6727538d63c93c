"""Training-time augmentation (data.augmentation): off by default, seeded by (seed, epoch, row), each transform doing
what it says, bad noise folders refused by name, the feature cache excluded, evaluation left clean, and a training run
with augmentation that resumes exactly."""

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import CPU_TRAINING, clip, tiny
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from speechllm_hf import from_preset
from speechllm_hf.commands.train import parse_arguments
from speechllm_hf.data.augmentation import AugmentationConfig, AugmentationEpoch, Augmenter, mask_spans, row_key
from speechllm_hf.data.collators import MixedSpeechTextCollator, SpeechLlmCollator, collator_from_args
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

RATE = 16000
EVERY_TRANSFORM = dict(
    augment_speeds=[0.9, 1.0, 1.1],
    augment_gain_db=[-6.0, 6.0],
    augment_noise_snr_db=[5.0, 15.0],
    augment_mask_time_prob=0.1,
    augment_mask_feature_prob=0.1,
)


@pytest.fixture
def noise_dir(tmp_path):
    folder = tmp_path / "noise"
    (folder / "babble").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(folder / "white.wav", (0.1 * rng.standard_normal(RATE)).astype(np.float32), RATE)
    sf.write(folder / "babble" / "hum.flac", 0.2 * np.sin(np.arange(8000) / 8000 * 2 * np.pi * 60), 8000)
    (folder / "README.txt").write_text("not audio")
    return folder


def training_args(tmp_path, **overrides):
    return SpeechLlmTrainingArguments(output_dir=str(tmp_path / "out"), **{**CPU_TRAINING, **overrides})


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(np.square(clean, dtype=np.float64)) / np.mean(np.square(noise)))


def test_augmentation_is_off_by_default(tmp_path):
    _, processor = tiny("whisper", "mlp")
    rows = load_split("train")[:3]
    args = training_args(tmp_path)
    assert AugmentationConfig.from_args(args) is None and AugmentationConfig().enabled is False
    collator = collator_from_args(SpeechLlmCollator, args, processor)
    assert collator.augmentation is None
    assert batches_equal(collator(rows), SpeechLlmCollator(processor)(rows))
    # Speed 1.0 alone changes nothing, so it turns nothing on.
    assert AugmentationConfig.from_args(training_args(tmp_path, augment_speeds=[1.0])) is None


def test_the_same_seed_gives_the_same_batch_and_another_seed_or_epoch_another(tmp_path, noise_dir):
    _, processor = tiny("whisper", "mlp")
    rows = load_split("train")[:3]

    def collate(seed, epoch=0, batch=rows):
        args = training_args(tmp_path, seed=seed, augment_noise_dir=str(noise_dir), **EVERY_TRANSFORM)
        collator = collator_from_args(SpeechLlmCollator, args, processor)
        collator.augmentation.set_epoch(epoch)
        return collator(batch)

    clean = SpeechLlmCollator(processor)(rows)
    first = collate(0)
    assert batches_equal(first, collate(0))
    assert not torch.equal(first["input_features"], clean["input_features"])
    for other in (collate(1), collate(0, epoch=1)):
        assert not torch.equal(first["input_features"], other["input_features"])
    # A row draws the same whatever batch it is in and wherever (draws depend on seed, epoch and row only).
    alone = collate(0, batch=rows[2:3])
    frames = int(alone["feature_attention_mask"].sum())
    assert frames == int(first["feature_attention_mask"][2].sum())
    assert torch.equal(alone["input_features"][0, :, :frames], first["input_features"][2, :, :frames])


def test_dataloader_workers_draw_what_the_main_process_draws_in_each_epoch():
    _, processor = tiny("hubert", "mlp")
    rows = load_split("train")[:4]
    collator = SpeechLlmCollator(processor, augmentation=Augmenter(AugmentationConfig(speeds=(0.9, 1.1)), RATE, 1))
    loader = DataLoader(rows, batch_size=2, collate_fn=collator, num_workers=2, persistent_workers=True)
    callback = AugmentationEpoch(collator.augmentation)
    for epoch in (0, 1):
        callback.on_epoch_begin(None, type("State", (), {"epoch": float(epoch)})(), None)
        for index, batch in enumerate(loader):
            assert batches_equal(batch, collator(rows[2 * index : 2 * index + 2]))


def test_speed_perturbation_changes_the_length_by_one_over_the_factor():
    waveform = clip(2.0)
    for speed in (0.9, 1.1):
        augmenter = Augmenter(AugmentationConfig(speeds=(speed,)), RATE, 1)
        out = augmenter.waveform(waveform, augmenter.rng("row"))
        assert abs(len(out) - len(waveform) / speed) <= 1
    unchanged = Augmenter(AugmentationConfig(speeds=(1.0,)), RATE, 1)
    np.testing.assert_array_equal(unchanged.waveform(waveform, unchanged.rng("row")), waveform)


def test_gain_is_drawn_in_decibels_within_the_range():
    waveform = 0.1 * clip(1.0)  # low enough that +6 dB stays below full scale
    augmenter = Augmenter(AugmentationConfig(gain_db=(-6.0, 6.0)), RATE, 1)
    gains = []
    for key in range(20):
        out = augmenter.waveform(waveform, augmenter.rng(str(key)))
        gains.append(20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2) / np.mean(waveform**2))))
    assert min(gains) >= -6 - 1e-4 and max(gains) <= 6 + 1e-4 and max(gains) - min(gains) > 3
    fixed = Augmenter(AugmentationConfig(gain_db=(-3.0, -3.0)), RATE, 1)
    out = fixed.waveform(waveform, fixed.rng("row"))
    np.testing.assert_allclose(out, waveform * 10 ** (-3 / 20), rtol=1e-5)
    loud = Augmenter(AugmentationConfig(gain_db=(40.0, 40.0)), RATE, 1)
    assert np.abs(loud.waveform(waveform, loud.rng("row"))).max() == 1.0  # clipped at full scale


def test_noise_is_added_at_an_snr_within_the_range(noise_dir):
    waveform = clip(1.5)
    augmenter = Augmenter(AugmentationConfig(noise_dir=str(noise_dir), noise_snr_db=(5.0, 10.0)), RATE, 1)
    assert [p.rsplit("/", 1)[-1] for p in augmenter.noise_files] == ["hum.flac", "white.wav"]  # README.txt ignored
    measured = [snr_db(waveform, augmenter.waveform(waveform, augmenter.rng(str(key)))) for key in range(12)]
    assert all(5 - 1e-3 <= snr <= 10 + 1e-3 for snr in measured), measured
    assert max(measured) - min(measured) > 1
    never = Augmenter(AugmentationConfig(noise_dir=str(noise_dir), noise_prob=0.0), RATE, 1)
    np.testing.assert_array_equal(never.waveform(waveform, never.rng("row")), waveform)


def test_masks_set_spans_of_frames_and_bins_to_zero():
    features = torch.rand(80, 120) + 1  # no zero anywhere before masking
    config = AugmentationConfig(mask_time_prob=0.2, mask_time_length=10, mask_feature_prob=0.1, mask_feature_length=8)
    augmenter = Augmenter(config, RATE, 80)
    masked = augmenter.features(features, 100, augmenter.rng("row"))  # frames 100-119 are padding
    zero_frames = (masked == 0).all(0)
    zero_bins = (masked[:, :100] == 0).all(1)
    assert 20 <= int(zero_frames.sum()) <= 40 and not zero_frames[100:].any()
    assert 8 <= int(zero_bins.sum()) <= 16
    kept = ~zero_bins[:, None] & ~zero_frames[None, :]
    assert torch.equal(masked[kept], features[kept])  # nothing else changes
    # At least 2 time spans, as transformers' mask_time_min_masks: even a tiny probability masks 2 x length frames.
    spans = mask_spans(np.random.default_rng(0), 100, 0.001, 10, 2)
    assert spans.sum() == 20
    assert not mask_spans(np.random.default_rng(0), 100, 0.0, 10, 2).any()


def test_mixed_speech_text_batches_are_augmented_span_by_span(tmp_path):
    _, processor = tiny("whisper", "mlp")
    rows = []
    for row in load_split("train")[:4]:  # words evenly timed: the spans only need times
        words = row["text"].split()
        step = row["duration"] / len(words)
        rows.append(
            {**row, "words": [{"word": w, "start": i * step, "end": (i + 1) * step} for i, w in enumerate(words)]}
        )
    args = training_args(tmp_path, task="mixed", **EVERY_TRANSFORM)
    augmented = collator_from_args(MixedSpeechTextCollator, args, processor)
    clean = collator_from_args(MixedSpeechTextCollator, training_args(tmp_path, task="mixed"), processor)
    batch = augmented(rows)
    assert batches_equal(batch, augmented(rows))
    assert not torch.equal(batch["input_features"], clean(rows)["input_features"])


def test_row_keys_name_the_row_by_id_else_by_its_audio():
    assert row_key({"id": "a-1", "audio": "x.wav"}) == "id:a-1"
    assert row_key({"audio": "x.wav", "task": "asr"}) == "asr:path:x.wav"
    samples = {"array": clip(0.5), "sampling_rate": RATE}
    assert row_key({"audio": samples}) == row_key({"audio": dict(samples)}) != row_key({"audio": "x.wav"})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: folder / "missing", "does not exist"),
        (lambda folder: (folder / "notes.txt").write_text("x") and folder, "holds no audio file"),
        (lambda folder: sf.write(folder / "empty.wav", np.zeros(0), RATE) or folder, "holds no samples"),
        (lambda folder: (folder / "broken.wav").write_bytes(b"RIFF1234") and folder, "Cannot read the noise file"),
    ],
)
def test_a_bad_noise_folder_is_refused_by_name(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        Augmenter(AugmentationConfig(noise_dir=str(folder)), RATE, 1)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="LOW HIGH"):
        training_args(tmp_path, augment_gain_db=[6.0, -6.0])
    with pytest.raises(ValueError, match="Speed factors must be > 0"):
        training_args(tmp_path, augment_speeds=[0.0, 1.1])
    with pytest.raises(ValueError, match="mask_time_prob must be in"):
        training_args(tmp_path, augment_mask_time_prob=1.5)
    _, hubert = tiny("hubert", "mlp")
    with pytest.raises(ValueError, match="encoder_train_mode_augment"):
        collator_from_args(SpeechLlmCollator, training_args(tmp_path, augment_mask_time_prob=0.1), hubert)


def test_augmentation_excludes_the_feature_cache(tmp_path):
    with pytest.raises(ValueError, match="excludes a feature cache"):
        training_args(tmp_path, augment_speeds=[0.9, 1.1], feature_cache_dir=str(tmp_path / "cache"))
    _, processor = tiny("hubert", "mlp")
    augmenter = Augmenter(AugmentationConfig(speeds=(0.9,)), RATE, 1)
    with pytest.raises(ValueError, match="cached encoder features"):
        SpeechLlmCollator(processor, use_cached_features=True, augmentation=augmenter)


def test_the_train_command_takes_the_augmentation_flags(tmp_path, noise_dir):
    argv = ["--output_dir", str(tmp_path), "--augment_speeds", "0.9", "1.0", "1.1", "--augment_gain_db", "-6", "6"]
    argv += ["--augment_noise_dir", str(noise_dir), "--augment_mask_time_prob", "0.05"]
    args = parse_arguments(SpeechLlmTrainingArguments, None, argv)[2]
    config = AugmentationConfig.from_args(args)
    assert config.speeds == (0.9, 1.0, 1.1) and config.gain_db == (-6.0, 6.0) and config.noise_snr_db == (5.0, 20.0)
    assert config.noise_dir == str(noise_dir) and config.mask_time_prob == 0.05


def augmented_trainer(local_backbones, output_dir, noise_dir, **overrides):
    torch.manual_seed(0)
    model, processor = from_preset(
        "tiny",
        encoder_type="whisper",
        projector_type="mlp",
        encoder_name_or_path=str(local_backbones / "whisper"),
        text_name_or_path=str(local_backbones / "llm"),
    )
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        augment_noise_dir=str(noise_dir),
        **EVERY_TRANSFORM,
        **CPU_TRAINING,
    )
    return SpeechLlmTrainer(
        model=model,
        args=SpeechLlmTrainingArguments(**{**settings, **overrides}),
        train_dataset=datasets.Dataset.from_list(load_split("train")[:8]),
        eval_dataset=datasets.Dataset.from_list(load_split("train")[8:10]),
        processing_class=processor,
    )


class RecordEpochs(TrainerCallback):
    def __init__(self, augmenter):
        self.augmenter, self.epochs = augmenter, []

    def on_step_end(self, args, state, control, **kwargs):
        self.epochs.append(self.augmenter.epoch)


def test_training_with_augmentation_resumes_exactly_and_evaluates_clean(local_backbones, tmp_path, noise_dir):
    def losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    # Two epochs of two steps; the checkpoint at step 3 is in the second epoch, whose rows draw anew.
    uninterrupted = augmented_trainer(local_backbones, tmp_path / "a", noise_dir, save_strategy="steps", save_steps=3)
    recorder = RecordEpochs(uninterrupted.data_collator.augmentation)
    uninterrupted.add_callback(recorder)
    uninterrupted.train()
    assert uninterrupted.state.global_step == 4 and recorder.epochs == [0, 0, 1, 1]

    resumed = augmented_trainer(local_backbones, tmp_path / "a", noise_dir, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert losses(resumed) == losses(uninterrupted) and max(losses(resumed)) == 4
    for name, tensor in uninterrupted.model.projector.state_dict().items():
        assert torch.equal(resumed.model.projector.state_dict()[name], tensor), name
    # The checkpoint records the augmentation: a resume with other settings would draw other clips, and is refused.
    other = augmented_trainer(local_backbones, tmp_path / "a", noise_dir, augment_speeds=[0.8, 1.2])
    with pytest.raises(ValueError, match="augmentation"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))

    off = dict(augment_speeds=None, augment_gain_db=None, augment_noise_dir=None)
    plain = augmented_trainer(
        local_backbones, tmp_path / "b", noise_dir, **off, augment_mask_time_prob=0.0, augment_mask_feature_prob=0.0
    )
    assert plain.data_collator.augmentation is None
    plain.train()
    assert losses(plain)[1] != losses(uninterrupted)[1]  # the first step already trained on augmented clips

    # Evaluation batches are the clips as they are; training keeps its augmentation.
    eval_batch = next(iter(uninterrupted.get_eval_dataloader()))
    assert batches_equal(eval_batch, plain.data_collator(load_split("train")[8:10]))
    assert uninterrupted.data_collator.augmentation is not None
