"""The transformers 4.57 / 5.x differences that the package meets outside the model folder, in one place.

The Hub-shipped model folder keeps its own (`models/speechllm/compat_speechllm.py`): it may import nothing from here.
"""

from __future__ import annotations

import dataclasses

import transformers
from packaging import version
from transformers import TextIteratorStreamer, Trainer, TrainingArguments

try:
    from transformers.trainer_utils import rotate_checkpoints as _rotate_checkpoints
except ImportError:
    _rotate_checkpoints = None

_TRANSFORMERS_5 = version.parse(transformers.__version__).major >= 5

# transformers 5.x folded `warmup_ratio` into `warmup_steps` (a float below 1 is a ratio); 4.57 has both fields.
WARMUP_RATIO_FIELD = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}

# transformers 4.57's Trainer.train copies the tokenizer's special token ids into model.config, here the speech model's
# top level (the LLM's ids live in text_config and generation_config, set from that tokenizer); 5.x copies none.
TRAINER_ALIGNS_SPECIAL_TOKENS = hasattr(Trainer, "_align_special_tokens")


# transformers 5.x rotates checkpoints with trainer_utils.rotate_checkpoints; 4.57 with Trainer._rotate_checkpoints.
def rotate_checkpoints(trainer, output_dir: str, save_total_limit: int | None) -> None:
    """Delete the oldest checkpoints of `output_dir` beyond `save_total_limit`, keeping the best one, by mtime."""
    if _rotate_checkpoints is None:  # the method reads the limit from trainer.args
        trainer._rotate_checkpoints(use_mtime=True, output_dir=output_dir)
        return
    _rotate_checkpoints(
        output_dir=output_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=True,
    )


# transformers 5.x added `dataloader_multiprocessing_context` and `dataloader_in_order`; 4.57 has neither.
def dataloader_settings(args: TrainingArguments) -> dict:
    """The DataLoader settings that only some versions' training arguments carry."""
    names = ("multiprocessing_context", "in_order")
    return {name: getattr(args, f"dataloader_{name}") for name in names if hasattr(args, f"dataloader_{name}")}


# transformers 5.x asks for a sampling with `train_sampling_strategy`; 4.57 with `group_by_length`.
def requested_sampling(args: TrainingArguments) -> str | None:
    """The training sampling asked of transformers, if any, as the argument that asks for it."""
    if hasattr(args, "train_sampling_strategy"):
        strategy = args.train_sampling_strategy
        return None if strategy == "random" else f"train_sampling_strategy={strategy!r}"
    return "group_by_length=True" if args.group_by_length else None


# transformers 4.57's TextStreamer decodes the text after a newline without the token before it, which drops the next
# line's leading space; 5.x keeps that token as context.
class _NewlineContextStreamer(TextIteratorStreamer):
    def put(self, value) -> None:
        prompt = self.skip_prompt and self.next_tokens_are_prompt
        super().put(value)
        if not prompt and not self.token_cache:  # flushed at a newline: keep its token as 5.x does
            self.token_cache = value.reshape(-1)[-1:].tolist()
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))


def text_iterator_streamer(tokenizer, **kwargs) -> TextIteratorStreamer:
    """A `TextIteratorStreamer` whose pieces concatenate to the decoded output on both majors."""
    return (TextIteratorStreamer if _TRANSFORMERS_5 else _NewlineContextStreamer)(tokenizer, **kwargs)


# transformers 5.x counts the tensor-parallel ranks that share a batch once in its loss scale; 4.57 counts them all.
def loss_processes(trainer) -> int:
    """What `Trainer.compute_loss` multiplies a loss normalised over every process's tokens by (DDP then averages
    gradients over processes)."""
    if trainer.args.n_gpu > 1:
        return trainer.args.n_gpu
    processes = trainer.accelerator.num_processes
    return processes // trainer.get_tp_size() if _TRANSFORMERS_5 else processes


__all__ = [
    "TRAINER_ALIGNS_SPECIAL_TOKENS",
    "WARMUP_RATIO_FIELD",
    "rotate_checkpoints",
    "dataloader_settings",
    "requested_sampling",
    "loss_processes",
    "text_iterator_streamer",
]
