"""SpeechLlmTrainer: parameters that move, gradient accumulation, exact resume, feature cache, bad rows, LoRA,
best-model reloading, per-task losses, early argument checks and the train command's argument parsing."""

import json
import logging
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import CPU_TRAINING, TRANSFORMERS_5, clip, multi_task_rows, only_on_transformers_5
from safetensors.torch import load_file

from speechllm_hf import SpeechLlmForConditionalGeneration, from_preset
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator
from speechllm_hf.data.sampler import LengthGroupedSampler
from speechllm_hf.preprocessing import prepare_dataset
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.lora import LORA_TARGET_MODULES, add_lora
from speechllm_hf.training.trainer import SpeechLlmTrainer, logits_to_keep, subset


def tiny_with_ids(local_backbones, projector_type="qformer"):
    torch.manual_seed(0)
    return from_preset(
        "tiny",
        projector_type=projector_type,
        encoder_name_or_path=str(local_backbones / "hubert"),
        text_name_or_path=str(local_backbones / "llm"),
    )


def corpus(n=16, start=0):
    return datasets.Dataset.from_list(load_split("train")[start : start + n])


def arguments(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        **CPU_TRAINING,
    )
    return SpeechLlmTrainingArguments(**{**settings, **overrides})


def train(model, processor, output_dir, dataset=None, eval_dataset=None, **overrides):
    trainer = SpeechLlmTrainer(
        model=model,
        args=arguments(output_dir, **overrides),
        train_dataset=dataset or corpus(),
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
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


def test_logits_to_keep_starts_one_before_the_first_label_of_any_row():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, -100, 7, 8, -100, -100]])
    assert logits_to_keep(labels) == 5  # positions 1..5: position 1 predicts the first label, at 2
    assert logits_to_keep(torch.full((2, 6), IGNORE_INDEX)) == 0  # nothing labelled: all
    assert logits_to_keep(torch.tensor([[1, 2, -100]])) == 3  # at most every position


def test_the_loss_takes_logits_of_the_response_only_with_the_same_loss_and_gradients(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    model.eval()  # no projector dropout, so that both losses see the same forward
    batch = SpeechLlmCollator(processor)(load_split("train")[:4])
    length = batch["labels"].shape[1]
    trainer = SpeechLlmTrainer(model=model, args=arguments(tmp_path), processing_class=processor)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    # The prompt and the audio come before the response: most positions need no logits.
    assert outputs.logits.shape[1] == logits_to_keep(batch["labels"]) < length / 2
    loss.backward()
    trimmed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(**batch)
    assert full.logits.shape[1] == length
    full.loss.backward()
    torch.testing.assert_close(loss, full.loss)
    assert trimmed.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in trimmed.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad)
    # Metrics computed at evaluation read the logits: every position keeps them.
    trainer.compute_metrics = lambda predictions: {}
    assert trainer.compute_loss(model, batch, return_outputs=True)[1].logits.shape[1] == length


def test_a_few_steps_change_every_trainable_parameter_and_no_frozen_one(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, processor, tmp_path)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == name.startswith("projector."), name


