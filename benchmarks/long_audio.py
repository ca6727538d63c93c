"""Peak memory and time of `generate` on long clips (1, 5 and 10 minutes by default), the encoder in fixed windows.

The tiny preset with a Whisper-shaped encoder (random weights) answers one clip per length, each in a fresh process,
so that no length inherits another's allocations. Memory is the process's resident set (Linux `/proc/self/status`):
after building the model, one warm-up answer on a 5 s clip and making the long clip, the peak-RSS mark (`VmHWM`) is
reset (`/proc/self/clear_refs`) and the resident set noted; the peak during the processor + `generate` call, less
that, is the memory the call added. (torch's CPU allocations are invisible to `tracemalloc`; the resident set sees
them and everything else: numpy's feature extraction, the LLM's cache.) Prints one JSON line: per length the
process's peak, the added peak and the seconds; the ratio is the 10-minute process peak over the 1-minute one (goal
<= 1.2: the clip's memory must stay small beside the model's), with the added peak per minute of audio to show that
growth is linear.

    python benchmarks/long_audio.py --minutes 1 5 10 --encoder_type whisper --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GOAL = 1.2
RATE = 16000


def memory_mb(field: str) -> float:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def speech_like(seconds: float) -> np.ndarray:
    """A float32 clip without large temporaries (they would count as the clip's memory): one synthetic second of a
    few harmonics and noise, repeated."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    second = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 5)) + 0.05 * rng.standard_normal(RATE)
    return np.resize((0.3 * second).astype(np.float32), int(seconds * RATE))


def measure_one(minutes: float, encoder_type: str, max_new_tokens: int) -> dict:
    """In this process: the peak memory and time of one answer to a clip of `minutes`."""
    import torch

    from speechllm_hf import from_preset
    from speechllm_hf.inference import generate_responses

    torch.manual_seed(0)
    model, processor = from_preset("tiny", encoder_type=encoder_type)
    model.eval()
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    generate_responses(model, processor, [{"audio": speech_like(5.0), "sampling_rate": RATE}], **settings)
    clip = speech_like(minutes * 60)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    baseline = memory_mb("VmRSS")
    start = time.perf_counter()
    [result] = generate_responses(model, processor, [{"audio": clip, "sampling_rate": RATE}], **settings)
    seconds = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"{minutes} min clip refused: {result.error}")
    peak = memory_mb("VmHWM")
    inputs = processor(text=processor.audio_token, audio=clip, sampling_rate=RATE, return_tensors=None)
    return {
        "minutes": minutes,
        "process_peak_mb": round(peak, 1),
        "added_peak_mb": round(peak - baseline, 1),
        "seconds": round(seconds, 2),
        "audio_tokens": processor.num_audio_tokens(len(inputs["feature_attention_mask"][0])),
        "encoder_windows": -(-len(inputs["feature_attention_mask"][0]) // model.config.encoder_window),
    }


def run(args: argparse.Namespace) -> dict:
    """The benchmark with the options of `add_arguments`: one fresh process per length."""
    rows = []
    for minutes in args.minutes:
        command = [sys.executable, __file__, "--one", str(minutes), "--encoder_type", args.encoder_type]
        command += ["--max_new_tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"the {minutes} min run failed:\n{completed.stderr[-3000:]}")
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    first, last = rows[0], rows[-1]
    span = last["minutes"] - first["minutes"]
    return {
        "name": "long_audio_memory",
        "ratio": round(last["process_peak_mb"] / first["process_peak_mb"], 4),
        "goal": GOAL,
        "higher_is_better": False,
        "lengths": rows,
        "added_mb_per_minute": round((last["added_peak_mb"] - first["added_peak_mb"]) / span, 2) if span else None,
        "seconds_per_minute": round((last["seconds"] - first["seconds"]) / span, 3) if span else None,
        "model": f"tiny preset, {args.encoder_type}-shaped encoder, Q-Former, {args.max_new_tokens} new tokens",
        "memory": "process resident set (Linux /proc/self/status VmHWM after clear_refs), fresh process per length",
        "torch_threads": args.threads,
        "device": "cpu",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=float, nargs="+", default=[1.0, 5.0, 10.0], help="clip lengths, shortest first"
    )
    parser.add_argument("--encoder_type", choices=["whisper", "hubert", "wav2vec2"], default="whisper")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more than the idle cores make timings erratic)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # a child process: measure this length only
    args = parser.parse_args()
    if args.one is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_one(args.one, args.encoder_type, args.max_new_tokens)))
    else:
        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "run"]
