"""BLSP behaviour alignment by continuation writing (arXiv 2309.00916): `speechllm-hf train --method continuation`.

Rows hold audio, its transcript (`text`) and the continuation the text LLM wrote for the transcript
(`speechllm-hf continue-writing`). The speech model gets the continuation instruction with the speech where the
transcript was, and learns to write the same continuation:

- Cross-entropy (the faithful default, `ce_weight=1`): on the continuation tokens plus EOS / end-of-turn only. With
  the "blsp" prompt file and the whisper-cnn preset's chat template a sequence reads
  `<s>###[Human]:{instruction}<speech>\\n\\n\\n###[Assistant]:{continuation}</s>`.
- KL distillation (BLSP-KD, Ultravox; `kl_weight > 0`): the same frozen LLM reads the transcript instead of the
  speech, as `continue-writing` asked it for the continuation (the instruction, a space, the transcript; same response
  tokens) and, under `no_grad`, gives the teacher's next-token distribution at every response position; the loss is
  `T^2 * KL(teacher || student)` at temperature `T` (`kl_temperature`, 2), the `T^2` keeping gradient magnitudes
  comparable across temperatures (Hinton et al.). Both terms can be combined.

Both terms are sums over response tokens divided by the number of response tokens (over all accumulated micro-batches
and processes when the Trainer counts them), so gradient accumulation and data parallelism give the full-batch loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.collator import IGNORE_INDEX, SpeechLlmCollator, pad_token_lists
from ..data.prompts import continuation_request
from ..data.tasks import PromptConfig, build_turns
from .arguments import WARMUP_RATIO_FIELD, SpeechLlmTrainingArguments
from .trainer import SpeechLlmTrainer

TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")


@dataclass
class ContinuationTrainingArguments(SpeechLlmTrainingArguments):
    """Defaults follow BLSP stage 2 (arXiv 2309.00916 and its train_stage2 script): AdamW at lr 5e-5 with weight decay
    0.05, 1000 warmup steps then transformers' default linear decay, 1 epoch, task "continuation" with the "blsp"
    prompt file, and (as for every method) bf16 mixed precision on GPUs that support it, fp32 on CPU."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    if WARMUP_RATIO_FIELD:
        warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the steps spent warming up."})
        warmup_steps: int = field(default=1000, metadata={"help": "Warmup steps (override warmup_ratio)."})
    else:
        warmup_steps: float = field(default=1000, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the continuation data."})
    task: str = field(default="continuation", metadata={"help": "Task of rows without a `task` column."})
    prompt_file: str | None = field(
        default="blsp", metadata={"help": "Prompt YAML (user_template, instructions); 'default', 'blsp' or a path."}
    )
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy on the continuation."})
    kl_weight: float = field(
        default=0.0, metadata={"help": "Weight of KL(transcript-input LLM || speech-input LLM) on the continuation."}
    )
    kl_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})

    def __post_init__(self):
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            raise ValueError(
                f"ce_weight and kl_weight must be >= 0 and not both 0; got {self.ce_weight} and {self.kl_weight}."
            )
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0; got {self.kl_temperature}.")
        super().__post_init__()


