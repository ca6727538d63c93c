"""SpeechLlmForConditionalGeneration: speech encoder -> projector -> causal LLM, and the three projectors.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers, safetensors (which
transformers itself requires) and the standard library, and its siblings with single-dot imports; peft only inside
the function that loads a LoRA adapter.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer
from transformers.utils import is_torch_greater_or_equal

from .configuration_speechllm import WHISPER_CONVS, SpeechLlmConfig, conv_output_length, convs_output_length
from .hub_speechllm import (
    BACKBONE_KWARGS,
    HUB_KWARGS,
    LORA_FOLDER,
    PROJECTOR_WEIGHTS_NAME,
    forget_pipeline_entry,
    hub_commit,
    is_projector_key,
    load_projector_state,
    model_card,
    resolve_file,
    ship_pipeline,
    upload_saved_folder,
)

logger = logging.getLogger(__name__)

# transformers 4.x encoder layers take a positional `layer_head_mask`; 5.x removed it.
_WHISPER_LAYER_TAKES_HEAD_MASK = "layer_head_mask" in inspect.signature(WhisperEncoderLayer.forward).parameters


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True on valid positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


# Attention implementations that keep packed sequences apart, in transformers 4.57 and 5.x alike. Flash attention runs
# its varlen kernels on the cumulative sequence lengths passed with the packed row (`cu_seq_lens_q/k`, the
# `FlashAttentionKwargs` that DataCollatorWithFlattening also returns). The others get the block-diagonal causal mask
# that `masking_utils.create_causal_mask` builds when there is no attention mask and no cache and the position ids
# restart (`find_packed_sequence_indices`): 4.57 builds it only on torch >= 2.6, and 5.x requires that torch.
PACKED_MASK_ATTENTION = ("eager", "sdpa", "flex_attention")


def padding_free_unsupported(attn_implementation: str | None) -> str | None:
    """Why an LLM with this attention implementation cannot run packed sequences here, or None when it can."""
    if attn_implementation is not None and attn_implementation.startswith("flash_attention_"):
        return None
    if attn_implementation not in PACKED_MASK_ATTENTION:
        return (
            f"padding-free packing needs the LLM's attention to keep packed sequences apart: flash_attention_2/3/4 "
            f"or one of {', '.join(PACKED_MASK_ATTENTION)}; this LLM uses {attn_implementation!r}. Load it with "
            "attn_implementation set to one of those, or turn padding_free off."
        )
    if not is_torch_greater_or_equal("2.6"):
        return (
            f"padding-free packing with {attn_implementation} attention needs torch >= 2.6 (transformers ignores "
            f"packed position ids in its masks before it; torch {torch.__version__} is installed): upgrade torch, use "
            "flash attention, or turn padding_free off."
        )
    return None


def unpack(packed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(1, N, ...) values of the packed row -> (B, L, ...) with zeros at the padded positions (`valid`: (B, L) bool,
    N True entries, packed in row-major order)."""
    unpacked = packed.new_zeros(*valid.shape, *packed.shape[2:])
    return unpacked.index_put(valid.nonzero(as_tuple=True), packed[0])


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


