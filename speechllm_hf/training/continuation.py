"""BLSP behaviour alignment by continuation writing (arXiv 2309.00916): `speechllm-hf train --method continuation`.

Rows hold audio, its transcript (`text`) and the continuation the text LLM wrote for the transcript
(`speechllm-hf continue-writing`). The speech model gets the continuation instruction with the speech where the
transcript was, and learns to write the same continuation:

- Cross-entropy (the faithful default, `ce_weight=1`): on the continuation tokens plus EOS / end-of-turn only. With
  the "blsp" prompt file and the whisper-cnn preset's chat template a sequence reads
  `<s>###[Human]:{instruction}<speech>\\n\\n\\n###[Assistant]:{continuation}</s>`.
- KL distillation (BLSP-KD, Ultravox; `kl_weight > 0`): the same frozen LLM reads the transcript instead of the
  speech, as `continue-writing` asked it for the continuation (the instruction, a space, the transcript; same response
  tokens) and, under `no_grad`, gives the teacher's next-token distributions; the loss is `KL(teacher || student)` at
  temperature `T` (`kl_temperature`, 2), as in BLSP-Emo's code. `kl_temperature_squared` multiplies it by `T^2`
  (Hinton et al.), which BLSP-Emo does not. `kl_positions` picks where the two are compared: "aligned" (default, a
  departure) at the positions that predict the response tokens, those the cross-entropy trains; "blsp-emo" at the
  response tokens' own positions, one later, as BLSP-Emo and Ultravox index the logits with unshifted labels.
  Both terms can be combined.

Both terms are sums over response tokens divided by the number of response tokens (over all accumulated micro-batches
and processes when the Trainer counts them), so gradient accumulation and data parallelism give the full-batch loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..compat import WARMUP_RATIO_FIELD, loss_processes
from ..data.collators import IGNORE_INDEX, ContinuationCollator, collator_from_args, is_packed
from .arguments import SpeechLlmTrainingArguments
from .trainer import SpeechLlmTrainer, logits_to_keep

TEACHER_PREFIX = "teacher_"  # batch keys of the KL teacher's text-only sequence (ContinuationCollator)
KL_POSITIONS = ("aligned", "blsp-emo")


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
    kl_temperature_squared: bool = field(
        default=False,
        metadata={
            "help": "Departure: multiply the KL by kl_temperature**2 (Hinton et al.), which keeps its gradient's "
            "scale the same across temperatures. Off, as in BLSP-Emo's and Ultravox's code, so that their "
            "kl_weight, learning rate and clipping mean the same here."
        },
    )
    kl_positions: str = field(
        default="aligned",
        metadata={
            "help": "Where the KL compares the distributions. 'aligned' (a departure): the positions that predict "
            "the response tokens, those the cross-entropy trains. 'blsp-emo': the response tokens' own positions, "
            "one later, as BLSP-Emo and Ultravox index the logits with unshifted labels: the first response token's "
            "distribution is never compared, the one after the final EOS is."
        },
    )

    def __post_init__(self):
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            raise ValueError(
                f"ce_weight and kl_weight must be >= 0 and not both 0; got {self.ce_weight} and {self.kl_weight}."
            )
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0; got {self.kl_temperature}.")
        if self.kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions must be one of {', '.join(KL_POSITIONS)}; got {self.kl_positions!r}.")
        super().__post_init__()


def response_logits(logits: torch.Tensor, labels: torch.Tensor, positions: str = "aligned") -> torch.Tensor:
    """The logits of the response positions, row by row.

    Args:
        logits: (B, L, V) next-token logits.
        labels: (B, L) token ids, IGNORE_INDEX where nothing is learnt.
        positions: "aligned": the logits that predict the labelled tokens (position t predicts token t + 1).
            "blsp-emo": the logits at the labelled tokens themselves (`logits[labels != -100]`), one position later,
            as BLSP-Emo and Ultravox take them for their KL.

    Returns:
        (N, V), N being the number of labelled tokens (after the first position, for "aligned"), in row-major order.
    """
    if positions == "blsp-emo":
        return logits[labels != IGNORE_INDEX]
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    temperature_squared: bool = False,
) -> torch.Tensor:
    """Per-position `KL(softmax(teacher / T) || softmax(student / T))`, computed in fp32.

    Args:
        student_logits: (N, V) logits of the model being trained.
        teacher_logits: (N, V) logits of the teacher at the same positions (no gradient needed).
        temperature: T.
        temperature_squared: Multiply by `T^2` (Hinton et al.); BLSP-Emo's `F.kl_div` does not.

    Returns:
        (N,) KL divergences, 0 where the two distributions are equal.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature**2 * kl if temperature_squared else kl


