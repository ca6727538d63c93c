"""The quickstart: the whole pipeline on the tiny preset and the bundled corpus, on a CPU, in minutes.

1. Stage 1 (as in BLSP): the tiny random LLM learns the corpus' text task, "transcribe" a TEXT transcript, with
   ordinary causal-LM fine-tuning (`transformers.Trainer`); it is frozen from then on.
2. Contrastive pretraining of the projector (`ContrastiveTrainer`, all layers), speech vs transcript.
3. ASR fine-tuning of the projector (`SpeechLlmTrainer`).
4. Projector-only save; reload through `AutoModel.from_pretrained(..., trust_remote_code=True)`.
5. Transcribe the dev split; `report.md` with loss curves, retrieval R@1 and WER before/after, and PNG plots.

Encoder and LLM are random tiny networks (no download): what they reach is printed as it is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import datasets
import torch
from transformers import AutoModel, AutoProcessor, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from ..data.tasks import PromptConfig, build_turns
from ..evaluation.metrics import corpus_wer, mean_utterance_wer, require_optional
from ..evaluation.retrieval import evaluate_retrieval, import_pyplot, plot_similarity
from ..inference.generate import generate_responses
from ..presets import from_preset
from ..training.arguments import SpeechLlmTrainingArguments
from ..training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from ..training.trainer import SpeechLlmTrainer
from .corpus import load_split

logger = logging.getLogger(__name__)


# BLSP's adapter on the tiny Whisper-shaped encoder: of the three projectors it learned best here (see below).
PROJECTOR_TYPE = "cnn"
# Training-argument settings of every quickstart stage: on the CPU, quiet, logging every 10 steps, saving nothing.
CPU_RUN_ARGUMENTS = dict(logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
PROJECTOR_NAMES = {"qformer": "window Q-Former", "cnn": "CNN adapter", "mlp": "frame-stacking MLP"}


@dataclass
class QuickstartConfig:
    """Step counts and learning rates tuned so that the tiny model visibly learns in about a CPU minute.

    Measured on 2 CPU cores (the tiny Whisper-shaped encoder with each projector, 600 / 1000 / 1500 steps): the CNN
    adapter reached dev WER 0.36 and text -> speech R@1 0.30-0.35 (chance 0.0125) in 66 s, the MLP 0.45 and
    0.18-0.24, the Q-Former about 0.54 and 0.11-0.21; more ASR steps overfit the 320 training clips (WER 0.44 with
    the CNN at 3000 steps) and fewer stage-1 steps leave the tiny LLM a weaker writer (0.50 at 300). Those figures
    predate the contrastive sink token: with its default (`sink_token="bos"`) the CNN run gives WER 0.43 and R@1
    0.21-0.31 in 69 s (2026-12-05); the steps were not retuned for it.
    """

    text_steps: int = 600
    text_learning_rate: float = 3e-3
    contrastive_steps: int = 1000
    contrastive_learning_rate: float = 2e-3
    asr_steps: int = 1500
    asr_learning_rate: float = 3e-3
    batch_size: int = 16
    seed: int = 0


def stage_arguments(arguments_class, config, output_dir: str, stage: str, **kwargs):
    """The training arguments of one projector-training stage: a folder `stage` in `output_dir`, the config's
    `{stage}_steps`, `{stage}_learning_rate`, batch size and seed, on the CPU; `kwargs`: the stage's other settings."""
    return arguments_class(
        output_dir=os.path.join(output_dir, stage),
        max_steps=getattr(config, f"{stage}_steps"),
        learning_rate=getattr(config, f"{stage}_learning_rate"),
        per_device_train_batch_size=config.batch_size,
        seed=config.seed,
        **CPU_RUN_ARGUMENTS,
        **kwargs,
    )