def test_encoder_augmentation_is_a_switch_of_the_asr_run_too(tmp_path):
    """`--encoder_train_mode_augment` belongs to the training arguments of every trainer: the encoder runs in train
    mode in training steps only, and nothing of it reaches the model config."""
    model, processor = from_preset("tiny")
    modes = []
    model.encoder.register_forward_hook(lambda module, args, output: modes.append(module.training))
    trainer = train(model, processor, tmp_path, max_steps=2, encoder_train_mode_augment=True)
    assert modes == [True, True]
    trainer.evaluate(corpus(4, start=16))
    assert modes[2:] == [False]
    assert not any("augment" in key for key in model.config.to_dict())
    with pytest.raises(ValueError, match="excludes a feature cache"):
        arguments(tmp_path, encoder_train_mode_augment=True, feature_cache_dir=str(tmp_path / "cache"))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")  # no dropout: the two runs see the same net
        initial = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
        trainer = train(
            model,
            processor,
            tmp_path / str(batch_size),
            max_steps=2,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            # Plain SGD: its update is proportional to the gradient (Adam's would hide a doubled one), and no warmup
            # step at learning rate 0, so both steps' updates are compared.
            optim="sgd",
            learning_rate=0.1,
            warmup_steps=0,
        )
        updates = {n: p.detach() - initial[n] for n, p in model.projector.named_parameters()}
        results.append((losses(trainer), updates))
    (full_losses, full_updates), (accumulated_losses, accumulated_updates) = results
    assert full_losses.keys() == accumulated_losses.keys() == {1, 2}
    for step in full_losses:
        assert full_losses[step] == pytest.approx(accumulated_losses[step], rel=1e-5)
    for name, update in full_updates.items():
        assert update.abs().max() > 0, name
        torch.testing.assert_close(accumulated_updates[name], update, atol=1e-7, rtol=1e-4)


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


def test_a_local_encoder_folder_whose_weights_changed_in_place_is_refused(local_backbones, tmp_path):
    """A local folder has no revision: the key must follow its weights, not its path."""
    import shutil

    from transformers import HubertModel

    folder = tmp_path / "hubert"
    shutil.copytree(local_backbones / "hubert", folder)
    model, processor = from_preset("tiny", projector_type="mlp", encoder_name_or_path=str(folder))
    train(model, processor, tmp_path / "out", max_steps=1, feature_cache_dir=str(tmp_path / "cache"))
    encoder = HubertModel.from_pretrained(folder)
    with torch.no_grad():
        encoder.encoder.layers[0].feed_forward.output_dense.bias.add_(0.1)
    encoder.save_pretrained(folder)
    changed, processor = from_preset("tiny", projector_type="mlp", encoder_name_or_path=str(folder))
    assert changed.config.encoder_name_or_path == model.config.encoder_name_or_path
    with pytest.raises(ValueError, match="encoder_weights"):
        train(changed, processor, tmp_path / "out", max_steps=1, feature_cache_dir=str(tmp_path / "cache"))


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
    from speechllm_hf.quickstart.corpus import manifest_path

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


def test_cli_train_refuses_a_manifest_that_loses_every_row(tmp_path, capsys):
    from speechllm_hf.cli import main

    st_row = {"audio": load_split("dev")[0]["audio"], "translation": "hallo"}  # no target_language
    (tmp_path / "st.jsonl").write_text(json.dumps(st_row) + "\n")
    argv = ["train", "--output_dir", str(tmp_path / "run"), "--train_manifest", f"st={tmp_path / 'st.jsonl'}"]
    assert main([*argv, "--max_steps", "1", "--use_cpu"]) == 2
    expected = r"speechllm-hf train: error: Every row of .*st.jsonl was dropped \(1 missing_field\).*--target_lang"
    assert re.search(expected, capsys.readouterr().err)


def test_cli_train_seed_decides_the_new_projector(tmp_path, local_backbones):
    from speechllm_hf.cli import main

    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in load_split("dev")[:2]))
    argv = ["train", "--projector_type", "mlp", "--train_manifest", str(tmp_path / "m.jsonl"), "--max_steps", "1"]
    argv += ["--learning_rate", "0", "--use_cpu", "--save_strategy", "no", "--report_to", "none"]
    argv += ["--encoder_name_or_path", str(local_backbones / "hubert")]
    argv += ["--text_name_or_path", str(local_backbones / "llm")]  # so that only the projector is saved
    projectors = []
    for run, seed in enumerate([3, 3, 4]):
        torch.manual_seed(100 + run)  # whatever state the global generator is in
        assert main([*argv, "--seed", str(seed), "--output_dir", str(tmp_path / str(run))]) == 0
        projectors.append(load_file(tmp_path / str(run) / "projector.safetensors"))  # lr 0: the initial weights
    assert all(torch.equal(projectors[0][name], tensor) for name, tensor in projectors[1].items())
    assert not all(torch.equal(projectors[0][name], tensor) for name, tensor in projectors[2].items())


