"""Training-step time with the encoder-feature cache / without it, on the same batch.

A HuBERT-large-shaped encoder (random weights: 24 layers, width 1024) with a Q-Former projector and a small Llama;
one step = forward, backward and AdamW update of the projector. Without the cache the frozen encoder runs every step;
with it the step starts from stored encoder outputs. Prints one JSON line with the ratio (goal <= 0.6) and the
encoder's share of the uncached step.

    python benchmarks/feature_cache.py --steps 5 --batch_size 4 --seconds 6
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import HubertConfig, LlamaConfig

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor
from speechllm_hf.presets import tiny_tokenizer

GOAL = 0.6


def build(encoder_layers: int, text_layers: int):
    tokenizer = tiny_tokenizer()
    encoder = HubertConfig(
        hidden_size=1024,
        num_hidden_layers=encoder_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=text_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    config = SpeechLlmConfig(
        encoder_config=encoder, text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids("<audio>")
    )
    from transformers import Wav2Vec2FeatureExtractor

    processor = SpeechLlmProcessor(
        Wav2Vec2FeatureExtractor(return_attention_mask=True), tokenizer, audio_length_spec=config.audio_length_spec
    )
    return SpeechLlmForConditionalGeneration(config), processor


def time_steps(model, optimizer, batch, steps: int) -> float:
    model(**batch).loss.backward()  # warm-up
    optimizer.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="clip duration")
    parser.add_argument("--encoder_layers", type=int, default=24)
    parser.add_argument("--text_layers", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = build(args.encoder_layers, args.text_layers)
    model.train()
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(args.seconds * 16000)).astype(np.float32) * 0.1 for _ in range(args.batch_size)]
    batch = dict(processor(["<audio> transcribe: hello world"] * args.batch_size, audio=clips, sampling_rate=16000))
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    uncached = time_steps(model, optimizer, batch, args.steps)
    with torch.no_grad():
        states, lengths = model.encode_audio(batch.pop("input_features"), batch.pop("feature_attention_mask"))
    cached = time_steps(
        model, optimizer, {**batch, "encoder_hidden_states": states, "encoder_lengths": lengths}, args.steps
    )
    print(
        json.dumps(
            {
                "name": "encoder_feature_cache",
                "cached_step_s": round(cached, 4),
                "uncached_step_s": round(uncached, 4),
                "ratio": round(cached / uncached, 4),
                "goal": GOAL,
                "higher_is_better": False,
                "encoder_share_of_step": round(1 - cached / uncached, 4),
                "batch": f"{args.batch_size} x {args.seconds} s",
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
