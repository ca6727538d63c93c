"""Publishing bad input (issue 18): what `push`, `model.push_to_hub` and `trainer.push_to_hub` refuse to upload, and
how a folder that cannot be published is explained. Each case asserts the message and that nothing left this
machine.

The Hub is stood in for by the `hub_commits` fixture of tests/conftest.py: HfApi.create_repo and HfApi.create_commit
(the one call that uploads) are intercepted and each commit's file list is recorded.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import HUB_IDS, copy_saved, trained_tiny, trainer_of, with_hub_ids
from safetensors.torch import save_file

from speechllm_hf import from_preset
from speechllm_hf.cli import main


@pytest.fixture(scope="module")
def saved(local_backbones, tmp_path_factory):
    """A projector-only save of the tiny model trained on local backbone folders, and the model and processor."""
    folder = tmp_path_factory.mktemp("saved")
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(folder, processor=processor)
    return folder, None, model, processor


def push(folder: Path, *extra: str) -> int:
    return main(["push", "--model", str(folder), "--repo_id", "me/model", *extra])


def test_links_and_special_files_are_never_uploaded_even_when_named(saved, hub_commits, tmp_path):
    """A link named with --extra_file would upload whatever it points to, outside the folder; a FIFO would block the
    upload (huggingface_hub reads it): both are refused by name, named or not."""
    outside = tmp_path / "secret.txt"
    outside.write_text("private")
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "link"))
    (folder / "LICENSE").symlink_to(outside)
    with pytest.raises(ValueError, match=r"LICENSE \(a symbolic link\).*never uploaded: copy the file itself"):
        push(folder, "--extra_file", "LICENSE")
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "fifo"))
    os.remove(folder / "README.md")
    os.mkfifo(folder / "README.md")
    with pytest.raises(ValueError, match=r"README.md \(not a regular file\)"):
        push(folder)
    assert hub_commits == []


def test_extra_files_outside_the_folder_are_refused(saved, hub_commits, tmp_path):
    (tmp_path / "secret.txt").write_text("private")
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "model"))
    with pytest.raises(ValueError, match=r"does not hold: \.\./secret.txt"):
        push(folder, "--extra_file", "../secret.txt")
    assert hub_commits == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_pushing_something_that_is_no_folder_is_explained(hub_commits, tmp_path, kind):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("not a folder")
    with pytest.raises(ValueError, match="is not a folder: give the folder that save_pretrained"):
        push(target)
    assert hub_commits == []


def test_a_damaged_weight_file_or_config_is_not_published(saved, hub_commits, tmp_path):
    """A truncated projector.safetensors or an unparsable config.json would publish a model nobody can load."""
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "truncated"))
    weights = (folder / "projector.safetensors").read_bytes()
    (folder / "projector.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"projector.safetensors in .* cannot be read as safetensors"):
        push(folder)
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "config"))
    (folder / "config.json").write_text('{"model_type": "speechllm_hf",')
    with pytest.raises(ValueError, match=r"config.json in .* is not valid JSON"):
        push(folder)
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "list"))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json in .* holds a list, not a config object"):
        push(folder)
    assert hub_commits == []


def test_a_folder_without_projector_or_config_is_no_saved_model(saved, hub_commits, tmp_path):
    for missing in ("projector.safetensors", "config.json"):
        folder = with_hub_ids(copy_saved(saved[0], tmp_path / missing))
        os.remove(folder / missing)
        with pytest.raises(ValueError, match=r"is not a saved speech LLM \(no config.json with projector"):
            push(folder)
    assert hub_commits == []


def test_a_stray_file_in_the_lora_folder_or_a_linked_lora_folder_is_refused(saved, hub_commits, tmp_path):
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "linked-lora"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "adapter_config.json").write_text("{}")
    (folder / "lora").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"lora \(a symbolic link\)"):
        push(folder)
    assert hub_commits == []


def test_push_uploads_only_what_the_library_writes(saved, hub_commits, tmp_path):
    """Issue 18, item 1. The Hub is stood in for by `hub_commits` (HfApi.create_repo / create_commit intercepted,
    each commit's file list recorded): secrets, a pickled full model, stray adapter files and a symbolic link that
    leaves the folder are refused by name and nothing is uploaded; a file the user names explicitly goes up."""
    from speechllm_hf.cli import main

    outside = tmp_path / "outside.txt"
    outside.write_text("private notes")
    strays = {
        ".env": "HF_TOKEN=hf_secret",
        "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "pytorch_model.bin": "pickle",
        "lora/notes.txt": "scratch",
    }
    for name, text in strays.items():
        folder = with_hub_ids(copy_saved(saved[0], tmp_path / name.replace("/", "-")))
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(name)} \(not a file this library writes\).*Nothing was"):
            main(["push", "--model", str(folder), "--repo_id", "me/model"])
    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "link"))
    (folder / "notes.txt").symlink_to(outside)
    with pytest.raises(ValueError, match=r"notes.txt \(a symbolic link\)"):
        main(["push", "--model", str(folder), "--repo_id", "me/model"])
    assert hub_commits == []  # nothing left this machine

    folder = with_hub_ids(copy_saved(saved[0], tmp_path / "named"))
    (folder / "LICENSE").write_text("Apache-2.0")
    assert main(["push", "--model", str(folder), "--repo_id", "me/model", "--extra_file", "LICENSE"]) == 0
    assert hub_commits[-1]["files"] == set(os.listdir(saved[0])) | {"LICENSE"}


def test_cli_push_leaves_training_state_out_and_refuses_full_weights(saved, hub_commits, tmp_path):
    from speechllm_hf.cli import main

    checkpoint = with_hub_ids(copy_saved(saved[0], tmp_path / "checkpoint-10"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "checkpoint_complete.json"):
        (checkpoint / name).write_bytes(b"state")
    assert main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt"]) == 0
    assert hub_commits[-1]["files"] == set(os.listdir(saved[0]))

    save_file({"weight": torch.zeros(1)}, checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match="holds full model weights"):
        main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt"])
    assert main(["push", "--model", str(checkpoint), "--repo_id", "me/ckpt", "--allow_full_model"]) == 0
    assert "model.safetensors" in hub_commits[-1]["files"]


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


def test_trainer_push_to_hub_argument_is_refused(tmp_path):
    model, processor = from_preset("tiny")
    with pytest.raises(ValueError, match=r"push_to_hub=True uploads the output folder as it is.*speechllm-hf push"):
        trainer_of(model, processor, tmp_path, push_to_hub=True, hub_model_id="me/run")
