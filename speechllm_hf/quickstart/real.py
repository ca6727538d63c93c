"""The quickstart on real pretrained backbones: Whisper-base's encoder + a CNN adapter + SmolLM2-135M-Instruct.

`speechllm-hf quickstart --backbones real`. Each stage trains a fresh projector from the same seed within its own
time budget, so that each figure stands for one method alone:

1. baseline: Whisper-base itself (its own decoder) transcribes the dev clips, scored by the same script and
   normalisers as the speech LLM;
2. ASR: projector-only fine-tuning (`SpeechLlmTrainer`, feature cache on); dev WER; projector-only save, reload
   through `AutoModel.from_pretrained(..., trust_remote_code=True)`, transcripts compared with the in-memory model's;
3. contrastive: `ContrastiveTrainer` at the paper's `all` layers; text -> speech R@1 on the dev clips per layer;
4. continuation: the LLM continues every transcript (`write_continuations`), then `ContinuationTrainer` (BLSP
   cross-entropy) teaches the projector to make it write the same continuation from speech; per-token cross-entropy
   of the continuation from speech (untrained and trained) against from the transcript (the bound).

Backbones default to the Hub ids; offline, pass the folders `scripts/offline_backbones.py` writes (they are recorded
as local paths). Data default to the bundled corpus; `train_manifest` / `dev_manifest` take any manifest, e.g. the
open-vocabulary set of `speechllm-hf synthesize`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import datasets
import torch
from transformers import TrainerCallback

from ..data.collators import ContinuationCollator
from ..data.manifest import load_manifest
from ..data.tasks import PromptConfig
from ..evaluation.baselines import continuation_cross_entropy, whisper_transcripts
from ..evaluation.metrics import corpus_wer, mean_utterance_wer, require_optional
from ..evaluation.retrieval import evaluate_retrieval, import_pyplot, plot_similarity
from ..preprocessing.continuation import make_normalizer, write_continuations
from ..presets import from_preset
from ..training.arguments import SpeechLlmTrainingArguments
from ..training.continuation import ContinuationTrainer, ContinuationTrainingArguments
from ..training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from ..training.trainer import SpeechLlmTrainer
from .corpus import load_split
from .tiny import plot_losses, stage_arguments, transcribe, transcribe_reloaded

STAGES = ("baseline", "asr", "contrastive", "continuation")


@dataclass
class RealQuickstartConfig:
    """Budgets and learning rates of the real-backbone run. The defaults are the goals' budgets, with the learning
    rates that measured best (docs/real_backbones.md) and step counts whose schedules end within the budgets at the
    step times measured on 2 CPU cores (on a faster machine the schedule ends first)."""

    encoder_name_or_path: str = "openai/whisper-base"
    text_name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    preset: str = "whisper-base-smollm2"
    train_manifest: str = ""  # empty: the bundled corpus
    dev_manifest: str = ""
    stages: str = ",".join(STAGES)
    asr_minutes: float = 30.0
    asr_steps: int = 500  # 3.4 s a step with the feature cache
    asr_learning_rate: float = 3e-3
    contrastive_minutes: float = 20.0
    contrastive_steps: int = 880  # 1.35 s a step
    contrastive_learning_rate: float = 3e-3
    continuation_minutes: float = 20.0
    continuation_steps: int = 160  # 7.4 s a step
    continuation_learning_rate: float = 1e-3
    batch_size: int = 16
    eval_limit: int = 0  # 0: every dev clip
    seed: int = 0


class TimeBudget(TrainerCallback):
    """Stops training once `seconds` of it have passed (the learning-rate schedule still spans `max_steps`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.started > self.seconds:
            control.should_training_stop = True


def _rows(manifest: str, split: str) -> list[dict]:
    return load_split(split) if not manifest else [dict(row) for row in load_manifest(manifest)]


def _training_args(cls, config: RealQuickstartConfig, output_dir: str, stage: str, **kw):
    """`stage_arguments` with the real run's schedule: cosine, warm-up over the first 1/30 of the steps, no decay."""
    warmup_steps = max(1, getattr(config, f"{stage}_steps") // 30)
    return stage_arguments(
        cls, config, output_dir, stage, lr_scheduler_type="cosine", warmup_steps=warmup_steps, weight_decay=0.0, **kw
    )


def _train(trainer, minutes: float) -> dict:
    trainer.add_callback(TimeBudget(60 * minutes))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    steps = trainer.state.global_step
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "samples_per_second": round(steps * trainer.args.per_device_train_batch_size / seconds, 2),
        "history": trainer.state.log_history,
    }


def wer_by_normaliser(references: list[str], hypotheses: list[str]) -> dict:
    """Mean-utterance and corpus WER under the papers' normalisation and under Whisper's English normaliser."""
    whisper_normalizer = make_normalizer()
    normalised = {
        "papers": (references, hypotheses),  # lower case, no punctuation
        "whisper_english": ([whisper_normalizer(t) for t in references], [whisper_normalizer(t) for t in hypotheses]),
    }
    return {
        name: {
            "mean_utterance": mean_utterance_wer(refs, hyps, normalize=name == "papers"),
            "corpus": corpus_wer(refs, hyps, normalize=name == "papers"),
        }
        for name, (refs, hyps) in normalised.items()
    }


def _new_model(config: RealQuickstartConfig):
    torch.manual_seed(config.seed)
    return from_preset(
        config.preset, encoder_name_or_path=config.encoder_name_or_path, text_name_or_path=config.text_name_or_path
    )


def _asr_stage(config, output_dir, train_set, dev_rows, cache_dir) -> dict:
    model, processor = _new_model(config)
    args = _training_args(
        SpeechLlmTrainingArguments,
        config,
        output_dir,
        "asr",
        feature_cache_dir=cache_dir,
    )
    trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=train_set, processing_class=processor)
    training = _train(trainer, config.asr_minutes)
    hypotheses = transcribe(model, processor, dev_rows)
    model_dir = os.path.join(output_dir, "asr-model")
    reloaded_hypotheses = transcribe_reloaded(model, processor, model_dir, dev_rows)
    references = [row["text"] for row in dev_rows]
    return {
        **training,
        "wer": wer_by_normaliser(references, hypotheses),
        "saved_files": sorted(os.listdir(model_dir)),
        "reload_gives_same_transcripts": reloaded_hypotheses == hypotheses,
        "examples": [{"reference": r, "speech_llm": h} for r, h in list(zip(references, hypotheses))[:10]],
    }


