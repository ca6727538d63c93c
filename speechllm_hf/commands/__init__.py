"""Sub-commands of `speechllm-hf`; each module's `register(subparsers)` adds one (see speechllm_hf.cli)."""
