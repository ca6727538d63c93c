"""Contrastive pretraining on a real LLM: the published pooling against the attention-sink remedy, side by side.

Real backbones are needed (see `scripts/offline_backbones.py`): `--backbones DIR` holding `whisper-base` and
`smollm2-135m-instruct` (whisper-base's encoder, CNN adapter, SmolLM2-135M-Instruct). Two parts:

1. The sink, confirmed: hidden-state norms of the bare dev transcripts at the first position against the mean of
   the others, per layer, as the published text branch runs them, and the same with a leading sink token (the
   first transcript token's norm, then).
2. For each `--sink_tokens` value (`none` = the published form), the same randomly initialised projector trained
   with `ContrastiveTrainer` (`--contrastive_layers`, default the paper's `all`) on the bundled train split for
   `--max_steps`, then text -> speech R@1 on the 80 bundled dev clips with `evaluate_retrieval`, pooled as trained.

Prints one JSON line per part and a table of R@1 per layer (chance 1/80).

    python benchmarks/contrastive_sink.py --backbones /work/backbones --max_steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import torch

from speechllm_hf import from_preset
from speechllm_hf.evaluation.retrieval import evaluate_retrieval
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments, sink_token_id


def build_model(backbones: Path, projector_type: str = "cnn", seed: int = 0):
    """whisper-base's encoder + a randomly initialised projector (seeded) + SmolLM2-135M-Instruct, frozen."""
    torch.manual_seed(seed)
    return from_preset(
        "whisper-cnn",
        projector_type=projector_type,
        encoder_name_or_path=str(backbones / "whisper-base"),
        text_name_or_path=str(backbones / "smollm2-135m-instruct"),
    )


@torch.no_grad()
def sink_norms(model, processor, texts: list[str], sink_token: str) -> dict[int, dict[str, float]]:
    """Per hidden-state layer: the mean norm of the first transcript token and of the later ones, over `texts`, with
    the transcript run bare (`sink_token='none'`, the published text branch) or after the sink token."""
    tokenizer = processor.tokenizer
    sink_id = sink_token_id(tokenizer, sink_token, processor.audio_token_id)
    lead = [] if sink_id is None else [sink_id]
    first, rest = {}, {}
    for text in texts:
        ids = torch.tensor([lead + tokenizer(text, add_special_tokens=False)["input_ids"]])
        states = model.language_model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer, hidden in enumerate(states):
            norms = hidden[0, len(lead) :].norm(dim=-1)  # (L,): the transcript's positions only
            first.setdefault(layer, []).append(norms[0].item())
            rest.setdefault(layer, []).append(norms[1:].mean().item())
    return {
        layer: {"first": sum(first[layer]) / len(texts), "others": sum(rest[layer]) / len(texts)} for layer in first
    }


def train_and_evaluate(model, processor, initial: dict, sink_token: str, args, work_dir: Path) -> dict:
    """Train the projector from `initial` with `sink_token`, then dev retrieval per layer pooled the same way."""
    model.projector.load_state_dict(initial)
    training_args = ContrastiveTrainingArguments(
        output_dir=str(work_dir / f"run-{sink_token}"),
        sink_token=sink_token,
        contrastive_layers=args.contrastive_layers,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        feature_cache_dir=str(work_dir / "feature-cache"),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_list(load_split("train")),
        processing_class=processor,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    results, _ = evaluate_retrieval(model, processor, load_split("dev"), layers="all", sink_token=sink_token)
    return {
        "sink_token": sink_token,
        "train_seconds": round(seconds, 1),
        "R@1": {layer: round(result["text_to_speech/R@1"], 4) for layer, result in results.items()},
        "R@5": {layer: round(result["text_to_speech/R@5"], 4) for layer, result in results.items()},
        "chance_R@1": results["layer_0"]["chance_R@1"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbones", type=Path, required=True, help="holds whisper-base, smollm2-135m-instruct")
    parser.add_argument("--sink_tokens", nargs="+", default=["none", "bos"], help="the forms compared")
    parser.add_argument("--projector_type", default="cnn")
    parser.add_argument("--contrastive_layers", default="all")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16, help="micro-batch: the in-batch negatives")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up before the cosine decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_model(args.backbones, args.projector_type, args.seed)
    texts = [row["text"] for row in load_split("dev")[:16]]
    for sink_token in dict.fromkeys(["none", *args.sink_tokens]):
        norms = sink_norms(model, processor, texts, sink_token)
        print(json.dumps({"sink_norms": sink_token, **{f"layer_{k}": v for k, v in norms.items()}}), flush=True)
    initial = {name: tensor.clone() for name, tensor in model.projector.state_dict().items()}
    runs = []
    with tempfile.TemporaryDirectory() as work_dir:
        for sink_token in args.sink_tokens:
            runs.append(train_and_evaluate(model, processor, initial, sink_token, args, Path(work_dir)))
            print(json.dumps(runs[-1]), flush=True)
    layers = list(runs[0]["R@1"])
    print(f"text -> speech R@1 on {len(load_split('dev'))} dev clips (chance {runs[0]['chance_R@1']:.4f})")
    print(f"{'sink_token':<12}{'train s':>9}" + "".join(f"{name.removeprefix('layer_'):>8}" for name in layers))
    for run in runs:
        cells = "".join(f"{run['R@1'][name]:>8.3f}" for name in layers)
        print(f"{run['sink_token']:<12}{run['train_seconds']:>9.0f}{cells}")


if __name__ == "__main__":
    main()