def _contrastive_stage(config, output_dir, train_set, dev_rows, cache_dir) -> dict:
    model, processor = _new_model(config)
    before, _ = evaluate_retrieval(model, processor, dev_rows, layers="all")
    args = _training_args(ContrastiveTrainingArguments, config, output_dir, "contrastive", feature_cache_dir=cache_dir)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=train_set, processing_class=processor)
    training = _train(trainer, config.contrastive_minutes)
    after, similarities = evaluate_retrieval(model, processor, dev_rows, layers="all")
    last = max(similarities)
    plot_similarity(
        similarities[last], os.path.join(output_dir, "similarity.png"), f"dev cosine similarity, layer {last}"
    )
    r_at_1 = {
        key: {"before": before[key]["text_to_speech/R@1"], "after": value["text_to_speech/R@1"]}
        for key, value in after.items()
    }
    return {**training, "chance_R@1": 1 / len(dev_rows), "R@1": r_at_1}


def _with_continuations(model, tokenizer, rows: list[dict], path: str) -> list[dict]:
    write_continuations(
        model.language_model,
        tokenizer,
        datasets.Dataset.from_list(rows),
        path,
        model_name=model.config.text_name_or_path,
        style="chat",
    )
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _continuation_stage(config, output_dir, train_rows, dev_rows, cache_dir) -> dict:
    model, processor = _new_model(config)
    folder = os.path.join(output_dir, "continuations")
    train = _with_continuations(model, processor.tokenizer, train_rows, os.path.join(folder, "train.jsonl"))
    dev = _with_continuations(model, processor.tokenizer, dev_rows, os.path.join(folder, "dev.jsonl"))
    args = _training_args(
        ContinuationTrainingArguments,
        config,
        output_dir,
        "continuation",
        feature_cache_dir=cache_dir,
    )
    collator = ContinuationCollator(processor, with_teacher=True, prompts=PromptConfig.from_file(args.prompt_file))
    untrained = continuation_cross_entropy(model, collator, dev)
    trainer = ContinuationTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(train), processing_class=processor
    )
    training = _train(trainer, config.continuation_minutes)
    trained = continuation_cross_entropy(model, collator, dev)
    gap = untrained["speech"] - trained["transcript"]
    return {
        **training,
        "continuations": {"train": len(train), "dev": len(dev)},
        "cross_entropy": {
            "from_transcript": trained["transcript"],
            "from_speech_untrained": untrained["speech"],
            "from_speech_trained": trained["speech"],
        },
        "gap_closed": (untrained["speech"] - trained["speech"]) / gap if gap > 0 else None,
    }


