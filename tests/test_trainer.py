"""SpeechLlmTrainer: parameters that move, gradient accumulation, exact resume, feature cache, bad rows, LoRA."""

import json
import os

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import clip

from speechllm_hf import SpeechLlmForConditionalGeneration, from_preset
from speechllm_hf.corpus import load_split
from speechllm_hf.data.collator import IGNORE_INDEX, SpeechLlmCollator
from speechllm_hf.data.prepare import prepare_dataset
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.lora import add_lora
from speechllm_hf.training.trainer import SpeechLlmTrainer


def tiny_with_ids(local_backbones, projector_type="qformer"):
    torch.manual_seed(0)
    return from_preset(
        "tiny",
        projector_type=projector_type,
        encoder_name_or_path=str(local_backbones / "hubert"),
        text_name_or_path=str(local_backbones / "llm"),
    )


def corpus(n=16):
    return datasets.Dataset.from_list(load_split("train")[:n])


def train(model, processor, output_dir, dataset=None, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    args = SpeechLlmTrainingArguments(**{**settings, **overrides})
    trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=dataset or corpus(), processing_class=processor)
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    return trainer


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_collator_labels_only_the_response_and_end_of_turn():
    _, processor = from_preset("tiny")
    rows = load_split("train")[:2]
    batch = SpeechLlmCollator(processor)(rows)
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert processor.tokenizer.decode(labelled) == row["text"] + processor.tokenizer.eos_token
        audio = batch["input_ids"][i] == processor.audio_token_id
        assert audio.any() and (batch["labels"][i][audio] == IGNORE_INDEX).all()