def dev_rows(n=4):
    return datasets.Dataset.from_list(load_split("dev")[:n])


def test_evaluation_reads_its_own_feature_cache_of_parquet_bytes(tmp_path):
    # Parquet rows hold `{bytes, path}` with `path` naming the original file, which does not exist here.
    eval_rows = [
        {"audio": {"bytes": Path(row["audio"]).read_bytes(), "path": Path(row["audio"]).name}, "text": row["text"]}
        for row in load_split("dev")[:4]
    ]
    results = []
    for cache in (None, tmp_path / "cache"):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")
        trainer = SpeechLlmTrainer(
            model=model,
            args=arguments(tmp_path / "out", feature_cache_dir=cache and str(cache), per_device_eval_batch_size=2),
            train_dataset=corpus(8),
            eval_dataset=datasets.Dataset.from_list(eval_rows),
            processing_class=processor,
        )
        results.append(trainer.evaluate()["eval_loss"])
    assert os.path.exists(tmp_path / "cache" / "eval" / "cache_key.json")
    assert results[1] == pytest.approx(results[0], rel=1e-6)


def test_a_cache_of_other_clips_is_refused(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    train(model, processor, tmp_path / "out", max_steps=1, feature_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="holds other clips"):  # same encoder and row count, other clips
        train(
            model,
            processor,
            tmp_path / "out",
            dataset=corpus(16, start=16),
            max_steps=1,
            feature_cache_dir=str(tmp_path / "cache"),
        )


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'transcribe'"):
        arguments(tmp_path, task="transcribe")
    with pytest.raises(ValueError, match="cache would never be read"):
        arguments(tmp_path, task="mixed", feature_cache_dir=str(tmp_path / "cache"))
    model, processor = from_preset("tiny", projector_type="mlp")
    # ST rows need a translation and a target language, which the ASR corpus lacks: refused before any row is read.
    with pytest.raises(ValueError, match=r"train_dataset: st rows need the column\(s\) \['target_language', 'transl"):
        SpeechLlmTrainer(
            model=model, args=arguments(tmp_path, task="st"), train_dataset=corpus(), processing_class=processor
        )
    with pytest.raises(ValueError, match="drops the audio and text columns"):
        SpeechLlmTrainer(
            model=model,
            args=arguments(tmp_path, remove_unused_columns=True),
            train_dataset=corpus(),
            processing_class=processor,
        )


def test_grouped_loader_keeps_the_trainers_dataloader_settings(tmp_path):
    model, processor = from_preset("tiny", projector_type="mlp")
    args = arguments(
        tmp_path,
        dataloader_num_workers=1,
        dataloader_persistent_workers=True,
        dataloader_prefetch_factor=3,
        data_seed=0,  # a real seed, not "unset": seed 7 must not replace it
        seed=7,
    )
    trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=corpus(), processing_class=processor)
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, LengthGroupedSampler) and sampler.seed == 0
    assert loader.num_workers == 1 and loader.persistent_workers and loader.prefetch_factor == 3
    assert loader.worker_init_fn is not None  # transformers' seed_worker: workers seeded per rank
    assert subset(corpus(), 0.5, 0)["id"] != subset(corpus(), 0.5, 7)["id"]
    subset_trainer = SpeechLlmTrainer(
        model=model,
        args=arguments(tmp_path, data_subset=0.5, data_seed=0, seed=7),
        train_dataset=corpus(),
        processing_class=processor,
    )
    assert subset_trainer.train_dataset["id"] == subset(corpus(), 0.5, 0)["id"]


