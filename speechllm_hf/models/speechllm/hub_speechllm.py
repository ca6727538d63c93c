"""Publishing a saved model: the check that its backbones can be loaded by others, the upload, the model card and
the pipeline entry a saved folder carries.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers (and what transformers
itself requires: huggingface_hub) and the standard library.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load
from transformers.utils import cached_file

from .configuration_speechllm import PIPELINE_TASK
from .loading_speechllm import LORA_FOLDER, PROJECTOR_WEIGHTS_NAME

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline_speechllm.py"
# The Auto classes, besides AutoModel, that transformers registers its own audio LLMs under (Qwen2-Audio, Voxtral,
# Granite Speech); a saved folder maps each to the model class. AutoModelForMultimodalLM is 5.x's; 4.57 ignores it.
# AutoModelForCausalLM is left out, as transformers leaves its audio LLMs out: it promises text-in, text-out.
AUTO_CLASSES = ("AutoModelForSpeechSeq2Seq", "AutoModelForSeq2SeqLM", "AutoModelForMultimodalLM")
# The config.json entry that lets `pipeline(model=...)` find the shipped pipeline class without a task name.
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": f"{PIPELINE_FILE.removesuffix('.py')}.SpeechLlmPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    }
}


def check_backbone_ids_are_public(folder: str | os.PathLike) -> None:
    """Refuse a saved folder whose config.json names its encoder or LLM by a local folder path.

    Raises:
        ValueError: naming the field to set to a Hub id; nobody else can load backbones from a path on this machine.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    for field in ("encoder_name_or_path", "text_name_or_path"):
        name = config.get(field)
        if name is None:
            continue
        try:
            validate_repo_id(name)
            is_local = os.path.isdir(name)
        except HFValidationError:
            is_local = True
        if is_local:
            raise ValueError(
                f"{folder}/config.json names the {field} {name!r}, a local folder: nobody else could load the model "
                f"from it. Publish with `speechllm-hf push --{field.split('_')[0]}_hub_id ID`, which checks the "
                f"folder against that Hub repo, or set model.config.{field} (and its revision) to its Hub id."
            )


