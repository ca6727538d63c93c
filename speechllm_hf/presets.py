"""Named model recipes: `from_preset(name, **overrides) -> (model, processor)`.

- "hubert-qformer": contrastive task-independent pretraining (arXiv 2412.15712): HuBERT-large + window Q-Former +
  Llama-3.1-8B-Instruct with its chat template and the paper's system prompt.
- "whisper-cnn": BLSP (arXiv 2309.00916): Whisper-small encoder + CNN subsampler/adapter + Llama-2-7B, BLSP prompt.
- "whisper-base-smollm2", "whisper-base-smollm2-qformer": whisper-base's encoder + CNN adapter (or window Q-Former) +
  SmolLM2-135M-Instruct: real pretrained backbones small enough to train on a CPU.
- "tiny": a randomly initialised model of a few MB with its own small BPE tokenizer (merges learnt from the bundled
  corpus), built without any download:
  the default for tests, examples and the quickstart.

Prompt format: the LLM's own chat template when its tokenizer has one, else BLSP's (a base LLM); `chat_template=`
replaces either.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoTokenizer,
    HubertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from .models.speechllm import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor
from .models.speechllm.loading_speechllm import from_pretrained_or_explain, hub_commit
from .models.speechllm.processing_speechllm import add_special_token, ensure_pad_token

ENCODER_TYPES = ("hubert", "whisper", "wav2vec2")

# Hub ids used when a preset's encoder type is overridden without naming a checkpoint.
DEFAULT_ENCODER_IDS = {
    "hubert": "facebook/hubert-large-ls960-ft",
    "whisper": "openai/whisper-small",
    "wav2vec2": "facebook/wav2vec2-large-960h-lv60-self",
}

CONTRASTIVE_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# BLSP: `###[Human]:{instruction}<speech>\n\n\n###[Assistant]:{response}</s>`, BOS once at the start (when the
# tokenizer has one). The template of a base LLM, which has none of its own.
BLSP_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}###[Human]:{{ message['content'] }}\n\n\n###[Assistant]:"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# For a 512-d encoder (whisper-base) and a 576-d LLM (SmolLM2-135M): about 8.5 M parameters either way, a few
# percent of the LLM. The CNN keeps the encoder's width between its convolutions and a bottleneck below the LLM's;
# the Q-Former takes the encoder's width, with 2 layers instead of the paper's 4 at 768 for an 8B LLM.
SMALL_LLM_PROJECTOR_CONFIGS = {
    "cnn": {"adapter_size": 256},
    "qformer": {"hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 2048},
}

# Small enough to train in minutes on two CPU cores, with the token rates of the full-size projectors.
TINY_PROJECTOR_CONFIGS = {
    "qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "cnn": {"adapter_size": 32},
    "mlp": {"hidden_size": 64},
}


@dataclass(frozen=True)
class Preset:
    encoder_type: str
    encoder_name_or_path: str | None
    text_name_or_path: str | None
    projector_type: str
    system_prompt: str | None = None
    # Projector settings over the type's defaults, per projector type (so that `projector_type=` keeps them sized).
    projector_configs: dict[str, dict] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "hubert-qformer": Preset(
        "hubert",
        "facebook/hubert-large-ls960-ft",
        "meta-llama/Llama-3.1-8B-Instruct",
        "qformer",
        system_prompt=CONTRASTIVE_SYSTEM_PROMPT,
    ),
    "whisper-cnn": Preset("whisper", "openai/whisper-small", "meta-llama/Llama-2-7b-hf", "cnn"),
    # Offline stand-ins for both backbones: `python scripts/offline_backbones.py DIR`, then
    # encoder_name_or_path=DIR/whisper-base, text_name_or_path=DIR/smollm2-135m-instruct.
    "whisper-base-smollm2": Preset(
        "whisper",
        "openai/whisper-base",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "cnn",
        projector_configs=SMALL_LLM_PROJECTOR_CONFIGS,
    ),
    "whisper-base-smollm2-qformer": Preset(
        "whisper",
        "openai/whisper-base",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "qformer",
        projector_configs=SMALL_LLM_PROJECTOR_CONFIGS,
    ),
    "tiny": Preset("hubert", None, None, "qformer", projector_configs=TINY_PROJECTOR_CONFIGS),
}

# Settings that go to SpeechLlmConfig; every other keyword of `from_preset` goes to the backbones' from_pretrained.
_CONFIG_KEYS = (
    "freeze_encoder",
    "freeze_text_model",
    "audio_token",
    "ignore_index",
)


def tiny_tokenizer(audio_token: str = "<audio>") -> PreTrainedTokenizerFast:
    """A small BPE tokenizer built in code (no download): merges learnt from the bundled corpus' training transcripts,
    on a base alphabet of every printable ASCII character, so any English text tokenizes and corpus words are one
    token each (which lets a tiny random LLM learn from a few minutes of CPU training)."""
    from .quickstart.corpus import load_split

    specials = ["<unk>", "<s>", "</s>", "<pad>", audio_token, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation + "\n"),
        show_progress=False,
    )
    backend.train_from_iterator(sorted(row["text"] for row in load_split("train")), trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="left",
    )


def tiny_encoder_config(encoder_type: str):
    """A tiny random encoder with the real one's frame rate (HuBERT/wav2vec2: 320x conv stack; Whisper: 2x)."""
    if encoder_type == "whisper":
        return WhisperConfig(
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_layers=1,
            decoder_attention_heads=4,
            decoder_ffn_dim=128,
            num_mel_bins=80,
        )
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",  # as in the large checkpoints: padding is masked, not normalised over
        do_stable_layer_norm=True,
        vocab_size=32,
    )
    return HubertConfig(**common) if encoder_type == "hubert" else Wav2Vec2Config(**common)