@only_on_transformers_5
def test_a_conflicting_transformers_sampling_is_refused(tmp_path):
    model, processor = from_preset("tiny", projector_type="mlp")
    with pytest.raises(ValueError, match="train_sampling_strategy='sequential'.*--group_by_duration False"):
        SpeechLlmTrainer(
            model=model,
            args=arguments(tmp_path, train_sampling_strategy="sequential"),
            train_dataset=corpus(),
            processing_class=processor,
        )
    trainer = SpeechLlmTrainer(
        model=model,
        args=arguments(tmp_path, train_sampling_strategy="sequential", group_by_duration=False),
        train_dataset=corpus(),
        processing_class=processor,
    )
    assert list(trainer.get_train_dataloader().batch_sampler.sampler) == list(range(16))


@pytest.mark.skipif(TRANSFORMERS_5, reason="group_by_length is transformers 4.57's; 5.x has train_sampling_strategy")
def test_transformers_4_57_length_grouping_is_refused_too(tmp_path):
    model, processor = from_preset("tiny", projector_type="mlp")
    with pytest.raises(ValueError, match="group_by_length=True.*--group_by_duration False"):
        SpeechLlmTrainer(
            model=model,
            args=arguments(tmp_path, group_by_length=True),
            train_dataset=corpus(),
            processing_class=processor,
        )


def test_load_best_model_at_end_reloads_the_best_projector(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones, projector_type="mlp")
    trainer = train(
        model,
        processor,
        tmp_path / "out",
        eval_dataset=dev_rows(),
        max_steps=3,
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest loss: an early checkpoint, never the weights training ends with
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best) != "checkpoint-3"
    saved = load_file(os.path.join(best, "projector.safetensors"))
    last = load_file(str(tmp_path / "out" / "checkpoint-3" / "projector.safetensors"))
    for name, tensor in model.state_dict().items():
        if name.startswith("projector."):
            assert torch.equal(tensor, saved[name]), name
    assert any(not torch.equal(saved[name], last[name]) for name in saved)


def test_resuming_a_lora_checkpoint_needs_lora(local_backbones, tmp_path):
    model, processor = tiny_with_ids(local_backbones, projector_type="mlp")
    add_lora(model, r=2)
    train(model, processor, tmp_path / "lora", max_steps=1, save_strategy="steps", save_steps=1)
    plain, processor = tiny_with_ids(local_backbones, projector_type="mlp")
    with pytest.raises(ValueError, match=r"holds a LoRA adapter of the LLM .*\(--lora_r"):
        train(
            plain,
            processor,
            tmp_path / "lora",
            max_steps=2,
            resume_from_checkpoint=str(tmp_path / "lora" / "checkpoint-1"),
        )
    train(plain, processor, tmp_path / "plain", max_steps=1, save_strategy="steps", save_steps=1)
    model, _ = tiny_with_ids(local_backbones, projector_type="mlp")
    add_lora(model, r=2)
    with pytest.raises(ValueError, match="carries a LoRA adapter but .* holds none"):
        train(
            model,
            processor,
            tmp_path / "plain",
            max_steps=2,
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"),
        )


