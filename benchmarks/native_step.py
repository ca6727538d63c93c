"""Projector-only training step of our model / transformers' native speech LLMs, at matched sizes, on one batch.

Two comparisons, each on small random configs built here (no download):

- `qwen2audio`: `Qwen2AudioForConditionalGeneration` (Whisper-like encoder, 2x average pooling, a Linear projector,
  a Qwen2 LLM) against ours with a Whisper encoder of the same shape (`SpeechLlmWhisperEncoder`), the MLP projector
  stacking 2 frames (the same 25 audio tokens per second) and the same Qwen2 LLM;
- `granite_speech`: `GraniteSpeechForConditionalGeneration` (conformer encoder, window Q-Former of 15 frames -> 3
  queries, a Granite LLM) against ours with a Whisper encoder of the same width and depth, our window Q-Former of
  the same size (15 frames -> 3 queries: the same 10 audio tokens per second) and the same Granite LLM.

One step = forward, backward and an AdamW update of the projector alone; encoder and LLM are frozen in both models
(no gradients, eval mode), the projector trains (dropout on). Our loss is the one `SpeechLlmTrainer` computes, the
native models' is `model(**batch).loss`. Both models get the same clips (random log-mel frames of the given
durations) and the same token sequences: a prompt, the clip's audio tokens, a transcript and EOS, with labels on the
transcript and EOS. Steps of the two models alternate, and each side's median over `--repeats` steps, after a
warm-up, is reported, with the median time its encoder's forward takes within the step (forward hooks).

Work that differs, by design of each model:

- Qwen2-Audio's encoder accepts only 30 s of mel frames (3000), so every clip is padded to 30 s and the encoder runs
  on 1500 positions per clip whatever the clip's length; ours runs on the batch's longest real clip and masks the
  rest. `ratio` compares the two as each runs (same real durations); `ratio_same_work` feeds ours the same
  30 s-padded input, so that both encoders do the same work.
- Granite Speech's conformer and ours both run on the batch's longest clip. The conformer has two feed-forward
  blocks and a convolution module per layer where a Whisper layer has one feed-forward block: at the same width and
  depth it has about twice the encoder parameters (reported below).

Prints one JSON line per comparison (`native_qwen2audio`, `native_granite_speech`): `ratio` (our step / native
step, goal at most 1.0), `ratio_without_encoder` (the same, each side's encoder forward taken out: the projector
and LLM part, the same work on both sides), `ratio_same_work` (Qwen2-Audio only), the seconds of each step and of its
encoder, the parameter count of each part of each model, the audio tokens and sequence lengths, and a `work` line
that says what each side computes.

    python benchmarks/native_step.py --seconds 11 12 13 14 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from training_step import ForwardTimer, alternating_medians, library_step, plain_step
from transformers import (
    Blip2QFormerConfig,
    GraniteConfig,
    GraniteSpeechConfig,
    GraniteSpeechEncoderConfig,
    GraniteSpeechForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    WhisperConfig,
)

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration
from speechllm_hf.models.speechllm.configuration_speechllm import audio_token_count

GOAL = 1.0
IGNORE_INDEX = -100
MEL_FRAMES_PER_SECOND = 100  # Whisper's and Granite's 10 ms hop
QWEN2AUDIO_MEL_FRAMES = 3000  # Qwen2-Audio's encoder takes exactly 30 s
GRANITE_WINDOW, GRANITE_QUERIES = 15, 3  # granite-speech-3.3's projector: 15 encoder frames -> 3 queries


def text_config(family: str, args: argparse.Namespace):
    """The LLM config shared by both sides of a comparison."""
    config_class = {"qwen2": Qwen2Config, "granite": GraniteConfig}[family]
    return config_class(
        vocab_size=args.vocab_size,
        hidden_size=args.llm_hidden_size,
        intermediate_size=int(2.75 * args.llm_hidden_size),
        num_hidden_layers=args.llm_layers,
        num_attention_heads=args.llm_heads,
        num_key_value_heads=max(1, args.llm_heads // 2),
        tie_word_embeddings=False,
    )


def encoder_shape(args: argparse.Namespace) -> dict:
    return {
        "d_model": args.encoder_width,
        "encoder_layers": args.encoder_layers,
        "encoder_attention_heads": args.encoder_heads,
        "encoder_ffn_dim": 4 * args.encoder_width,
    }


def mel_frames(args: argparse.Namespace) -> list[int]:
    """Real mel frames of each clip, rounded to an even count (where both sides' length formulas agree)."""
    return [2 * round(seconds * MEL_FRAMES_PER_SECOND / 2) for seconds in args.seconds]


def mel_batch(frames: list[int], num_mels: int, padded_to: int | None, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, num_mels, T) random log-mel frames, zero beyond each clip, and the (B, T) mask of real frames; T is the
    longest clip or `padded_to`."""
    length = padded_to or max(frames)
    mask = torch.arange(length)[None, :] < torch.tensor(frames)[:, None]
    features = torch.randn(len(frames), num_mels, length, generator=generator) * mask[:, None, :]
    return features, mask.long()


def token_batch(audio_tokens: list[int], audio_token_id: int, args: argparse.Namespace, generator) -> dict:
    """Right-padded `input_ids`, `attention_mask` and `labels`: prompt, audio tokens, transcript, EOS per row; the
    labels cover transcript and EOS. Text ids are drawn from [1, vocab_size - 2]; the last id is the audio token."""
    rows, label_rows = [], []
    for count, seconds in zip(audio_tokens, args.seconds):
        prompt = torch.randint(1, args.vocab_size - 1, (args.prompt_tokens,), generator=generator)
        transcript_length = round(seconds * args.text_tokens_per_second) + 1
        transcript = torch.randint(1, args.vocab_size - 1, (transcript_length,), generator=generator)
        rows.append(torch.cat([prompt, torch.full((count,), audio_token_id), transcript]))
        label_rows.append(torch.cat([torch.full((args.prompt_tokens + count,), IGNORE_INDEX), transcript]))
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    labels = torch.nn.utils.rnn.pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def freeze_all_but(model: torch.nn.Module, projector: torch.nn.Module) -> None:
    """A native model trained as ours is: only the projector learns; encoder and LLM without gradients, in eval mode
    (no dropout; Granite's conformer keeps its BatchNorm statistics)."""
    model.requires_grad_(False)
    projector.requires_grad_(True)
    model.train()
    for module in model.modules():
        if module is not projector and not any(p.requires_grad for p in module.parameters()):
            module.eval()
    projector.train()


def native_parts(native: torch.nn.Module) -> torch.nn.Module:
    """The module that holds a native model's encoder, projector and LLM: `native.model` on transformers 5.x, the
    model itself on 4.57."""
    return getattr(native, "model", native)


def native_llm(native: torch.nn.Module) -> torch.nn.Module:
    """The native LLM with its output layer: 5.x keeps `lm_head` beside `model.language_model`, 4.57's
    `language_model` is a whole causal LM."""
    if hasattr(native, "lm_head"):
        return torch.nn.ModuleList([native.model.language_model, native.lm_head])
    return native.language_model


def part_sizes(ours, native, native_encoder: torch.nn.Module, native_projector: torch.nn.Module) -> dict:
    """Parameters of each part of both models (the LLM with its output layer), and how many train."""
    return {
        "ours": parameter_counts(encoder=ours.encoder, projector=ours.projector, llm=ours.language_model),
        "native": parameter_counts(encoder=native_encoder, projector=native_projector, llm=native_llm(native)),
    }


def parameter_counts(**parts: torch.nn.Module) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    trainable = sum(p.numel() for part in parts.values() for p in part.parameters() if p.requires_grad)
    return {**counts, "trainable": trainable}


def ours_for(encoder_config, text, projector_type: str, projector_config: dict, audio_token_id: int):
    config = SpeechLlmConfig(
        encoder_config=encoder_config,
        text_config=text,
        projector_type=projector_type,
        projector_config=projector_config,
        audio_token_id=audio_token_id,
    )
    model = SpeechLlmForConditionalGeneration(config)
    model.train()  # the projector trains; frozen encoder and LLM stay in eval mode
    return model


def qwen2audio(args: argparse.Namespace) -> dict:
    """Ours (Whisper encoder at the clips' real length, MLP projector stacking 2 frames, Qwen2 LLM) against
    `Qwen2AudioForConditionalGeneration` at the same sizes."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    text = text_config("qwen2", args)
    audio_token_id = args.vocab_size - 1  # Qwen2-Audio embeds the audio token, so it lies inside the vocabulary
    native = Qwen2AudioForConditionalGeneration(
        Qwen2AudioConfig(
            audio_config=Qwen2AudioEncoderConfig(num_mel_bins=128, **encoder_shape(args)),
            text_config=text.to_dict(),
            audio_token_index=audio_token_id,
        )
    )
    parts = native_parts(native)
    freeze_all_but(native, parts.multi_modal_projector)
    ours = ours_for(
        WhisperConfig(num_mel_bins=128, max_source_positions=1500, **encoder_shape(args)),
        text,
        "mlp",
        {"stack_factor": 2, "hidden_size": args.encoder_width},
        audio_token_id,
    )
    frames = mel_frames(args)
    native_tokens = parts.audio_tower._get_feat_extract_output_lengths(torch.tensor(frames))[1].tolist()
    our_tokens = [audio_token_count(n, ours.config.audio_length_spec) for n in frames]
    if native_tokens != our_tokens:
        raise AssertionError(f"audio tokens differ: native {native_tokens}, ours {our_tokens}")
    tokens = token_batch(our_tokens, audio_token_id, args, generator)
    padded, padded_mask = mel_batch(frames, 128, QWEN2AUDIO_MEL_FRAMES, generator)
    real_length = max(frames)
    ours_step, ours_timer = library_step(ours), ForwardTimer(ours.encoder)
    real = {"input_features": padded[..., :real_length], "feature_attention_mask": padded_mask[:, :real_length]}
    thirty_seconds = {"input_features": padded, "feature_attention_mask": padded_mask}
    seconds = alternating_medians(
        {
            "ours": (ours_step, {**tokens, **real}),
            "ours_padded_30s": (ours_step, {**tokens, **thirty_seconds}),
            "native": (plain_step(native), {**tokens, **thirty_seconds}),
        },
        args.repeats,
        {"ours": ours_timer, "ours_padded_30s": ours_timer, "native": ForwardTimer(parts.audio_tower)},
    )
    return {
        "name": "native_qwen2audio",
        **ratios(seconds),
        "ratio_same_work": round(seconds["ours_padded_30s"]["step_s"] / seconds["native"]["step_s"], 3),
        "seconds": seconds,
        "parameters": part_sizes(ours, native, parts.audio_tower, parts.multi_modal_projector),
        **batch_details(args, frames, our_tokens, tokens),
        "encoder_frames": {"ours": real_length // 2, "native": QWEN2AUDIO_MEL_FRAMES // 2},
        "work": (
            "both: frozen encoder forward, projector forward+backward, frozen Qwen2 LLM forward+backward to the "
            "projector, full-vocabulary logits at every position, AdamW on the projector; native: the encoder runs "
            "on 30 s of padded mel per clip (its only input length), then 2x average pooling and a Linear; ours: the "
            "encoder runs on the longest real clip with padding masked, then 2-frame stacking and a SwiGLU MLP"
        ),
    }


def granite_speech(args: argparse.Namespace) -> dict:
    """Ours (Whisper encoder, window Q-Former, Granite LLM) against `GraniteSpeechForConditionalGeneration` (conformer
    encoder, window Q-Former, Granite LLM) at the same sizes."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    text = text_config("granite", args)
    audio_token_id = args.vocab_size - 1
    qformer = {
        "hidden_size": args.qformer_hidden_size,
        "num_hidden_layers": args.qformer_layers,
        "num_attention_heads": args.qformer_heads,
        "intermediate_size": 4 * args.qformer_hidden_size,
    }
    native = GraniteSpeechForConditionalGeneration(
        GraniteSpeechConfig(
            encoder_config=GraniteSpeechEncoderConfig(
                input_dim=160,  # two stacked 80-bin mel frames: 50 frames per second, as ours after its stride-2 conv
                hidden_dim=args.encoder_width,
                num_layers=args.encoder_layers,
                num_heads=args.encoder_heads,
            ),
            projector_config=Blip2QFormerConfig(
                **qformer, encoder_hidden_size=args.encoder_width, cross_attention_frequency=1
            ).to_dict(),
            text_config=text.to_dict(),
            audio_token_index=audio_token_id,
            window_size=GRANITE_WINDOW,
            downsample_rate=GRANITE_WINDOW // GRANITE_QUERIES,
            has_lora_adapter=False,
            tie_word_embeddings=False,
        )
    )
    parts = native_parts(native)
    freeze_all_but(native, parts.projector)
    ours = ours_for(
        WhisperConfig(num_mel_bins=80, max_source_positions=1500, **encoder_shape(args)),
        text,
        "qformer",
        {**qformer, "window_size": GRANITE_WINDOW, "num_queries": GRANITE_QUERIES},
        audio_token_id,
    )
    frames = mel_frames(args)
    # Granite Speech's feature extractor's count: ceil(encoder frames / window) windows of 3 queries.
    native_tokens = [math.ceil(n // 2 / GRANITE_WINDOW) * GRANITE_QUERIES for n in frames]
    our_tokens = [audio_token_count(n, ours.config.audio_length_spec) for n in frames]
    if native_tokens != our_tokens:
        raise AssertionError(f"audio tokens differ: native {native_tokens}, ours {our_tokens}")
    tokens = token_batch(our_tokens, audio_token_id, args, generator)
    mel, mel_mask = mel_batch(frames, 80, None, generator)
    # Granite's input: two consecutive mel frames stacked, (B, T / 2, 160), and a mask over the projector outputs.
    stacked = mel.transpose(1, 2).reshape(len(frames), mel.shape[-1] // 2, 160)
    features_mask = torch.arange(max(native_tokens))[None, :] < torch.tensor(native_tokens)[:, None]
    ours_inputs = {**tokens, "input_features": mel, "feature_attention_mask": mel_mask}
    native_inputs = {**tokens, "input_features": stacked, "input_features_mask": features_mask}
    seconds = alternating_medians(
        {"ours": (library_step(ours), ours_inputs), "native": (plain_step(native), native_inputs)},
        args.repeats,
        {"ours": ForwardTimer(ours.encoder), "native": ForwardTimer(parts.encoder)},
    )
    return {
        "name": "native_granite_speech",
        **ratios(seconds),
        "seconds": seconds,
        "parameters": part_sizes(ours, native, parts.encoder, parts.projector),
        **batch_details(args, frames, our_tokens, tokens),
        "encoder_frames": {"ours": max(frames) // 2, "native": max(frames) // 2},
        "work": (
            "both: frozen encoder forward on the longest clip of the batch (50 frames/s), window Q-Former (15 "
            "frames -> 3 queries) forward+backward, frozen Granite LLM forward+backward to the projector, "
            "full-vocabulary logits at every position, AdamW on the projector; native: a conformer encoder (two "
            "feed-forward blocks, attention in 200-frame blocks and a convolution module per layer); ours: a "
            "Whisper encoder (one feed-forward block and full attention per layer, padding masked)"
        ),
    }


def ratios(seconds: dict[str, dict[str, float]]) -> dict:
    """Our step / the native step (the benchmark's ratio), and the same without each side's encoder forward: the
    projector and LLM part, where both do the same work."""
    ours, native = seconds["ours"], seconds["native"]
    return {
        "ratio": round(ours["step_s"] / native["step_s"], 3),
        "goal": GOAL,
        "higher_is_better": False,
        "ratio_without_encoder": round(
            (ours["step_s"] - ours["encoder_s"]) / (native["step_s"] - native["encoder_s"]), 3
        ),
    }


def batch_details(args: argparse.Namespace, frames: list[int], audio_tokens: list[int], tokens: dict) -> dict:
    return {
        "clip_seconds": args.seconds,
        "mel_frames": frames,
        "audio_tokens": audio_tokens,
        "sequence_lengths": tokens["attention_mask"].sum(-1).tolist(),
        "labelled_tokens": int((tokens["labels"] != IGNORE_INDEX).sum()),
        "llm": f"{args.llm_layers} x {args.llm_hidden_size}, {args.llm_heads} heads, vocabulary {args.vocab_size}",
        "encoder": f"{args.encoder_layers} x {args.encoder_width}, {args.encoder_heads} heads",
        "threads": args.threads,
        "device": "cpu",
    }


COMPARISONS = {"qwen2audio": qwen2audio, "granite_speech": granite_speech}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, nargs="+", default=[11.0, 12.0, 13.0, 14.0], help="clip durations")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--encoder_width", type=int, default=256)
    parser.add_argument("--encoder_layers", type=int, default=4)
    parser.add_argument("--encoder_heads", type=int, default=4)
    parser.add_argument("--qformer_hidden_size", type=int, default=256, help="Granite comparison's Q-Former")
    parser.add_argument("--qformer_layers", type=int, default=2)
    parser.add_argument("--qformer_heads", type=int, default=4)
    parser.add_argument("--llm_hidden_size", type=int, default=512)
    parser.add_argument("--llm_layers", type=int, default=4)
    parser.add_argument("--llm_heads", type=int, default=8)
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=2048,
        help="2048 gives the output layer the share of the LLM's parameters it has in Qwen2-7B (about 8%%)",
    )
    parser.add_argument("--prompt_tokens", type=int, default=16, help="text tokens before the audio")
    parser.add_argument("--text_tokens_per_second", type=float, default=3.0, help="transcript tokens per second")
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--only", choices=list(COMPARISONS), nargs="+", default=list(COMPARISONS))
    args = parser.parse_args()
    for name in args.only:
        print(json.dumps(COMPARISONS[name](args)))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "COMPARISONS", "add_arguments", "granite_speech", "qwen2audio"]
