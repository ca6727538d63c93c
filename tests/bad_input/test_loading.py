"""Bad configs, processors and tokenizers at loading time (docs/reliability.md): each case asserts the message and
that what is valid still loads."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS, clip, copy_saved, only_on_transformers_5, run_without_package, trained_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, HubertModel, PreTrainedTokenizerFast

from bad_input.conftest import RATE, array_row
from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor, from_preset
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator
from speechllm_hf.presets import TINY_CHAT_TEMPLATE, tiny_encoder_config, tiny_text_config


def test_unknown_projector_type(tmp_path, hubert):
    model, _ = hubert
    with pytest.raises(ValueError, match="Unknown projector_type 'transformer'; choose one of qformer, cnn, mlp"):
        SpeechLlmConfig(projector_type="transformer")
    with pytest.raises(ValueError, match="Unknown projector_type 'linear'"):
        from_preset("tiny", projector_type="linear")
    with pytest.raises(ValueError, match=r"Unknown qformer projector settings \['stack_factor'\]; valid ones"):
        SpeechLlmConfig(projector_type="qformer", projector_config={"stack_factor": 4})
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "projector_type": "perceiver"}))
    with pytest.raises(ValueError, match="Unknown projector_type 'perceiver'"):
        SpeechLlmConfig.from_pretrained(tmp_path)


def test_encoder_llm_dimension_mismatch_in_a_config(tmp_path, hubert):
    model, processor = hubert
    config = copy.deepcopy(model.config)  # 64-wide encoder and LLM
    narrow_encoder = tiny_encoder_config("hubert")
    narrow_encoder.hidden_size = 32
    with pytest.raises(ValueError, match="The encoder is 32 wide but the config's encoder_config says 64"):
        SpeechLlmForConditionalGeneration(config, encoder=HubertModel(narrow_encoder))
    # An LLM of another width used to take the audio features element by element, without an error.
    narrow_text = tiny_text_config(processor.tokenizer)
    narrow_text.hidden_size = 32
    AutoModelForCausalLM.from_config(narrow_text).save_pretrained(tmp_path / "llm")
    config.text_name_or_path = str(tmp_path / "llm")
    with pytest.raises(ValueError, match="The LLM is 32 wide but the config's text_config says 64.*AutoConfig"):
        SpeechLlmForConditionalGeneration.from_backbones(config)


def tokenizer_without_pad(specials: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built here (no download) with no pad token, like Llama's."""
    words = ["hello", "there", "word", "short"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"unk_token": "<unk>", "eos_token": "</s>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{key: token for key, token in named.items() if token in specials},
        additional_special_tokens=["<audio>"],
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="left",
    )
    assert tokenizer.pad_token is None
    return tokenizer


def test_tokenizer_without_a_pad_token(tmp_path, hubert):
    model, processor = hubert
    spec = processor.audio_length_spec
    # Llama-2 (pads with its unknown token, as BLSP did), Llama-3.1 (a dedicated pad token), neither (EOS).
    for specials, pad in (
        (["<unk>", "</s>", "<audio>"], "<unk>"),
        (["<unk>", "</s>", "<audio>", "<|finetune_right_pad_id|>"], "<|finetune_right_pad_id|>"),
        (["</s>", "<audio>"], "</s>"),
    ):
        tokenizer = tokenizer_without_pad(specials)
        built = SpeechLlmProcessor(processor.feature_extractor, tokenizer, audio_length_spec=spec)
        assert tokenizer.pad_token == pad and built.tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(pad)
        batch = built(["<audio> hello", "hello there word short"], audio=[clip(0.5)], sampling_rate=RATE)
        padding = batch["attention_mask"] == 0
        assert padding[1, 0] and (batch["input_ids"][padding] == built.tokenizer.pad_token_id).all()  # left padded
        collated = SpeechLlmCollator(built)(
            [array_row(clip(0.5), text="hello"), array_row(clip(0.5), text="word " * 5)]
        )
        padding = collated["attention_mask"] == 0
        assert padding.any() and (collated["input_ids"][padding] == built.tokenizer.pad_token_id).all()
        assert (collated["labels"][padding] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="no pad, unknown or EOS token"):
        SpeechLlmProcessor(processor.feature_extractor, tokenizer_without_pad(["<audio>"]), audio_length_spec=spec)

    # from_preset sets one for a local LLM whose tokenizer has none, saved with the processor and generation config.
    tokenizer = tokenizer_without_pad(["<unk>", "<s>", "</s>", "<audio>"])
    tokenizer.save_pretrained(tmp_path / "llm")
    AutoModelForCausalLM.from_config(tiny_text_config(tokenizer)).save_pretrained(tmp_path / "llm")
    model, built = from_preset("tiny", text_name_or_path=str(tmp_path / "llm"))
    assert (
        built.tokenizer.pad_token == "<unk>" and model.generation_config.pad_token_id == built.tokenizer.unk_token_id
    )
    built.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").pad_token == "<unk>"