# The keywords of `upload_folder` besides the folder, the repo and the file names.
UPLOAD_OPTIONS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    names: list[str],
    *,
    commit_message: str = "Upload speech LLM projector",
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create `repo_id` if needed and upload the files `names` of `folder` (a saved speech LLM) in one commit.

    Raises:
        ValueError: see `check_backbone_ids_are_public`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_backbone_ids_are_public(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [CommitOperationAdd(name, os.path.join(folder, name)) for name in names]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those that require a gradient with `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def llm_licence(name_or_path: str | None, revision: str | None, online: bool = False) -> str | None:
    """The `license` of the LLM's own model card front matter, when its README.md can be read (None otherwise):
    from its folder or the local Hub cache, and from the Hub only when `online` (when publishing; never when
    saving, which happens at every checkpoint)."""
    if not name_or_path:
        return None
    readme = cached_file(
        name_or_path,
        "README.md",
        revision=revision,
        local_files_only=not online,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return (metadata_load(readme) or {}).get("license") if readme else None


def model_card(model, repo_id: str | None = None, full_model: bool = False) -> str:
    """A README.md for a saved speech LLM: base models, what was trained, what the folder holds (projector only or
    `full_model`: every weight), sizes, memory, how to load, licence. Its front matter carries what the Hub reads;
    the LLM's licence is looked up on the Hub only when publishing (`repo_id` given)."""
    config = model.config
    repo = repo_id or "path/to/this/folder"

    def source(name_or_path: str | None, revision: str | None) -> str:
        if full_model:
            return "this repository" + (f" (initialised from `{name_or_path}`)" if name_or_path else "")
        return f"`{name_or_path}` (revision `{revision or 'default'}`)"

    if full_model:
        holds = (
            "all the weights (encoder, projector and LLM, in `model*.safetensors`), the configuration, the processor "
            "files and the model code: it loads without downloading the base models."
        )
    else:
        adapter = f" and the LLM's LoRA adapter (`{LORA_FOLDER}/`)" if model.has_lora else ""
        holds = (
            f"only the projector weights (`{PROJECTOR_WEIGHTS_NAME}`){adapter}, the configuration, the processor "
            "files and the model code: the encoder and the LLM are downloaded from their own repositories at the "
            "revisions recorded in `config.json`."
        )
    text = f"`{config.text_name_or_path}`" if config.text_name_or_path else "the LLM saved here"
    trained = "LoRA adapter" if model.has_lora else "no"
    parts = ("encoder", "projector", "language_model")
    sizes = {name: _human(count_parameters(getattr(model, name))) for name in parts}
    total = count_parameters(model)
    bytes_per_parameter = torch.finfo(model.language_model.dtype).bits // 8
    memory = total * bytes_per_parameter * 1.2 / 2**30  # weights + ~20% for activations and the KV cache
    base_models = [m for m in (config.encoder_name_or_path, config.text_name_or_path) if m and not os.path.isdir(m)]
    licence = llm_licence(config.text_name_or_path, config.text_revision, online=repo_id is not None)
    # A projector-only repo adapts its base models; a full save holds their weights, trained further or not.
    relation = ("finetune" if full_model else "adapter") if base_models else None
    front = ModelCardData(
        library_name="transformers",
        pipeline_tag="audio-text-to-text",
        license=licence,
        base_model=base_models or None,
        base_model_relation=relation,
        tags=["speechllm_hf", "speech-llm"],
    )
    return f"""---
{front.to_yaml()}
---

# Speech LLM ({config.projector_type} projector)

A speech LLM built with [speechllm_hf](https://github.com/speechllm-hf/speechllm_hf): a frozen speech encoder feeds a
trained **{config.projector_type}** projector whose outputs are spliced into the input of a frozen causal LLM.

| part | source | parameters | trained |
|---|---|---|---|
| encoder | {source(config.encoder_name_or_path, config.encoder_revision)} | {sizes["encoder"]} | no |
| projector | this repository | {sizes["projector"]} | yes |
| LLM | {source(config.text_name_or_path, config.text_revision)} | {sizes["language_model"]} | {trained} |

Total {_human(total)} parameters; running it in {model.language_model.dtype} needs about {memory:.1f} GiB of
accelerator memory. This repository holds {holds}

## Use

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
conversation = [{{"role": "user", "content": [{{"type": "audio", "path": "clip.wav"}},
                                             {{"type": "text", "text": "\\nTranscribe."}}]}}]
inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=128), skip_special_tokens=True))
```

`trust_remote_code=True` runs the Python files of this repository; pin `code_revision=` to a commit you have read.
`AutoModelForSpeechSeq2Seq`, `AutoModelForSeq2SeqLM` (and on transformers 5.x `AutoModelForMultimodalLM`) load the same
class, as for transformers' own audio LLMs; `AutoModelForCausalLM` does not, as it promises text in and text out: use
`AutoModel`. Build inputs with the processor: a plain `AutoTokenizer` does not expand the audio placeholder into the
audio tokens the model fills, so the model would refuse its inputs.

## Licence

The projector is released with this repository; the licences of the base models apply to their weights and to the
combined model, in particular the LLM's licence ({text}).
"""


def write_hub_entries(save_directory: str | os.PathLike) -> None:
    """Completes the saved config.json (not the live config: see `forget_pipeline_entry`) with what the Hub and
    transformers read from it: the Auto classes besides AutoModel that map to the model (`AUTO_CLASSES`), and the
    shipped pipeline class under `custom_pipelines`, so that `pipeline(model=folder, trust_remote_code=True)` finds
    it without a task name.

    The model code imports the pipeline module, so transformers copies it into its module cache when the model is
    loaded and into every folder the model is saved to, a model loaded from the Hub included.
    """
    path = os.path.join(save_directory, "config.json")
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    auto_map = saved.get("auto_map", {})
    if "AutoModel" in auto_map:
        for name in AUTO_CLASSES:
            auto_map.setdefault(name, auto_map["AutoModel"])
    if os.path.isfile(os.path.join(save_directory, PIPELINE_FILE)):
        saved["custom_pipelines"] = CUSTOM_PIPELINES
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def forget_pipeline_entry(config) -> None:
    """Drops a loaded `custom_pipelines` entry: transformers' `pipeline()` would otherwise insist on loading the
    pipeline class from the repo (by name, with trust_remote_code) even for a model object already in memory."""
    if "custom_pipelines" in vars(config):
        del config.custom_pipelines


__all__ = [
    "AUTO_CLASSES",
    "UPLOAD_OPTIONS",
    "CUSTOM_PIPELINES",
    "PIPELINE_FILE",
    "check_backbone_ids_are_public",
    "count_parameters",
    "forget_pipeline_entry",
    "model_card",
    "write_hub_entries",
    "upload_folder",
]
