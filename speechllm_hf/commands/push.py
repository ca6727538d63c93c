"""`speechllm-hf push --model DIR --repo_id ID`: publish a saved model folder (projector, config, code, processor,
card) to the Hub. Training state in a checkpoint folder (optimizer, scheduler, RNG) is never uploaded, a folder
holding full backbone weights is refused unless `--allow_full_model` is given, and so is a config.json that names its
encoder or LLM by a local folder path (nobody else could load it: set the Hub ids first)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="upload a saved (projector-only) model folder to the Hub")
    parser.add_argument("--model", required=True, help="folder written by save_pretrained or a training checkpoint")
    parser.add_argument("--repo_id", required=True, help="target Hub repo, e.g. me/hubert-qformer-llama3")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--revision", help="branch to commit to")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit_message", default="Upload speech LLM projector")
    parser.add_argument("--allow_full_model", action="store_true", help="also upload full backbone weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllm_hf.models.speechllm.hub_speechllm import upload_saved_folder

    commit = upload_saved_folder(
        args.model,
        args.repo_id,
        allow_full_model=args.allow_full_model,
        commit_message=args.commit_message,
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    print(f"pushed {args.model} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


__all__ = ["register", "run"]
