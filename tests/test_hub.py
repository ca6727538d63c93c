"""Projector-only publishing: the saved file set, strict loading, round trips without the package, push_to_hub."""

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clip
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, pipeline

from speechllm_hf import from_preset

REPO = Path(__file__).resolve().parents[1]
HUB_FOLDER = REPO / "speechllm_hf" / "models" / "speechllm"
LOADER = Path(__file__).parent / "scripts" / "load_without_package.py"
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
}
COMPAT_TRANSFORMERS = "4.57.6"


def trained_tiny(local_backbones, **kwargs):
    """A tiny model whose backbones come from local folders and whose projector is not at its initial values."""
    model, processor = from_preset(
        "tiny",
        encoder_name_or_path=str(local_backbones / "hubert"),
        text_name_or_path=str(local_backbones / "llm"),
        **kwargs,
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.projector.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval(), processor


@pytest.fixture(scope="module")
def saved(local_backbones, tmp_path_factory):
    """A projector-only save plus the outputs the original model gives, for comparison in other processes."""
    folder = tmp_path_factory.mktemp("saved")
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(folder, processor=processor)
    texts = ["<|user|><audio> hi<|end|><|assistant|>", "<|user|>x <audio><|end|><|assistant|>"]
    clips = [clip(0.9), clip(0.5, 1)]
    inputs = processor(texts, audio=clips, sampling_rate=16000)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    # What the in-process "speech-llm" pipeline answers (default prompt); the shipped one must answer the same.
    pipeline_text = pipeline("speech-llm", model=model, processor=processor)(
        clips[0], sampling_rate=16000, max_new_tokens=8
    )
    expected = folder.parent / "expected.npz"
    np.savez(
        expected,
        texts=json.dumps(texts),
        num_clips=len(clips),
        clip0=clips[0],
        clip1=clips[1],
        logits=logits.numpy(),
        generated=generated.numpy(),
        pipeline_text=pipeline_text["generated_text"],
        **{k: v.numpy() for k, v in inputs.items()},
    )
    return folder, expected, model, processor


def test_saved_folder_holds_exactly_the_expected_files(saved, tmp_path):
    folder, _, _, processor = saved
    processor.save_pretrained(tmp_path)
    processor_files = set(os.listdir(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= processor_files
    assert set(os.listdir(folder)) == MODEL_FILES | processor_files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_speechllm.SpeechLlmConfig",
        "AutoModel": "modeling_speechllm.SpeechLlmForConditionalGeneration",
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


def run_loader(python: str, folder: Path, expected: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(folder.parent / f"modules-{Path(python).parent.parent.name}")
    result = subprocess.run(
        [python, str(LOADER), str(folder), str(expected)],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder.parent,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attn_implementation"] == ["eager", "eager"] and report["dtypes"] == ["torch.bfloat16"]
    return report


def test_round_trip_without_the_package_on_transformers_5(saved):
    folder, expected, _, _ = saved
    report = run_loader(sys.executable, folder, expected)
    assert report["transformers"].startswith("5.") and report["model_class"].startswith("transformers_modules")


@pytest.fixture(scope="session")
def compat_python() -> str:
    """A virtualenv with transformers 4.57 and without speechllm_hf (created once, reused across runs)."""
    venv = REPO / f".venv-transformers-{COMPAT_TRANSFORMERS}"
    python = venv / "bin" / "python"
    with FileLock(str(venv) + ".lock"):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "torch==2.13.0",
                    f"transformers=={COMPAT_TRANSFORMERS}",
                    "soundfile",
                    "soxr",
                ],
                check=True,
            )
    return str(python)


def test_round_trip_without_the_package_on_transformers_4_57(saved, compat_python):
    folder, expected, _, _ = saved
    report = run_loader(compat_python, folder, expected)
    assert report["transformers"] == COMPAT_TRANSFORMERS


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


def copy_saved(folder: Path, target: Path) -> Path:
    target.mkdir(exist_ok=True)
    for name in os.listdir(folder):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


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


@pytest.fixture
def hub_commits(monkeypatch):
    """No network here: HfApi.create_repo and HfApi.create_commit (the one call that uploads) are intercepted and
    each commit's files are recorded."""
    from huggingface_hub import HfApi, RepoUrl

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append({"repo_id": repo_id, "files": {op.path_in_repo for op in operations}})
        return "commit"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


HUB_IDS = {"encoder_name_or_path": "someone/hubert-tiny", "text_name_or_path": "someone/llama-tiny"}


def with_hub_ids(folder: Path) -> Path:
    """The saved backbones are local folders; a folder to publish must name them by Hub ids."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **HUB_IDS}))
    return folder


def test_push_to_hub_sends_exactly_the_saved_files(saved, hub_commits, monkeypatch):
    import yaml

    folder, _, model, processor = saved
    for field, hub_id in HUB_IDS.items():
        monkeypatch.setattr(model.config, field, hub_id)
    model.push_to_hub("me/tiny-speechllm", processor=processor)
    assert hub_commits == [{"repo_id": "me/tiny-speechllm", "files": set(os.listdir(folder))}]
    card = (folder / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["speechllm_hf", "speech-llm"]  # valid card metadata


def test_publishing_refuses_backbones_named_by_local_folders(saved, hub_commits, tmp_path):
    from speechllm_hf.cli import main

    folder, _, model, processor = saved
    with pytest.raises(ValueError, match=r"names the encoder_name_or_path '.*hubert', a local folder.*Hub id"):
        model.push_to_hub("me/tiny-speechllm", processor=processor)
    copy = copy_saved(folder, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "encoder_name_or_path": HUB_IDS["encoder_name_or_path"]}))
    with pytest.raises(ValueError, match=r"names the text_name_or_path '.*llm', a local folder"):
        main(["push", "--model", str(copy), "--repo_id", "me/ckpt"])
    assert hub_commits == []


def test_pushing_backbones_without_an_id_needs_save_full_model(hub_commits):
    model, processor = from_preset("tiny")
    with pytest.raises(ValueError, match="no Hub id to be loaded from .* save_full_model=True"):
        model.push_to_hub("me/tiny", processor=processor)
    assert hub_commits == []
    model.push_to_hub("me/tiny", processor=processor, save_full_model=True)
    assert "model.safetensors" in hub_commits[0]["files"] and "projector.safetensors" not in hub_commits[0]["files"]


def test_cli_push_leaves_training_state_out_and_refuses_full_weights(saved, hub_commits, tmp_path):
    from speechllm_hf.cli import main

    checkpoint = with_hub_ids(copy_saved(saved[0], tmp_path / "checkpoint-10"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "checkpoint_complete.json"):
        (checkpoint / name).write_bytes(b"state")
    assert main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt"]) == 0
    assert hub_commits[-1]["files"] == set(os.listdir(saved[0]))

    (checkpoint / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds full model weights"):
        main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt"])
    assert main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt", "--allow_full_model"]) == 0
    assert "model.safetensors" in hub_commits[-1]["files"]


def test_hub_folder_imports_only_torch_transformers_and_stdlib():
    allowed = {"torch", "transformers", "numpy", "huggingface_hub", "safetensors", "tokenizers", "packaging"}
    allowed |= set(sys.stdlib_module_names) | {"__future__"}
    for path in HUB_FOLDER.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] in allowed for alias in node.names), (path.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and "." not in (node.module or ""), (path.name, node.lineno)
                else:
                    assert node.module.split(".")[0] in allowed, (path.name, node.module)
