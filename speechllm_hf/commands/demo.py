"""`speechllm-hf demo --model DIR_OR_ID | --preset tiny [--host 127.0.0.1] [--port 7860]`: a local Gradio chat.

Needs the `demo` extra (`pip install "speechllm_hf[demo]"`). The page is served on `--host` only; there is no public
share link.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from speechllm_hf.presets import ENCODER_TYPES, PRESETS

    parser = subparsers.add_parser("demo", help="chat with a model in the browser: upload or record audio (Gradio)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved model folder or Hub id (projector-only or full save)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="build a preset instead (tiny: random, offline)")
    parser.add_argument("--encoder_type", choices=ENCODER_TYPES, help="with --preset: replace the encoder")
    parser.add_argument("--projector_type", choices=["qformer", "cnn", "mlp"], help="with --preset")
    parser.add_argument("--prompts", help="prompt file: default, blsp or a YAML path (user_template, instructions)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights' dtype")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling and a preset's random weights")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.demo import build_demo, import_gradio

    from .generate import load_model_and_processor

    import_gradio()  # fail with the install hint before spending time on loading the model
    model, processor = load_model_and_processor(args)
    demo = build_demo(
        model, processor, prompts=PromptConfig.from_file(args.prompts), max_new_tokens=args.max_new_tokens
    )
    # Quiet: gradio's banner suggests share=True, which this command refuses (the demo stays on --host).
    demo.queue().launch(
        server_name=args.host, server_port=args.port, share=False, quiet=True, prevent_thread_lock=True
    )
    print(f"speechllm-hf demo: serving on {demo.local_url} (Ctrl+C to stop)", flush=True)
    demo.block_thread()
    return 0


__all__ = ["register", "run"]
