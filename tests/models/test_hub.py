"""Projector-only publishing: the saved file set, strict loading, round trips without the package, push_to_hub."""

import ast
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    COMPAT_TRANSFORMERS,
    HUB_IDS,
    REPO,
    SCRIPTS,
    TRANSFORMERS_5,
    clip,
    copy_saved,
    only_on_transformers_5,
    run_loader,
    run_without_package,
    save_expected_outputs,
    trained_tiny,
    trainer_of,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, pipeline

from speechllm_hf import SpeechLlmForConditionalGeneration, from_preset

HUB_FOLDER = REPO / "speechllm_hf" / "models" / "speechllm"
MODEL_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "projector.safetensors",
    "configuration_speechllm.py",
    "modeling_speechllm.py",
    "processing_speechllm.py",
    "hub_speechllm.py",
    "pipeline_speechllm.py",
    "audio_speechllm.py",
    "compat_speechllm.py",
    "loading_speechllm.py",
    "modules_speechllm.py",
}


@pytest.fixture(scope="module")
def saved(local_backbones, tmp_path_factory):
    """A projector-only save plus the outputs the original model gives, for comparison in other processes."""
    folder = tmp_path_factory.mktemp("saved")
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(folder, processor=processor)
    texts = ["<|user|><audio> hi<|end|><|assistant|>", "<|user|>x <audio><|end|><|assistant|>"]
    expected = folder.parent / "expected.npz"
    save_expected_outputs(expected, model, processor, texts, [clip(0.9), clip(0.5, 1)])
    return folder, expected, model, processor