class ContinuationTrainer(SpeechLlmTrainer):
    """`SpeechLlmTrainer` with the continuation losses: `ce_weight * CE + kl_weight * KL` on the response tokens.

    The cross-entropy is the base trainer's loss (the model's own, on the kept logits, with the per-task losses of
    multi-task data); the KL term is normalised over the same tokens. Logs `loss_ce` and `loss_kl` (per response token)
    beside the total `loss`. The teacher pass runs the same model on text only, under `no_grad` and with any LoRA
    adapter of the LLM switched off, so the teacher is the frozen LLM.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for
            `SpeechLlmTrainer`; `args` are `ContinuationTrainingArguments` and the default collator is a
            `ContinuationCollator` that builds teacher inputs when `args.kl_weight > 0`.
    """

    arguments_class = ContinuationTrainingArguments

    def default_collator(self, args, processor, llm_attention, with_task_ids):
        return collator_from_args(
            ContinuationCollator,
            args,
            processor,
            llm_attention,
            with_teacher=args.kl_weight > 0,
            return_task_ids=with_task_ids,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        teacher = {
            key.removeprefix(TEACHER_PREFIX): inputs.pop(key) for key in list(inputs) if key.startswith(TEACHER_PREFIX)
        }
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        labels = self._loss_labels(model, inputs, outputs)
        num_tokens = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
        # The KL sum is normalised as the Trainer normalised the CE sum: over this micro-batch's tokens, or over those
        # of the whole accumulated batch (all processes' when the Trainer counts them; DDP averages gradients, hence
        # the factor, as in `Trainer.compute_loss`).
        per_token = 1 / num_tokens
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            per_token = (loss_processes(self) if self.args.average_tokens_across_devices else 1) / num_items_in_batch
        loss = self.args.ce_weight * ce
        self.record_metric("loss_ce", ce.detach() / (per_token * num_tokens))
        if self.args.kl_weight > 0:
            if not teacher:
                raise ValueError("kl_weight > 0 needs teacher inputs: use ContinuationCollator(with_teacher=True).")
            student = response_logits(outputs.logits, labels, self.args.kl_positions)  # (N, V)
            teacher_logits = self.teacher_response_logits(model, teacher, labels)
            kl_sum = distillation_kl(
                student, teacher_logits, self.args.kl_temperature, self.args.kl_temperature_squared
            ).sum()
            loss = loss + self.args.kl_weight * kl_sum * per_token
            self.record_metric("loss_kl", kl_sum.detach() / num_tokens)
        return (loss, outputs) if return_outputs else loss

    def teacher_response_logits(self, model, teacher: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The frozen LLM's logits on the transcript-input sequence, at the positions that predict the response.

        Args:
            model: the (possibly wrapped) speech LLM.
            teacher: `input_ids`, `labels` and `attention_mask` (or, packed, `position_ids` and any flash-attention
                kwargs) of the text-only sequence.
            labels: the student's labels, to check that both sequences hold the same response tokens.

        Returns:
            (N, V) logits at the positions `kl_positions` names, row by row and token by token with the student's.
        """
        teacher_labels = teacher["labels"]
        student_mask, teacher_mask = labels[:, 1:] != IGNORE_INDEX, teacher_labels[:, 1:] != IGNORE_INDEX
        if not torch.equal(student_mask.sum(1), teacher_mask.sum(1)) or not torch.equal(
            labels[:, 1:][student_mask], teacher_labels[:, 1:][teacher_mask]
        ):
            raise ValueError("The teacher and student sequences do not hold the same response tokens.")
        unwrapped = self.accelerator.unwrap_model(model)
        without_adapter = (
            unwrapped.language_model.disable_adapter() if unwrapped.has_lora else contextlib.nullcontext()
        )
        inputs = {key: value for key, value in teacher.items() if key != "labels"}
        keep = 0 if is_packed(inputs) else logits_to_keep(teacher_labels)
        with torch.no_grad(), without_adapter:
            # No audio: the model embeds the tokens; positions come from the attention mask, or with a packed batch.
            logits = model(**inputs, logits_to_keep=keep).logits
        return response_logits(logits, teacher_labels[:, -logits.shape[1] :], self.args.kl_positions)


__all__ = [
    "ContinuationTrainingArguments",
    "ContinuationTrainer",
    "distillation_kl",
    "response_logits",
    "KL_POSITIONS",
    "TEACHER_PREFIX",
]
