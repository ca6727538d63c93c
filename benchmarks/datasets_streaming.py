"""Training speed of the tiny preset on the same clips from a jsonl manifest and streamed from a local parquet dataset.

Both go through `speechllm-hf train`'s data path (`commands.train.load_rows`): the manifest is validated before
training (as `prepare` does) and read map-style; the parquet dataset (a folder laid out as a Hub dataset repo, clips
stored as bytes) is streamed, each row validated and decoded as the Trainer reads it. The same trainer settings
(batch, seed, no duration grouping, which a stream cannot do) run one after the other in one process; steps/s are
timed from the end of the first step (start-up and the first batch excluded) to the last, each source run --repeats
times, alternated, the best run counting. Prints one JSON line with both figures and their ratio (goal: streaming >=
0.8x the manifest) and the stream's report of rows read, kept and dropped.

    python benchmarks/datasets_streaming.py --rows 64 --steps 20 --batch_size 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback

from speechllm_hf import from_preset
from speechllm_hf.commands.train import DataArguments, load_rows
from speechllm_hf.preprocessing.streaming import StreamReport
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

GOAL = 0.8


class StepClock(TrainerCallback):
    """The time at the end of each optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def write_sources(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """The rows as a jsonl manifest (audio paths) and as a Hub-style parquet dataset (audio bytes)."""
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": r["audio"], "text": r["text"]}) + "\n" for r in rows))
    table = {
        "audio": [{"bytes": Path(r["audio"]).read_bytes(), "path": Path(r["audio"]).name} for r in rows],
        "text": [r["text"] for r in rows],
    }
    hub = folder / "parquet_dataset"
    (hub / "data").mkdir(parents=True)
    dataset = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio(decode=False))
    dataset.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: data/train-*\n---\n")
    return manifest, hub


def steps_per_second(train_rows, output_dir: Path, steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    args = SpeechLlmTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        group_by_duration=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=steps,
        seed=0,
    )
    clock = StepClock()
    trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=train_rows, processing_class=processor)
    trainer.add_callback(clock)
    trainer.train()
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def run(args: argparse.Namespace) -> dict:
    """The benchmark with the options of `add_arguments`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest, hub = write_sources(load_split("train")[: args.rows], folder)
        train_args = SpeechLlmTrainingArguments(output_dir=str(folder / "unused"), use_cpu=True, report_to="none")
        # Streamed rows in file order, as the manifest's without duration grouping: the two runs see the same batches.
        data_args = DataArguments(shuffle_buffer_size=0)
        reports: list[StreamReport] = []
        manifest_rows = load_rows([str(manifest)], train_args, data_args)
        stream_rows = load_rows([str(hub)], train_args, data_args, streaming=True, reports=reports)
        # Alternated, each source --repeats times, best run kept: the first run of a process pays warm-ups (thread
        # pools, allocator) that are no property of the data source, and other work on the machine comes and goes.
        rates = {"manifest": [], "stream": []}
        for repeat in range(args.repeats):
            for name, rows in (("manifest", manifest_rows), ("stream", stream_rows)):
                rates[name].append(steps_per_second(rows, folder / f"{name}{repeat}", args.steps, args.batch_size))
    manifest_rate, stream_rate = max(rates["manifest"]), max(rates["stream"])
    return {
        "benchmark": "datasets_streaming",
        "ratio": round(stream_rate / manifest_rate, 3),
        "goal": GOAL,
        "higher_is_better": True,
        "rows": args.rows,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "manifest_steps_per_s": round(manifest_rate, 3),
        "streaming_steps_per_s": round(stream_rate, 3),
        "stream_report": reports[0].as_dict(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=64, help="training clips of the bundled corpus")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each source, alternated; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "run", "steps_per_second", "write_sources"]
