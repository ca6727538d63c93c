"""`speechllm-hf demo --model DIR_OR_ID | --preset tiny [--host 127.0.0.1] [--port 7860]`: a local Gradio chat.

Needs the `demo` extra (`pip install "speechllm_hf[demo]"`). The page is served on `--host` only; there is no public
share link.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from .generate import add_model_arguments

    parser = subparsers.add_parser("demo", help="chat with a model in the browser: upload or record audio (Gradio)")
    add_model_arguments(parser)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.data.tasks import PromptConfig
    from speechllm_hf.quickstart.demo import build_demo, import_gradio

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