def _stage1_text_tuning(model, processor, rows, config: QuickstartConfig, output_dir: str) -> list[dict]:
    """Teach the tiny LLM the text version of the ASR task (transcript in place of the audio)."""
    prompts = PromptConfig.from_file()
    texts = []
    for row in rows:
        user, response = build_turns(row, "asr", prompts, audio_token=row["text"])
        conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        texts.append(processor.apply_chat_template(conversation))
    tokenizer = processor.tokenizer
    dataset = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False), batched=True, remove_columns=["text"]
    )
    language_model = model.language_model
    language_model.requires_grad_(True)
    language_model.train()
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "stage1"),
        max_steps=config.text_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.text_learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=language_model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    language_model.requires_grad_(False)
    model.train(False)
    return trainer.state.log_history


def _save_backbones(model, processor, output_dir: str) -> None:
    """Write the tiny encoder and the stage-1 LLM as their own checkpoints, as if they were Hub repos, and point the
    config at them: the speech LLM can then be saved projector-only and loaded by id like a real one."""
    encoder_dir, text_dir = os.path.join(output_dir, "encoder"), os.path.join(output_dir, "llm")
    model.encoder.save_pretrained(encoder_dir)
    processor.feature_extractor.save_pretrained(encoder_dir)
    model.language_model.save_pretrained(text_dir)
    processor.tokenizer.save_pretrained(text_dir)
    model.config.encoder_name_or_path = os.path.abspath(encoder_dir)
    model.config.text_name_or_path = os.path.abspath(text_dir)


