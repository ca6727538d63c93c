"""Runnable showcases, outside the core import path: the quickstart on the tiny preset (`tiny`) and on real
backbones (`real`), the Gradio demo (`demo`) and the bundled espeak-ng corpus they, the tests and the tiny preset's
tokenizer read (`corpus`). Each module is imported only by its command; this file imports nothing, so that
`speechllm_hf.quickstart.corpus` stays light."""
