"""The modules a speech LLM is built from besides its backbones: the three projectors and a Whisper encoder that
takes clips shorter than 30 s.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .compat_speechllm import WHISPER_LAYER_EXTRA_ARGS
from .configuration_speechllm import WHISPER_CONVS, SpeechLlmConfig, conv_output_length, convs_output_length


def mask_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) int64 counts of its ones, summed in the mask's own integer type: torch would first
    copy an int32 mask to int64 (77 MB for a 10-minute clip's samples)."""
    dtype = mask.dtype if mask.dtype in (torch.int32, torch.int64) else torch.int64
    return mask.sum(-1, dtype=dtype).long()


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True on valid positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


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
                f"Whisper encodes at most {max_frames} mel frames (30 s); got {num_frames}. "
                "SpeechLlmForConditionalGeneration splits longer audio into windows (config.encoder_window_length)."
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
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, additive_mask, **WHISPER_LAYER_EXTRA_ARGS)
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
        self.window_size = settings.window_size
        self.num_queries = settings.num_queries
        self.length_convs = settings.convs  # the window split, as a conv: how many windows a clip fills
        self.layer_norm = nn.LayerNorm(config.encoder_hidden_size)
        self.query = nn.Parameter(torch.empty(1, self.num_queries, settings.hidden_size).normal_(0.0, 0.02))
        qformer_config = Blip2QFormerConfig(
            hidden_size=settings.hidden_size,
            num_hidden_layers=settings.num_hidden_layers,
            num_attention_heads=settings.num_attention_heads,
            intermediate_size=settings.intermediate_size,
            hidden_dropout_prob=settings.dropout,
            attention_probs_dropout_prob=settings.dropout,
            cross_attention_frequency=1,
            encoder_hidden_size=config.encoder_hidden_size,
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        self.linear = nn.Linear(settings.hidden_size, config.text_config.hidden_size)

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
        hidden = settings.hidden_size or config.encoder_hidden_size
        width = config.text_config.hidden_size
        channels = [config.encoder_hidden_size] + [hidden] * (settings.num_layers - 1) + [width]
        self.length_convs = settings.convs  # [kernel, stride, total padding] of each conv below
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, 2 * c_out, kernel, stride, padding=padding // 2)
            for c_in, c_out, (kernel, stride, padding) in zip(channels[:-1], channels[1:], self.length_convs)
        )
        self.adapter_down = nn.Linear(width, settings.adapter_size, bias=False)
        self.adapter_up = nn.Linear(settings.adapter_size, width, bias=False)
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
        self.stack_factor = settings.stack_factor
        self.length_convs = settings.convs  # stacking, as a conv: how many stacks a clip fills
        stacked = self.stack_factor * config.encoder_hidden_size
        self.layer_norm = nn.LayerNorm(stacked)
        self.linear_in = nn.Linear(stacked, 2 * settings.hidden_size)
        self.linear_out = nn.Linear(settings.hidden_size, config.text_config.hidden_size)

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
__all__ = [
    "PROJECTOR_CLASSES",
    "SpeechLlmCnnProjector",
    "SpeechLlmMlpProjector",
    "SpeechLlmQFormerProjector",
    "SpeechLlmWhisperEncoder",
    "lengths_to_mask",
    "mask_lengths",
]