def test_saved_folder_holds_exactly_the_expected_files(saved, tmp_path):
    folder, _, _, processor = saved
    processor.save_pretrained(tmp_path)
    processor_files = set(os.listdir(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= processor_files
    assert set(os.listdir(folder)) == MODEL_FILES | processor_files
    config = json.loads((folder / "config.json").read_text())
    model_class = "modeling_speechllm.SpeechLlmForConditionalGeneration"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_speechllm.SpeechLlmConfig",
        "AutoModel": model_class,
        "AutoModelForSpeechSeq2Seq": model_class,
        "AutoModelForSeq2SeqLM": model_class,
        "AutoModelForMultimodalLM": model_class,
    }
    assert config["encoder_name_or_path"].endswith("hubert") and config["text_name_or_path"].endswith("llm")
    # `pipeline(model=folder)` finds the shipped pipeline class by this entry, with no task name.
    assert config["custom_pipelines"] == {
        "speech-llm": {
            "impl": "pipeline_speechllm.SpeechLlmPipeline",
            "pt": ["AutoModel"],
            "tf": [],
            "type": "multimodal",
        }
    }


def test_pipeline_without_a_task_name_from_a_saved_folder(saved):
    folder, expected, model, _ = saved
    pipe = pipeline(model=str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "SpeechLlmPipeline"
    answer = pipe(clip(0.9), sampling_rate=16000, max_new_tokens=8)
    assert answer == {"generated_text": str(np.load(expected)["pipeline_text"])}
    # The loaded model forgets the entry, so the in-process task serves the model object without trust_remote_code.
    reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not hasattr(reloaded.config, "custom_pipelines")
    assert "custom_pipelines" not in model.config.to_dict()


def test_projector_file_holds_exactly_the_projector(saved):
    folder, _, model, _ = saved
    with safe_open(folder / "projector.safetensors", "pt") as file:
        keys = set(file.keys())
    projector = {k: v for k, v in model.state_dict().items() if k.startswith("projector.")}
    assert keys == set(projector)
    payload = sum(v.numel() * v.element_size() for v in projector.values())
    assert payload <= (folder / "projector.safetensors").stat().st_size < payload + 16_384  # + the JSON header


def test_model_card_names_bases_counts_memory_and_licence(saved):
    card = (saved[0] / "README.md").read_text()
    for needle in ("projector", "parameters", "GiB", "trust_remote_code=True", "licence", "hubert", "llm"):
        assert needle in card
    assert "holds only the projector weights (`projector.safetensors`)" in card and "all the weights" not in card
    assert "`AutoModelForCausalLM` does not" in card and "a plain `AutoTokenizer` does not expand" in card


def test_model_card_front_matter_carries_what_the_hub_reads(local_backbones, tmp_path, monkeypatch):
    """Issue 19, item 8: both backbones under base_model, the relation of a projector to them, the pipeline tag, the
    LLM's licence and the library. The backbones are named by (made-up) Hub ids; the LLM's card is read from where
    its README.md resolves (here a local stand-in with an Apache-2.0 front matter)."""
    from huggingface_hub.repocard import metadata_load

    from speechllm_hf.models.speechllm import hub_speechllm

    (local_backbones / "llm-card").mkdir(exist_ok=True)
    (local_backbones / "llm-card" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# An LLM\n")
    monkeypatch.setattr(
        hub_speechllm, "cached_file", lambda name, filename, **kwargs: str(local_backbones / "llm-card" / filename)
    )
    model, processor = trained_tiny(local_backbones)
    model.config.encoder_name_or_path, model.config.text_name_or_path = "org/encoder", "org/llm"
    for full in (False, True):
        (tmp_path / "README.md").write_text(hub_speechllm.model_card(model, "org/speech-llm", full_model=full))
        metadata = metadata_load(tmp_path / "README.md")
        assert metadata["base_model"] == ["org/encoder", "org/llm"]
        assert metadata["base_model_relation"] == ("finetune" if full else "adapter")
        assert metadata["pipeline_tag"] == "audio-text-to-text"
        assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"


def test_the_audio_llm_auto_classes_load_the_model_and_causal_lm_is_not_claimed(saved):
    """Issue 19, item 5: a saved folder maps the Auto classes transformers registers its own audio LLMs under to the
    model class; AutoModelForCausalLM stays unregistered (text in, text out), and the card says to use AutoModel."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    folder, expected, model, processor = saved
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"AutoModel", "AutoModelForSpeechSeq2Seq", "AutoModelForSeq2SeqLM", "AutoModelForMultimodalLM"} <= set(
        auto_map
    ) and "AutoModelForCausalLM" not in auto_map
    inputs = processor(["<|user|><audio> hi<|end|>"], audio=[clip(0.9)], sampling_rate=16000)
    for auto_class in (AutoModelForSpeechSeq2Seq, AutoModelForSeq2SeqLM):
        loaded = auto_class.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_auto_model_honours_attn_implementation_and_dtype(saved):
    """AutoConfig takes `attn_implementation` (it never reaches the model's kwargs); both backbones must get it."""
    folder, _, _, _ = saved
    default = AutoModel.from_pretrained(folder, trust_remote_code=True)
    eager = AutoModel.from_pretrained(
        folder, trust_remote_code=True, attn_implementation="eager", dtype=torch.bfloat16
    )
    assert default.language_model.config._attn_implementation == "sdpa"
    assert eager.encoder.config._attn_implementation == eager.language_model.config._attn_implementation == "eager"
    assert {parameter.dtype for parameter in eager.parameters()} == {torch.bfloat16}


def test_round_trip_with_the_package(saved):
    folder, _, model, processor = saved
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not loaded.training
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    loaded_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded_processor.audio_length_spec == processor.audio_length_spec


@only_on_transformers_5
def test_round_trip_without_the_package_on_transformers_5(saved):
    folder, expected, _, _ = saved
    report = run_loader(sys.executable, folder, expected)
    assert report["transformers"].startswith("5.") and report["model_class"].startswith("transformers_modules")


def test_round_trip_without_the_package_on_transformers_4_57(saved, compat_python):
    folder, expected, _, _ = saved
    report = run_loader(compat_python, folder, expected)
    assert report["transformers"] == COMPAT_TRANSFORMERS


def test_round_trip_without_the_package_on_transformers_5_10(saved, transformers_5_10_python):
    """5.10 moves a `dtype` given to AutoModel into the config: the bfloat16 asked for must still reach every part."""
    folder, expected, _, _ = saved
    report = run_loader(transformers_5_10_python, folder, expected)
    assert report["transformers"] == "5.10.4"


def test_full_save_round_trip(local_backbones, tmp_path):
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(tmp_path, processor=processor, save_full_model=True)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and "projector.safetensors" not in files
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_backbones_without_an_id_are_saved_in_full_with_a_warning(tmp_path, caplog):
    model, _ = from_preset("tiny")
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path)
    assert "saving all weights, backbones included" in caplog.text
    assert "model.safetensors" in os.listdir(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "holds all the weights (encoder, projector and LLM" in card and "only the projector" not in card
    loaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(
        loaded.encoder.state_dict()["feature_projection.projection.weight"],
        model.encoder.state_dict()["feature_projection.projection.weight"],
    )


def test_trainable_backbone_refuses_a_projector_only_save(local_backbones, tmp_path):
    model, _ = trained_tiny(local_backbones)
    model.language_model.lm_head.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the projector are trainable.*save_full_model=True"):
        model.save_pretrained(tmp_path)


def test_projector_shape_mismatch_is_explained(saved, tmp_path):
    folder = copy_saved(saved[0], tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["projector_config"]["hidden_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"other shapes than the config builds .*projector\.query"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_missing_and_unexpected_projector_keys_are_named(saved, tmp_path):
    folder = copy_saved(saved[0], tmp_path / "keys")
    state = {k: v for k, v in saved[2].state_dict().items() if k.startswith("projector.")}
    state.pop("projector.query")
    state["projector.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "projector.safetensors")
    with pytest.raises(
        ValueError,
        match=r"Missing keys: \['projector.query'\]; unexpected keys: "
        r"\['projector.extra.weight'\]",
    ):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_backbone_missing_offline_says_what_to_do(saved, tmp_path):
    folder = copy_saved(saved[0], tmp_path / "missing")
    config = json.loads((folder / "config.json").read_text())
    config["text_name_or_path"] = "someone/unavailable-llm"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="hf download someone/unavailable-llm"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_nothing_is_unpickled_on_load(saved, local_backbones, tmp_path, monkeypatch):
    full = tmp_path / "full"
    trained_tiny(local_backbones)[0].save_pretrained(full, save_full_model=True)

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle during from_pretrained")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    AutoModel.from_pretrained(saved[0], trust_remote_code=True)
    AutoModel.from_pretrained(full, trust_remote_code=True)


def test_with_the_package_imported_no_file_of_the_repo_runs(saved, tmp_path):
    from speechllm_hf import SpeechLlmForConditionalGeneration, SpeechLlmProcessor

    folder = copy_saved(saved[0], tmp_path / "booby-trapped")
    for path in folder.glob("*.py"):
        path.write_text("raise RuntimeError('the repo code ran')\n" + path.read_text())
    SpeechLlmForConditionalGeneration.from_pretrained(folder)
    SpeechLlmProcessor.from_pretrained(folder)
    # transformers 5.x prefers the classes registered in-process to the repo's, even with trust_remote_code=True;
    # 4.57 does so when trust_remote_code is not given (given, it runs the repo's code as asked).
    trust = {"trust_remote_code": True} if TRANSFORMERS_5 else {}
    assert type(AutoModel.from_pretrained(folder, **trust)) is SpeechLlmForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(folder, **trust)) is SpeechLlmProcessor


def test_full_save_is_read_from_safetensors_only(tmp_path):
    from_preset("tiny")[0].save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(tmp_path)


def test_lora_adapter_loads_frozen_and_from_safetensors_only(local_backbones, tmp_path):
    from speechllm_hf.training.lora import add_lora

    model, processor = trained_tiny(local_backbones)
    add_lora(model, r=2)
    with torch.no_grad():  # lora_B starts at zero, which would make any adapter look loaded
        for name, parameter in model.language_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path, processor=processor)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.has_lora and not any(p.requires_grad for p in loaded.language_model.parameters())
    inputs = processor(["<|user|><audio> hi<|end|>"], audio=[clip(0.6)], sampling_rate=16000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)

    adapter = tmp_path / "lora" / "adapter_model.safetensors"
    torch.save(load_file(adapter), adapter.with_suffix(".bin"))
    os.remove(adapter)
    with pytest.raises(ValueError, match="no lora/adapter_model.safetensors: adapters are read from safetensors only"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_push_to_hub_sends_exactly_the_saved_files(saved, hub_commits, monkeypatch):
    import yaml

    folder, _, model, processor = saved
    for field, hub_id in HUB_IDS.items():
        monkeypatch.setattr(model.config, field, hub_id)
    model.push_to_hub("me/tiny-speechllm", processor=processor)
    assert hub_commits == [{"repo_id": "me/tiny-speechllm", "files": set(os.listdir(folder))}]
    card = (folder / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["speechllm_hf", "speech-llm"]  # valid card metadata


def test_trainer_push_uploads_the_projector_only_and_no_training_state(hub_commits, monkeypatch, tmp_path):
    model, processor = from_preset("tiny")
    trainer = trainer_of(model, processor, tmp_path / "run", hub_model_id="me/run")
    trainer.train()
    with pytest.raises(ValueError, match="holds full model weights"):  # backbones without an id: saved in full
        trainer.push_to_hub()
    assert hub_commits == []
    trainer.push_to_hub(allow_full_model=True)
    assert "model.safetensors" in hub_commits[-1]["files"] and "training_args.bin" not in hub_commits[-1]["files"]

    for field, hub_id in HUB_IDS.items():
        monkeypatch.setattr(model.config, field, hub_id)
    trainer.args.output_dir = str(tmp_path / "projector-only")
    trainer.push_to_hub()
    assert hub_commits[-1]["repo_id"] == "me/run"
    saved = set(os.listdir(tmp_path / "projector-only"))
    assert "projector.safetensors" in saved and "model.safetensors" not in saved
    assert hub_commits[-1]["files"] == saved - {"training_args.bin"}


def test_hub_folder_imports_only_torch_transformers_and_stdlib():
    """What `trust_remote_code` runs imports torch, transformers (and what transformers itself requires) and the
    standard library, anywhere in the files; an optional package is imported only inside the function that needs
    it, under `try`, so that its absence is explained."""
    allowed = {"torch", "transformers", "numpy", "huggingface_hub", "safetensors", "tokenizers", "packaging"}
    allowed |= set(sys.stdlib_module_names) | {"__future__"}
    optional = {"peft", "soundfile", "soxr"}  # LoRA adapters, audio files, resampling
    for path in HUB_FOLDER.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        guarded = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.Try)
            and any(
                handler.type is not None and "ImportError" in ast.unparse(handler.type) for handler in block.handlers
            )
            for statement in block.body
            for node in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and "." not in (node.module or ""), (path.name, node.lineno)
                continue
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                assert name in allowed or (name in optional and id(node) in guarded), (path.name, node.lineno, name)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone revisions: recorded when the model is built, honoured when it is loaded.

HUBERT_COMMIT, LLM_COMMIT, LLM_NEXT_COMMIT = "1" * 40, "2" * 40, "3" * 40


def hub_cache(root: Path, repo_id: str, snapshots: dict[str, Path], main: str) -> None:
    """A Hub cache entry as `hf download` leaves it: a folder per commit, `refs/main` naming the newest."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for commit, source in snapshots.items():
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)


@pytest.fixture
def cached_hub(local_backbones, tmp_path):
    """An offline Hub cache with the tiny HuBERT and two commits of the tiny LLM (weights + 1 in the second), the
    main branch on the first."""
    newer = tmp_path / "llm-next"
    shutil.copytree(local_backbones / "llm", newer)
    first_weights = load_file(local_backbones / "llm" / "model.safetensors")
    next_weights = {name: tensor + 1 for name, tensor in first_weights.items()}
    save_file(next_weights, newer / "model.safetensors", metadata={"format": "pt"})
    cache = tmp_path / "hub"
    hub_cache(cache, HUB_IDS["encoder_name_or_path"], {HUBERT_COMMIT: local_backbones / "hubert"}, HUBERT_COMMIT)
    llm_snapshots = {LLM_COMMIT: local_backbones / "llm", LLM_NEXT_COMMIT: newer}
    hub_cache(cache, HUB_IDS["text_name_or_path"], llm_snapshots, LLM_COMMIT)
    return cache, first_weights, next_weights


def test_backbone_commits_are_recorded_and_a_moved_branch_does_not_move_the_model(cached_hub, tmp_path):
    cache, first_weights, _ = cached_hub
    model, processor = from_preset("tiny", **HUB_IDS, cache_dir=str(cache))
    # No revision was asked for: the commits actually loaded are recorded, and saved.
    assert (model.config.encoder_revision, model.config.text_revision) == (HUBERT_COMMIT, LLM_COMMIT)
    model.save_pretrained(tmp_path / "saved", processor=processor)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["encoder_revision"], saved["text_revision"]) == (HUBERT_COMMIT, LLM_COMMIT)

    # The LLM's main branch moves on; the saved model still loads the commit it was trained with, whatever revision
    # of its own repo is asked for.
    hub_cache(cache, HUB_IDS["text_name_or_path"], {}, main=LLM_NEXT_COMMIT)
    loaded = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True, cache_dir=cache, revision="main")
    for name, tensor in first_weights.items():
        assert torch.equal(loaded.language_model.state_dict()[name], tensor), name


def test_an_asked_backbone_revision_is_loaded_and_recorded(cached_hub):
    cache, _, next_weights = cached_hub
    model, _ = from_preset("tiny", **HUB_IDS, text_revision=LLM_NEXT_COMMIT, cache_dir=str(cache))
    assert model.config.text_revision == LLM_NEXT_COMMIT
    for name, tensor in next_weights.items():
        assert torch.equal(model.language_model.state_dict()[name], tensor), name


@pytest.mark.parametrize("major", [pytest.param("5.x", marks=only_on_transformers_5), "4.57"])
def test_save_push_and_load_take_every_argument_of_pretrained_models(major, local_backbones, tmp_path, request):
    """The Hub copy's save_pretrained / push_to_hub / from_pretrained accept every parameter of PreTrainedModel's, by
    keyword and by position, on both transformers majors, and a save with all of PreTrainedModel's defaults is still
    projector-only (the Trainer passes some of them)."""
    python = sys.executable if major == "5.x" else request.getfixturevalue("compat_python")
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(tmp_path / "model", processor=processor)
    script = SCRIPTS / "standard_signatures.py"
    report = run_without_package(python, [str(script), str(tmp_path / "model")], tmp_path)
    assert report["transformers"].startswith("4.57" if major == "4.57" else "5.")
    assert {"is_main_process", "state_dict", "push_to_hub", "max_shard_size", "variant", "token"} <= set(
        report["bound"]["save_pretrained"]
    )
    for files in (report["saved"], *report["uploaded"]):
        assert [n for n in files if n.endswith(".safetensors")] == ["projector.safetensors"], files
    assert len(report["uploaded"]) == 1  # one commit


@pytest.mark.parametrize("major", [pytest.param("5.x", marks=only_on_transformers_5), "4.57"])
def test_whisper_checkpoints_load_their_encoder_exactly_and_missing_weights_are_refused(major, tmp_path, request):
    """Both Whisper layouts (`model.encoder.*`, `encoder.*`) load every encoder tensor on both transformers majors
    (4.57 once left them all random with a warning), and a checkpoint lacking encoder weights is an error."""
    python = sys.executable if major == "5.x" else request.getfixturevalue("compat_python")
    shutil.copytree(HUB_FOLDER, tmp_path / "speechllm_hub", ignore=shutil.ignore_patterns("__pycache__"))
    script = SCRIPTS / "whisper_encoder_loads.py"
    report = run_without_package(python, [str(script)], tmp_path)
    assert report["transformers"].startswith("4.57" if major == "4.57" else "5.")
    assert report["differing"] == {"WhisperForConditionalGeneration": [], "WhisperModel": []}
    assert report["refused"] and "lacks 15 of the weights" in report["refused"] and "layers.1." in report["refused"]


def test_damaged_or_moved_saves_say_which_file_what_is_wrong_and_what_to_do(saved, tmp_path):
    """Issue 19, item 3: errors that pointed the wrong way (transformers' "no file named model.safetensors", a raw
    SafetensorError, HFValidationError "Repo id must be ...")."""
    source = saved[0]

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        return folder

    folder = damaged("no-projector")
    os.remove(folder / "projector.safetensors")
    with pytest.raises(OSError, match=r"holds neither projector.safetensors .* nor model.safetensors .* incomplete"):
        SpeechLlmForConditionalGeneration.from_pretrained(folder)

    folder = damaged("lfs-pointer")
    (folder / "projector.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(OSError, match=r"projector.safetensors \(\d+ bytes\) is a Git LFS pointer.*git lfs pull"):
        SpeechLlmForConditionalGeneration.from_pretrained(folder)

    folder = damaged("truncated")
    data = (source / "projector.safetensors").read_bytes()
    (folder / "projector.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"projector.safetensors \(\d+ bytes\) is not readable.*Download it again"):
        SpeechLlmForConditionalGeneration.from_pretrained(folder)

    folder = damaged("moved-backbone")
    config = json.loads((folder / "config.json").read_text())
    config["encoder_name_or_path"] = str(tmp_path / "gone" / "hubert")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match=r"encoder of '.*gone/hubert': there is no such folder \(moved or deleted\?\)"):
        SpeechLlmForConditionalGeneration.from_pretrained(folder)


def test_a_full_save_missing_projector_weights_is_refused(tmp_path):
    """Issue 18, item 3: a full save loaded non-strictly, leaving a random projector with only a warning."""
    model = from_preset("tiny", projector_type="mlp")[0]
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "projector.linear_out.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 of the weights .*projector.linear_out.weight.*random"):
        SpeechLlmForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"projector.linear_out.weight"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_save_pretrained_with_push_to_hub_uploads_the_projector_only(local_backbones, hub_commits, tmp_path):
    """`save_pretrained(..., push_to_hub=True)` as PreTrainedModel takes it: save-only keywords (max_shard_size,
    safe_serialization on 5.x) stay with the save, upload ones (token, commit_message) reach the upload."""
    model, processor = trained_tiny(local_backbones)
    model.config.update(HUB_IDS)
    model.save_pretrained(
        tmp_path / "model",
        processor=processor,
        push_to_hub=True,
        repo_id="me/model",
        max_shard_size="1GB",
        safe_serialization=True,
        token="hf_token",
        commit_message="first projector",
    )
    (commit,) = hub_commits
    assert commit["repo_id"] == "me/model" and commit["files"] == set(os.listdir(tmp_path / "model"))
    assert [n for n in commit["files"] if n.endswith(".safetensors")] == ["projector.safetensors"]
