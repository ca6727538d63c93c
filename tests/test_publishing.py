"""Publishing a model trained on local backbone folders under Hub ids (`push --encoder_hub_id/--text_hub_id`): each
folder is checked against the Hub repo it is said to hold (bytes, else tensor names and shapes), the uploaded copy's
config and card name the ids pinned to a commit, and the saved folder itself is left loading from the local paths.

No network here: the Hub's answers (file hashes, safetensors headers) are served from local folders standing in for
the repos, and the upload is recorded instead of sent."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import trained_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from speechllm_hf.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch):
    """`repos`: Hub id -> local folder serving its files; `commits`: what each upload would have sent (the config
    and card as text)."""
    from huggingface_hub import HfApi, RepoUrl

    repos: dict[str, Path] = {}
    commits: list[dict] = []

    def safetensors_files(repo_id):
        return sorted(repos[repo_id].glob("*.safetensors"))

    def model_info(self, repo_id, revision=None, files_metadata=False, **kwargs):
        siblings = [
            SimpleNamespace(rfilename=f.name, lfs=SimpleNamespace(sha256=hashlib.sha256(f.read_bytes()).hexdigest()))
            for f in safetensors_files(repo_id)
        ]
        return SimpleNamespace(sha=COMMIT, siblings=siblings)

    def get_safetensors_metadata(self, repo_id, revision=None, **kwargs):
        assert revision == COMMIT  # shapes are read at the commit the revision resolved to
        files = {}
        for path in safetensors_files(repo_id):
            with safe_open(path, framework="pt") as weights:
                tensors = {k: SimpleNamespace(shape=list(weights.get_slice(k).get_shape())) for k in weights.keys()}
            files[path.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    def create_commit(self, repo_id, operations, **kwargs):
        sent = {op.path_in_repo: op.path_or_fileobj for op in operations}
        commits.append(
            {
                "files": set(sent),
                "config": json.loads(Path(sent["config.json"]).read_text()),
                "card": Path(sent["README.md"]).read_text(),
            }
        )
        return "commit"

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return SimpleNamespace(repos=repos, commits=commits)


@pytest.fixture
def saved(local_backbones, tmp_path):
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(tmp_path / "model", processor=processor)
    return tmp_path / "model"


def push(folder: Path, *extra: str) -> int:
    return main(["push", "--model", str(folder), "--repo_id", "me/speechllm", *extra])


IDS = ["--encoder_hub_id", "someone/hubert", "--text_hub_id", "someone/llama"]


def test_push_with_hub_ids_checks_the_weights_and_pins_the_commits(saved, local_backbones, hub, capsys):
    hub.repos.update({"someone/hubert": local_backbones / "hubert", "someone/llama": local_backbones / "llm"})
    before = (saved / "config.json").read_text()
    assert push(saved, *IDS) == 0
    assert "holds the safetensors bytes of someone/hubert@" + COMMIT in capsys.readouterr().out
    [commit] = hub.commits
    config, card = commit["config"], commit["card"]
    assert (config["encoder_name_or_path"], config["encoder_revision"]) == ("someone/hubert", COMMIT)
    assert (config["text_name_or_path"], config["text_revision"]) == ("someone/llama", COMMIT)
    assert f"`someone/hubert` (revision `{COMMIT}`)" in card and f"`someone/llama` (revision `{COMMIT}`)" in card
    assert "base_model:\n- someone/hubert\n- someone/llama\n---" in card
    assert str(local_backbones) not in card and "Training weights" not in card
    assert "projector.safetensors" in commit["files"]
    assert (saved / "config.json").read_text() == before  # the saved folder still loads offline from the folders


def test_push_with_a_converted_backbone_says_so_in_the_card(saved, local_backbones, hub, tmp_path, capsys):
    # The Hub repo's LLM weights in float16: the names and shapes of the local folder, other bytes.
    hub_llm = tmp_path / "hub-llama"
    shutil.copytree(local_backbones / "llm", hub_llm)
    weights = load_file(hub_llm / "model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, hub_llm / "model.safetensors")
    hub.repos.update({"someone/hubert": local_backbones / "hubert", "someone/llama": hub_llm})
    assert push(saved, *IDS) == 0
    assert "has the tensor names and shapes of someone/llama@" in capsys.readouterr().out
    card = hub.commits[0]["card"]
    assert "## Training weights" in card and "other bytes" in card and "someone/hubert" not in card.split("##")[-1]


def test_push_refuses_an_id_whose_weights_do_not_fit(saved, local_backbones, hub):
    hub.repos.update({"someone/hubert": local_backbones / "whisper", "someone/llama": local_backbones / "llm"})
    with pytest.raises(ValueError, match=r"hubert does not hold the weights of someone/hubert@.*shaped otherwise"):
        push(saved, *IDS)
    assert hub.commits == []


def test_push_with_only_one_id_still_refuses_the_other_local_folder(saved, local_backbones, hub):
    hub.repos["someone/hubert"] = local_backbones / "hubert"
    with pytest.raises(ValueError, match=r"names the text_name_or_path '.*llm', a local folder.*--text_hub_id"):
        push(saved, *IDS[:2])
    assert hub.commits == []