def run_real_quickstart(output_dir: str, config: RealQuickstartConfig | None = None) -> dict:
    """Runs the selected stages into `output_dir`; writes results.json, report.md and plots, returns the results."""
    config = config or RealQuickstartConfig()
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"Unknown stages {unknown}; choose from {', '.join(STAGES)}.")
    # WER needs jiwer (the `eval` extra) and the plots matplotlib (`plots`): say so before any training.
    require_optional("jiwer")
    import_pyplot()
    os.makedirs(output_dir, exist_ok=True)
    train_rows, dev_rows = _rows(config.train_manifest, "train"), _rows(config.dev_manifest, "dev")
    if config.eval_limit:
        dev_rows = dev_rows[: config.eval_limit]
    train_set = datasets.Dataset.from_list(train_rows)
    cache_dir = os.path.join(output_dir, "feature_cache")
    started = time.time()
    results: dict = {"config": asdict(config), "train_clips": len(train_rows), "dev_clips": len(dev_rows)}
    references = [row["text"] for row in dev_rows]
    if "baseline" in stages:
        hypotheses = whisper_transcripts(config.encoder_name_or_path, dev_rows)
        results["whisper_baseline"] = {
            "wer": wer_by_normaliser(references, hypotheses),
            "examples": [{"reference": r, "whisper": h} for r, h in list(zip(references, hypotheses))[:10]],
        }
    if "asr" in stages:
        results["asr"] = _asr_stage(config, output_dir, train_set, dev_rows, os.path.join(cache_dir, "train"))
    if "contrastive" in stages:
        results["contrastive"] = _contrastive_stage(
            config, output_dir, train_set, dev_rows, os.path.join(cache_dir, "train")
        )
    if "continuation" in stages:
        results["continuation"] = _continuation_stage(
            config, output_dir, train_rows, dev_rows, os.path.join(cache_dir, "continuation")
        )
    results["seconds"] = round(time.time() - started, 1)
    trained = {stage: results[stage]["history"] for stage in STAGES[1:] if stage in results}
    if trained:
        plot_losses(trained, os.path.join(output_dir, "losses.png"))
    with open(os.path.join(output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w") as file:
        file.write(_report(results))
    return results


def _wer_lines(label: str, wer: dict) -> str:
    papers, whisper = wer["papers"], wer["whisper_english"]
    return (
        f"| {label} | {papers['mean_utterance']:.3f} | {papers['corpus']:.3f} | "
        f"{whisper['mean_utterance']:.3f} | {whisper['corpus']:.3f} |"
    )


def _report(results: dict) -> str:
    config = results["config"]
    lines = [
        "# speechllm_hf quickstart on real backbones",
        "",
        f"Encoder `{config['encoder_name_or_path']}`, LLM `{config['text_name_or_path']}`, preset "
        f"`{config['preset']}`; {results['train_clips']} training and {results['dev_clips']} dev clips; "
        f"{results['seconds']} s in all. Each stage trains a fresh projector; only the projector trains.",
        "",
        "![losses](losses.png)",
        "",
    ]
    if "whisper_baseline" in results or "asr" in results:
        lines += [
            "## ASR on the dev clips (WER)",
            "",
            "| system | mean utt. (papers' norm.) | corpus (papers') | mean utt. (Whisper English norm.) | "
            "corpus (Whisper) |",
            "|---|---|---|---|---|",
        ]
        if "whisper_baseline" in results:
            lines.append(_wer_lines("Whisper-base alone (greedy)", results["whisper_baseline"]["wer"]))
        if "asr" in results:
            asr = results["asr"]
            lines.append(_wer_lines(f"speech LLM, {asr['steps']} steps / {asr['seconds']} s", asr["wer"]))
            lines += [
                "",
                f"Projector-only save: {', '.join(asr['saved_files'])}; the `AutoModel` reload gives the same "
                f"transcripts: {asr['reload_gives_same_transcripts']}.",
            ]
        lines.append("")
    if "contrastive" in results:
        contrastive = results["contrastive"]
        lines += [
            f"## Contrastive pretraining: text -> speech R@1 (chance {contrastive['chance_R@1']:.4f}), "
            f"{contrastive['steps']} steps / {contrastive['seconds']} s",
            "",
            "| layer | before | after |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['before']:.3f} | {v['after']:.3f} |" for k, v in contrastive["R@1"].items()]
        lines += ["", "![similarity](similarity.png)", ""]
    if "continuation" in results:
        continuation = results["continuation"]
        ce = continuation["cross_entropy"]
        closed = continuation["gap_closed"]
        lines += [
            f"## Continuation writing (BLSP), {continuation['steps']} steps / {continuation['seconds']} s",
            "",
            "Per-token cross-entropy of the LLM's own continuation on the dev clips:",
            "",
            "| input | cross-entropy |",
            "|---|---|",
            f"| transcript (the bound) | {ce['from_transcript']:.3f} |",
            f"| speech, untrained projector | {ce['from_speech_untrained']:.3f} |",
            f"| speech, trained projector | {ce['from_speech_trained']:.3f} |",
            "",
            f"Gap closed: {closed:.1%}." if closed is not None else "Gap closed: undefined (no gap).",
            "",
        ]
    return "\n".join(lines)


__all__ = ["run_real_quickstart", "RealQuickstartConfig", "TimeBudget", "STAGES", "wer_by_normaliser"]
