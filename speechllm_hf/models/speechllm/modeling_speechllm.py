"""SpeechLlmForConditionalGeneration: speech encoder -> projector -> audio features spliced into a causal LLM.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers and the standard library,
and its siblings with single-dot imports. It imports every sibling that the model code needs directly, because
transformers 4.57 copies only the direct relative imports of a local folder's model file into its module cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat_speechllm import CACHE_KWARGS, cached_length
from .configuration_speechllm import SpeechLlmConfig, convs_output_length, windowed_output_length
from .hub_speechllm import UPLOAD_OPTIONS, forget_pipeline_entry, model_card, upload_folder, write_hub_entries
from .loading_speechllm import (
    FULL_WEIGHTS,
    HUB_KWARGS,
    PROJECTOR_WEIGHTS_NAME,
    build_encoder,
    import_peft,
    load_backbones,
    load_trained_weights,
    projector_only_arguments,
    quantized_backbones,
    refuse_missing_weights,
    resolve_file,
    resolved_dtype,
    save_projector_only,
    saved_generation_config,
)
from .modules_speechllm import PROJECTOR_CLASSES, SpeechLlmQFormerProjector, lengths_to_mask, mask_lengths

# Imported so that transformers copies the pipeline file with the model code: into its module cache when the model
# is loaded, and into every folder it is saved to (`custom_object_save` copies the model file's relative imports).
from .pipeline_speechllm import SpeechLlmPipeline  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class SpeechLlmCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    The fields of transformers' `CausalLMOutputWithPast` (`loss`, `logits`, the LLM's key/value cache, `hidden_states`,
    `attentions`; the cache field is `past_key_values` on transformers 4.x and `cache` on newer 5.x), plus:

    Args:
        audio_hidden_states (`torch.FloatTensor` of shape `(num_clips, N, hidden_size)`, *optional*): the projector
            outputs (audio features in the LLM's embedding space), when audio was given.
        audio_lengths (`torch.LongTensor` of shape `(num_clips,)`, *optional*): valid positions of each clip's
            `audio_hidden_states`.
    """

    audio_hidden_states: torch.FloatTensor | None = None
    audio_lengths: torch.LongTensor | None = None


