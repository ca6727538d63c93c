"""`speechllm-hf retrieval --model DIR | --preset NAME --manifest M --output_dir D`: speech <-> text retrieval
(R@1, R@5 both ways) and the contrastive loss per LLM layer on held-out data, with a similarity heat map per layer."""

from __future__ import annotations

import argparse

from .common import add_source_arguments, flag_values, print_report


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.presets import PRESETS

    from .model_arguments import BackboneArguments, QuantizationArguments, add_arguments

    parser = subparsers.add_parser("retrieval", help="held-out speech<->text retrieval and contrastive loss per layer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a saved model (folder or Hub id)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="build a preset instead (tiny: random, offline)")
    # No prompt flags: retrieval feeds the LLM the transcript and the audio tokens alone, without a chat prompt.
    add_arguments(parser, BackboneArguments, QuantizationArguments)
    parser.add_argument("--manifest", required=True, help="held-out manifest or datasets source, audio and text")
    add_source_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="where retrieval.json and the heat maps go")
    parser.add_argument("--layers", default="all", help="'all', one index or a comma-separated list")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.1, help="temperature of the reported loss")
    parser.add_argument("--text_column", default="text")
    parser.add_argument(
        "--sink_token",
        default="bos",
        help="leading token left out of the pooling, as the projector was trained with (train's --sink_token): "
        "'bos' (the default), 'none' (the published form) or a token",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.evaluation.retrieval import evaluate_retrieval, import_pyplot, write_retrieval_report
    from speechllm_hf.preprocessing import prepare_dataset

    from .model_arguments import load_model_and_processor

    import_pyplot()  # the heat maps need the `plots` extra: say so before the model is loaded

    def retrieval() -> dict:
        # A bad manifest, split or model (such as a quantized backbone that is built randomly) is a message.
        model, processor = load_model_and_processor(args)
        rows, report = prepare_dataset(args.manifest, **flag_values(args, "text_column", "dataset_config", "split"))
        flags = flag_values(args, "layers", "batch_size", "temperature", "text_column", "sink_token")
        results, similarities = evaluate_retrieval(model, processor, rows, **flags)
        write_retrieval_report(
            {**results, "data": {k: report[k] for k in ("total", "kept", "dropped")}}, similarities, args.output_dir
        )
        return results

    return print_report("retrieval", retrieval)


__all__ = ["register", "run"]