# ---------------------------------------------------------------------------------------------------------------------
# A processor folder that names code of its own for the tokenizer or the feature extractor (issue 18 item 2).

# Where a tampered folder can name a module for a sub-processor, and the entry that names it.
PLANTED_ENTRIES = {
    "tokenizer_config.json": {"AutoTokenizer": ["planted.PlantedTokenizer", None]},
    "preprocessor_config.json": {"AutoFeatureExtractor": "planted.PlantedFeatureExtractor"},
    "config.json": {"AutoTokenizer": ["planted.PlantedTokenizer", None]},
}


def plant_code(folder: Path, file_name: str, marker: Path) -> None:
    """Adds a module to `folder` that writes `marker` when imported, and names it in `file_name`'s auto_map."""
    (folder / "planted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast): pass\n"
        "class PlantedFeatureExtractor(Wav2Vec2FeatureExtractor): pass\n"
    )
    saved = json.loads((folder / file_name).read_text())
    saved["auto_map"] = {**saved.get("auto_map", {}), **PLANTED_ENTRIES[file_name]}
    (folder / file_name).write_text(json.dumps(saved))


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, local_backbones):
    model, processor = trained_tiny(local_backbones)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder, processor=processor)
    return folder


@pytest.mark.parametrize("file_name", PLANTED_ENTRIES)
def test_the_package_never_runs_sub_processor_code_a_folder_names(saved_folder, tmp_path, file_name):
    folder = copy_saved(saved_folder, tmp_path / "tampered")
    plant_code(folder, file_name, tmp_path / "ran")
    expected = rf"maps its tokenizer or feature extractor to code of its own \({file_name}: .*planted\."
    with pytest.raises(ValueError, match=expected):
        SpeechLlmProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match=expected):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert not (tmp_path / "ran").exists()
    # The class itself is the package's on transformers 5.x, the folder's copy on 4.57 (docs/security.md).
    assert type(AutoProcessor.from_pretrained(saved_folder, trust_remote_code=True)).__name__ == "SpeechLlmProcessor"


@pytest.mark.parametrize("major", [pytest.param("5.x", marks=only_on_transformers_5), "4.57"])
def test_the_hub_copy_never_runs_sub_processor_code_a_folder_names(saved_folder, tmp_path, major, request):
    """Without the package, `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` runs the folder's
    processing_speechllm.py (that is what the flag is for) and nothing else: transformers alone would also import a
    module that tokenizer_config.json names."""
    python = sys.executable if major == "5.x" else request.getfixturevalue("compat_python")
    script = str(SCRIPTS / "foreign_processor_code.py")
    folder = copy_saved(saved_folder, tmp_path / "tampered")
    plant_code(folder, "tokenizer_config.json", tmp_path / "ran")
    report = run_without_package(python, [script, str(folder), str(tmp_path / "ran")], tmp_path)
    assert not report["ran"] and "maps its tokenizer or feature extractor to code of its own" in report["error"]
    clean = run_without_package(python, [script, str(saved_folder), str(tmp_path / "ran")], tmp_path)
    assert clean["error"] is None and not clean["ran"]