class SpeechLlmWhisperEncoder(WhisperEncoder):
    """Whisper encoder that takes clips shorter than 30 s and masks padding.

    The stock `WhisperEncoder` demands exactly 3000 mel frames and ignores `attention_mask`, so short clips would
    have to be padded to 30 s. Here padded frames are zeroed before each convolution (so the convolutions see the
    same zeros an unpadded clip sees) and masked in self-attention: a padded clip gives the same valid outputs as
    the clip alone. Parameter names are those of `WhisperEncoder`, so its checkpoints load unchanged.
    """

    # A WhisperForConditionalGeneration checkpoint also holds the decoder (and its output projection): expected to go
    # unused, so left out of transformers' load report (`load_pretrained_encoder` says so in one line). Missing encoder
    # weights are still reported.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\.", r"^proj_out\."]

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch_size, _, num_frames = input_features.shape  # (B, n_mels, T)
        max_frames = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if num_frames > max_frames:
            raise ValueError(
                f"Whisper encodes at most {max_frames} mel frames (30 s); got {num_frames}. Split longer audio."
            )
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, num_frames, dtype=torch.long, device=input_features.device)
        lengths = attention_mask.sum(-1)
        hidden_states = input_features
        for conv, spec in zip((self.conv1, self.conv2), WHISPER_CONVS):
            valid = lengths_to_mask(lengths, hidden_states.shape[-1])[:, None, :].to(hidden_states.dtype)
            hidden_states = nn.functional.gelu(conv(hidden_states * valid))
            lengths = conv_output_length(lengths, *spec)
        hidden_states = hidden_states.permute(0, 2, 1)  # (B, T', C)
        num_positions = hidden_states.shape[1]
        hidden_states = hidden_states + self.embed_positions.weight[:num_positions]
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        key_mask = lengths_to_mask(lengths, num_positions)  # (B, T')
        additive_mask = torch.zeros(key_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        additive_mask = additive_mask.masked_fill(~key_mask, torch.finfo(hidden_states.dtype).min)
        additive_mask = additive_mask[:, None, None, :].expand(batch_size, 1, num_positions, num_positions)
        extra = {"layer_head_mask": None} if _WHISPER_LAYER_TAKES_HEAD_MASK else {}
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, additive_mask, **extra)
            if isinstance(hidden_states, tuple):
                hidden_states = hidden_states[0]
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden_states))