def test_a_few_steps_change_every_trainable_parameter_and_no_frozen_one(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, processor, tmp_path)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == name.startswith("projector."), name


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")  # no dropout: the two runs see the same net
        trainer = train(
            model,
            processor,
            tmp_path / str(batch_size),
            max_steps=2,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        results.append((losses(trainer), {n: p.detach().clone() for n, p in model.projector.named_parameters()}))
    (full_losses, full_state), (accumulated_losses, accumulated_state) = results
    assert full_losses.keys() == accumulated_losses.keys() == {1, 2}
    for step in full_losses:
        assert full_losses[step] == pytest.approx(accumulated_losses[step], rel=1e-5)
    for name, tensor in full_state.items():
        torch.testing.assert_close(accumulated_state[name], tensor, atol=1e-6, rtol=1e-5)


def test_resume_from_a_projector_only_checkpoint_is_exact(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones)  # Q-Former dropout: RNG state must be restored too
    uninterrupted = train(model, processor, tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert "projector.safetensors" in os.listdir(checkpoint) and "model.safetensors" not in os.listdir(checkpoint)

    resumed_model, processor = tiny_with_ids(local_backbones)
    torch.manual_seed(123)  # a different projector init must not matter: the checkpoint is loaded
    with torch.no_grad():
        for parameter in resumed_model.projector.parameters():
            parameter.normal_()
    resumed = train(
        resumed_model,
        processor,
        tmp_path / "a",
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        resume_from_checkpoint=str(checkpoint),
    )
    # Steps 1-3 come back from the checkpoint's trainer_state; steps 4-6 were computed again after the resume.
    assert losses(resumed) == losses(uninterrupted) and max(losses(resumed)) == 6
    for name, tensor in model.projector.state_dict().items():
        assert torch.equal(resumed_model.projector.state_dict()[name], tensor), name


def test_training_on_cached_encoder_features_gives_the_same_losses(tmp_path):
    runs = []
    for cache in (None, str(tmp_path / "cache")):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")
        runs.append(losses(train(model, processor, tmp_path / "out", max_steps=3, feature_cache_dir=cache)))
    assert os.path.exists(tmp_path / "cache" / "cache_key.json")
    assert runs[0].keys() == runs[1].keys()
    for step in runs[0]:
        assert runs[1][step] == pytest.approx(runs[0][step], rel=1e-6)


def test_a_cache_of_another_encoder_is_refused(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    train(model, processor, tmp_path / "out", max_steps=1, feature_cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(1)
    other, processor = from_preset("tiny", projector_type="mlp")
    with pytest.raises(ValueError, match="built for another encoder"):
        train(other, processor, tmp_path / "out", max_steps=1, feature_cache_dir=str(tmp_path / "cache"))


def test_bad_rows_are_counted_and_an_8khz_stereo_row_is_trained_on(tmp_path):
    rows = []
    good = load_split("train")[0]
    rows.append({"audio": good["audio"], "text": good["text"]})
    stereo = np.stack([clip(1.2, rate=8000), clip(1.2, 1, rate=8000)], axis=1)
    sf.write(tmp_path / "stereo8k.wav", (stereo * 32767).astype(np.int16), 8000, subtype="PCM_16")
    rows.append({"audio": str(tmp_path / "stereo8k.wav"), "text": "a stereo clip"})
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    rows.append({"audio": str(tmp_path / "garbage.wav"), "text": "unreadable"})
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    rows.append({"audio": str(tmp_path / "empty.wav"), "text": "empty"})
    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    rows.append({"audio": str(tmp_path / "nan.wav"), "text": "nan"})
    sf.write(tmp_path / "long.wav", clip(3.0), 16000)
    rows.append({"audio": str(tmp_path / "long.wav"), "text": "too long"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    kept, report = prepare_dataset(str(manifest), tmp_path / "prepared", max_duration=2.5)
    assert report["kept"] == 2
    assert {k: v for k, v in report["dropped"].items() if v} == {
        "unreadable": 1,
        "empty": 1,
        "non_finite": 1,
        "too_long": 1,
    }
    assert sorted(kept["text"]) == ["a stereo clip", good["text"]]

    model, processor = from_preset("tiny", projector_type="mlp")
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    trainer = train(
        model, processor, tmp_path / "out", dataset=kept, max_steps=1, per_device_train_batch_size=2, warmup_steps=0
    )  # one step: the default 3% warmup would give it a learning rate of 0
    assert np.isfinite(losses(trainer)[1])
    assert any(not torch.equal(before[n], p) for n, p in model.projector.named_parameters())


def test_lora_fine_tuning_changes_only_lora_and_projector_and_reloads(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones, projector_type="mlp")
    add_lora(model, r=4, target_modules=("q_proj", "v_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, processor, tmp_path / "out", max_steps=3)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        is_lora_b_or_projector = name.startswith("projector.") or "lora_" in name
        assert changed <= is_lora_b_or_projector, name
    assert any("lora_B" in n and not torch.equal(before[n], p) for n, p in model.named_parameters())

    model.save_pretrained(tmp_path / "saved", processor=processor)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "saved" / "lora"))
    reloaded = SpeechLlmForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.has_lora
    batch = SpeechLlmCollator(processor)(load_split("dev")[:2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_data_subset_is_seeded(tmp_path):
    from speechllm_hf.training.trainer import subset

    data = corpus(40)
    first, again = subset(data, 0.25, 42), subset(data, 0.25, 42)
    assert len(first) == 10 and first["id"] == again["id"] and first["id"] != subset(data, 0.25, 7)["id"]


def test_cli_train_end_to_end_with_a_multi_task_manifest_list(tmp_path):
    from speechllm_hf.cli import main
    from speechllm_hf.corpus import manifest_path

    st_row = {"audio": load_split("dev")[0]["audio"], "translation": "hallo", "target_language": "German"}
    (tmp_path / "st.jsonl").write_text(json.dumps(st_row) + "\n")
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "asr",
        "--preset",
        "tiny",
        "--output_dir",
        str(out),
        "--train_manifest",
        f"st={tmp_path / 'st.jsonl'}",
        f"asr={manifest_path('dev')}",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "--save_steps",
        "1",
    ]
    assert main(argv) == 0
    assert {"checkpoint-1", "checkpoint-2", "config.json"} <= set(os.listdir(out))
