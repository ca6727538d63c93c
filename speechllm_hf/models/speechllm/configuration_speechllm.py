"""SpeechLlmConfig: a frozen speech encoder, a trainable projector and a frozen causal LLM.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import inspect

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

PIPELINE_TASK = "speech-llm"  # the task name of the pipeline a saved folder ships (pipeline_speechllm.py)


class SpeechLlmProjectorConfig(PretrainedConfig):
    """Base of the projector configs: a projector's settings are the arguments of its config's `__init__`, and only
    they are serialised (PretrainedConfig's generic fields, such as `id2label`, mean nothing for a projector)."""

    @classmethod
    def setting_names(cls) -> list[str]:
        return list(inspect.signature(cls.__init__).parameters)[1:-1]  # between self and **kwargs

    def to_dict(self) -> dict:
        # `transformers_version` too: PretrainedConfig.to_dict deletes it from every nested config's dict.
        settings = {name: getattr(self, name) for name in self.setting_names()}
        return {"model_type": self.model_type, **settings, "transformers_version": self.transformers_version}


class SpeechLlmQFormerProjectorConfig(SpeechLlmProjectorConfig):
    r"""
    Settings of the window-level Q-Former projector (SALMONN; the contrastive-pretraining paper's): LayerNorm on the
    encoder frames, non-overlapping windows of `window_size` frames, `num_queries` learned queries cross-attending to
    each window in a `Blip2QFormerModel`, then a Linear layer to the LLM width.

    Args:
        window_size (`int`, *optional*, defaults to 17): encoder frames per window.
        num_queries (`int`, *optional*, defaults to 4): queries (audio tokens) per window.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size (`int`, *optional*, defaults to 768,
            4, 12, 3072): the Q-Former's BERT layers.
        dropout (`float`, *optional*, defaults to 0.1): hidden and attention dropout of the Q-Former.
    """

    model_type = "speechllm_qformer_projector"

    def __init__(
        self,
        window_size: int = 17,
        num_queries: int = 4,
        hidden_size: int = 768,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        **kwargs,
    ):
        self.window_size = window_size
        self.num_queries = num_queries
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        super().__init__(**kwargs)

    @property
    def convs(self) -> list[list[int]]:
        """The window split, as a convolution (kernel = stride): how many windows a clip fills."""
        return [[self.window_size, self.window_size, self.window_size - 1]]

    @property
    def tokens_per_step(self) -> int:
        return self.num_queries


class SpeechLlmCnnProjectorConfig(SpeechLlmProjectorConfig):
    r"""
    Settings of BLSP's convolutional projector: `num_layers` x [Conv1d(kernel_size, stride) -> GLU] (8x downsampling
    by default), then a residual bottleneck adapter without bias and a LayerNorm.

    Args:
        num_layers (`int`, *optional*, defaults to 3), kernel_size (`int`, *optional*, defaults to 5), stride (`int`,
            *optional*, defaults to 2): the convolutions.
        hidden_size (`int`, *optional*): channels between the convolutions; None: the encoder's hidden size.
        adapter_size (`int`, *optional*, defaults to 512): the bottleneck of the residual adapter.
    """

    model_type = "speechllm_cnn_projector"

    def __init__(
        self,
        num_layers: int = 3,
        kernel_size: int = 5,
        stride: int = 2,
        hidden_size: int | None = None,
        adapter_size: int = 512,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.kernel_size = kernel_size
        self.stride = stride
        self.hidden_size = hidden_size
        self.adapter_size = adapter_size
        super().__init__(**kwargs)

    @property
    def convs(self) -> list[list[int]]:
        """`[kernel, stride, total padding]` of each convolution."""
        return [[self.kernel_size, self.stride, 2 * (self.kernel_size // 2)]] * self.num_layers

    @property
    def tokens_per_step(self) -> int:
        return 1


class SpeechLlmMlpProjectorConfig(SpeechLlmProjectorConfig):
    r"""
    Settings of the frame-stacking MLP projector (Ultravox style): stack `stack_factor` frames, LayerNorm, Linear,
    SwiGLU, Linear.

    Args:
        stack_factor (`int`, *optional*, defaults to 5): encoder frames per audio token.
        hidden_size (`int`, *optional*, defaults to 2048): width of the SwiGLU.
    """

    model_type = "speechllm_mlp_projector"

    def __init__(self, stack_factor: int = 5, hidden_size: int = 2048, **kwargs):
        self.stack_factor = stack_factor
        self.hidden_size = hidden_size
        super().__init__(**kwargs)

    @property
    def convs(self) -> list[list[int]]:
        """Stacking, as a convolution (kernel = stride): how many stacks a clip fills."""
        return [[self.stack_factor, self.stack_factor, self.stack_factor - 1]]

    @property
    def tokens_per_step(self) -> int:
        return 1


PROJECTOR_CONFIG_CLASSES = {
    "qformer": SpeechLlmQFormerProjectorConfig,
    "cnn": SpeechLlmCnnProjectorConfig,
    "mlp": SpeechLlmMlpProjectorConfig,
}
PROJECTOR_TYPES = tuple(PROJECTOR_CONFIG_CLASSES)

# (kernel, stride, total padding) of the convolutions in front of a Whisper encoder's transformer layers.
WHISPER_CONVS = [[3, 1, 2], [3, 2, 2]]

# Encoder window of encoders fed raw samples (HuBERT, wav2vec2, ...): 30 s at their 16 kHz, as Whisper's. Clips up to
# it (all of the training data under `prepare`'s 30 s default) are encoded whole, exactly as before windows existed;
# a window costs about 200 MB in the convolutional feature encoder (512 channels x 96,000 frames) and 1,500 frames of
# self-attention, whatever the clip's length.
DEFAULT_SAMPLE_WINDOW = 480_000


def conv_output_length(length, kernel: int, stride: int, padding: int):
    """Frames a 1-D convolution (or window split) emits for `length` input frames (an int or a tensor of them);
    `padding` is the total over both ends."""
    frames = (length + padding - kernel) // stride + 1
    return frames.clamp(min=0) if hasattr(frames, "clamp") else max(frames, 0)


def convs_output_length(length, convs: list[list[int]]):
    """Frames left of `length` input frames (an int or a tensor of them) after the 1-D convolutions (or window
    splits) `convs`, given as `[[kernel, stride, total_padding], ...]`."""
    for kernel, stride, padding in convs:
        length = conv_output_length(length, kernel, stride, padding)
    return length


def windowed_output_length(length, convs: list[list[int]], window: int):
    """Frames an encoder with downsampling steps `convs` emits for `length` input frames (an int or a tensor of them)
    encoded in consecutive windows of `window` frames, the last one shorter, their outputs concatenated."""
    full, rest = length // window, length % window
    return full * convs_output_length(window, convs) + convs_output_length(rest, convs) * (rest > 0)


def window_settings(length_spec: dict) -> tuple[int, int]:
    """`(window_length, encoder_steps)` of an `audio_length_spec`: the encoder window in feature frames and how many
    of its `convs` are the encoder's.

    A spec saved before windows existed (a processor_config.json without these keys) gets what the model now does
    with the same config: Whisper-like encoders (`max_feature_length` set) window at it after their two convolutions;
    other encoders at `DEFAULT_SAMPLE_WINDOW` after their feature encoder's convolutions, the leading unpadded steps
    whose kernel differs from their stride (the projectors' steps are padded or have kernel = stride).
    """
    if "window_length" in length_spec:
        return length_spec["window_length"], length_spec["encoder_steps"]
    if length_spec.get("max_feature_length") is not None:
        return length_spec["max_feature_length"], len(WHISPER_CONVS)
    steps = 0
    for kernel, stride, padding in length_spec["convs"]:
        if padding or kernel == stride:
            break
        steps += 1
    return DEFAULT_SAMPLE_WINDOW, steps


def audio_token_count(feature_length: int, length_spec: dict) -> int:
    """Number of audio tokens the model emits for a clip of `feature_length` feature frames (or samples).

    `length_spec` is `SpeechLlmConfig.audio_length_spec`. The encoder runs in windows of `window_length` frames (see
    `SpeechLlmConfig.encoder_window_length`) whose outputs are concatenated before the projector. The processor uses
    this to expand each audio placeholder; the model computes its lengths with the same functions (`windowed_output_
    length`, `convs_output_length`), so the two always agree.
    """
    window, steps = window_settings(length_spec)
    encoder_convs, projector_convs = length_spec["convs"][:steps], length_spec["convs"][steps:]
    frames = windowed_output_length(feature_length, encoder_convs, window)
    return convs_output_length(frames, projector_convs) * length_spec["tokens_per_step"]


class SpeechLlmConfig(PretrainedConfig):
    r"""
    Configuration of a [`SpeechLlmForConditionalGeneration`]: speech encoder -> projector -> causal LLM.

    Args:
        encoder_config (`Union[PretrainedConfig, dict]`, *optional*):
            Config of the speech encoder: HuBERT, wav2vec2, a Whisper (encoder) config, or any transformers audio
            encoder. A dict needs a `model_type` key. Defaults to a `HubertConfig`.
        text_config (`Union[PretrainedConfig, dict]`, *optional*):
            Config of the causal LLM (any `AutoModelForCausalLM`; Llama is the reference). Defaults to `LlamaConfig`.
        projector_type (`str`, *optional*, defaults to `"qformer"`):
            One of `"qformer"` (window-level Q-Former), `"cnn"` (BLSP convolutional subsampler + adapter) or `"mlp"`
            (frame stacking + SwiGLU MLP).
        projector_config (`Union[PretrainedConfig, dict]`, *optional*):
            Settings of the projector: a `SpeechLlmQFormerProjectorConfig`, `SpeechLlmCnnProjectorConfig` or
            `SpeechLlmMlpProjectorConfig` (as `projector_type` says), or a dict of settings over that type's defaults.
        audio_token (`str`, *optional*, defaults to `"<audio>"`):
            The placeholder token that marks where audio features go in the text.
        audio_token_id (`int`, *optional*):
            Its id in the tokenizer. It may lie beyond the LLM's vocabulary: it is never embedded by the LLM.
        encoder_name_or_path (`str`, *optional*):
            Hub id or local folder of the pretrained encoder, used to load it when this config is loaded.
        encoder_revision (`str`, *optional*):
            Revision (branch, tag or commit) of `encoder_name_or_path`.
        text_name_or_path (`str`, *optional*):
            Hub id or local folder of the pretrained LLM.
        text_revision (`str`, *optional*):
            Revision of `text_name_or_path`.
        freeze_encoder (`bool`, *optional*, defaults to `True`):
            Keep the encoder frozen: no gradients, eval mode, run under `torch.no_grad()`.
        freeze_text_model (`bool`, *optional*, defaults to `True`):
            Keep the LLM's weights frozen (gradients still flow through it to the projector).
        encoder_length_spec (`list`, *optional*):
            `[[kernel, stride, total_padding], ...]` of the encoder's downsampling convolutions, for an encoder
            whose output length cannot be read from its config (HuBERT/wav2vec2-like and Whisper-like encoders
            need nothing).
        encoder_window_length (`int`, *optional*):
            Feature frames (Whisper: mel frames, 100 a second; HuBERT/wav2vec2: samples) per encoder window. Longer
            clips are encoded one window at a time and the encoder outputs concatenated before the projector, so the
            encoder's memory is bounded by the window whatever the clip's length. Defaults to 30 s: Whisper's
            3000 frames (the most its positional table holds), `DEFAULT_SAMPLE_WINDOW` (480,000 samples at 16 kHz)
            for other encoders.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value that the loss ignores; audio positions always get it.

    Example:

    ```python
    >>> from transformers import HubertConfig, LlamaConfig
    >>> from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration

    >>> config = SpeechLlmConfig(encoder_config=HubertConfig(), text_config=LlamaConfig(), projector_type="qformer")
    >>> model = SpeechLlmForConditionalGeneration(config)
    ```
    """

    model_type = "speechllm_hf"
    sub_configs = {"encoder_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        encoder_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projector_type: str = "qformer",
        projector_config: PretrainedConfig | dict | None = None,
        audio_token: str = "<audio>",
        audio_token_id: int | None = None,
        encoder_name_or_path: str | None = None,
        encoder_revision: str | None = None,
        text_name_or_path: str | None = None,
        text_revision: str | None = None,
        freeze_encoder: bool = True,
        freeze_text_model: bool = True,
        encoder_length_spec: list | None = None,
        encoder_window_length: int | None = None,
        ignore_index: int = -100,
        **kwargs,
    ):
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"Unknown projector_type {projector_type!r}; choose one of {', '.join(PROJECTOR_TYPES)}.")
        self.encoder_config = _as_config(encoder_config, "hubert")
        self.text_config = _as_config(text_config, "llama")
        self.projector_type = projector_type
        self.projector_config = _as_projector_config(projector_config, projector_type)
        self.audio_token = audio_token
        self.audio_token_id = audio_token_id
        self.encoder_name_or_path = encoder_name_or_path
        self.encoder_revision = encoder_revision
        self.text_name_or_path = text_name_or_path
        self.text_revision = text_revision
        self.freeze_encoder = freeze_encoder
        self.freeze_text_model = freeze_text_model
        self.encoder_length_spec = encoder_length_spec
        self.encoder_window_length = encoder_window_length
        self.encoder_window  # noqa: B018 (checks the window now rather than at the first long clip)
        self.ignore_index = ignore_index
        super().__init__(**kwargs)

    @property
    def encoder_hidden_size(self) -> int:
        return hidden_size_of(self.encoder_config)

    def check_backbones(self, encoder_config: PretrainedConfig, text_config: PretrainedConfig) -> None:
        """Checks that the encoder and LLM actually used are as wide as this config says.

        The projector is built from this config's widths. An encoder of another width fails deep in the projector's
        first layer; an LLM of another width is worse: its embeddings take the audio features element by element
        (`masked_scatter`) without an error. Both happen when `encoder_config` / `text_config` were written by hand
        or edited while the weights come from `encoder_name_or_path` / `text_name_or_path`.

        Raises:
            ValueError: naming the sub-model and both widths.
        """
        for what, key, expected, config in (
            ("encoder", "encoder_config", self.encoder_hidden_size, encoder_config),
            ("LLM", "text_config", hidden_size_of(self.text_config), text_config),
        ):
            actual = hidden_size_of(config)
            if actual != expected:
                raise ValueError(
                    f"The {what} is {actual} wide but the config's {key} says {expected}, which the projector is "
                    f"built for. Take {key} from the checkpoint itself (AutoConfig.from_pretrained, as from_preset "
                    "does) instead of writing or editing it."
                )

    @property
    def is_whisper_like_encoder(self) -> bool:
        """Log-mel encoders with Whisper's conv front end (Whisper, Qwen2-Audio encoder)."""
        return hasattr(self.encoder_config, "num_mel_bins") and hasattr(self.encoder_config, "max_source_positions")

    @property
    def max_feature_length(self) -> int | None:
        """Longest input (feature frames) the encoder accepts: Whisper's positional table ends at 30 s."""
        if self.is_whisper_like_encoder:
            return 2 * self.encoder_config.max_source_positions
        return None

    @property
    def encoder_window(self) -> int:
        """Feature frames per encoder window: `encoder_window_length`, or the encoder's 30 s default.

        Raises:
            ValueError: for a window a Whisper-like encoder cannot take, or one that is not a positive number.
        """
        window = self.encoder_window_length
        limit = self.max_feature_length
        if window is None:
            return limit if limit is not None else DEFAULT_SAMPLE_WINDOW
        if not isinstance(window, int) or window < 1 or (limit is not None and window > limit):
            most = f"at most {limit} (30 s) for this Whisper-like encoder" if limit is not None else "a positive int"
            raise ValueError(f"encoder_window_length is {window!r}; it must be {most}.")
        return window

    @property
    def encoder_convs(self) -> list[list[int]]:
        """`[kernel, stride, total_padding]` of each encoder downsampling step (feature frames -> hidden frames)."""
        if self.encoder_length_spec is not None:
            return [list(step) for step in self.encoder_length_spec]
        config = self.encoder_config
        if hasattr(config, "conv_kernel") and hasattr(config, "conv_stride"):  # wav2vec2, HuBERT, WavLM, ...
            return [[k, s, 0] for k, s in zip(config.conv_kernel, config.conv_stride)]
        if self.is_whisper_like_encoder:
            return [list(step) for step in WHISPER_CONVS]
        raise ValueError(
            f"Cannot tell how {type(config).__name__} downsamples its input; "
            "pass encoder_length_spec=[[kernel, stride, total_padding], ...] to SpeechLlmConfig."
        )

    @property
    def audio_length_spec(self) -> dict:
        """What the processor needs to expand audio placeholders; see `audio_token_count`."""
        encoder_convs = self.encoder_convs
        return {
            "convs": encoder_convs + self.projector_config.convs,
            "tokens_per_step": self.projector_config.tokens_per_step,
            "max_feature_length": self.max_feature_length,
            "window_length": self.encoder_window,
            "encoder_steps": len(encoder_convs),
        }

    def audio_tokens_per_second(self, feature_rate: float) -> float:
        """Approximate audio tokens per second of speech given the feature rate (samples or mel frames per second)."""
        rate = feature_rate
        for _, stride, _ in self.audio_length_spec["convs"]:
            rate /= stride
        return rate * self.audio_length_spec["tokens_per_step"]


def hidden_size_of(config: PretrainedConfig) -> int:
    """The width of a sub-model's hidden states, read from its config (`hidden_size`, Whisper's `d_model`, ...)."""
    for name in ("hidden_size", "d_model", "output_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"Cannot read the hidden size of {type(config).__name__}.")


def _as_config(config: PretrainedConfig | dict | None, default_type: str) -> PretrainedConfig:
    if config is None:
        return CONFIG_MAPPING[default_type]()
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", default_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"Unknown model_type {model_type!r} in a SpeechLlmConfig sub-config.")
        return CONFIG_MAPPING[model_type](**config)
    raise TypeError(f"Expected a PretrainedConfig or a dict, got {type(config).__name__}.")


def _as_projector_config(config: PretrainedConfig | dict | None, projector_type: str) -> SpeechLlmProjectorConfig:
    """The projector settings as the config class of `projector_type`: from a config, a dict of settings over the
    type's defaults (the form folders saved before these classes existed hold), or None for the defaults.

    Raises:
        ValueError: for a setting the type does not have, or a config of another projector type.
    """
    config_class = PROJECTOR_CONFIG_CLASSES[projector_type]
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    config = dict(config or {})
    model_type = config.pop("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise ValueError(f"projector_type is {projector_type!r} but projector_config is a {model_type!r} config.")
    settings = config_class.setting_names()
    unknown = sorted(set(config) - set(settings))
    if unknown:
        raise ValueError(f"Unknown {projector_type} projector settings {unknown}; valid ones are {sorted(settings)}.")
    return config_class(**config)


__all__ = [
    "SpeechLlmConfig",
    "SpeechLlmCnnProjectorConfig",
    "SpeechLlmProjectorConfig",
    "SpeechLlmMlpProjectorConfig",
    "SpeechLlmQFormerProjectorConfig",
    "PROJECTOR_CONFIG_CLASSES",
    "audio_token_count",
    "conv_output_length",
    "hidden_size_of",
    "convs_output_length",
    "DEFAULT_SAMPLE_WINDOW",
    "PROJECTOR_TYPES",
    "WHISPER_CONVS",
    "window_settings",
    "windowed_output_length",
]