class SpeechLlmQFormerProjector(nn.Module):
    """Window-level Q-Former (SALMONN; arXiv 2412.15712) on transformers' `Blip2QFormerModel`.

    LayerNorm on encoder frames -> non-overlapping windows of `window_size` frames -> `num_queries` learned queries
    cross-attend to each window -> Linear to the LLM width. Shapes: (B, T, C_enc) -> (B, ceil(T / w) * q, D_llm).
    A window's outputs are valid when it holds at least one valid frame.
    """

    def __init__(self, config: SpeechLlmConfig):
        super().__init__()
        settings = config.projector_config
        self.window_size = settings["window_size"]
        self.num_queries = settings["num_queries"]
        self.length_convs = config.projector_convs  # the window split, as a conv: how many windows a clip fills
        self.layer_norm = nn.LayerNorm(config.encoder_hidden_size)
        self.query = nn.Parameter(torch.empty(1, self.num_queries, settings["hidden_size"]).normal_(0.0, 0.02))
        qformer_config = Blip2QFormerConfig(
            hidden_size=settings["hidden_size"],
            num_hidden_layers=settings["num_hidden_layers"],
            num_attention_heads=settings["num_attention_heads"],
            intermediate_size=settings["intermediate_size"],
            hidden_dropout_prob=settings["dropout"],
            attention_probs_dropout_prob=settings["dropout"],
            cross_attention_frequency=1,
            encoder_hidden_size=config.encoder_hidden_size,
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        self.linear = nn.Linear(settings["hidden_size"], config.text_config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_frames, channels = hidden_states.shape  # (B, T, C)
        num_windows = convs_output_length(num_frames, self.length_convs)
        pad = num_windows * self.window_size - num_frames
        hidden_states = nn.functional.pad(self.layer_norm(hidden_states), (0, 0, 0, pad))
        frame_mask = lengths_to_mask(lengths, num_frames + pad)
        windows = hidden_states.reshape(batch_size * num_windows, self.window_size, channels)  # (B*W, w, C)
        window_mask = frame_mask.reshape(batch_size * num_windows, self.window_size).long()
        query = self.query.expand(windows.shape[0], -1, -1)
        output = self.qformer(query_embeds=query, encoder_hidden_states=windows, encoder_attention_mask=window_mask)
        output = self.linear(output.last_hidden_state.to(self.linear.weight.dtype))  # (B*W, q, D)
        output_lengths = convs_output_length(lengths, self.length_convs) * self.num_queries
        return output.reshape(batch_size, num_windows * self.num_queries, -1), output_lengths


class SpeechLlmCnnProjector(nn.Module):
    """BLSP subsampler + adapter (arXiv 2309.00916).

    `num_layers` x [Conv1d(kernel, stride) -> GLU over channels] (8x downsampling by default), then a residual
    bottleneck `x + up(GELU(down(x)))` without bias and a LayerNorm. Shapes: (B, T, C_enc) -> (B, ~T / 8, D_llm).
    """

    def __init__(self, config: SpeechLlmConfig):
        super().__init__()
        settings = config.projector_config
        hidden = settings["hidden_size"] or config.encoder_hidden_size
        width = config.text_config.hidden_size
        channels = [config.encoder_hidden_size] + [hidden] * (settings["num_layers"] - 1) + [width]
        self.length_convs = config.projector_convs  # [kernel, stride, total padding] of each conv below
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, 2 * c_out, kernel, stride, padding=padding // 2)
            for c_in, c_out, (kernel, stride, padding) in zip(channels[:-1], channels[1:], self.length_convs)
        )
        self.adapter_down = nn.Linear(width, settings["adapter_size"], bias=False)
        self.adapter_up = nn.Linear(settings["adapter_size"], width, bias=False)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.transpose(1, 2)  # (B, C, T)
        for conv, spec in zip(self.convs, self.length_convs):
            # Zero the padding so that each clip sees the zeros it would see alone.
            mask = lengths_to_mask(lengths, hidden_states.shape[-1])[:, None, :]
            hidden_states = nn.functional.glu(conv(hidden_states * mask.to(hidden_states.dtype)), dim=1)
            lengths = conv_output_length(lengths, *spec)
        hidden_states = hidden_states.transpose(1, 2)  # (B, T', D)
        hidden_states = hidden_states + self.adapter_up(nn.functional.gelu(self.adapter_down(hidden_states)))
        return self.layer_norm(hidden_states), lengths


class SpeechLlmMlpProjector(nn.Module):
    """Frame-stacking MLP (Ultravox style): stack k frames -> LayerNorm -> Linear -> SwiGLU -> Linear.

    Shapes: (B, T, C_enc) -> (B, ceil(T / k), D_llm).
    """

    def __init__(self, config: SpeechLlmConfig):
        super().__init__()
        settings = config.projector_config
        self.stack_factor = settings["stack_factor"]
        self.length_convs = config.projector_convs  # stacking, as a conv: how many stacks a clip fills
        stacked = self.stack_factor * config.encoder_hidden_size
        self.layer_norm = nn.LayerNorm(stacked)
        self.linear_in = nn.Linear(stacked, 2 * settings["hidden_size"])
        self.linear_out = nn.Linear(settings["hidden_size"], config.text_config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_frames, channels = hidden_states.shape
        num_steps = convs_output_length(num_frames, self.length_convs)
        pad = num_steps * self.stack_factor - num_frames
        # Zero the padding so that a clip's last, partial stack is the same batched or alone.
        mask = lengths_to_mask(lengths, num_frames)[..., None].to(hidden_states.dtype)
        hidden_states = nn.functional.pad(hidden_states * mask, (0, 0, 0, pad))
        hidden_states = hidden_states.reshape(batch_size, num_steps, self.stack_factor * channels)
        gate, value = self.linear_in(self.layer_norm(hidden_states)).chunk(2, dim=-1)
        hidden_states = self.linear_out(nn.functional.silu(gate) * value)
        return hidden_states, convs_output_length(lengths, self.length_convs)


PROJECTOR_CLASSES = {"qformer": SpeechLlmQFormerProjector, "cnn": SpeechLlmCnnProjector, "mlp": SpeechLlmMlpProjector}


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
    """`loader(name_or_path, **kwargs)`; a missing checkpoint becomes an error that says what to download."""
    try:
        return loader(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"Cannot load the {what} of {name_or_path!r}: {err}\nIf it is a Hub id, download it first "
            f"(`hf download {name_or_path}`; gated models such as Llama need `hf auth login` and an accepted "
            "licence) or point to a local folder. Offline, the files must be in the local cache."
        ) from err


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
        # Map `model.encoder.*` (WhisperForConditionalGeneration) and `encoder.*` (WhisperModel) to the encoder.
        kwargs["key_mapping"] = {r"^(model\.)?encoder\.": ""}
        logger.info(
            "Loading the encoder of the Whisper checkpoint %s; its decoder's weights go unused.",
            config.encoder_name_or_path,
        )
        return from_pretrained_or_explain(
            SpeechLlmWhisperEncoder.from_pretrained, config.encoder_name_or_path, "encoder", **kwargs
        )
    encoder = from_pretrained_or_explain(AutoModel.from_pretrained, config.encoder_name_or_path, "encoder", **kwargs)
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
    return from_pretrained_or_explain(
        AutoModelForCausalLM.from_pretrained, config.text_name_or_path, "text model", **kwargs
    )


def _import_peft(reason: str):
    """peft, which only adapters need: the Hub copy of this code must load without it."""
    try:
        import peft
        import peft.tuners.tuners_utils
    except ImportError as err:
        raise ImportError(f"{reason}: `pip install peft`.") from err
    return peft


class SpeechLlmPreTrainedModel(PreTrainedModel):
    config_class = SpeechLlmConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The LLM supports flash attention; the Q-Former and a Whisper encoder do not and keep eager/SDPA attention.
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _no_split_modules = ["SpeechLlmQFormerProjector", "SpeechLlmCnnProjector", "SpeechLlmMlpProjector"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the cache's name on transformers 4.x and 5.x

    def _init_weights(self, module: nn.Module) -> None:
        # Projector modules initialise themselves in their constructors (PyTorch defaults, N(0, 0.02) queries) and
        # the encoder and LLM bring their own `_init_weights`: nothing to do here.
        return


class SpeechLlmForConditionalGeneration(SpeechLlmPreTrainedModel, GenerationMixin):
    """Speech LLM: `encoder` -> `projector` -> audio features spliced into the `language_model` input.

    The processor expands each audio placeholder to exactly as many audio tokens as the projector emits for that clip;
    `forward` scatters the projector outputs into those positions. Encoder and LLM are frozen by default: the encoder
    runs under `torch.no_grad()` in eval mode, the LLM's weights get no gradient but pass gradients to the projector.
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
        `from_pretrained`, except `quantization_config`, which only the LLM gets: quantisation is meant to shrink
        the large LLM, while the small frozen encoder keeps the precision its features were trained in.
        `attn_implementation` (a name for both backbones, or a dict keyed by `"encoder_config"` / `"text_config"`,
        as transformers takes it) is recorded on the config, so that backbones built from config honour it as well
        as loaded ones; a Whisper encoder keeps SDPA when flash attention is asked for (see
        `encoder_attn_implementation`). `dtype` applies to every part. Under DeepSpeed ZeRO-3 the encoder is built
        outside `deepspeed.zero.Init` (see `outside_zero3_init`), the LLM inside.
        """
        if "attn_implementation" in kwargs:
            # The property setter that transformers uses for configs: it passes the request on to the sub-configs.
            config._attn_implementation = kwargs.pop("attn_implementation")
        # Pin what is about to be loaded: a Hub backbone without a revision is loaded at, and records, the commit its
        # default branch points to now, which every later load of this model then asks for.
        hub_kwargs = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only", "proxies") if k in kwargs}
        if config.encoder_name_or_path and config.encoder_revision is None:
            config.encoder_revision = hub_commit(config.encoder_name_or_path, **hub_kwargs)
        if config.text_name_or_path and config.text_revision is None:
            config.text_revision = hub_commit(config.text_name_or_path, **hub_kwargs)
        encoder_kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
        with outside_zero3_init():
            if config.encoder_name_or_path:
                encoder = load_pretrained_encoder(config, **encoder_kwargs)
            else:
                encoder = build_encoder(config)
        language_model = load_pretrained_text_model(config, **kwargs) if config.text_name_or_path else None
        model = cls(config, encoder=encoder, language_model=language_model)
        # The new projector (and any randomly built backbone) joins the LLM's input device and the requested dtype.
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype == "auto":
            dtype = model.language_model.dtype
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = model.get_input_embeddings().weight.device
        model.projector.to(device=device, dtype=dtype)
        if not config.encoder_name_or_path:
            model.encoder.to(device=device, dtype=dtype)
        if language_model is None:
            model.language_model.to(device=device, dtype=dtype)
        return model.eval()  # as from_pretrained leaves a model: dropout off until a trainer calls train()

    # ----------------------------------------------------------------------------------------------------------------
    # Projector-only checkpoints. The inherited from_pretrained would leave encoder and LLM randomly initialised
    # without a word, and building them with from_pretrained inside __init__ breaks on transformers 5.x, so the
    # backbones are loaded first, by the ids the config records, and the model is built around them.

    @property
    def references_backbones(self) -> bool:
        """Whether encoder and LLM can be loaded from their own repos (so a save needs only the projector)."""
        return bool(self.config.encoder_name_or_path and self.config.text_name_or_path)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        processor=None,
        save_full_model: bool = False,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        **kwargs,
    ) -> None:
        """Save for `from_pretrained` / `AutoModel.from_pretrained(..., trust_remote_code=True)`.

        When encoder and LLM are frozen and referenced by id (`config.encoder_name_or_path`,
        `config.text_name_or_path`), only the projector is written (`projector.safetensors`), with config.json,
        generation_config.json, the model code (`auto_map`), the processor files (when `processor` is given) and a
        model card. `save_full_model=True` writes every weight instead; so does, with a warning, a model whose
        backbones have no id to be loaded from (such as the tiny preset), since nothing else could restore them.

        Args:
            save_directory: target folder.
            processor: the `SpeechLlmProcessor` to save beside the model.
            save_full_model: write all weights (e.g. for offline use).
            is_main_process, state_dict, **kwargs: as for `PreTrainedModel.save_pretrained` (the Trainer passes
                the gathered `state_dict` under DeepSpeed/FSDP).
        """
        os.makedirs(save_directory, exist_ok=True)
        if processor is not None and is_main_process:
            processor.save_pretrained(save_directory)
        if save_full_model and self.has_lora:
            raise ValueError("A full save of a model with a LoRA adapter: call model.merge_lora() first.")
        full_model = save_full_model or not self.references_backbones
        if full_model:
            if not save_full_model:
                logger.warning(
                    "The encoder and/or LLM have no Hub id or folder to be loaded from (config.encoder_name_or_path / "
                    "config.text_name_or_path): saving all weights, backbones included, to %s.",
                    save_directory,
                )
            super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        elif is_main_process:
            self._save_projector_only(save_directory, state_dict)
        if is_main_process:
            with open(os.path.join(save_directory, "README.md"), "w") as card:
                card.write(model_card(self, full_model=full_model))
            if self._auto_class is not None:  # the code ships with the weights: so does the pipeline
                ship_pipeline(save_directory)

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
        peft = _import_peft("Adapters of the LLM need peft")
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
        tuner_layer = _import_peft("Adapters of the LLM need peft").tuners.tuners_utils.BaseTunerLayer
        for module in self.language_model.modules():
            if isinstance(module, tuner_layer):
                module.enable_adapters(enabled)

    def merge_lora(self) -> None:
        """Merge the LoRA adapter into the LLM weights (e.g. before a full save); the adapter is gone afterwards."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()

    def _save_projector_only(self, save_directory: str | os.PathLike, state_dict: dict | None) -> None:
        state_dict = state_dict if state_dict is not None else self.state_dict()
        trainable_elsewhere = [
            n
            for n, p in self.named_parameters()
            if p.requires_grad and not is_projector_key(n) and not (self.has_lora and "lora_" in n)
        ]
        if trainable_elsewhere:
            raise ValueError(
                f"Parameters outside the projector are trainable ({', '.join(trainable_elsewhere[:3])}, ...): a "
                "projector-only save would lose them. Freeze them or pass save_full_model=True."
            )
        if self._auto_class is not None:  # copy the model code and write auto_map, as PreTrainedModel does
            custom_object_save(self, save_directory, config=self.config)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        projector = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if is_projector_key(k)}
        save_file(projector, os.path.join(save_directory, PROJECTOR_WEIGHTS_NAME), metadata={"format": "pt"})
        if self.has_lora:
            prefix = "language_model."
            lora_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            self.language_model.save_pretrained(os.path.join(save_directory, LORA_FOLDER), state_dict=lora_state)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """Load a projector-only save (backbones from their recorded ids and revisions) or a full save, from
        safetensors files only.

        Args:
            pretrained_model_name_or_path: Hub id or local folder.
            config: a `SpeechLlmConfig` to use instead of the saved one.
            **kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, ... locate this repo's files; `dtype`,
                `device_map`, `attn_implementation`, `quantization_config`, `token`, `cache_dir`,
                `local_files_only` also go to the backbones (as `from_backbones` describes), which load at the
                revisions in the config. An `attn_implementation` that `AutoConfig` recorded on `config` counts too.
        """
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        if resolve_file(pretrained_model_name_or_path, PROJECTOR_WEIGHTS_NAME, **hub_kwargs) is None:
            # A full save: never fall back to a pickled pytorch_model.bin, which can run code when read.
            kwargs["use_safetensors"] = True
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            forget_pipeline_entry(model.config)
            return model
        # AutoModel passes the config it loaded, an instance of the Hub copy of SpeechLlmConfig (a class object of
        # its own), so check for any config rather than for this module's class.
        if not isinstance(config, PretrainedConfig):
            config = SpeechLlmConfig.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs)
        if not (config.encoder_name_or_path and config.text_name_or_path):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds only a projector but its config names no encoder and/or LLM "
                "to load (encoder_name_or_path / text_name_or_path): set them in config.json."
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
        model = cls.from_backbones(config, **{k: kwargs[k] for k in BACKBONE_KWARGS if k in kwargs})
        model.load_trained_weights(pretrained_model_name_or_path, **hub_kwargs)
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            logger.info("No generation_config.json in %s; keeping the defaults.", pretrained_model_name_or_path)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        forget_pipeline_entry(model.config)
        return model.eval()

    def load_trained_weights(self, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
        """Load a projector-only save's trained weights into this model: the projector (strictly: any missing,
        unexpected or mis-shaped tensor is an error) and, when saved, the LLM's LoRA adapter."""
        projector_file = resolve_file(name_or_path, PROJECTOR_WEIGHTS_NAME, **hub_kwargs)
        if projector_file is None:
            raise ValueError(f"{name_or_path} holds no {PROJECTOR_WEIGHTS_NAME}.")
        expected = {k: v for k, v in self.state_dict().items() if is_projector_key(k)}
        state = load_projector_state(projector_file, expected)
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()}, strict=True)
        adapter_config = resolve_file(name_or_path, f"{LORA_FOLDER}/adapter_config.json", **hub_kwargs)
        if adapter_config is None:
            return
        peft = _import_peft(f"{name_or_path} holds a LoRA adapter of the LLM, which needs peft")
        # Read from safetensors only: peft's own loader falls back to a pickled adapter_model.bin.
        adapter_file = resolve_file(name_or_path, f"{LORA_FOLDER}/adapter_model.safetensors", **hub_kwargs)
        if adapter_file is None:
            raise ValueError(
                f"{name_or_path} holds {LORA_FOLDER}/adapter_config.json but no "
                f"{LORA_FOLDER}/adapter_model.safetensors: adapters are read from safetensors only, as a pickled .bin "
                "can run code. Save the adapter again with peft's save_pretrained (safetensors by default)."
            )
        if not self.has_lora:  # when resuming training the adapter exists already and only its weights are read
            peft_config = peft.PeftConfig.from_pretrained(os.path.dirname(adapter_config))
            peft_config.inference_mode = True  # frozen, as for PeftModel.from_pretrained
            self.language_model = peft.get_peft_model(self.language_model, peft_config)
        result = peft.set_peft_model_state_dict(self.language_model, load_file(adapter_file))
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The LoRA adapter in {name_or_path} does not fit the LLM: missing {missing[:5] or 'none'}, "
                f"unexpected {result.unexpected_keys[:5] or 'none'}."
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        processor=None,
        commit_message: str = "Upload speech LLM projector",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        save_full_model: bool = False,
    ):
        """Upload exactly what `save_pretrained` writes (by default: projector, config, code, processor, card).

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
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, processor=processor, save_full_model=save_full_model)
            with open(os.path.join(work_dir, "README.md"), "w") as card:
                card.write(model_card(self, repo_id, full_model=save_full_model))
            return upload_saved_folder(
                work_dir,
                repo_id,
                allow_full_model=save_full_model,
                commit_message=commit_message,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

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
        """Frozen sub-models stay in eval mode (no dropout, no SpecAugment) unless augmentation is asked for.

        With gradient checkpointing enabled (call this after enabling it; the Trainer calls it at every step), the
        frozen LLM's checkpointed decoder layers are flagged as training, because transformers checkpoints only
        layers in training mode; their sub-modules (attention, dropout) stay in eval mode, so no dropout acts.
        """
        super().train(mode)
        if not _has_trainable(self.encoder) and not self.config.encoder_train_mode_augment:
            self.encoder.eval()
        if not _has_trainable(self.language_model):
            self.language_model.eval()
            if mode:
                for module in self.language_model.modules():
                    if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                        module.training = True
        return self

    def encoder_output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Valid encoder frames for each clip, from its number of feature frames (or samples)."""
        return convs_output_length(feature_lengths, self.config.encoder_convs)

    def _run_encoder(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        features = input_features.to(dtype=encoder.dtype, device=encoder.device)
        mask = feature_attention_mask.to(encoder.device)
        input_name = encoder.main_input_name
        # wav2vec2/HuBERT with group norm in the feature encoder (base checkpoints) normalise over time, so padding
        # changes every frame: encode those clips one by one at their true length.
        if getattr(encoder.config, "feat_extract_norm", "layer") == "group" and not bool(mask.all()):
            lengths = mask.sum(-1)
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
        return hidden_states, self.encoder_output_lengths(feature_attention_mask.sum(-1).to(hidden_states.device))

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
        padding_free: bool | None = None,
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
            padding_free: pack the valid positions of the padded rows into one row before the LLM (see
                `SpeechLlmConfig.padding_free`, which this overrides; None: the config's setting). Packing a
                forward that cannot be packed is an error: given position ids, attention weights, an attention
                implementation that would mix the sequences, and (asked for here) a generation forward.
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
        if not has_audio and input_ids is not None and _cached_length(kwargs) == 0:
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
        packed = self._packs(padding_free, attention_mask, position_ids, use_cache, logits_to_keep, kwargs)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Left padding must not shift positions: count only real tokens (also for the cached decode steps).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if packed:
            outputs = self._packed_language_model(inputs_embeds, attention_mask, position_ids, labels, kwargs)
            return SpeechLlmCausalLMOutputWithPast(
                **outputs, audio_hidden_states=audio_embeds, audio_lengths=audio_lengths
            )
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

    def _packs(self, requested, attention_mask, position_ids, use_cache, logits_to_keep, kwargs) -> bool:
        """Whether this forward runs the LLM on packed rows; raises where packing is on but cannot be done.

        The config's `padding_free` applies to training and scoring forwards: a generation forward (a key/value
        cache, `use_cache=True`, or `logits_to_keep`, which would keep the last positions of the packed row rather
        than of each sequence) runs padded. A batch without padding is not packed: there is nothing to remove.
        """
        explicit = requested is not None
        if not (requested if explicit else getattr(self.config, "padding_free", False)):
            return False
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keeps_logits = not isinstance(logits_to_keep, int) or logits_to_keep != 0
        if use_cache or cache is not None or keeps_logits:
            if not explicit:
                return False
            raise ValueError(
                "padding_free=True packs the rows of a training or scoring forward, but this one generates (a "
                "key/value cache, use_cache=True or logits_to_keep). Pass padding_free=False (or leave it unset) to "
                "generate."
            )
        refusals = {
            "position ids are given (packing derives them from attention_mask, restarting at 0 for each row)": (
                position_ids is not None
            ),
            "attention weights are asked for (they would span the whole packed row)": bool(
                kwargs.get("output_attentions")
            ),
            "attention_mask is not a 2-D padding mask": attention_mask is not None and attention_mask.dim() != 2,
        }
        reasons = [reason for reason, refused in refusals.items() if refused]
        unsupported = padding_free_unsupported(self.language_model.config._attn_implementation)
        if unsupported:
            reasons.append(unsupported)
        if reasons:
            raise ValueError(
                f"padding_free is on but this forward cannot be packed: {'; '.join(reasons)}. Turn padding_free off "
                "for it (padding_free=False, or config.padding_free = False)."
            )
        return attention_mask is not None and not bool(attention_mask.all())

    def _packed_language_model(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None,
        kwargs: dict,
    ) -> CausalLMOutputWithPast:
        """Run the LLM on the valid positions of all rows packed into one row, and unpack its per-token outputs.

        The packed row has no attention mask and position ids that restart at 0 for each sequence: transformers then
        keeps the sequences apart (see `padding_free_unsupported`). The label of each sequence's first token is
        ignored, as in `DataCollatorWithFlattening`: the loss shifts labels along the packed row, and would otherwise
        have the last token of one sequence predict the first token of the next. No real token predicts a row's
        first token in the padded batch either, so the loss is the padded batch's (the one exception: a labelled
        first token of a left-padded row, which the padded batch has a padding position predict).
        """
        valid = attention_mask.bool()  # (B, L)
        if labels is not None:
            label_valid = valid.to(labels.device)
            first = label_valid & (label_valid.cumsum(-1) == 1)
            labels = labels.masked_fill(first, self.config.ignore_index)[label_valid][None]
        if self.language_model.config._attn_implementation.startswith("flash_attention_"):
            lengths = valid.sum(-1, dtype=torch.int32)
            lengths = lengths[lengths > 0]
            cu_seq_lens = nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_length = int(lengths.max())
            kwargs = {
                **kwargs,
                "cu_seq_lens_q": cu_seq_lens,
                "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": max_length,
                "max_length_k": max_length,
            }
        outputs = self.language_model(
            inputs_embeds=inputs_embeds[valid][None],  # (1, N, D)
            attention_mask=None,
            position_ids=position_ids[valid][None],
            labels=labels,
            use_cache=False,  # a cache would make transformers skip the packed-sequence mask
            **{**kwargs, "return_dict": True},
        )
        outputs.logits = unpack(outputs.logits, valid)
        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(unpack(states, valid) for states in outputs.hidden_states)
        return outputs

    _AUDIO_INPUTS = ("input_features", "feature_attention_mask", "encoder_hidden_states", "encoder_lengths")

    def prepare_inputs_for_generation(self, *args, **kwargs):
        audio = {name: kwargs.pop(name, None) for name in self._AUDIO_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Audio is encoded once, in the prefill step; later steps read the LLM's cache.
        prefill = _cached_length(kwargs) == 0
        model_inputs.update({name: value if prefill else None for name, value in audio.items()})
        return model_inputs


def _has_trainable(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


def _cached_length(kwargs: dict) -> int:
    """Tokens already in the LLM's key/value cache among `kwargs` (`past_key_values` on transformers 4.x, `cache` on
    newer 5.x); 0 in a prefill step."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else cache.get_seq_length()


__all__ = [
    "SpeechLlmPreTrainedModel",
    "SpeechLlmForConditionalGeneration",
    "SpeechLlmQFormerProjector",
    "SpeechLlmCnnProjector",
    "SpeechLlmMlpProjector",
    "SpeechLlmWhisperEncoder",
    "SpeechLlmCausalLMOutputWithPast",
    "from_pretrained_or_explain",
    "encoder_attn_implementation",
    "load_pretrained_encoder",
    "load_pretrained_text_model",
]
