"""Folders saved by an earlier version of the library load, and give the logits they gave then."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, clip, fill_deterministically
from safetensors.torch import load_file

from speechllm_hf import SpeechLlmForConditionalGeneration, SpeechLlmProcessor, from_preset

SAVED = FIXTURES / "saved-692bcdd"


@pytest.mark.parametrize("name", ["hubert-qformer", "whisper-mlp"])
def test_folder_saved_by_692bcdd_loads_with_the_same_logits(name, tmp_path):
    encoder_type, projector_type = name.split("-")
    torch.manual_seed(0)
    model, _ = from_preset("tiny", encoder_type=encoder_type, projector_type=projector_type)
    fill_deterministically(model.encoder, 1)
    fill_deterministically(model.language_model, 2)
    model.encoder.save_pretrained(tmp_path / "encoder")
    model.language_model.save_pretrained(tmp_path / "text")
    folder = tmp_path / name
    shutil.copytree(SAVED / name, folder)
    config = json.loads((folder / "config.json").read_text())
    # The backbones were local folders when the fixture was written: point at their rebuilt copies.
    config["encoder_name_or_path"], config["text_name_or_path"] = str(tmp_path / "encoder"), str(tmp_path / "text")
    (folder / "config.json").write_text(json.dumps(config))

    loaded = SpeechLlmForConditionalGeneration.from_pretrained(folder)
    processor = SpeechLlmProcessor.from_pretrained(folder)
    batch = processor(
        text=["<audio> hello", "say <audio> again"],
        audio=[clip(1.0, seed=1), clip(1.6, seed=2)],
        sampling_rate=16000,
        return_tensors="pt",
        padding=True,
    )
    expected = load_file(folder / "expected.safetensors")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    with torch.no_grad():
        logits = loaded(**batch).logits[:, -8:]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
    # The projector weights came from the folder, not from a new initialisation.
    reference = from_preset("tiny", encoder_type=encoder_type, projector_type=projector_type)[0]
    fill_deterministically(reference.projector, 3)
    saved = reference.projector.state_dict()
    for key, value in loaded.projector.state_dict().items():
        assert torch.equal(value, saved[key]), key
