"""Dev WER of a saved speech LLM on any manifest, scored as `speechllm-hf quickstart --backbones real` scores it (the
same greedy decoding and normalisers), optionally side by side with a whole Whisper checkpoint on the same clips.

Used for the figures of docs/real_backbones.md where a model trained on one corpus is scored on another's dev split:

    python benchmarks/asr_dev_wer.py --model /work/runs/combined/asr-model \
        --whisper ~/.cache/speechllm_hf/backbones/whisper-base

Prints one JSON object: WER per normaliser, clip count and the first transcripts.
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoModel, AutoProcessor

from speechllm_hf.data.manifest import load_manifest
from speechllm_hf.evaluation.baselines import whisper_transcripts
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.quickstart.real import wer_by_normaliser
from speechllm_hf.quickstart.tiny import transcribe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved speech LLM folder (or Hub id)")
    parser.add_argument("--dev_manifest", default="", help="default: the bundled corpus's dev split")
    parser.add_argument("--whisper", help="also score this whole Whisper checkpoint (its own decoder) on the clips")
    args = parser.parse_args()
    if not (args.model or args.whisper):
        parser.error("give --model, --whisper or both")
    rows = load_split("dev") if not args.dev_manifest else [dict(r) for r in load_manifest(args.dev_manifest)]
    references = [row["text"] for row in rows]
    report = {"clips": len(rows)}
    if args.model:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        hypotheses = transcribe(model, processor, rows)
        report["speech_llm"] = wer_by_normaliser(references, hypotheses)
        report["examples"] = [{"reference": r, "speech_llm": h} for r, h in list(zip(references, hypotheses))[:10]]
    if args.whisper:
        report["whisper"] = wer_by_normaliser(references, whisper_transcripts(args.whisper, rows))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