class SpeechLlmPreTrainedModel(PreTrainedModel):
    config_class = SpeechLlmConfig
    base_model_prefix = ""  # no base-model class: encoder, projector and LLM hang off the generation class
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The LLM supports flash attention; the Q-Former and a Whisper encoder do not and keep eager/SDPA attention.
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _no_split_modules = ["SpeechLlmQFormerProjector", "SpeechLlmCnnProjector", "SpeechLlmMlpProjector"]
    _skip_keys_device_placement = list(CACHE_KWARGS)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The projector's own layers: PyTorch's defaults for linear and convolution layers, unit LayerNorms and
        N(0, 0.02) Q-Former queries. Encoder, LLM and the Q-Former's BERT layers are `PreTrainedModel`s that
        transformers initialises with their own `_init_weights`. Only `torch.nn.init` functions are used, which
        transformers 5.x guards so that they leave loaded tensors alone."""
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SpeechLlmQFormerProjector):
            nn.init.normal_(module.query, 0.0, 0.02)


class SpeechLlmForConditionalGeneration(SpeechLlmPreTrainedModel, GenerationMixin):
    """Speech LLM: `encoder` -> `projector` -> audio features spliced into the `language_model` input.

    The processor expands each audio placeholder to exactly as many audio tokens as the projector emits for that clip;
    `forward` scatters the projector outputs into those positions. Encoder and LLM are frozen by default: the encoder
    runs under `torch.no_grad()` in eval mode, the LLM's weights get no gradient but pass gradients to the projector.

    Saving follows the state of the model, as peft's adapters do: when encoder and LLM are frozen and referenced by
    id (`config.encoder_name_or_path`, `config.text_name_or_path`), `save_pretrained` and `push_to_hub` write only
    the projector (and the LLM's LoRA adapter), and `from_pretrained` loads the backbones from their ids at the
    recorded revisions; otherwise every weight is saved, as `PreTrainedModel` does.
    """

    def __init__(
        self,
        config: SpeechLlmConfig,
        encoder: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        # Ready-made (pretrained) sub-models may be passed in; `from_pretrained` does so.
        self.encoder = encoder if encoder is not None else build_encoder(config)
        self.projector = PROJECTOR_CLASSES[config.projector_type](config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        config.check_backbones(self.encoder.config, self.language_model.config)
        self.encoder.requires_grad_(not config.freeze_encoder)
        self.language_model.requires_grad_(not config.freeze_text_model)
        self.post_init()
        self.train(self.training)

    @classmethod
    def from_backbones(cls, config: SpeechLlmConfig, **kwargs) -> SpeechLlmForConditionalGeneration:
        """A model whose encoder and LLM are loaded from `config.encoder_name_or_path` / `config.text_name_or_path`
        (a sub-model whose id is None is built randomly from its config) and whose projector is new, in eval mode.

        `kwargs` (dtype, device_map, token, cache_dir, local_files_only, ...) are passed to each backbone's
        `from_pretrained` (see `load_backbones`; `quantization_config` goes to the LLM only,
        `encoder_quantization_config` to the encoder). The projector keeps the dtype asked for (float32 by
        default) on quantized backbones; a projector-only save records neither quantization config.
        `attn_implementation` (a name for both backbones, or a dict keyed by `"encoder_config"` / `"text_config"`,
        as transformers takes it) is recorded on the config, so that backbones built from config honour it as well
        as loaded ones; a Whisper encoder keeps SDPA when flash attention is asked for (see
        `encoder_attn_implementation`). `dtype` applies to every part.
        """
        if "attn_implementation" in kwargs:
            # The property setter that transformers uses for configs: it passes the request on to the sub-configs.
            config._attn_implementation = kwargs.pop("attn_implementation")
        encoder, language_model = load_backbones(config, **kwargs)
        model = cls(config, encoder=encoder, language_model=language_model)
        # The new projector (and any randomly built backbone) joins the LLM's input device and the requested dtype.
        dtype = resolved_dtype(kwargs, default=model.language_model.dtype)
        device = model.get_input_embeddings().weight.device
        model.projector.to(device=device, dtype=dtype)
        if not config.encoder_name_or_path:
            model.encoder.to(device=device, dtype=dtype)
        if language_model is None:
            model.language_model.to(device=device, dtype=dtype)
        return model.eval()  # as from_pretrained leaves a model: dropout off until a trainer calls train()

    @property
    def references_backbones(self) -> bool:
        """Whether encoder and LLM can be loaded from their own repos (so a save needs only the projector)."""
        return bool(self.config.encoder_name_or_path and self.config.text_name_or_path)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        *args,
        processor=None,
        save_full_model: bool = False,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained`, every argument of which it takes and forwards, writing only what the
        model's state calls for.

        When encoder and LLM are frozen and referenced by id (`references_backbones`), only the projector is written
        (`projector.safetensors`, and `lora/` for an LLM LoRA adapter), with config.json, generation_config.json, the
        model code (`auto_map`) and a model card: the backbones' own repos hold the rest. Otherwise, or with
        `save_full_model=True`, every weight is written by `PreTrainedModel.save_pretrained` (with a warning when
        the backbones have no id, as for the tiny preset). `push_to_hub=True` uploads the folder afterwards.

        Args:
            processor: the `SpeechLlmProcessor` to save beside the model.
            save_full_model: write all weights (e.g. for offline use).
        """
        if save_full_model and self.has_lora:
            raise ValueError("A full save of a model with a LoRA adapter: call model.merge_lora() first.")
        full_model = save_full_model or not self.references_backbones
        if full_model and quantized_backbones(self):
            raise ValueError(
                f"A full save of a model whose {' and '.join(quantized_backbones(self))} is quantized: its config "
                "records full-precision backbones, so the quantized weights would not load back. Save the projector "
                "only (backbones named by id, save_full_model=False), or load the model without "
                "quantization_config to save every weight."
            )
        if full_model and not save_full_model:
            logger.warning(
                "The encoder and/or LLM have no Hub id or folder to be loaded from (config.encoder_name_or_path / "
                "config.text_name_or_path): saving all weights, backbones included, to %s.",
                save_directory,
            )
        # The arguments as PreTrainedModel.save_pretrained names them on this transformers version (which differ
        # between 4.57 and 5.x): an unknown one is a TypeError, as it would be there.
        arguments = (
            inspect.signature(PreTrainedModel.save_pretrained)
            .bind(self, save_directory, is_main_process, state_dict, *args, **kwargs)
            .arguments
        )
        push = arguments.get("push_to_hub", False)
        hub_options = arguments.get("kwargs", {})
        if full_model:
            super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        elif is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            save_projector_only(self, save_directory, state_dict)
        if not is_main_process:
            return
        if processor is not None:
            processor.save_pretrained(save_directory)
        with open(os.path.join(save_directory, "README.md"), "w") as card:
            card.write(model_card(self, hub_options.get("repo_id"), full_model=full_model))
        write_hub_entries(save_directory)
        if push and not full_model:  # PreTrainedModel pushed a full save itself, before the card and pipeline
            repo_id = hub_options.get("repo_id", os.path.basename(save_directory))
            self._upload(save_directory, repo_id, {**arguments, **hub_options})

    def push_to_hub(self, repo_id: str, *args, processor=None, save_full_model: bool = False, **kwargs):
        """`PreTrainedModel.push_to_hub`, every argument of which it takes: uploads exactly what `save_pretrained`
        writes (by default: projector, config, code, processor, card), in one commit.

        Raises:
            ValueError: when the backbones have no Hub id to be loaded from and `save_full_model` is off (publishing
                would mean uploading every weight), or when their ids are local folders nobody else can read.
        """
        if not (self.references_backbones or save_full_model):
            raise ValueError(
                "The encoder and/or LLM have no Hub id to be loaded from (config.encoder_name_or_path / "
                "config.text_name_or_path), so publishing this model means uploading all its weights, encoder and "
                "LLM included. Set those ids to publish the projector only, or pass save_full_model=True to upload "
                "everything."
            )
        arguments = inspect.signature(PreTrainedModel.push_to_hub).bind(self, repo_id, *args, **kwargs).arguments
        save_options = {k: arguments[k] for k in ("max_shard_size", "safe_serialization") if k in arguments}
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, processor=processor, save_full_model=save_full_model, **save_options)
            with open(os.path.join(work_dir, "README.md"), "w") as card:
                card.write(model_card(self, repo_id, full_model=save_full_model))
            return self._upload(work_dir, repo_id, arguments)

    @staticmethod
    def _upload(folder: str, repo_id: str, arguments: dict):
        """Upload every file of `folder` (what a save wrote), with the upload settings among the bound `arguments`
        of save_pretrained / push_to_hub (the others, such as `max_shard_size`, concern the save)."""
        names = sorted(
            os.path.relpath(os.path.join(root, name), folder) for root, _, files in os.walk(folder) for name in files
        )
        options = {k: arguments[k] for k in UPLOAD_OPTIONS if arguments.get(k) is not None}
        return upload_folder(folder, repo_id, names, **options)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """`PreTrainedModel.from_pretrained` for a full save; for a projector-only save, the backbones from their
        recorded ids and revisions and the projector (and LoRA adapter) from this repo. Safetensors files only.

        Args:
            pretrained_model_name_or_path: Hub id or local folder.
            config: a `SpeechLlmConfig` to use instead of the saved one.
            **kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, ... locate this repo's files; `dtype`,
                `device_map`, `attn_implementation`, `quantization_config`, `encoder_quantization_config`, `token`,
                `cache_dir`, `local_files_only` also go to the backbones (as `from_backbones` describes), which load
                at the revisions in the config. An `attn_implementation` that `AutoConfig` recorded on `config` counts
                too.
        """
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        if resolve_file(pretrained_model_name_or_path, PROJECTOR_WEIGHTS_NAME, **hub_kwargs) is None:
            if not any(resolve_file(pretrained_model_name_or_path, name, **hub_kwargs) for name in FULL_WEIGHTS):
                raise OSError(
                    f"{pretrained_model_name_or_path} holds neither {PROJECTOR_WEIGHTS_NAME} (a projector-only save) "
                    f"nor {FULL_WEIGHTS[0]} (a full save): the save or its download is incomplete. Download it "
                    "again, or save the model again."
                )
            quantization = [k for k in ("quantization_config", "encoder_quantization_config") if kwargs.get(k)]
            if quantization:
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a full save, which loads as one model: {quantization[0]} "
                    "would quantize the projector with the backbones. Quantized backbones load under a projector-only "
                    "save (backbones named by id); load this one in full precision, or save its projector only."
                )
            # A full save: never fall back to a pickled pytorch_model.bin, which can run code when read.
            kwargs["use_safetensors"] = True
            wants_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
            )
            refuse_missing_weights(info, str(pretrained_model_name_or_path), cls.__name__)
            forget_pipeline_entry(model.config)
            return (model, info) if wants_info else model
        config, backbone_kwargs = projector_only_arguments(pretrained_model_name_or_path, config, kwargs)
        model = cls.from_backbones(config, **backbone_kwargs)
        model.load_trained_weights(pretrained_model_name_or_path, **hub_kwargs)
        model.generation_config = saved_generation_config(pretrained_model_name_or_path, model, hub_kwargs)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        forget_pipeline_entry(model.config)
        return model.eval()

    def load_trained_weights(self, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
        """Load a projector-only save's trained weights into this model: the projector (strictly: any missing,
        unexpected or mis-shaped tensor is an error) and, when saved, the LLM's LoRA adapter."""
        load_trained_weights(self, name_or_path, **hub_kwargs)

    @property
    def has_lora(self) -> bool:
        """Whether the LLM carries a peft (LoRA) adapter."""
        # The wrapper's type, not a `peft_config` attribute: peft < 0.19 leaves that on the LLM after merge_and_unload.
        return type(self.language_model).__module__.split(".")[0] == "peft"

    # transformers' PeftAdapterMixin would inject the adapter into every module whose name matches, Whisper's own
    # q_proj/v_proj included, and on transformers 5.x it needs peft >= 0.22. An adapter of this model belongs to the
    # LLM, so these wrap `language_model` with peft's get_peft_model instead: any peft this package supports, and
    # one saved form (`lora/`, which from_pretrained reads) whichever way the adapter was added.

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Add a peft adapter (e.g. `LoraConfig(target_modules=["q_proj", "v_proj"])`) to the LLM, active and
        trainable; encoder and projector are untouched. `target_modules` name the LLM's own modules.

        Raises:
            ValueError: if the LLM already carries an adapter (one adapter per model; merge_lora() first).
        """
        peft = import_peft("Adapters of the LLM need peft")
        if not isinstance(adapter_config, peft.PeftConfig):
            raise TypeError(f"adapter_config must be a peft config (e.g. LoraConfig); got {type(adapter_config)}.")
        if self.has_lora:
            raise ValueError("The LLM already carries an adapter: merge it (model.merge_lora()) before adding one.")
        adapter_name = adapter_name or "default"
        self.language_model = peft.get_peft_model(self.language_model, adapter_config, adapter_name=adapter_name)
        self.train(self.training)  # the LLM has trainable weights now: its dropout follows the model's mode

    def disable_adapters(self) -> None:
        """Run the LLM without its adapter (until enable_adapters())."""
        self._enable_adapter_layers(False)

    def enable_adapters(self) -> None:
        """Run the LLM with its adapter again."""
        self._enable_adapter_layers(True)

    def _enable_adapter_layers(self, enabled: bool) -> None:
        # Layer by layer, as transformers' PeftAdapterMixin does: the same call on every peft release supported.
        if not self.has_lora:
            raise ValueError("The LLM carries no adapter: add one with model.add_adapter(LoraConfig(...)).")
        tuner_layer = import_peft("Adapters of the LLM need peft").tuners.tuners_utils.BaseTunerLayer
        for module in self.language_model.modules():
            if isinstance(module, tuner_layer):
                module.enable_adapters(enabled)

    def merge_lora(self) -> None:
        """Merge the LoRA adapter into the LLM weights (e.g. before a full save); the adapter is gone afterwards."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()

    # ----------------------------------------------------------------------------------------------------------------
    # Delegation to the LLM (generation, peft and resize_token_embeddings rely on these).

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_encoder(self) -> nn.Module:
        return self.encoder

    # ----------------------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Frozen sub-models stay in eval mode: no dropout, no SpecAugment (the trainers'
        `--encoder_train_mode_augment` puts the encoder back in train mode for their training steps).

        With gradient checkpointing enabled (call this after enabling it; the Trainer calls it at every step), the
        frozen LLM's checkpointed decoder layers are flagged as training, because transformers checkpoints only
        layers in training mode; their sub-modules (attention, dropout) stay in eval mode, so no dropout acts.
        """
        super().train(mode)
        if not _has_trainable(self.encoder):
            self.encoder.eval()
        if not _has_trainable(self.language_model):
            self.language_model.eval()
            if mode:
                for module in self.language_model.modules():
                    if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                        module.training = True
        return self

    def encoder_output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Valid encoder frames for each clip, from its number of feature frames (or samples): the sum over the
        encoder windows it fills (`config.encoder_window`)."""
        return windowed_output_length(feature_lengths, self.config.encoder_convs, self.config.encoder_window)

    def _run_encoder(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T', C) encoder outputs of clips longer than one encoder window: window by window (the same window of
        every clip in one batch), each clip's valid outputs concatenated, so memory follows the window, not the clip.
        Clips that all fit one window take one pass, exactly as before windows existed."""
        window = self.config.encoder_window
        if input_features.shape[-1] <= window:
            return self._encode_window(input_features, feature_attention_mask)
        lengths = mask_lengths(feature_attention_mask)
        encoder_convs = self.config.encoder_convs
        pieces = [[] for _ in range(len(lengths))]
        for start in range(0, int(lengths.max()), window):
            window_lengths = (lengths - start).clamp(0, window)
            output_lengths = convs_output_length(window_lengths, encoder_convs)
            # A clip's window too short for one encoder frame adds nothing (and could not pass the convolutions).
            rows = output_lengths.nonzero()[:, 0]
            if len(rows) == 0:
                continue
            end = start + int(window_lengths[rows].max())
            hidden_states = self._encode_window(
                input_features[rows, ..., start:end], feature_attention_mask[rows, start:end]
            )
            for row, states, count in zip(rows.tolist(), hidden_states, output_lengths[rows].tolist()):
                pieces[row].append(states[:count])
        no_frames = hidden_states[0, :0]  # a clip too short for any encoder frame
        return nn.utils.rnn.pad_sequence([torch.cat(clip or [no_frames]) for clip in pieces], batch_first=True)

    def _encode_window(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        features = input_features.to(dtype=encoder.dtype, device=encoder.device)
        mask = feature_attention_mask.to(encoder.device)
        input_name = encoder.main_input_name
        # wav2vec2/HuBERT with group norm in the feature encoder (base checkpoints) normalise over time, so padding
        # changes every frame: encode those clips one by one at their true length.
        if getattr(encoder.config, "feat_extract_norm", "layer") == "group" and not bool(mask.all()):
            lengths = mask_lengths(mask)
            outputs = [
                encoder(**{input_name: features[i : i + 1, ..., : int(n)]}).last_hidden_state[0]
                for i, n in enumerate(lengths)
            ]
            return nn.utils.rnn.pad_sequence(outputs, batch_first=True)
        return encoder(**{input_name: features}, attention_mask=mask).last_hidden_state

    def encode_audio(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder (under `no_grad` while it is frozen): (B, T', C) hidden states and (B,) valid lengths."""
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(
                input_features.shape[0], input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        frozen = not _has_trainable(self.encoder)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            hidden_states = self._run_encoder(input_features, feature_attention_mask)  # (B, T', C)
        lengths = mask_lengths(feature_attention_mask).to(hidden_states.device)
        return hidden_states, self.encoder_output_lengths(lengths)

    def get_audio_features(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and project audio.

        Args:
            input_features: (B, T) raw samples (HuBERT/wav2vec2) or (B, n_mels, T) log-mel frames (Whisper), one row
                per clip.
            feature_attention_mask: (B, T), 1 on real samples/frames. Defaults to all ones.
            encoder_hidden_states, encoder_lengths: (B, T', C) encoder outputs and (B,) their valid lengths, e.g.
                from a feature cache, used instead of running the encoder.

        Returns:
            `(audio_embeds, audio_lengths)`: (B, N, D_llm) projector outputs and (B,) the number of valid ones.
        """
        if encoder_hidden_states is None:
            hidden_states, lengths = self.encode_audio(input_features, feature_attention_mask)
        else:
            hidden_states, lengths = encoder_hidden_states, encoder_lengths.to(encoder_hidden_states.device)
        projector_dtype = next(self.projector.parameters()).dtype
        audio_embeds, audio_lengths = self.projector(hidden_states.to(projector_dtype), lengths)
        return audio_embeds, audio_lengths

    def _audio_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) True where `input_ids` hold the audio token (nowhere when the config sets no `audio_token_id`)."""
        if self.config.audio_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.config.audio_token_id

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings; audio tokens (which may lie outside the LLM vocabulary) embed as id 0, a stand-in
        that `merge_audio_features` overwrites."""
        text_ids = input_ids.masked_fill(self._audio_positions(input_ids), 0)
        return self.get_input_embeddings()(text_ids)

    def merge_audio_features(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        audio_embeds: torch.Tensor,
        audio_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Scatter the valid audio features, clip after clip, into the audio-token positions of `inputs_embeds`."""
        if self.config.audio_token_id is None:
            raise ValueError(
                "config.audio_token_id is not set, so the audio features have no positions to go to: set it to the "
                "tokenizer's id of the audio token (SpeechLlmProcessor.audio_token_id)."
            )
        valid = lengths_to_mask(audio_lengths, audio_embeds.shape[1])
        features = audio_embeds[valid]  # (total audio tokens, D)
        audio_positions = self._audio_positions(input_ids)
        num_tokens, num_features = int(audio_positions.sum()), features.shape[0]
        if num_tokens != num_features:
            raise ValueError(
                f"Audio tokens and audio features do not match: the input_ids hold {num_tokens} audio tokens "
                f"({self.config.audio_token!r}) but the audio gives {num_features} features. Build inputs with "
                "SpeechLlmProcessor, which expands each placeholder to the projector's output length."
            )
        audio_positions = audio_positions.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(audio_positions, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        encoder_lengths: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SpeechLlmCausalLMOutputWithPast:
        r"""
        Args:
            input_ids: (B, L) token ids with audio tokens where audio goes (see `SpeechLlmProcessor`).
            input_features: (num_clips, ...) audio input, one row per audio placeholder, in order of appearance.
            feature_attention_mask: (num_clips, T) 1 on real samples/frames.
            encoder_hidden_states, encoder_lengths: precomputed encoder outputs (num_clips, T', C) and their valid
                lengths, instead of `input_features` (a feature cache).
            labels: (B, L) next-token targets; audio positions are set to `ignore_index` whatever they hold.
            position_ids: (B, L) positions; by default counted over the attention mask, so that left padding does
                not shift them. A padding-free batch (the collators' `padding_free`: one row holding several
                sequences, position ids restarting at 0 for each, no attention mask) runs as it is: transformers
                keeps the sequences apart (flash attention through the `cu_seq_lens_*` kwargs the collator adds).
            logits_to_keep: compute the logits of the last `logits_to_keep` positions only (0: all); with `labels`,
                the loss is taken on them, so they must include every position that predicts a label.
            **kwargs: passed to the LLM: its key/value cache (`past_key_values` on transformers 4.x, `cache` on newer
                5.x: left unnamed here so that either version's name passes through), `num_items_in_batch` for the
                loss, `output_hidden_states`, ...
        """
        has_audio = input_features is not None or encoder_hidden_states is not None
        audio_embeds = audio_lengths = None
        if has_audio:
            audio_embeds, audio_lengths = self.get_audio_features(
                input_features, feature_attention_mask, encoder_hidden_states, encoder_lengths
            )
            if input_ids is None and inputs_embeds is None:
                # Audio alone: the projected features, without running the LLM (contrastive pretraining at the
                # embedding level goes through here, so that DDP sees one forward of the wrapped model).
                return SpeechLlmCausalLMOutputWithPast(audio_hidden_states=audio_embeds, audio_lengths=audio_lengths)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if not has_audio and input_ids is not None and cached_length(kwargs) == 0:
            # Later generation steps legitimately come without audio: it was encoded in the prefill step.
            num_audio_tokens = int(self._audio_positions(input_ids).sum())
            if num_audio_tokens:
                raise ValueError(
                    f"input_ids hold {num_audio_tokens} audio tokens ({self.config.audio_token!r}) but no audio was "
                    "given: pass the input_features and feature_attention_mask that SpeechLlmProcessor returned with "
                    "these input_ids (or encoder_hidden_states and encoder_lengths)."
                )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if has_audio:
            if input_ids is None:
                raise ValueError("Audio inputs need input_ids to locate the audio tokens.")
            inputs_embeds = self.merge_audio_features(input_ids, inputs_embeds, audio_embeds, audio_lengths)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(self._audio_positions(input_ids), self.config.ignore_index)
        if labels is not None and not isinstance(logits_to_keep, int):
            raise ValueError("With labels, logits_to_keep must be an int: the number of last positions kept.")
        if labels is not None and logits_to_keep:
            # Position t predicts label t + 1: the kept logits cover the labels of the last logits_to_keep - 1.
            if bool((labels[:, 1 : labels.shape[1] - logits_to_keep + 1] != self.config.ignore_index).any()):
                raise ValueError(
                    f"logits_to_keep={logits_to_keep} leaves out the logits of labelled positions: keep from the "
                    "position before the first label on (or pass 0 to keep all)."
                )
            labels = labels[:, -logits_to_keep:]  # the LLM's loss pairs them with the logits it keeps
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Left padding must not shift positions: count only real tokens (also for the cached decode steps).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{**kwargs, "return_dict": True},
        )
        # `**outputs` carries the cache under this transformers version's field name.
        return SpeechLlmCausalLMOutputWithPast(
            **outputs, audio_hidden_states=audio_embeds, audio_lengths=audio_lengths
        )

    _AUDIO_INPUTS = ("input_features", "feature_attention_mask", "encoder_hidden_states", "encoder_lengths")

    def prepare_inputs_for_generation(self, *args, **kwargs):
        audio = {name: kwargs.pop(name, None) for name in self._AUDIO_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Audio is encoded once, in the prefill step; later steps read the LLM's cache.
        prefill = cached_length(kwargs) == 0
        model_inputs.update({name: value if prefill else None for name, value in audio.items()})
        return model_inputs


def _has_trainable(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


__all__ = ["SpeechLlmCausalLMOutputWithPast", "SpeechLlmForConditionalGeneration", "SpeechLlmPreTrainedModel"]
