"""Publishing a saved folder (a trained model or a Trainer output) to the Hub: only the files that belong there,
and, for a model trained on local backbone folders, under the backbones' Hub ids.

`upload_saved_folder` uploads a saved folder without its training state (optimizer, scheduler, RNG state,
completeness marker), refusing backbone weights unless allowed.

A projector-only save records its encoder and LLM by the paths it loaded them from; `push` refuses local paths,
since nobody else can load them. `hub_backbones_copy` writes a copy of the saved folder whose config.json names Hub
ids instead (each pinned to the commit it resolves to), after checking every local weight against that Hub repo:
same bytes where the Hub's file hashes allow it, else same tensor names and shapes (a folder converted from another
format or dtype has the shapes but not the bytes, and the model card says so). `speechllm-hf push --encoder_hub_id
... --text_hub_id ...` publishes through it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

from safetensors import safe_open

from .models.speechllm.hub_speechllm import upload_folder
from .models.speechllm.loading_speechllm import LORA_FOLDER, PROJECTOR_WEIGHTS_NAME
from .training.checkpoints import COMPLETE_MARKER
from .training.run_lock import LOCK_FILE
from .training.run_record import RUN_RECORD

logger = logging.getLogger(__name__)

FIELDS = {"encoder": ("encoder_name_or_path", "encoder_revision"), "text": ("text_name_or_path", "text_revision")}


# What a Trainer checkpoint holds besides the model: never published, and left out without a word.
TRAINING_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
    COMPLETE_MARKER,
    RUN_RECORD,
    LOCK_FILE,
)
# The files a save of this library writes (model, processor, card) and so publishes. Code files are those of the
# model folder; tokenizer files those the tokenizers of transformers write, whichever kind the LLM has.
MODEL_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "speechllm")
PUBLISHED_FILES = (
    {"config.json", "generation_config.json", "README.md", PROJECTOR_WEIGHTS_NAME}
    | {"preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json"}
    | {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"}
    | {"vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model"}
    | {name for name in os.listdir(MODEL_FOLDER) if name.endswith("_speechllm.py")}
    | {f"{LORA_FOLDER}/adapter_config.json", f"{LORA_FOLDER}/adapter_model.safetensors", f"{LORA_FOLDER}/README.md"}
)
FULL_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def publishable_files(
    folder: str | os.PathLike, allow_full_model: bool = False, extra_files: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """The files of a saved model folder that go to the Hub: those this library writes (`PUBLISHED_FILES`, full
    weights with `allow_full_model`), as regular files, plus each of `extra_files` the caller names. Training state
    (`TRAINING_STATE`, RNG states) and sub-folders such as `checkpoint-*` are left out.

    Raises:
        ValueError: when the folder is no saved speech LLM, holds backbone weights and `allow_full_model` is off, or
            holds any other file (a `.env`, a key, a pickled `pytorch_model.bin`, a symbolic link): each is named,
            and none is uploaded unless named in `extra_files`.
    """
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder} is not a folder: give the folder that save_pretrained (or a training checkpoint) wrote."
        )
    names = sorted(
        n
        for n in os.listdir(folder)
        if not os.path.isdir(os.path.join(folder, n)) or os.path.islink(os.path.join(folder, n))
    )
    if os.path.isdir(os.path.join(folder, LORA_FOLDER)) and not os.path.islink(os.path.join(folder, LORA_FOLDER)):
        names += sorted(f"{LORA_FOLDER}/{n}" for n in os.listdir(os.path.join(folder, LORA_FOLDER)))
    names = [n for n in names if n not in TRAINING_STATE and not re.fullmatch(r"rng_state(_\d+)?\.pth", n)]
    full = [n for n in names if FULL_WEIGHTS.fullmatch(n)]
    if "config.json" not in names or not (PROJECTOR_WEIGHTS_NAME in names or full):
        raise ValueError(f"{folder} is not a saved speech LLM (no config.json with projector or model weights).")
    if full and not allow_full_model:
        raise ValueError(
            f"{folder} holds full model weights ({', '.join(full)}), encoder and LLM included. Publish a "
            "projector-only save instead, or allow full weights explicitly (allow_full_model / --allow_full_model)."
        )
    refused = {name: why for name in names if (why := _refusal(folder, name, name in extra_files or name in full))}
    if refused:
        listed = "; ".join(f"{name} ({why})" for name, why in refused.items())
        raise ValueError(
            f"{folder} holds files that are not published without being named: {listed}. Nothing was uploaded. "
            "Move them out of the folder, or name each one to upload (extra_files= / --extra_file NAME); a link "
            "or a special file is never uploaded: copy the file itself into the folder."
        )
    missing = [name for name in extra_files if name not in names]
    if missing:
        raise ValueError(f"extra_files names files that {folder} does not hold: {', '.join(missing)}.")
    _check_readable(folder, [name for name in names if name.endswith(".safetensors")])
    return names


def _refusal(folder: str | os.PathLike, name: str, named: bool) -> str | None:
    """Why `name` may not be uploaded, or None: a link (it may point anywhere, even when named) or a special file
    (a FIFO would block the upload) never is; another file only when this library writes it or the caller names it."""
    path = os.path.join(folder, name)
    if os.path.islink(path):
        return "a symbolic link"
    if not os.path.isfile(path):
        return "not a regular file"
    return None if named or name in PUBLISHED_FILES else "not a file this library writes"


def _check_readable(folder: str | os.PathLike, weights: list[str]) -> None:
    """A broken weight file would be published and fail every load: its safetensors header must read, and
    config.json must be a JSON object."""
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as file:
                file.keys()
        except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError depending on the damage
            raise ValueError(
                f"{name} in {folder} cannot be read as safetensors ({err}): save the model again."
            ) from err
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config.json in {folder} is not valid JSON ({err}): save the model again.") from err
    if not isinstance(config, dict):
        raise ValueError(f"config.json in {folder} holds a {type(config).__name__}, not a config object.")


def upload_saved_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    allow_full_model: bool = False,
    extra_files: tuple[str, ...] | list[str] = (),
    **hub_kwargs,
):
    """Create `repo_id` if needed and upload the publishable files of `folder` (see `publishable_files`) in one
    commit.

    `hub_kwargs` (commit_message, commit_description, private, token, revision, create_pr) go to the upload.

    Raises:
        ValueError: see `publishable_files` and `check_backbone_ids_are_public`.
    """
    return upload_folder(folder, repo_id, publishable_files(folder, allow_full_model, extra_files), **hub_kwargs)


@dataclass
class BackboneCheck:
    """How a local backbone folder compares with the Hub repo named for it."""

    part: str  # "encoder" or "text"
    local_folder: str
    repo_id: str
    revision: str  # the commit the repo's revision resolved to
    same_bytes: bool

    def describe(self) -> str:
        if self.same_bytes:
            return f"{self.part}: {self.local_folder} holds the safetensors bytes of {self.repo_id}@{self.revision}"
        return (
            f"{self.part}: {self.local_folder} has the tensor names and shapes of {self.repo_id}@{self.revision} but "
            "other bytes (another dtype, a conversion or fine-tuned weights): the projector was trained on these"
        )


def _sha256(path: str) -> str:
    from huggingface_hub.utils.sha import sha_fileobj  # the digest the Hub records for LFS files

    with open(path, "rb") as file:
        return sha_fileobj(file).hex()


def _local_shapes(folder: str, files: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as weights:
            shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
    return shapes


def check_hub_backbone(
    part: str, local_folder: str, repo_id: str, revision: str | None = None, token: str | bool | None = None
) -> BackboneCheck:
    """Compare the safetensors weights of `local_folder` with those of the Hub repo `repo_id` at `revision`.

    Raises:
        ValueError: when the local folder holds no safetensors weights, or a local tensor is missing from the Hub
            repo or has another shape there (the id names another checkpoint).
    """
    from huggingface_hub import HfApi

    files = sorted(n for n in os.listdir(local_folder) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{local_folder} holds no .safetensors weights to check against {repo_id}.")
    api = HfApi(token=token)
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    hub_hashes = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs is not None}
    if all(hub_hashes.get(name) == _sha256(os.path.join(local_folder, name)) for name in files):
        return BackboneCheck(part, local_folder, repo_id, info.sha, same_bytes=True)
    # Other bytes: the local tensors must still be the repo's, by name and shape (tied weights the Hub file holds and
    # the local one does not are no mismatch).
    remote = api.get_safetensors_metadata(repo_id, revision=info.sha)
    remote_shapes = {
        key: tuple(tensor.shape) for meta in remote.files_metadata.values() for key, tensor in meta.tensors.items()
    }
    local_shapes = _local_shapes(local_folder, files)
    wrong = [
        f"{key} {shape} (Hub: {remote_shapes.get(key, 'missing')})"
        for key, shape in local_shapes.items()
        if remote_shapes.get(key) != shape
    ]
    if wrong:
        raise ValueError(
            f"{local_folder} does not hold the weights of {repo_id}@{info.sha}: {len(wrong)} of its "
            f"{len(local_shapes)} tensors are missing there or shaped otherwise ({'; '.join(wrong[:3])}). "
            f"Name the Hub repo the {part} was converted or downloaded from."
        )
    return BackboneCheck(part, local_folder, repo_id, info.sha, same_bytes=False)


def _card_with_hub_backbones(card: str, old: dict, new: dict, checks: list[BackboneCheck]) -> str:
    """The saved model card with the old backbone sources replaced by the new ones (as `model_card` writes them)."""
    for path_field, revision_field in FIELDS.values():
        before = f"`{old[path_field]}` (revision `{old.get(revision_field) or 'default'}`)"
        card = card.replace(before, f"`{new[path_field]}` (revision `{new.get(revision_field) or 'default'}`)")
        card = card.replace(f"`{old[path_field]}`", f"`{new[path_field]}`")  # e.g. the licence line
    base_models = "".join(
        f"- {new[path_field]}\n"
        for path_field, _ in FIELDS.values()
        if new[path_field] and not os.path.isdir(new[path_field])
    )
    card = re.sub(r"\nbase_model:\n(- .*\n)*", "\n", card, count=1)
    if base_models:
        card = card.replace("- speech-llm\n---\n", f"- speech-llm\nbase_model:\n{base_models}---\n", 1)
    differ = [check for check in checks if not check.same_bytes]
    if differ:
        note = "".join(f"\n- {check.describe()}." for check in differ)
        card += f"\n## Training weights\n\nThe projector was trained on local copies of the base models:{note}\n"
    return card


def hub_backbones_copy(
    folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    encoder_id: str | None = None,
    encoder_revision: str | None = None,
    text_id: str | None = None,
    text_revision: str | None = None,
    token: str | bool | None = None,
    allow_full_model: bool = False,
    extra_files: tuple[str, ...] | list[str] = (),
) -> list[BackboneCheck]:
    """Write to `output_dir` the publishable files of the saved model `folder`, with config.json (and the model card)
    naming the given Hub ids for its backbones, pinned to the commits their revisions resolve to. `folder` itself is
    left as it is, so it keeps loading from the local backbones offline.

    Each backbone whose config entry is a local folder is checked with `check_hub_backbone` first; an id given for a
    backbone the config already names by a Hub id replaces it without a check (there is nothing local to compare).

    Returns:
        The checks made, one per backbone given.
    """
    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    old = dict(config)
    checks = []
    given = {"encoder": (encoder_id, encoder_revision), "text": (text_id, text_revision)}
    for part, (repo_id, revision) in given.items():
        if repo_id is None:
            continue
        path_field, revision_field = FIELDS[part]
        local = config.get(path_field)
        if local and os.path.isdir(local):
            check = check_hub_backbone(part, local, repo_id, revision, token)
            checks.append(check)
            logger.info(check.describe())
            revision = check.revision
        else:
            logger.warning("%s: %r is no local folder, so %s is not checked against it.", part, local, repo_id)
        config[path_field], config[revision_field] = repo_id, revision
    os.makedirs(output_dir, exist_ok=True)
    for name in publishable_files(folder, allow_full_model, extra_files):
        os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
        shutil.copyfile(os.path.join(folder, name), os.path.join(output_dir, name))
    with open(os.path.join(output_dir, "config.json"), "w") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")
    card = os.path.join(output_dir, "README.md")
    if os.path.exists(card):
        with open(card) as file:
            text = file.read()
        with open(card, "w") as file:
            file.write(_card_with_hub_backbones(text, old, config, checks))
    return checks


__all__ = [
    "PUBLISHED_FILES",
    "TRAINING_STATE",
    "BackboneCheck",
    "check_hub_backbone",
    "hub_backbones_copy",
    "publishable_files",
    "upload_saved_folder",
]