def transcribe(model, processor, rows, batch_size: int = 16, max_new_tokens: int = 40) -> list[str]:
    """Greedy transcriptions of `rows` (audio paths) with the prompt file's ASR instruction, batched."""
    results = generate_responses(
        model,
        processor,
        [{"audio": row["audio"]} for row in rows],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    failed = [f"{row['audio']}: {r.error}" for row, r in zip(rows, results) if r.error]
    if failed:  # the bundled clips are all usable: a failure here is a bug, not a row to skip
        raise RuntimeError(f"{len(failed)} dev clips could not be transcribed, e.g. {failed[0]}")
    return [r.response for r in results]


def transcribe_reloaded(model, processor, model_dir: str, rows) -> list[str]:
    """Save the model into `model_dir` (projector-only where its backbones are referenced), reload it as a user
    would, through `AutoModel` / `AutoProcessor` with `trust_remote_code`, and transcribe `rows` with the reload."""
    model.save_pretrained(model_dir, processor=processor)
    reloaded = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    reloaded_processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return transcribe(reloaded, reloaded_processor, rows)


def plot_losses(histories: dict[str, list[dict]], path: str) -> None:
    """One panel of training loss per stage (`{stage: trainer.state.log_history}`), saved as a PNG."""
    plt = import_pyplot()
    figure, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for axis, (stage, history) in zip(axes[0], histories.items()):
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if points:
            axis.plot(*zip(*points), marker=".")
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_quickstart(output_dir: str, config: QuickstartConfig | None = None) -> dict:
    """Run the whole pipeline into `output_dir`; returns the figures written to `report.md` / `results.json`."""
    config = config or QuickstartConfig()
    # WER needs jiwer (the `eval` extra) and the plots matplotlib (`plots`): say so now, not after minutes of training.
    require_optional("jiwer")
    import_pyplot()
    os.makedirs(output_dir, exist_ok=True)
    started = time.time()
    torch.manual_seed(config.seed)
    model, processor = from_preset("tiny", encoder_type="whisper", projector_type=PROJECTOR_TYPE)
    train_rows, dev_rows = load_split("train"), load_split("dev")
    train_set = datasets.Dataset.from_list(train_rows)
    cache_dir = os.path.join(output_dir, "feature_cache")

    logger.info("Stage 1: text-only tuning of the tiny LLM.")
    stage1 = _stage1_text_tuning(model, processor, train_rows, config, output_dir)
    _save_backbones(model, processor, os.path.join(output_dir, "backbones"))

    retrieval_before, _ = evaluate_retrieval(model, processor, dev_rows, layers="all")
    hypotheses_before = transcribe(model, processor, dev_rows)

    logger.info("Stage 2: contrastive pretraining of the projector.")
    args = stage_arguments(
        ContrastiveTrainingArguments, config, output_dir, "contrastive", feature_cache_dir=cache_dir
    )
    contrastive = ContrastiveTrainer(model=model, args=args, train_dataset=train_set, processing_class=processor)
    contrastive.train()
    retrieval_after, similarities = evaluate_retrieval(model, processor, dev_rows, layers="all")

    logger.info("Stage 3: ASR fine-tuning of the projector.")
    args = stage_arguments(SpeechLlmTrainingArguments, config, output_dir, "asr", feature_cache_dir=cache_dir)
    asr = SpeechLlmTrainer(model=model, args=args, train_dataset=train_set, processing_class=processor)
    asr.train()

    model_dir = os.path.join(output_dir, "model")
    hypotheses_after = transcribe_reloaded(model, processor, model_dir, dev_rows)

    references = [row["text"] for row in dev_rows]
    last = max(int(k.split("_")[1]) for k in retrieval_after)
    results = {
        "seconds": round(time.time() - started, 1),
        "dev_clips": len(dev_rows),
        "retrieval_R@1": {
            "chance": 1 / len(dev_rows),
            "before": {k: v["text_to_speech/R@1"] for k, v in retrieval_before.items()},
            "after": {k: v["text_to_speech/R@1"] for k, v in retrieval_after.items()},
        },
        "wer": {
            "before": {
                "mean_utterance": mean_utterance_wer(references, hypotheses_before),
                "corpus": corpus_wer(references, hypotheses_before),
            },
            "after": {
                "mean_utterance": mean_utterance_wer(references, hypotheses_after),
                "corpus": corpus_wer(references, hypotheses_after),
            },
        },
        "saved_files": sorted(os.listdir(model_dir)),
        "examples": [
            {"reference": r, "before": b, "after": a}
            for r, b, a in list(zip(references, hypotheses_before, hypotheses_after))[:8]
        ],
    }
    plot_losses(
        {
            "stage 1: text LM": stage1,
            "stage 2: contrastive": contrastive.state.log_history,
            "stage 3: ASR": asr.state.log_history,
        },
        os.path.join(output_dir, "losses.png"),
    )
    plot_similarity(
        similarities[last],
        os.path.join(output_dir, "similarity.png"),
        f"dev cosine similarity at layer {last} after contrastive pretraining",
    )
    with open(os.path.join(output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w") as file:
        file.write(_report(results))
    return results


def _report(results: dict) -> str:
    retrieval, wer = results["retrieval_R@1"], results["wer"]
    rows = "\n".join(
        f"| {layer} | {retrieval['before'][layer]:.3f} | {retrieval['after'][layer]:.3f} |"
        for layer in retrieval["after"]
    )
    examples = "\n".join(f"| {e['reference']} | {e['before']} | {e['after']} |" for e in results["examples"])
    return f"""# speechllm_hf quickstart report

Tiny random Whisper-shaped encoder + {PROJECTOR_NAMES[PROJECTOR_TYPE]} + tiny Llama on the bundled espeak-ng
corpus ({results["dev_clips"]} dev clips), {results["seconds"]} s on this machine. Stage 1 tuned the tiny LLM on
text; stages 2-3 trained only the projector.

![losses](losses.png)

## Retrieval on the dev split (text -> speech R@1; chance {retrieval["chance"]:.4f})

| layer | before contrastive | after contrastive |
|---|---|---|
{rows}

![similarity](similarity.png)

## ASR on the dev split (WER; after = the reloaded projector-only save)

| | mean per-utterance WER | corpus WER |
|---|---|---|
| before (untrained projector) | {wer["before"]["mean_utterance"]:.3f} | {wer["before"]["corpus"]:.3f} |
| after contrastive + ASR | {wer["after"]["mean_utterance"]:.3f} | {wer["after"]["corpus"]:.3f} |

| reference | before | after |
|---|---|---|
{examples}

Saved projector-only model: {", ".join(results["saved_files"])}.
"""


__all__ = [
    "run_quickstart",
    "QuickstartConfig",
    "stage_arguments",
    "transcribe",
    "transcribe_reloaded",
    "plot_losses",
    "CPU_RUN_ARGUMENTS",
]
