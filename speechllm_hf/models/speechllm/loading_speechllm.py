"""Loading and saving around the model: the backbones (from their own repos, at recorded revisions) and
projector-only checkpoints (the projector's tensors and, when fine-tuned with LoRA, the LLM's adapter).

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers (and what transformers
itself requires: safetensors, huggingface_hub) and the standard library; peft only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import cached_file
from transformers.utils.hub import extract_commit_hash

from .compat_speechllm import WHISPER_ENCODER_KEY_MAPPING, dtype_from_auto_config, requested_dtype
from .configuration_speechllm import SpeechLlmConfig
from .modules_speechllm import SpeechLlmWhisperEncoder

logger = logging.getLogger(__name__)

PROJECTOR_WEIGHTS_NAME = "projector.safetensors"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what a full save writes, unsharded or sharded
LORA_FOLDER = "lora"  # a peft adapter of the LLM, saved beside the projector when fine-tuned with LoRA
# Arguments of `from_pretrained` that locate files of this repo (the projector checkpoint itself).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")
# Arguments passed on to the backbones' own `from_pretrained`. `revision` is not among them: each backbone is
# loaded at the revision its config records.
BACKBONE_KWARGS = (
    "dtype",
    "torch_dtype",
    "device_map",
    "max_memory",
    "offload_folder",
    "attn_implementation",
    "quantization_config",
    "encoder_quantization_config",
    "low_cpu_mem_usage",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
)


def quantized_backbones(model) -> list[str]:
    """The names of the backbones (`encoder`, `language_model`) that were loaded with a `quantization_config`."""
    return [name for name in ("encoder", "language_model") if getattr(getattr(model, name), "is_quantized", False)]


def is_projector_key(name: str) -> bool:
    """The one predicate deciding which weights are trained, saved and published: the projector's."""
    return name.startswith("projector.")