def response_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict the labelled tokens, row by row: position t predicts token t + 1.

    Args:
        logits: (B, L, V) next-token logits.
        labels: (B, L) token ids, IGNORE_INDEX where nothing is learnt.

    Returns:
        (N, V), N being the number of labelled tokens after the first position, in row-major order.
    """
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0):
    """Per-position `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, computed in fp32.

    Args:
        student_logits: (N, V) logits of the model being trained.
        teacher_logits: (N, V) logits of the teacher at the same positions (no gradient needed).
        temperature: T.

    Returns:
        (N,) KL divergences, 0 where the two distributions are equal.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1)


class ContinuationCollator(SpeechLlmCollator):
    """`SpeechLlmCollator` for continuation rows that can also build the KL teacher's text-only inputs.

    The teacher sequence is the request `continue-writing` gave the text LLM (`continuation_request`: the row's
    instruction, a space, its transcript from `text_column`) as the user turn of the model's chat template, followed
    by exactly the student's response tokens (after any `max_length` cut), labelled the same way:
    `teacher_input_ids`, `teacher_attention_mask` and `teacher_labels`, right-padded. With the whisper-cnn chat
    template this is BLSP's continuation prompt, `<s>###[Human]:{instruction} {transcript}\n\n\n###[Assistant]:`.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        with_teacher: build the teacher tensors.
        **kwargs: as for `SpeechLlmCollator` (task defaults to "continuation").
    """

    def __init__(self, processor, with_teacher: bool = False, **kwargs):
        kwargs.setdefault("task", "continuation")
        super().__init__(processor, **kwargs)
        self.with_teacher = with_teacher

    def teacher_prompt(self, row: dict) -> str:
        """The rendered prompt of the teacher: the row's instruction and transcript in the model's chat template."""
        transcript = row.get(self.text_column)
        if not isinstance(transcript, str) or not transcript.strip():
            raise ValueError(
                f"The KL teacher reads the transcript from {self.text_column!r}, which this row lacks; it has "
                f"{sorted(row)}."
            )
        # The instruction alone, formatted with the row's fields as the student's is.
        instruction, _ = build_turns(
            row,
            row.get("task") or self.task,
            PromptConfig("{instruction}", self.prompts.instructions),
            self.text_column,
        )
        request = continuation_request(instruction, transcript.strip())
        return self.processor.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        if not self.with_teacher:
            return batch
        tokenizer = self.processor.tokenizer
        prompts = tokenizer([self.teacher_prompt(row) for row in rows], add_special_tokens=False)["input_ids"]
        sequences, labels = [], []
        for prompt, student_labels in zip(prompts, batch["labels"]):
            response = student_labels[student_labels != IGNORE_INDEX].tolist()
            sequences.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = pad_token_lists(
            sequences, tokenizer.pad_token_id
        )
        batch["teacher_labels"], _ = pad_token_lists(labels, IGNORE_INDEX)
        return batch


class ContinuationTrainer(SpeechLlmTrainer):
    """`SpeechLlmTrainer` with the continuation losses: `ce_weight * CE + kl_weight * KL` on the response tokens.

    Logs `loss_ce` and `loss_kl` (per response token) beside the total `loss`. The teacher pass runs the same model
    on text only, under `no_grad` and with any LoRA adapter of the LLM switched off, so the teacher is the frozen LLM.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for
            `SpeechLlmTrainer`; `args` are `ContinuationTrainingArguments` and the default collator is a
            `ContinuationCollator` that builds teacher inputs when `args.kl_weight > 0`.
    """

    def __init__(
        self,
        model=None,
        args: ContinuationTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if not isinstance(args, ContinuationTrainingArguments):
            raise ValueError("ContinuationTrainer needs ContinuationTrainingArguments (at least an output_dir).")
        if data_collator is None and processing_class is not None:
            data_collator = ContinuationCollator(
                processing_class,
                with_teacher=args.kl_weight > 0,
                task=args.task,
                prompts=PromptConfig.from_file(args.prompt_file),
                text_column=args.text_column,
                audio_column=args.audio_column,
                max_length=args.max_length,
                use_cached_features=args.feature_cache_dir is not None,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        teacher = {key.removeprefix("teacher_"): inputs.pop(key) for key in TEACHER_KEYS if key in inputs}
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        # Audio positions never count, whatever the collator put there (the model's own loss masks them the same way).
        audio_token_id = self.accelerator.unwrap_model(model).config.audio_token_id
        labels = labels.masked_fill(inputs["input_ids"] == audio_token_id, IGNORE_INDEX)
        student = response_logits(outputs.logits, labels)  # (N, V)
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        num_tokens = max(targets.numel(), 1)
        ce_sum = F.cross_entropy(student.float(), targets, reduction="sum")
        total = self.args.ce_weight * ce_sum
        self.record_metric("loss_ce", ce_sum.detach() / num_tokens)
        if self.args.kl_weight > 0:
            if not teacher:
                raise ValueError("kl_weight > 0 needs teacher inputs: use ContinuationCollator(with_teacher=True).")
            teacher_logits = self.teacher_response_logits(model, teacher, labels)
            kl_sum = distillation_kl(student, teacher_logits, self.args.kl_temperature).sum()
            total = total + self.args.kl_weight * kl_sum
            self.record_metric("loss_kl", kl_sum.detach() / num_tokens)
        if num_items_in_batch is None:
            loss = total / num_tokens
        else:
            # Normalised over the whole accumulated batch, as the model's own loss is with `num_items_in_batch`; the
            # Trainer counts tokens over all processes and DDP averages gradients, hence the factor (as in
            # `Trainer.compute_loss`).
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def teacher_response_logits(self, model, teacher: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The frozen LLM's logits on the transcript-input sequence, at the positions that predict the response.

        Args:
            model: the (possibly wrapped) speech LLM.
            teacher: `input_ids`, `attention_mask` and `labels` of the text-only sequence.
            labels: the student's labels, to check that both sequences hold the same response tokens.

        Returns:
            (N, V) logits aligned row by row and token by token with `response_logits(student_logits, labels)`.
        """
        student_mask, teacher_mask = labels[:, 1:] != IGNORE_INDEX, teacher["labels"][:, 1:] != IGNORE_INDEX
        if not torch.equal(student_mask.sum(1), teacher_mask.sum(1)) or not torch.equal(
            labels[:, 1:][student_mask], teacher["labels"][:, 1:][teacher_mask]
        ):
            raise ValueError("The teacher and student sequences do not hold the same response tokens.")
        unwrapped = self.accelerator.unwrap_model(model)
        without_adapter = (
            unwrapped.language_model.disable_adapter() if unwrapped.has_lora else contextlib.nullcontext()
        )
        with torch.no_grad(), without_adapter:
            # No audio: the model embeds the tokens and takes position ids from the attention mask, as for the student.
            logits = model(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits
        return response_logits(logits, teacher["labels"])


__all__ = [
    "ContinuationTrainingArguments",
    "ContinuationCollator",
    "ContinuationTrainer",
    "distillation_kl",
    "response_logits",
    "TEACHER_KEYS",
]
