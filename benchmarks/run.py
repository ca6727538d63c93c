"""Run the benchmarks side by side in one process and check each ratio against its goal.

    python benchmarks/run.py --quick --json results.json
    python benchmarks/run.py --only padding_fraction native_qwen2audio

Each benchmark is a function of one of the scripts beside this one, called with that script's own options (its
`add_arguments` defaults, then the overrides of `--quick` or `--smoke` from `BENCHMARKS`). Sizes: the scripts'
defaults without a flag; `--quick` fewer repeats, so that the CPU set finishes in under 10 minutes on 2 cores;
`--smoke` the tiniest models, to check that everything runs (its figures mean nothing). A benchmark that needs CUDA is
skipped, with the reason, on a machine without it; one that fails is reported with its error, and the exit status
is then 1.

Prints a table (ratio, goal, pass or miss) and, with `--json`, writes `{name: {"ratio", "goal", "higher_is_better",
...details}}`, each entry also holding the machine, the wall time and the load average before and after it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import transformers

# The tiniest sizes of the native comparisons: seconds to build and run, for `--smoke` (and the test suite).
TINY_NATIVE = {
    "seconds": [1.0, 2.0],
    "repeats": 1,
    "encoder_width": 32,
    "encoder_layers": 1,
    "encoder_heads": 2,
    "qformer_hidden_size": 32,
    "qformer_layers": 1,
    "qformer_heads": 2,
    "llm_hidden_size": 32,
    "llm_layers": 1,
    "llm_heads": 2,
    "vocab_size": 128,
    "prompt_tokens": 4,
}
TINY_LLM = {"llm_hidden_size": 64, "llm_layers": 2, "llm_heads": 4}


@dataclass(frozen=True)
class Benchmark:
    """One entry of the run: `function(args)` of `benchmarks/<module>.py`, `args` parsed by its `add_arguments`."""

    name: str
    module: str
    function: str
    quick: dict = field(default_factory=dict)  # option overrides of --quick
    smoke: dict = field(default_factory=dict)  # option overrides of --smoke
    requires_cuda: bool = False


BENCHMARKS = (
    Benchmark("padding_fraction", "padding", "run", smoke={"num": 2000}),
    Benchmark("native_qwen2audio", "native_step", "qwen2audio", quick={"repeats": 3}, smoke=TINY_NATIVE),
    Benchmark("native_granite_speech", "native_step", "granite_speech", quick={"repeats": 3}, smoke=TINY_NATIVE),
    Benchmark(
        "encoder_feature_cache",
        "feature_cache",
        "run",
        quick={"steps": 3},
        smoke={"steps": 1, "batch_size": 2, "seconds": 1.0, "encoder_layers": 1, "text_layers": 1},
    ),
    Benchmark(
        "contrastive_step", "contrastive_step", "step_times", quick={"repeats": 3}, smoke={"repeats": 1, **TINY_LLM}
    ),
    Benchmark("sinkhorn_vectorised", "contrastive_step", "sinkhorn_times", quick={"repeats": 3}, smoke={"repeats": 1}),
    Benchmark(
        "batched_generation",
        "generation",
        "run",
        quick={"num_clips": 32, "threads": 1},  # 2 threads on a shared 2-core machine stall behind other jobs
        smoke={"num_clips": 4, "batch_size": 2, "max_new_tokens": 4},
    ),
    Benchmark(
        "long_audio_memory",
        "long_audio",
        "run",
        quick={"minutes": [1.0, 3.0]},
        smoke={"minutes": [0.25, 0.75], "max_new_tokens": 2},
    ),
    Benchmark(
        "datasets_streaming",
        "datasets_streaming",
        "run",
        quick={"steps": 10},
        smoke={"rows": 8, "steps": 2, "batch_size": 2, "repeats": 1},
    ),
    Benchmark(
        "gpu_training",
        "gpu_training",
        "run",
        smoke={"batch_size": 2, "steps": 1, "warmup": 1, "encoder_layers": 1, "llm_layers": 1, "flop_sample": 1},
        requires_cuda=True,
    ),
)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )


def options(benchmark: Benchmark, size: str | None) -> argparse.Namespace:
    """The benchmark script's own defaults, with the overrides of `size` ("quick", "smoke" or None)."""
    parser = argparse.ArgumentParser()
    importlib.import_module(benchmark.module).add_arguments(parser)
    args = parser.parse_args([])
    for key, value in (getattr(benchmark, size) if size else {}).items():
        if not hasattr(args, key):
            raise ValueError(f"{benchmark.name}: benchmarks/{benchmark.module}.py has no option --{key}")
        setattr(args, key, value)
    return args


def run_one(benchmark: Benchmark, size: str | None) -> dict:
    """The benchmark's result, or an entry that says why it was skipped or how it failed."""
    entry = {"machine": machine(), "load_average_before": round(os.getloadavg()[0], 2)}
    if benchmark.requires_cuda and not torch.cuda.is_available():
        return {"ratio": None, "goal": None, "higher_is_better": None, "skipped": "CUDA is not available", **entry}
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        args = options(benchmark, size)
        result = getattr(importlib.import_module(benchmark.module), benchmark.function)(args)
    except Exception as err:  # one failing benchmark must not hide the others' figures
        traceback.print_exc()
        result = {"ratio": None, "goal": None, "higher_is_better": None, "error": f"{type(err).__name__}: {err}"}
    finally:
        torch.set_num_threads(threads)  # scripts set their own thread counts
    result.pop("name", None)
    entry.update(wall_s=round(time.perf_counter() - start, 1), load_average_after=round(os.getloadavg()[0], 2))
    return {**result, **entry}


def verdict(result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"error: {result['error']}"
    ratio, goal = result["ratio"], result["goal"]
    if goal is None:
        return "reported (no goal)"
    met = ratio >= goal if result["higher_is_better"] else ratio <= goal
    text = "pass" if met else "MISS"
    if result.get("goal_device") and result.get("goal_device") != result.get("device"):
        text += f" (goal set for {result['goal_device']}; measured on {result['device']})"
    return text


def table(results: dict[str, dict]) -> str:
    rows = [("benchmark", "ratio", "goal", "verdict", "wall s")]
    for name, result in results.items():
        goal = result.get("goal")
        goal_text = "-" if goal is None else f"{'>=' if result['higher_is_better'] else '<='} {goal}"
        ratio = "-" if result.get("ratio") is None else f"{result['ratio']:g}"
        rows.append((name, ratio, goal_text, verdict(result), str(result.get("wall_s", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + f"  {row[4]}" for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_const", const="quick", dest="size", help="the CPU set in < 10 min")
    sizes.add_argument("--smoke", action="store_const", const="smoke", dest="size", help="tiniest sizes: runs only")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"a subset of: {', '.join(names)}")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    selected = [benchmark for benchmark in BENCHMARKS if args.only is None or benchmark.name in args.only]
    started = datetime.datetime.now().astimezone()
    print(f"{started:%Y-%m-%d %H:%M %Z}, {args.size or 'full'} sizes; {machine()}", flush=True)
    for module in dict.fromkeys(benchmark.module for benchmark in selected):
        importlib.import_module(module)  # before the clocks start, so that no benchmark's time holds imports
    results = {}
    for benchmark in selected:
        print(f"running {benchmark.name} ...", flush=True)
        results[benchmark.name] = run_one(benchmark, args.size)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    print(table(results))
    print(f"total {(datetime.datetime.now().astimezone() - started).total_seconds():.0f} s")
    failed = [name for name, result in results.items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
