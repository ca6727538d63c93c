"""Load Whisper checkpoints of both layouts into the Hub copy's SpeechLlmWhisperEncoder, and a checkpoint missing
encoder weights, on the transformers version this interpreter has.

    python whisper_encoder_loads.py   (run in a folder holding the model folder as the package `speechllm_hub`)

Prints one JSON line.
"""

import json
import os
import sys
import tempfile

sys.modules["speechllm_hf"] = None  # any import of the package now raises ImportError
sys.path.insert(0, os.getcwd())  # where speechllm_hub is

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from speechllm_hub.configuration_speechllm import SpeechLlmConfig  # noqa: E402
from speechllm_hub.loading_speechllm import load_pretrained_encoder  # noqa: E402
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel  # noqa: E402

config = WhisperConfig(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=128,
    num_mel_bins=80,
)
report = {"transformers": transformers.__version__, "differing": {}}
with tempfile.TemporaryDirectory() as root:
    torch.manual_seed(0)
    for name, cls in (
        ("WhisperForConditionalGeneration", WhisperForConditionalGeneration),
        ("WhisperModel", WhisperModel),
    ):
        checkpoint = cls(config)
        checkpoint.save_pretrained(f"{root}/{name}")
        encoder = load_pretrained_encoder(
            SpeechLlmConfig(encoder_config=config.to_dict(), encoder_name_or_path=f"{root}/{name}")
        )
        reference = checkpoint.get_encoder().state_dict()
        report["differing"][name] = [k for k, v in encoder.state_dict().items() if not torch.equal(v, reference[k])]
    # The same checkpoint without one encoder layer's weights: an error naming them, not a random layer.
    weights = load_file(f"{root}/WhisperModel/model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("encoder.layers.1.")},
        f"{root}/WhisperModel/model.safetensors",
    )
    try:
        load_pretrained_encoder(
            SpeechLlmConfig(encoder_config=config.to_dict(), encoder_name_or_path=f"{root}/WhisperModel")
        )
        report["refused"] = None
    except ValueError as err:
        report["refused"] = str(err)
print(json.dumps(report))