def test_multi_task_data_logs_each_tasks_loss(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    mixed = multi_task_rows()
    trainer = train(model, processor, tmp_path / "out", dataset=mixed, max_steps=2, per_device_train_batch_size=2)
    assert {"loss_asr", "loss_st"} <= {key for entry in trainer.state.log_history for key in entry}

    # Evaluated one row per batch, a task's loss over the mixed set is the plain loss over that task's rows alone.
    evaluator = SpeechLlmTrainer(
        model=model,
        args=arguments(tmp_path / "eval", per_device_eval_batch_size=1),
        eval_dataset=mixed,
        processing_class=processor,
    )
    evaluator.evaluate()
    per_task = evaluator.state.log_history[-1]
    for task in ("asr", "st"):
        alone = evaluator.evaluate(mixed.select([i for i, name in enumerate(mixed["task"]) if name == task]))
        assert per_task[f"eval_loss_{task}"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    assert not any(
        key.startswith("loss_")
        for entry in train(model, processor, tmp_path / "asr", max_steps=1).state.log_history
        for key in entry
    )


def test_one_lora_default_for_add_lora_and_the_command_line(local_backbones, tmp_path):
    assert arguments(tmp_path).lora_target_modules.split(",") == list(LORA_TARGET_MODULES)
    model, _ = tiny_with_ids(local_backbones, projector_type="mlp")
    add_lora(model, r=2)
    assert set(model.language_model.peft_config["default"].target_modules) == set(LORA_TARGET_MODULES)


def test_train_config_file_and_command_line_flags_merge(tmp_path):
    from speechllm_hf.commands.train import parse_arguments

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "out"), "train_manifest": ["a.jsonl"], "max_steps": 5, "save_steps": 7}
        )
    )
    model_args, data_args, training_args = parse_arguments(
        SpeechLlmTrainingArguments, str(config), ["--max_steps", "2", "--preset", "whisper-cnn"]
    )
    assert training_args.max_steps == 2 and model_args.preset == "whisper-cnn"  # the command line wins
    assert training_args.save_steps == 7 and data_args.train_manifest == ["a.jsonl"]  # the rest comes from the file
    assert training_args.output_dir == str(tmp_path / "out")
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "max_step": 5}))
    with pytest.raises(SystemExit, match=r"unknown keys \['max_step'\]"):
        parse_arguments(SpeechLlmTrainingArguments, str(config), [])


def test_train_command_validates_each_manifest_row_against_its_task(tmp_path):
    from speechllm_hf.commands.train import DataArguments, load_rows

    audio = load_split("dev")[0]["audio"]
    st_rows = [
        {"audio": audio, "translation": "hallo"},  # its target language comes from --target_language
        {"audio": audio, "translation": " "},  # no translation: dropped, not a crash in the collator
    ]
    (tmp_path / "st.jsonl").write_text("".join(json.dumps(row) + "\n" for row in st_rows))
    rows = load_rows([f"st={tmp_path / 'st.jsonl'}"], arguments(tmp_path), DataArguments(target_language="German"))
    assert rows["translation"] == ["hallo"] and rows["target_language"] == ["German"] and rows["task"] == ["st"]


def test_cli_train_loads_backbones_in_dtype_with_the_llm_attention_and_an_fp32_projector(tmp_path, monkeypatch):
    from speechllm_hf.cli import main
    from speechllm_hf.commands import train as train_command

    built = {}
    original = train_command.methods

    def recording_methods():
        table = original()
        trainer_class, arguments_class = table["asr"]

        class RecordingTrainer(trainer_class):
            def __init__(self, model=None, **kwargs):
                built["model"] = model
                super().__init__(model=model, **kwargs)

        return {**table, "asr": (RecordingTrainer, arguments_class)}

    monkeypatch.setattr(train_command, "methods", recording_methods)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in load_split("dev")[:2]))
    argv = ["train", "--train_manifest", str(tmp_path / "m.jsonl"), "--max_steps", "1", "--use_cpu"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    assert main([*argv, "--dtype", "bfloat16", "--attn_implementation", "eager"]) == 0
    model = built["model"]
    assert model.language_model.dtype == model.encoder.dtype == torch.bfloat16
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    assert model.language_model.config._attn_implementation == "eager"
    assert model.encoder.config._attn_implementation != "eager"  # the encoder keeps its default


def test_cli_train_drops_rows_whose_text_holds_a_special_token(tmp_path, caplog):
    from speechllm_hf.cli import main

    rows = load_split("dev")[:3]
    rows[1]["text"] = f"{rows[1]['text']} </s> and on"  # the tiny tokenizer's end of sequence
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["train", "--train_manifest", str(tmp_path / "m.jsonl"), "--max_steps", "1", "--use_cpu"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    with caplog.at_level(logging.INFO, logger="speechllm_hf.commands.train"):
        assert main(argv) == 0
    report = next(json.loads(r.getMessage().split(": ", 1)[1]) for r in caplog.records if "m.jsonl" in r.getMessage())
    assert report["kept"] == 2 and report["dropped"]["special_token_in_text"] == 1
