"""from_preset: tiny build, pretrained backbones from local folders, offline errors, Auto classes."""

import json
import logging
import shutil

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    HubertModel,
    WhisperForConditionalGeneration,
)

from speechllm_hf import PRESETS, SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor, from_preset
from speechllm_hf.presets import BLSP_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE


def test_tiny_preset_is_a_few_megabytes_and_needs_no_download():
    model, processor = from_preset("tiny")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < 5 * 2**20
    assert processor.tokenizer.convert_tokens_to_ids("<audio>") == model.config.audio_token_id
    assert model.config.encoder_name_or_path is None and model.config.text_name_or_path is None


def test_a_new_model_is_in_eval_mode_and_generates_the_same_answer_each_time():
    """As `from_pretrained` leaves a model: the Q-Former's dropout is off until a trainer calls `train()`."""
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="qformer")
    assert not any(module.training for module in model.modules())
    inputs = processor("<audio>", audio=[torch.randn(16000).numpy()], sampling_rate=16000, return_tensors="pt")
    answers = [model.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]


def test_local_encoder_and_text_model_weights_are_loaded(local_backbones):
    model, processor = from_preset(
        "tiny", encoder_name_or_path=str(local_backbones / "hubert"), text_name_or_path=str(local_backbones / "llm")
    )
    saved_encoder = HubertModel.from_pretrained(local_backbones / "hubert")
    saved_llm = AutoModelForCausalLM.from_pretrained(local_backbones / "llm")
    for name, tensor in saved_encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor, rtol=0, atol=0)
    for name, tensor in saved_llm.state_dict().items():
        torch.testing.assert_close(model.language_model.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.config.encoder_name_or_path == str(local_backbones / "hubert")
    assert model.config.text_name_or_path == str(local_backbones / "llm")


def test_whisper_checkpoint_loads_only_its_encoder(local_backbones):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")  # it does not propagate: caplog would not see it
    transformers_logger.addHandler(handler)
    try:
        model, _ = from_preset("tiny", encoder_type="whisper", encoder_name_or_path=str(local_backbones / "whisper"))
    finally:
        transformers_logger.removeHandler(handler)
    # The decoder's weights are expected to go unused: no load report listing them.
    assert not [record.getMessage() for record in records if "decoder" in record.getMessage()]
    reference = WhisperForConditionalGeneration.from_pretrained(local_backbones / "whisper").model.encoder
    assert type(model.encoder).__name__ == "SpeechLlmWhisperEncoder"
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor, rtol=0, atol=0)


def test_encoder_type_conflicting_with_the_checkpoint_is_refused(local_backbones):
    with pytest.raises(ValueError, match=r"encoder_type 'whisper' .* holds a 'hubert' encoder"):
        from_preset("tiny", encoder_type="whisper", encoder_name_or_path=str(local_backbones / "hubert"))
    model, _ = from_preset("tiny", encoder_type="hubert", encoder_name_or_path=str(local_backbones / "hubert"))
    assert model.config.encoder_config.model_type == "hubert"


@pytest.mark.parametrize("name", [name for name, preset in PRESETS.items() if preset.encoder_name_or_path])
def test_real_preset_offline_says_what_to_download(name):
    with pytest.raises(OSError, match=rf"hf download {PRESETS[name].encoder_name_or_path}"):
        from_preset(name)


def test_unknown_names_raise_value_errors():
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        from_preset("nope")
    with pytest.raises(ValueError, match="Unknown encoder_type"):
        from_preset("tiny", encoder_type="conformer")
    with pytest.raises(ValueError, match="Unknown projector_type"):
        from_preset("tiny", projector_type="perceiver")
    with pytest.raises(ValueError, match="Unknown qformer projector settings"):
        SpeechLlmConfig(projector_config={"windows": 3})


def test_auto_classes_are_registered_in_process(tmp_path):
    model, processor = from_preset("tiny")
    settings = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("speechllm_hf", **settings)
    assert isinstance(config, SpeechLlmConfig)
    assert type(AutoModel.from_config(config)) is SpeechLlmForConditionalGeneration
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)  # no trust_remote_code: the registered class, not the Hub copy
    assert type(loaded) is SpeechLlmProcessor
    assert loaded.audio_length_spec == processor.audio_length_spec


def test_config_round_trips_through_json(tmp_path):
    model, _ = from_preset("tiny", encoder_type="whisper", projector_type="cnn")
    model.config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.projector_type == "cnn" and loaded.encoder_config.model_type == "whisper"
    assert loaded.audio_length_spec == model.config.audio_length_spec


def test_saved_tokenizer_config_holds_no_loading_options(local_backbones, tmp_path):
    _, processor = from_preset("tiny", text_name_or_path=str(local_backbones / "llm"), local_files_only=True)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local", "cache_dir", "token", "_commit_hash"} & set(saved)
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # 5.x's TokenizersBackend is unknown to 4.57


def test_presets_use_the_llms_own_chat_template_else_blsps(local_backbones, tmp_path):
    _, processor = from_preset("tiny", text_name_or_path=str(local_backbones / "llm"))
    assert processor.chat_template == TINY_CHAT_TEMPLATE  # the tokenizer's own
    base_llm = shutil.copytree(local_backbones / "llm", tmp_path / "base-llm")
    (base_llm / "chat_template.jinja").unlink()  # a base LLM: no template of its own
    _, processor = from_preset("tiny", text_name_or_path=str(base_llm))
    assert processor.chat_template == BLSP_CHAT_TEMPLATE
    _, processor = from_preset("tiny", chat_template="{{ messages[0]['content'] }}")
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
