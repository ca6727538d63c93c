"""`speechllm-hf push --model DIR --repo_id ID`: publish a saved model folder (projector, config, code, processor,
card) to the Hub: the files the library writes, and any other only when named (`--extra_file`); training state in a
checkpoint folder (optimizer, scheduler, RNG) is never uploaded, a folder
holding full backbone weights is refused unless `--allow_full_model` is given, and so is a config.json that names its
encoder or LLM by a local folder path (nobody else could load it): `--encoder_hub_id` / `--text_hub_id` name the Hub
repos those folders hold, checked against the local weights (`speechllm_hf.publishing`), for the uploaded copy."""

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
    parser.add_argument(
        "--extra_file",
        action="append",
        default=[],
        help="a file of the folder that the library does not write, to upload too (repeat for each); any other such "
        "file stops the push",
    )
    for part, label, example in (
        ("encoder", "encoder", "openai/whisper-base"),
        ("text", "LLM", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ):
        parser.add_argument(
            f"--{part}_hub_id",
            help=f"publish with this Hub id for the {label} (e.g. {example}) in place of the local folder the config "
            "names; the folder's weights are checked against the repo's first",
        )
        parser.add_argument(f"--{part}_hub_revision", help=f"revision of --{part}_hub_id (default: main, pinned)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from speechllm_hf.publishing import hub_backbones_copy, upload_saved_folder

    with tempfile.TemporaryDirectory() as copy:
        folder = args.model
        if args.encoder_hub_id or args.text_hub_id:
            checks = hub_backbones_copy(
                args.model,
                copy,
                encoder_id=args.encoder_hub_id,
                encoder_revision=args.encoder_hub_revision,
                text_id=args.text_hub_id,
                text_revision=args.text_hub_revision,
                token=args.token,
                allow_full_model=args.allow_full_model,
                extra_files=args.extra_file,
            )
            for check in checks:
                print(check.describe())
            folder = copy
        commit = upload_saved_folder(
            folder,
            args.repo_id,
            allow_full_model=args.allow_full_model,
            extra_files=args.extra_file,
            commit_message=args.commit_message,
            private=args.private or None,
            token=args.token,
            revision=args.revision,
            create_pr=args.create_pr,
        )
    print(f"pushed {args.model} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


__all__ = ["register", "run"]
