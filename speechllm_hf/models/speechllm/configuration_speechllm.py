"""SpeechLlmConfig: a frozen speech encoder, a trainable projector and a frozen causal LLM.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

PROJECTOR_TYPES = ("qformer", "cnn", "mlp")
PIPELINE_TASK = "speech-llm"  # the task name of the pipeline a saved folder ships (pipeline_speechllm.py)

# Defaults per projector type; `projector_config` overrides any of them.
PROJECTOR_DEFAULTS: dict[str, dict] = {
    # Window-level Q-Former (SALMONN style), as in the contrastive-pretraining paper: 17 frames -> 4 queries.
    "qformer": {
        "window_size": 17,
        "num_queries": 4,
        "hidden_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "dropout": 0.1,
    },
    # BLSP: 3 x (Conv1d k5 s2 -> GLU) = 8x downsampling, then a residual bottleneck adapter and LayerNorm.
    "cnn": {
        "num_layers": 3,
        "kernel_size": 5,
        "stride": 2,
        "hidden_size": None,  # channels between conv layers; None = the encoder's hidden size
        "adapter_size": 512,
    },
    # Frame stacking (Ultravox style): stack k frames -> norm -> Linear -> SwiGLU -> Linear.
    "mlp": {
        "stack_factor": 5,
        "hidden_size": 2048,
    },
}

# (kernel, stride, total padding) of the convolutions in front of a Whisper encoder's transformer layers.
WHISPER_CONVS = [[3, 1, 2], [3, 2, 2]]


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


def audio_token_count(feature_length: int, length_spec: dict) -> int:
    """Number of audio tokens the model emits for a clip of `feature_length` feature frames (or samples).

    `length_spec` is `SpeechLlmConfig.audio_length_spec`. The processor uses this to expand each audio placeholder;
    the encoder and projectors compute their output lengths from the same conv specs with `convs_output_length`,
    so the two always agree.
    """
    return convs_output_length(feature_length, length_spec["convs"]) * length_spec["tokens_per_step"]


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
        projector_config (`dict`, *optional*):
            Settings of the projector, merged over the defaults of its type (see `PROJECTOR_DEFAULTS`).
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
        projector_config: dict | None = None,
        audio_token: str = "<audio>",
        audio_token_id: int | None = None,
        encoder_name_or_path: str | None = None,
        encoder_revision: str | None = None,
        text_name_or_path: str | None = None,
        text_revision: str | None = None,
        freeze_encoder: bool = True,
        freeze_text_model: bool = True,
        encoder_length_spec: list | None = None,
        ignore_index: int = -100,
        **kwargs,
    ):
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"Unknown projector_type {projector_type!r}; choose one of {', '.join(PROJECTOR_TYPES)}.")
        unknown = set(projector_config or {}) - set(PROJECTOR_DEFAULTS[projector_type])
        if unknown:
            raise ValueError(
                f"Unknown {projector_type} projector settings {sorted(unknown)}; "
                f"valid ones are {sorted(PROJECTOR_DEFAULTS[projector_type])}."
            )
        self.encoder_config = _as_config(encoder_config, "hubert")
        self.text_config = _as_config(text_config, "llama")
        self.projector_type = projector_type
        self.projector_config = {**PROJECTOR_DEFAULTS[projector_type], **(projector_config or {})}
        self.audio_token = audio_token
        self.audio_token_id = audio_token_id
        self.encoder_name_or_path = encoder_name_or_path
        self.encoder_revision = encoder_revision
        self.text_name_or_path = text_name_or_path
        self.text_revision = text_revision
        self.freeze_encoder = freeze_encoder
        self.freeze_text_model = freeze_text_model
        self.encoder_length_spec = encoder_length_spec
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
    def projector_convs(self) -> list[list[int]]:
        """The projector's downsampling written as convolutions (a window split is a conv with kernel = stride)."""
        settings = self.projector_config
        if self.projector_type == "qformer":
            window = settings["window_size"]
            return [[window, window, window - 1]]
        if self.projector_type == "cnn":
            kernel, stride = settings["kernel_size"], settings["stride"]
            return [[kernel, stride, 2 * (kernel // 2)]] * settings["num_layers"]
        stack = settings["stack_factor"]
        return [[stack, stack, stack - 1]]

    @property
    def audio_length_spec(self) -> dict:
        """What the processor needs to expand audio placeholders; see `audio_token_count`."""
        return {
            "convs": self.encoder_convs + self.projector_convs,
            "tokens_per_step": self.projector_config["num_queries"] if self.projector_type == "qformer" else 1,
            "max_feature_length": self.max_feature_length,
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


__all__ = [
    "SpeechLlmConfig",
    "audio_token_count",
    "conv_output_length",
    "hidden_size_of",
    "convs_output_length",
    "PROJECTOR_TYPES",
    "PROJECTOR_DEFAULTS",
    "WHISPER_CONVS",
]
