"""Training: the trainers of the projector and their arguments; the losses are in `training.contrastive_losses`."""

from .arguments import SpeechLlmTrainingArguments
from .continuation import ContinuationTrainer, ContinuationTrainingArguments
from .contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from .lora import add_lora
from .trainer import SpeechLlmTrainer

__all__ = [
    "SpeechLlmTrainer",
    "SpeechLlmTrainingArguments",
    "ContrastiveTrainer",
    "ContrastiveTrainingArguments",
    "ContinuationTrainer",
    "ContinuationTrainingArguments",
    "add_lora",
]
