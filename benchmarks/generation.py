"""Batched, length-sorted generation vs one clip at a time (as the original BLSP generate.py ran) on CPU.

Both runs answer the same clips of the bundled dev corpus with the same greedy settings through
`speechllm_hf.inference.generate_responses` (batch_size=1 is the one-at-a-time baseline), after a warm-up of each;
how many answers are identical is reported. The model is the random tiny preset, or a larger random LLM with
`--llm_hidden_size`, `--llm_layers` and `--llm_heads`.

Prints one JSON line: `{"name": "batched_generation", "ratio": batched clips/s / one-at-a-time clips/s, "goal": 5,
"higher_is_better": true, "goal_device": "cuda", "device": "cpu", ...}`: the goal is set for a GPU at batch 16.

    python benchmarks/generation.py --batch_size 16 --num_clips 64 --max_new_tokens 128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from speechllm_hf import SpeechLlmForConditionalGeneration, from_preset
from speechllm_hf.inference import generate_responses
from speechllm_hf.quickstart.corpus import load_split

GOAL = 5


def build_model(args: argparse.Namespace):
    """The tiny preset, with its LLM resized when asked; random weights from `args.seed`."""
    torch.manual_seed(args.seed)
    model, processor = from_preset("tiny", encoder_type=args.encoder_type, projector_type=args.projector_type)
    text = model.config.text_config
    if (args.llm_hidden_size, args.llm_layers) != (text.hidden_size, text.num_hidden_layers):
        config = copy.deepcopy(model.config)
        text = config.text_config
        text.hidden_size, text.num_hidden_layers = args.llm_hidden_size, args.llm_layers
        text.intermediate_size = 2 * args.llm_hidden_size
        text.num_attention_heads, text.num_key_value_heads = args.llm_heads, max(1, args.llm_heads // 2)
        text.head_dim = args.llm_hidden_size // args.llm_heads
        generation_config = model.generation_config
        model = SpeechLlmForConditionalGeneration(config)
        model.generation_config = generation_config
    return model.eval(), processor


def clips_per_second(model, processor, requests: list[dict], batch_size: int, max_new_tokens: int):
    """(clips/s, responses) of one timed run, after an untimed warm-up on the first batch."""
    generate_responses(model, processor, requests[:batch_size], batch_size=batch_size, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    results = generate_responses(model, processor, requests, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return len(requests) / (time.perf_counter() - start), [r.response for r in results]


def run(args: argparse.Namespace) -> dict:
    """The benchmark with the options of `add_arguments`."""
    torch.set_num_threads(args.threads)
    model, processor = build_model(args)
    requests = [{"audio": row["audio"]} for row in load_split("dev")[: args.num_clips]]
    single, single_out = clips_per_second(model, processor, requests, 1, args.max_new_tokens)
    batched, batched_out = clips_per_second(model, processor, requests, args.batch_size, args.max_new_tokens)
    description = f"tiny {args.encoder_type}+{args.projector_type}, LLM {args.llm_layers}x{args.llm_hidden_size}"
    # Greedy decoding of a random model writes long degenerate text, where float32 sums taken in another order (a
    # padded batch vs one row) can flip a near-tie late in a response: report how many answers are identical, and
    # where the others first differ, rather than only whether all are.
    differing = {
        i: len(os.path.commonprefix([a, b])) for i, (a, b) in enumerate(zip(batched_out, single_out)) if a != b
    }
    return {
        "name": "batched_generation",
        "ratio": round(batched / single, 2),
        "goal": GOAL,
        "higher_is_better": True,
        "goal_device": "cuda",  # the goal is set for a GPU at batch 16; this script measures the CPU
        "device": "cpu",
        "batched_clips_per_s": round(batched, 2),
        "one_at_a_time_clips_per_s": round(single, 2),
        "identical_outputs": f"{len(requests) - len(differing)}/{len(requests)}",
        "first_difference_at_char": differing,
        "batch_size": args.batch_size,
        "num_clips": len(requests),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "llm_parameters": sum(p.numel() for p in model.language_model.parameters()),
        "model": description,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_clips", type=int, default=64, help="dev-corpus clips answered by each run")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="BLSP generate.py's default")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--encoder_type", default="hubert", choices=["hubert", "whisper", "wav2vec2"])
    parser.add_argument("--projector_type", default="qformer", choices=["qformer", "cnn", "mlp"])
    parser.add_argument("--llm_hidden_size", type=int, default=64, help="64 with 2 layers = the tiny preset")
    parser.add_argument("--llm_layers", type=int, default=2)
    parser.add_argument("--llm_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "build_model", "clips_per_second", "run"]