def tiny_text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # SmolLM2's: room for the 10-minute clips the processor takes
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _absolute_if_local(name_or_path: str | None) -> str | None:
    """Local folders are recorded as absolute paths, so that a saved config loads from any working directory."""
    return os.path.abspath(name_or_path) if name_or_path and os.path.isdir(name_or_path) else name_or_path


def default_chat_template(tokenizer) -> str:
    """The prompt format of a preset: the LLM's own chat template (an instruction-tuned LLM was trained on it), else
    BLSP's (a base LLM has none)."""
    return getattr(tokenizer, "chat_template", None) or BLSP_CHAT_TEMPLATE


def _prepare_text_tokenizer(tokenizer, audio_token: str):
    add_special_token(tokenizer, audio_token)
    # Before the processor is built: the generation config takes the pad id from the tokenizer.
    return ensure_pad_token(tokenizer)


def from_preset(
    name: str,
    *,
    encoder_type: str | None = None,
    projector_type: str | None = None,
    projector_config: dict | None = None,
    encoder_name_or_path: str | None = None,
    encoder_revision: str | None = None,
    text_name_or_path: str | None = None,
    text_revision: str | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    **kwargs,
) -> tuple[SpeechLlmForConditionalGeneration, SpeechLlmProcessor]:
    """Build a model and its processor from a named preset.

    Args:
        name: one of `PRESETS`: "hubert-qformer", "whisper-cnn", "whisper-base-smollm2",
            "whisper-base-smollm2-qformer" or "tiny".
        encoder_type: "hubert", "whisper" or "wav2vec2" instead of the preset's encoder.
        projector_type: "qformer", "cnn" or "mlp" instead of the preset's projector.
        projector_config: projector settings over the type's defaults.
        encoder_name_or_path, text_name_or_path: a Hub id or local folder whose weights are loaded (with
            `*_revision`). For "tiny", giving one replaces the random sub-model with the pretrained one.
        chat_template: a Jinja chat template instead of the LLM's own (or, for a base LLM without one, BLSP's).
        system_prompt: a system message inserted into conversations without one, instead of the preset's.
        **kwargs: `freeze_encoder`, `freeze_text_model`, `audio_token`,
            `ignore_index` go to `SpeechLlmConfig`; anything else (dtype, device_map,
            attn_implementation, quantization_config, token, cache_dir, local_files_only, ...) to
            `SpeechLlmForConditionalGeneration.from_backbones`, which honours dtype and attn_implementation for
            random tiny backbones too and gives quantization_config to the LLM only (encoder_quantization_config
            to the encoder; see `speechllm_hf.quantization`).

    Returns:
        `(model, processor)`.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    if encoder_type is not None and encoder_type not in ENCODER_TYPES:
        raise ValueError(f"Unknown encoder_type {encoder_type!r}; choose one of {', '.join(ENCODER_TYPES)}.")
    config_kwargs = {key: kwargs.pop(key) for key in _CONFIG_KEYS if key in kwargs}
    audio_token = config_kwargs.get("audio_token", "<audio>")
    is_tiny = name == "tiny"
    requested_encoder_type, encoder_type = encoder_type, encoder_type or preset.encoder_type
    if encoder_name_or_path is None and not is_tiny:
        same_encoder = encoder_type == preset.encoder_type
        encoder_name_or_path = preset.encoder_name_or_path if same_encoder else DEFAULT_ENCODER_IDS[encoder_type]
    text_name_or_path = _absolute_if_local(text_name_or_path or preset.text_name_or_path)
    encoder_name_or_path = _absolute_if_local(encoder_name_or_path)
    projector_type = projector_type or preset.projector_type
    hub_kwargs = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in kwargs}
    # Configs, tokenizer, feature extractor and weights all come from one commit, recorded in the config.
    if encoder_name_or_path and encoder_revision is None:
        encoder_revision = hub_commit(encoder_name_or_path, **hub_kwargs)
    if text_name_or_path and text_revision is None:
        text_revision = hub_commit(text_name_or_path, **hub_kwargs)

    encoder_config, feature_extractor = _encoder_parts(
        encoder_name_or_path, encoder_revision, encoder_type, requested_encoder_type, hub_kwargs
    )
    text_config, tokenizer = _text_parts(text_name_or_path, text_revision, audio_token, hub_kwargs)

    config = SpeechLlmConfig(
        encoder_config=encoder_config,
        text_config=text_config,
        projector_type=projector_type,
        projector_config={**preset.projector_configs.get(projector_type, {}), **(projector_config or {})},
        audio_token_id=tokenizer.convert_tokens_to_ids(audio_token),
        encoder_name_or_path=encoder_name_or_path,
        encoder_revision=encoder_revision,
        text_name_or_path=text_name_or_path,
        text_revision=text_revision,
        **config_kwargs,
    )
    model = SpeechLlmForConditionalGeneration.from_backbones(config, **kwargs)
    _set_generation_defaults(model, tokenizer)
    processor = SpeechLlmProcessor(
        feature_extractor,
        tokenizer,
        chat_template=chat_template or default_chat_template(tokenizer),
        audio_token=audio_token,
        audio_length_spec=config.audio_length_spec,
        system_prompt=system_prompt if system_prompt is not None else preset.system_prompt,
    )
    return model, processor


def _encoder_parts(name_or_path, revision, encoder_type, requested_type, hub_kwargs):
    """The encoder's config and feature extractor: from `name_or_path` at `revision`, else tiny ones."""
    if name_or_path:
        encoder_config = from_pretrained_or_explain(
            AutoConfig.from_pretrained, name_or_path, "encoder config", revision=revision, **hub_kwargs
        )
        if requested_type is not None and encoder_config.model_type != requested_type:
            raise ValueError(
                f"encoder_type {requested_type!r} was asked for, but {name_or_path} holds a "
                f"{encoder_config.model_type!r} encoder: the checkpoint decides the encoder, so drop encoder_type or "
                "point encoder_name_or_path to a checkpoint of that type."
            )
        feature_extractor = from_pretrained_or_explain(
            AutoFeatureExtractor.from_pretrained, name_or_path, "feature extractor", revision=revision, **hub_kwargs
        )
    elif encoder_type == "whisper":
        encoder_config, feature_extractor = tiny_encoder_config(encoder_type), WhisperFeatureExtractor(feature_size=80)
    else:
        feature_extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
        encoder_config = tiny_encoder_config(encoder_type)
    if isinstance(feature_extractor, Wav2Vec2FeatureExtractor):
        feature_extractor.return_attention_mask = True
    return encoder_config, feature_extractor


