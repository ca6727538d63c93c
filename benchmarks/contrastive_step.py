"""Contrastive pretraining step time on CPU: "all" layers vs an ASR step on the same batch, and the saving of running
the text branch without autograd; plus the vectorised Sinkhorn divergence vs the original's B x B Python loop.

A step is the forward and backward of the trainer's own `compute_loss` on one collated batch of the bundled train
corpus (the optimizer step, the same for every variant, is left out), timed as the median of `--repeats` after a
warm-up:

- `asr`: `SpeechLlmTrainer` on the ASR sequences (chat prompt + audio tokens + transcript), one LLM pass;
- `contrastive`: `ContrastiveTrainer`, `--contrastive_layers all`: the bare transcripts through the LLM under
  `no_grad`, then the projector output alone through it, with backward;
- `contrastive_text_grad`: the same step with the text branch recorded by autograd and back-propagated through, as
  the original computed it: no `no_grad`, and LLM input embeddings that require grad (what
  `enable_input_require_grads` does for gradient checkpointing on a frozen LLM).

The model is the tiny preset with a larger random LLM (`--llm_hidden_size`, `--llm_layers`, `--llm_heads`; built as
in `generation.py`), so that the LLM dominates as in the paper's 8B set-up. The Sinkhorn part times
`sinkhorn_distance` on the batch of the test suite's check against the loop (16 x 24 text and 16 x 12 speech
positions, 32 dimensions), the loop being the test suite's per-pair reference.

Prints one JSON line per comparison: `contrastive_step` with `ratio` = contrastive / ASR step (goal at most 2.2) and
`text_grad_over_contrastive`; `sinkhorn_vectorised` with `ratio` = loop / vectorised (no goal).

    python benchmarks/contrastive_step.py --batch_size 8 --llm_hidden_size 512 --llm_layers 16 --llm_heads 8 \
        --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from generation import build_model  # the same resized tiny model as the generation benchmark

from speechllm_hf.data.collators import ContrastiveCollator
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from speechllm_hf.training.contrastive_losses import sinkhorn_distance
from speechllm_hf.training.trainer import SpeechLlmTrainer

GOAL = 2.2  # contrastive step / ASR step
ASR_INPUTS = ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask")


def median_seconds(step, repeats: int) -> float:
    """Median wall time of `step()` over `repeats` runs, after one untimed warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def text_branch_with_gradient(model):
    """The original's text branch: recorded by autograd, so that backward runs through it for nothing."""
    model.enable_input_require_grads()
    try:
        with mock.patch.object(torch, "no_grad", contextlib.nullcontext):
            yield
    finally:
        model.disable_input_require_grads()


def step_times(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = build_model(args)
    model.train()
    batch = ContrastiveCollator(processor)(load_split("train")[: args.batch_size])
    common = dict(output_dir="/tmp/contrastive_step", use_cpu=True, report_to="none", disable_tqdm=True)
    asr = SpeechLlmTrainer(model=model, args=SpeechLlmTrainingArguments(**common), processing_class=processor)
    contrastive = ContrastiveTrainer(
        model=model, args=ContrastiveTrainingArguments(contrastive_layers="all", **common), processing_class=processor
    )
    asr_batch = {key: batch[key] for key in ASR_INPUTS}

    def asr_step():
        asr.compute_loss(model, asr_batch).backward()

    def contrastive_step():
        contrastive.compute_loss(model, batch).backward()

    def contrastive_text_grad_step():
        with text_branch_with_gradient(model):
            contrastive.compute_loss(model, batch).backward()

    # The baseline must really carry the text branch's graph: the first LLM pass (the text) records one.
    recorded = []
    hook = model.language_model.register_forward_hook(
        lambda module, inputs, output: recorded.append(output.hidden_states[-1].requires_grad)
    )
    contrastive_text_grad_step()
    contrastive_step()
    hook.remove()
    assert recorded == [True, True, False, True], recorded
    model.zero_grad()

    seconds = {
        "asr": median_seconds(asr_step, args.repeats),
        "contrastive": median_seconds(contrastive_step, args.repeats),
        "contrastive_text_grad": median_seconds(contrastive_text_grad_step, args.repeats),
    }
    return {
        "name": "contrastive_step",
        "ratio": round(seconds["contrastive"] / seconds["asr"], 3),
        "goal": GOAL,
        "higher_is_better": False,
        "text_grad_over_contrastive": round(seconds["contrastive_text_grad"] / seconds["contrastive"], 3),
        "seconds": {name: round(value, 4) for name, value in seconds.items()},
        "layers": contrastive.layers,
        "batch_size": args.batch_size,
        "asr_tokens": int(batch["attention_mask"].sum()),
        "text_tokens": int(batch["text_attention_mask"].sum()),
        "speech_tokens": int(batch["speech_attention_mask"].sum()),
        "llm_parameters": sum(p.numel() for p in model.language_model.parameters()),
        "model": f"tiny {args.encoder_type}+{args.projector_type}, LLM {args.llm_layers}x{args.llm_hidden_size}",
        "threads": args.threads,
        "device": "cpu",
    }


def sinkhorn_times(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    # The test suite's plain per-pair reference (the original's loop over B x B pairs) and its sequence sampler.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_contrastive_losses import _random_sequences, _reference_distances

    generator = torch.Generator().manual_seed(4)
    x, x_mask = _random_sequences(16, 24, 32, generator, scale=0.2)
    y, y_mask = _random_sequences(16, 12, 32, generator, scale=0.2)
    vectorised = median_seconds(lambda: sinkhorn_distance(x, x_mask, y, y_mask), args.repeats)
    loop = median_seconds(lambda: _reference_distances(x, x_mask, y, y_mask), args.repeats)
    return {
        "name": "sinkhorn_vectorised",
        "ratio": round(loop / vectorised, 2),
        "goal": None,  # no goal: the loop is the original's, kept as a reference
        "higher_is_better": True,
        "seconds": {"loop": round(loop, 4), "vectorised": round(vectorised, 4)},
        "pairs": 16 * 16,
        "threads": args.threads,
        "device": "cpu",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=8, help="clips of the bundled train corpus in the batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (the median is reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more than the idle cores make timings erratic)"
    )
    parser.add_argument("--encoder_type", default="hubert", choices=["hubert", "whisper", "wav2vec2"])
    parser.add_argument("--projector_type", default="qformer", choices=["qformer", "cnn", "mlp"])
    parser.add_argument("--llm_hidden_size", type=int, default=512, help="64 with 2 layers = the tiny preset")
    parser.add_argument("--llm_layers", type=int, default=16)
    parser.add_argument("--llm_heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    print(json.dumps(step_times(args)))
    print(json.dumps(sinkhorn_times(args)))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "median_seconds", "step_times", "sinkhorn_times", "text_branch_with_gradient"]
