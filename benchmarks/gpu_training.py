"""Projector-only training throughput, MFU and peak memory of the full-size set-up on one GPU, in bf16.

The model has random weights with the shapes of the "hubert-qformer" preset: a HuBERT-large encoder (24 x 1024), the
window-level Q-Former (4 layers x 768, 4 queries per 17 frames) and a Llama-3.1-8B LLM (32 x 4096, 8 key/value heads,
vocabulary 128,256). Backbones are bf16; the projector keeps fp32 weights under bf16 autocast, as the Trainer's
`--bf16` runs it. One step is forward, backward and AdamW on a batch of MuST-C-like examples: clip durations drawn
log-normally (median 5.2 s, mean about 6.3 s, clipped to [1, 30] s), a 50-token prompt, the clip's audio tokens and a
response of about 30 tokens with the loss on the response only. Batches are length-grouped, as `--group_by_duration`
makes them, and built on the GPU before timing (a DataLoader with workers overlaps loading with the step).

Variants (each is skipped with its reason where it cannot run): `sdpa` on padded batches; `sdpa_packed` and
`flex_packed` on the same batches packed as the collators' `padding_free` packs them (`pack_sequences`);
`flash2_packed` with flash-attention 2 varlen kernels when `flash_attn` is installed.

MFU counts the useful FLOPs of a step (every example at its own length, no padding, counted by
`torch.utils.flop_counter.FlopCounterMode` on the unpadded examples one by one: the frozen encoder's forward, the
LLM's forward and its input-gradient backward, the projector's forward and backward) over the measured step time,
against the dense bf16 peak (`--peak_tflops`, 989 for the H100/H200 SXM datasheet).

Prints one JSON line: `{"name": "gpu_training", "ratio": samples/s of the best variant / 60, "goal": 1, ...}`.

    python benchmarks/gpu_training.py --batch_size 32 --steps 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import HubertConfig, LlamaConfig

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration
from speechllm_hf.data.collators import pack_sequences
from speechllm_hf.models.speechllm.configuration_speechllm import audio_token_count

GOAL_SAMPLES_PER_S = 60  # per H100, issue 9 (Ultravox reports 32-48 including a distillation pass)
SAMPLING_RATE = 16000
AUDIO_TOKEN_ID = 128_002  # a reserved special token of the Llama-3 vocabulary
PROMPT_TOKENS = 50  # Llama-3.1 chat template + the contrastive system prompt + an instruction


def build_model(args: argparse.Namespace, attn_implementation: str) -> SpeechLlmForConditionalGeneration:
    """The random full-size model on `args.device`, its LLM's attention set to `attn_implementation`."""
    encoder = HubertConfig(
        hidden_size=1024,
        num_hidden_layers=args.encoder_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    text = LlamaConfig(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=args.llm_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
    )
    config = SpeechLlmConfig(encoder_config=encoder, text_config=text, audio_token_id=AUDIO_TOKEN_ID)
    # Only the LLM's attention varies between variants: the encoder runs on padded clips with SDPA in all of them.
    config._attn_implementation = {"encoder_config": "sdpa", "text_config": attn_implementation}
    torch.manual_seed(0)
    with torch.device(args.device):
        model = SpeechLlmForConditionalGeneration(config)
    # HuBERT makes `masked_spec_embed` with the legacy `torch.Tensor` constructor, which ignores the device context.
    model.to(args.device)
    model.encoder.to(torch.bfloat16)
    model.language_model.to(torch.bfloat16)
    return model.train()


def make_examples(args: argparse.Namespace, model, rng: np.random.Generator) -> list[dict]:
    """MuST-C-like examples, each a dict of unbatched tensors on the device."""
    device = args.device
    count = args.batch_size * (args.steps + args.warmup)
    seconds = np.clip(rng.lognormal(np.log(5.2), 0.6, count), 1.0, 30.0)
    examples = []
    for duration in seconds:
        samples = int(duration * SAMPLING_RATE)
        num_audio = audio_token_count(samples, model.config.audio_length_spec)
        response = int(np.clip(rng.normal(30, 8), 5, 80))
        prompt = rng.integers(0, 128_000, PROMPT_TOKENS).tolist()
        target = rng.integers(0, 128_000, response).tolist()
        ids = prompt + [AUDIO_TOKEN_ID] * num_audio + target
        examples.append(
            {
                "audio": torch.randn(samples, device=device) * 0.1,
                "input_ids": torch.tensor(ids, device=device),
                "labels": torch.tensor([-100] * (len(ids) - response) + target, device=device),
                "seconds": float(duration),
            }
        )
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    pad = torch.nn.utils.rnn.pad_sequence
    audio = [e["audio"] for e in examples]
    ids = [e["input_ids"] for e in examples]
    return {
        "input_features": pad(audio, batch_first=True),
        "feature_attention_mask": pad([torch.ones_like(a, dtype=torch.long) for a in audio], batch_first=True),
        "input_ids": pad(ids, batch_first=True, padding_value=0),
        "attention_mask": pad([torch.ones_like(i) for i in ids], batch_first=True),
        "labels": pad([e["labels"] for e in examples], batch_first=True, padding_value=-100),
    }


def length_grouped_batches(examples: list[dict], batch_size: int, rng: np.random.Generator) -> list[dict]:
    order = sorted(range(len(examples)), key=lambda i: examples[i]["seconds"])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return [collate([examples[i] for i in batch]) for batch in batches]


def train_step(model, optimizer, batch: dict) -> torch.Tensor:
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def useful_flops(model, examples: list[dict]) -> float:
    """FLOPs of one step over `examples` run one at a time (no padding); the optimizer step is negligible."""
    # Eager attention: the FLOP counter of torch 2.11 cannot count SDPA with grouped key/value heads.
    model.language_model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    with counter:
        for example in examples:
            with torch.autocast(model.device.type, dtype=torch.bfloat16):
                loss = model(**collate([example])).loss
            loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_variant(args, model, attn: str, padding_free: bool, batches, flops_per_step) -> dict:
    """Time the variant on `model` (its LLM switched to `attn`), after `args.warmup` untimed steps."""
    model.language_model.set_attn_implementation(attn)
    if padding_free:
        batches = [pack_sequences(batch, return_flash_attn_kwargs=attn.startswith("flash")) for batch in batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for batch in batches[: args.warmup]:
        train_step(model, optimizer, batch)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [train_step(model, optimizer, batch) for batch in batches[args.warmup :]]
    finite = all(math.isfinite(float(loss)) for loss in losses)  # reading the losses waits for the device
    seconds = (time.perf_counter() - start) / len(losses)
    return {
        "samples_per_s": round(args.batch_size / seconds, 1),
        "step_s": round(seconds, 4),
        "mfu": round(flops_per_step / seconds / (args.peak_tflops * 1e12), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        "losses_finite": finite,
    }


def variants(args) -> dict[str, tuple[str, bool] | str]:
    """name -> (attention implementation, padding_free), or the reason it is skipped."""
    table: dict[str, tuple[str, bool] | str] = {"sdpa": ("sdpa", False), "sdpa_packed": ("sdpa", True)}
    table["flex_packed"] = ("flex_attention", True)
    if importlib.util.find_spec("flash_attn") is None:
        table["flash2_packed"] = "flash_attn is not installed (pip install flash-attn: needs a CUDA build)"
    else:
        table["flash2_packed"] = ("flash_attention_2", True)
    return {name: value for name, value in table.items() if not args.only or name in args.only}


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        return {"name": "gpu_training", "skipped": "no CUDA device"}
    rng = np.random.default_rng(0)
    model = build_model(args, "sdpa")
    examples = make_examples(args, model, rng)
    batches = length_grouped_batches(examples, args.batch_size, rng)
    # The mean step's useful FLOPs, from a sample of examples scaled to the batch size.
    sample = examples[: args.flop_sample]
    flops_per_step = useful_flops(model, sample) / len(sample) * args.batch_size
    parameters = {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("encoder", "projector", "language_model")
    }
    padded = sum(int(b["attention_mask"].numel()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    results = {}
    for name, variant in variants(args).items():
        if isinstance(variant, str):
            results[name] = {"skipped": variant}
            continue
        try:
            results[name] = run_variant(args, model, *variant, batches, flops_per_step)
        except Exception as err:  # one variant's failure (an unsupported kernel) must not hide the others
            results[name] = {"failed": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps({name: results[name]}), flush=True)  # progress, should a time limit stop the run
    best = max((r["samples_per_s"] for r in results.values() if "samples_per_s" in r), default=0.0)
    return {
        "name": "gpu_training",
        "ratio": round(best / GOAL_SAMPLES_PER_S, 3),
        "goal": 1,
        "higher_is_better": True,
        "goal_note": f"best samples/s over {GOAL_SAMPLES_PER_S} per H100; MFU goal 0.40",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "variants": results,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "mean_clip_s": round(float(np.mean([e["seconds"] for e in examples])), 2),
        "mean_tokens": round(real / len(examples), 1),
        "token_padding_fraction": round(1 - real / padded, 4),
        "useful_tflop_per_step": round(flops_per_step / 1e12, 2),
        "parameters": parameters,
        "torch": torch.__version__,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--encoder_layers", type=int, default=24)
    p.add_argument("--llm_layers", type=int, default=32)
    p.add_argument("--flop_sample", type=int, default=8, help="examples whose FLOPs are counted")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--device", default="cuda", help="cpu runs the same code slowly, as a check of the script")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))