def _text_parts(name_or_path, revision, audio_token: str, hub_kwargs):
    """The LLM's config and its tokenizer (with the audio token and a pad token): from `name_or_path` at
    `revision`, else tiny ones."""
    if name_or_path:
        # Left padding for batched generation (position ids make training padding-agnostic); an init argument,
        # so that it is saved with the tokenizer.
        tokenizer = from_pretrained_or_explain(
            AutoTokenizer.from_pretrained,
            name_or_path,
            "tokenizer",
            revision=revision,
            padding_side="left",
            **hub_kwargs,
        )
        text_config = from_pretrained_or_explain(
            AutoConfig.from_pretrained, name_or_path, "text config", revision=revision, **hub_kwargs
        )
    else:
        tokenizer = tiny_tokenizer(audio_token)
        text_config = tiny_text_config(tokenizer)
    return text_config, _prepare_text_tokenizer(tokenizer, audio_token)


def _set_generation_defaults(model: SpeechLlmForConditionalGeneration, tokenizer) -> None:
    """Stop at EOS and at the chat end-of-turn token (Llama-3's <|eot_id|>); pad with the tokenizer's pad."""
    generation_config = model.generation_config
    eos = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
    if eot is not None and eot not in eos:
        eos.append(eot)
    generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id


__all__ = ["from_preset", "PRESETS", "Preset", "tiny_tokenizer", "ENCODER_TYPES", "CONTRASTIVE_SYSTEM_PROMPT"]