def resolve_file(name_or_path: str | os.PathLike, filename: str, **hub_kwargs) -> str | None:
    """Path of `filename` in a local folder or Hub repo (downloaded if needed); None when it is not there."""
    return cached_file(
        name_or_path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


def names_a_local_folder(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` is a path rather than a Hub id (`org/name`): absolute, relative from `.` or `~`, or
    deeper than one slash. Such a name that is no folder is a folder that moved, not a repo to download."""
    name = str(name_or_path)
    windows_path = os.sep != "/" and os.sep in name
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or windows_path


def hub_commit(name_or_path: str | os.PathLike, **hub_kwargs) -> str | None:
    """The commit that a Hub id's default branch points to now (None for a local folder or an unknown repo).

    Read from where its config.json lands in the Hub cache (`snapshots/<commit>/`), which transformers 4.57 and 5.x
    both lay out; 5.x no longer records the commit on the loaded config (`_commit_hash`).
    """
    if os.path.isdir(name_or_path) or names_a_local_folder(name_or_path):
        return None
    return extract_commit_hash(resolve_file(name_or_path, "config.json", **hub_kwargs), None)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, with an error that says what the file is when it is none: a truncated
    download, or the Git LFS pointer a clone without `git lfs` leaves in its place.

    Raises:
        OSError: naming the file, its size and what to do.
    """
    try:
        return load_file(path)
    except SafetensorError as err:
        with open(path, "rb") as file:
            head = file.read(64)
        what = "a Git LFS pointer, not the file" if head.startswith(b"version https://git-lfs") else "not readable"
        raise OSError(
            f"{path} ({os.path.getsize(path)} bytes) is {what}: {err}. Download it again (`hf download`, or "
            "`git lfs pull` in a git clone), or save the model again."
        ) from err


def load_projector_state(path: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read `projector.safetensors` (never a pickle) and check it against the model's projector tensors.

    Raises:
        ValueError: naming missing or unexpected keys, or tensors whose shape the config does not build.
    """
    state = read_safetensors(path)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the projector this config builds. Missing keys: {missing or 'none'}; "
            f"unexpected keys: {unexpected or 'none'}. Was the checkpoint saved with another projector_type or "
            "projector_config? Load it with the config.json saved beside it."
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"{path} holds projector tensors of other shapes than the config builds ({'; '.join(wrong)}). "
            "The config (projector settings, encoder or LLM width) and the weights must come from the same save."
        )
    return state


def encoder_attn_implementation(config: SpeechLlmConfig) -> str | None:
    """The attention implementation the encoder gets: the one requested on `config.encoder_config` (None: the
    default), except that a Whisper encoder keeps SDPA when flash attention is requested, because
    `SpeechLlmWhisperEncoder` masks padded clips with a 4-D additive mask, which flash attention cannot take."""
    # `_attn_implementation` is where transformers records the request on a config (AutoConfig puts it there).
    requested = config.encoder_config._attn_implementation
    if config.encoder_config.model_type == "whisper" and requested and "flash" in requested:
        return "sdpa"
    return requested


# Keeps alive the DeepSpeed config that `outside_zero3_init` registers again: transformers holds only a weak reference.
_ZERO3_CONFIG: list = []


@contextlib.contextmanager
def outside_zero3_init():
    """Builds the models of the block outside `deepspeed.zero.Init` while a DeepSpeed ZeRO-3 config is in force.

    Under ZeRO-3, transformers builds every model inside `deepspeed.zero.Init`, which partitions each parameter as
    its module is created; HuBERT and wav2vec2 then take a special path for their weight-norm positional convolution
    that is reported to hang at load time (huggingface/transformers#31797). Used for the frozen encoder, which is
    small: it is built as an ordinary module and partitioned only when DeepSpeed wraps the whole model, while the
    LLM, the part worth partitioning, still loads inside `zero.Init`. Must not be entered inside an active
    `zero.Init` (such as the one `PreTrainedModel.from_pretrained` opens around `__init__`). transformers has no
    public way to re-register the config object that was in force, so an equal one is registered afterwards; the
    Trainer's accelerator registers its own when it starts.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, deepspeed_config, unset_hf_deepspeed_config

    config = deepspeed_config()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        _ZERO3_CONFIG[:] = [HfDeepSpeedConfig(config)]


def build_encoder(config: SpeechLlmConfig) -> PreTrainedModel:
    """A randomly initialised encoder for `config.encoder_config` (weights are loaded separately)."""
    encoder_config = config.encoder_config
    encoder_config._attn_implementation = encoder_attn_implementation(config)
    if encoder_config.model_type == "whisper":
        return SpeechLlmWhisperEncoder(encoder_config)
    encoder = AutoModel.from_config(encoder_config)
    if getattr(encoder_config, "is_encoder_decoder", False):
        encoder = encoder.get_encoder()
    return encoder


def from_pretrained_or_explain(loader, name_or_path: str, what: str, **kwargs):
    """`loader(name_or_path, **kwargs)`; a missing checkpoint becomes an error that says what to download, or, for
    a local folder that is gone, where to point instead."""
    if names_a_local_folder(name_or_path) and not os.path.isdir(os.path.expanduser(str(name_or_path))):
        raise OSError(
            f"Cannot load the {what} of {str(name_or_path)!r}: there is no such folder (moved or deleted?). Point the "
            "config's encoder_name_or_path / text_name_or_path at where it is now, or at its Hub id (edit "
            "config.json, or pass from_pretrained a config with the field changed)."
        )
    try:
        return loader(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"Cannot load the {what} of {name_or_path!r}: {err}\nIf it is a Hub id, download it first "
            f"(`hf download {name_or_path}`; gated models such as Llama need `hf auth login` and an accepted "
            "licence) or point to a local folder. Offline, the files must be in the local cache."
        ) from err


def refuse_missing_weights(loading_info: dict, checkpoint: str, model_name: str) -> None:
    """Raises when `from_pretrained`'s loading info lists missing weights: transformers only warns and initialises
    them, and a projector or backbone left random would make every later result meaningless.

    Raises:
        ValueError: naming `checkpoint` and the missing weights.
    """
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise ValueError(
            f"{checkpoint} lacks {len(missing)} of the weights {model_name} needs ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); loading it would leave them random. Check that it is a "
            "checkpoint of this model and config (model type, projector settings), and that it downloaded completely."
        )


def load_backbone(loader, name_or_path: str, what: str, **kwargs) -> PreTrainedModel:
    """`from_pretrained_or_explain`, refusing a checkpoint that lacks weights of the model it loads into: transformers
    only warns and leaves them random, which would make every later result meaningless.

    Raises:
        ValueError: naming the missing weights.
    """
    model, info = from_pretrained_or_explain(loader, name_or_path, what, output_loading_info=True, **kwargs)
    refuse_missing_weights(info, f"The {what} checkpoint {name_or_path!r}", type(model).__name__)
    return model


def load_pretrained_encoder(config: SpeechLlmConfig, **kwargs) -> PreTrainedModel:
    """Load the encoder named by `config.encoder_name_or_path` at `config.encoder_revision`.

    `kwargs` (dtype, device_map, token, cache_dir, local_files_only, ...) go to `from_pretrained`; the attention
    implementation defaults to `encoder_attn_implementation(config)`. Whisper checkpoints (full encoder-decoder
    models) load into `SpeechLlmWhisperEncoder`: only the encoder's tensors are read.
    """
    kwargs = {
        "attn_implementation": encoder_attn_implementation(config),
        **kwargs,
        "revision": config.encoder_revision,
    }
    if config.encoder_config.model_type == "whisper":
        kwargs["key_mapping"] = WHISPER_ENCODER_KEY_MAPPING
        logger.info(
            "Loading the encoder of the Whisper checkpoint %s; its decoder's weights go unused.",
            config.encoder_name_or_path,
        )
        return load_backbone(SpeechLlmWhisperEncoder.from_pretrained, config.encoder_name_or_path, "encoder", **kwargs)
    encoder = load_backbone(AutoModel.from_pretrained, config.encoder_name_or_path, "encoder", **kwargs)
    if getattr(encoder.config, "is_encoder_decoder", False):
        encoder = encoder.get_encoder()
    return encoder


def load_pretrained_text_model(config: SpeechLlmConfig, **kwargs) -> PreTrainedModel:
    """Load the causal LLM named by `config.text_name_or_path` at `config.text_revision`.

    `kwargs` go to `from_pretrained`; the attention implementation defaults to the one requested on
    `config.text_config` (None: the default).
    """
    kwargs = {
        "attn_implementation": config.text_config._attn_implementation,
        **kwargs,
        "revision": config.text_revision,
    }
    return load_backbone(AutoModelForCausalLM.from_pretrained, config.text_name_or_path, "text model", **kwargs)


def import_peft(reason: str):
    """peft, which only adapters need: the Hub copy of this code must load without it."""
    try:
        import peft
        import peft.tuners.tuners_utils
    except ImportError as err:
        raise ImportError(f"{reason}: `pip install peft`.") from err
    return peft


def load_backbones(config: SpeechLlmConfig, **kwargs) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """The encoder and LLM that `config.encoder_name_or_path` / `config.text_name_or_path` name (a randomly built
    encoder, and None for the LLM, where the id is None), for `SpeechLlmForConditionalGeneration.from_backbones`.

    A Hub backbone without a revision is loaded at, and records in `config`, the commit its default branch points to
    now, which every later load of the model then asks for. `quantization_config` goes to the LLM only: quantisation
    is meant to shrink the large LLM, while the small frozen encoder keeps the precision its features were trained
    in unless `encoder_quantization_config` asks otherwise. Under DeepSpeed ZeRO-3 the encoder is built outside
    `deepspeed.zero.Init` (see `outside_zero3_init`).

    Raises:
        ValueError: for a quantization config of a backbone that is built randomly (no id): there are no weights
            to quantize, and dropping the request silently would leave a full-precision model.
    """
    kwargs = dict(kwargs)
    encoder_quantization = kwargs.pop("encoder_quantization_config", None)
    for name, quantization, checkpoint in (
        ("quantization_config", kwargs.get("quantization_config"), config.text_name_or_path),
        ("encoder_quantization_config", encoder_quantization, config.encoder_name_or_path),
    ):
        if quantization is not None and not checkpoint:
            raise ValueError(
                f"{name} was given, but that backbone has no checkpoint to load (its name_or_path is None) and is "
                "built randomly: quantization applies to loaded weights. Name a checkpoint (encoder_name_or_path / "
                f"text_name_or_path), or drop {name}."
            )
    hub_kwargs = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only", "proxies") if k in kwargs}
    if config.encoder_name_or_path and config.encoder_revision is None:
        config.encoder_revision = hub_commit(config.encoder_name_or_path, **hub_kwargs)
    if config.text_name_or_path and config.text_revision is None:
        config.text_revision = hub_commit(config.text_name_or_path, **hub_kwargs)
    encoder_kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
    if encoder_quantization is not None:
        encoder_kwargs["quantization_config"] = encoder_quantization
    with outside_zero3_init():
        if config.encoder_name_or_path:
            encoder = load_pretrained_encoder(config, **encoder_kwargs)
        else:
            encoder = build_encoder(config)
    language_model = load_pretrained_text_model(config, **kwargs) if config.text_name_or_path else None
    return encoder, language_model


def resolved_dtype(kwargs: dict, default: torch.dtype) -> torch.dtype | None:
    """The torch dtype a `from_pretrained` call asks for: None for none, `default` for "auto"."""
    dtype = requested_dtype(kwargs)
    if dtype == "auto":
        return default
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def projector_only_arguments(name_or_path: str | os.PathLike, config, kwargs: dict) -> tuple[PretrainedConfig, dict]:
    """The config and the backbones' `from_pretrained` kwargs for loading the projector-only save `name_or_path`
    (`SpeechLlmForConditionalGeneration.from_pretrained`); the other kwargs are ignored with a warning.

    Raises:
        ValueError: when the config names no encoder or LLM to load.
    """
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    # AutoModel passes the config it loaded, an instance of the Hub copy of SpeechLlmConfig (a class object of its
    # own), so check for any config rather than for this module's class.
    if not isinstance(config, PretrainedConfig):
        config = SpeechLlmConfig.from_pretrained(config or name_or_path, **hub_kwargs)
    if not (config.encoder_name_or_path and config.text_name_or_path):
        raise ValueError(
            f"{name_or_path} holds only a projector but its config names no encoder and/or LLM to load "
            "(encoder_name_or_path / text_name_or_path): set them in config.json."
        )
    ignored = sorted(
        k
        for k in kwargs
        if k not in HUB_KWARGS + BACKBONE_KWARGS
        and not k.startswith("_")
        and k not in ("trust_remote_code", "code_revision", "adapter_kwargs")
    )
    if ignored:
        logger.warning("from_pretrained ignores these arguments for a projector-only checkpoint: %s", ignored)
    backbone_kwargs = {k: kwargs[k] for k in BACKBONE_KWARGS if k in kwargs}
    return config, backbone_kwargs | dtype_from_auto_config(kwargs, config)


def saved_generation_config(name_or_path: str | os.PathLike, model, hub_kwargs: dict) -> GenerationConfig:
    """The generation config saved beside a projector-only save, or the model's defaults when there is none."""
    try:
        return GenerationConfig.from_pretrained(name_or_path, **hub_kwargs)
    except OSError:
        logger.info("No generation_config.json in %s; keeping the defaults.", name_or_path)
        return model.generation_config


def save_projector_only(model, save_directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write `model`'s config, generation config, code (when registered for an auto class) and projector tensors
    (`projector.safetensors`), and its LLM's LoRA adapter (`lora/`) when it carries one.

    Raises:
        ValueError: when parameters outside the projector (and adapter) are trainable: the save would lose them.
    """
    state_dict = state_dict if state_dict is not None else model.state_dict()
    trainable_elsewhere = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not is_projector_key(n) and not (model.has_lora and "lora_" in n)
    ]
    if trainable_elsewhere:
        raise ValueError(
            f"Parameters outside the projector are trainable ({', '.join(trainable_elsewhere[:3])}, ...): a "
            "projector-only save would lose them. Freeze them or pass save_full_model=True."
        )
    if model._auto_class is not None:  # copy the model code and write auto_map, as PreTrainedModel does
        custom_object_save(model, save_directory, config=model.config)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(save_directory)
    model.generation_config.save_pretrained(save_directory)
    projector = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if is_projector_key(k)}
    save_file(projector, os.path.join(save_directory, PROJECTOR_WEIGHTS_NAME), metadata={"format": "pt"})
    if model.has_lora:
        prefix = "language_model."
        lora_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        model.language_model.save_pretrained(os.path.join(save_directory, LORA_FOLDER), state_dict=lora_state)


def load_trained_weights(model, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
    """Load a projector-only save's trained weights into `model`: the projector (strictly: any missing, unexpected
    or mis-shaped tensor is an error) and, when saved, the LLM's LoRA adapter (safetensors only)."""
    projector_file = resolve_file(name_or_path, PROJECTOR_WEIGHTS_NAME, **hub_kwargs)
    if projector_file is None:
        raise ValueError(f"{name_or_path} holds no {PROJECTOR_WEIGHTS_NAME}.")
    expected = {k: v for k, v in model.state_dict().items() if is_projector_key(k)}
    state = load_projector_state(projector_file, expected)
    model.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()}, strict=True)
    adapter_config = resolve_file(name_or_path, f"{LORA_FOLDER}/adapter_config.json", **hub_kwargs)
    if adapter_config is None:
        return
    peft = import_peft(f"{name_or_path} holds a LoRA adapter of the LLM, which needs peft")
    # Read from safetensors only: peft's own loader falls back to a pickled adapter_model.bin.
    adapter_file = resolve_file(name_or_path, f"{LORA_FOLDER}/adapter_model.safetensors", **hub_kwargs)
    if adapter_file is None:
        raise ValueError(
            f"{name_or_path} holds {LORA_FOLDER}/adapter_config.json but no "
            f"{LORA_FOLDER}/adapter_model.safetensors: adapters are read from safetensors only, as a pickled .bin "
            "can run code. Save the adapter again with peft's save_pretrained (safetensors by default)."
        )
    if not model.has_lora:  # when resuming training the adapter exists already and only its weights are read
        peft_config = peft.PeftConfig.from_pretrained(os.path.dirname(adapter_config))
        peft_config.inference_mode = True  # frozen, as for PeftModel.from_pretrained
        model.language_model = peft.get_peft_model(model.language_model, peft_config)
    result = peft.set_peft_model_state_dict(model.language_model, read_safetensors(adapter_file))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The LoRA adapter in {name_or_path} does not fit the LLM: missing {missing[:5] or 'none'}, "
            f"unexpected {result.unexpected_keys[:5] or 'none'}."
        )


__all__ = [
    "BACKBONE_KWARGS",
    "FULL_WEIGHTS",
    "HUB_KWARGS",
    "LORA_FOLDER",
    "PROJECTOR_WEIGHTS_NAME",
    "build_encoder",
    "encoder_attn_implementation",
    "from_pretrained_or_explain",
    "hub_commit",
    "import_peft",
    "is_projector_key",
    "load_backbone",
    "load_backbones",
    "load_pretrained_encoder",
    "load_pretrained_text_model",
    "load_projector_state",
    "load_trained_weights",
    "names_a_local_folder",
    "read_safetensors",
    "refuse_missing_weights",
    "outside_zero3_init",
    "projector_only_arguments",
    "resolve_file",
    "resolved_dtype",
    "save_projector_only",
    "saved_generation_config",
]
