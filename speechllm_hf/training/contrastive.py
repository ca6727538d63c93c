"""ContrastiveTrainer: task-independent contrastive pretraining of the projector (arXiv 2412.15712).

The paper's loss: the transcript tokens alone (no BOS/EOS, template or instruction) and the projector output alone
(no prompt) each go through the frozen LLM separately (not at all for layer 0); each sequence is mean-pooled over its
valid positions, L2-normalised, and the InfoNCE loss text -> speech with tau = 0.1 and in-batch negatives is SUMMED
over the hidden-state layers {0, 5, 10, 15, 20, 25, last}. The text branch runs under `torch.no_grad()`: it builds no
graph (the original computed its gradient for nothing).

One departure is on by default, `sink_token='bos'`: both sequences run after a leading BOS whose position is left
out of the pooling. As published, the pooled spans start at position 0, where a Llama-family LLM puts a massive
activation at its middle layers (an attention sink, about 100 times the other positions' norm), so both pooled
vectors point the same way there and those layers never learn; measured in docs/training.md. `sink_token='none'`
is the published form, exactly.

Departures off by default, each documented on its argument: a single layer or a list, the symmetric loss, a
learnable temperature, negatives gathered across processes, an added ASR cross-entropy, a random position shift
applied to both branches, the Wasserstein (Sinkhorn) variant, and the encoder's train-mode augmentation.

Every term of the returned loss is a mean over the micro-batch (the InfoNCE negatives are the micro-batch's own), so
the Trainer divides it by the gradient-accumulation steps: the logged loss and the gradient are the mean over the
accumulated micro-batches, whatever their number.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import Enum

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..data.collators import (
    IGNORE_INDEX,
    ContrastiveCollator,
    MixedContrastiveCollator,
    collator_from_args,
    position_ids_from_mask,
)
from ..models.speechllm.modules_speechllm import lengths_to_mask
from .arguments import SpeechLlmTrainingArguments
from .contrastive_losses import (
    LearnableTemperature,
    contrastive_layer_indices,
    info_nce,
    mean_pool,
    summed_layer_loss,
    wasserstein_contrastive_loss,
)
from .trainer import SpeechLlmTrainer

logger = logging.getLogger(__name__)

TEMPERATURE_FILE = "contrastive_temperature.safetensors"


@dataclass
class ContrastiveTrainingArguments(SpeechLlmTrainingArguments):
    """Arguments of `ContrastiveTrainer`; defaults reproduce the paper's pretraining (arXiv 2412.15712) but for
    `sink_token` (set it to 'none' for the published form)."""

    contrastive_layers: str = field(
        default="all",
        metadata={
            "help": "'all' = hidden states {0,5,10,15,20,25,last} (spaced alike for other depths), one index "
            "k, or a comma-separated list. Index 0 is the embedding level: the LLM is not run for it."
        },
    )
    contrastive_loss: str = field(
        default="infonce",
        metadata={
            "help": "'infonce' (default) or 'wasserstein': Sinkhorn divergence between the sequences of "
            "L2-normalised token vectors, as the original, at the embedding level only."
        },
    )
    temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature tau."})
    learnable_temperature: bool = field(
        default=False, metadata={"help": "Departure: learn tau (CLIP style, initialised at `temperature`)."}
    )
    symmetric: bool = field(default=False, metadata={"help": "Departure: add the speech -> text direction."})
    gather_negatives: bool = field(
        default=False,
        metadata={
            "help": "Departure: the speech keys of every process are negatives under DDP. Gradients reaching a "
            "gathered key are summed over processes and sent back to the process that owns it, so the update "
            "equals one process with the whole batch. InfoNCE only."
        },
    )
    ce_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an added ASR cross-entropy (the paper's variant used 1.0), a mean over each "
            "micro-batch's response tokens like the contrastive loss is over its pairs."
        },
    )
    position_shift: int = field(
        default=0,
        metadata={
            "help": "Departure: add a random U{0..N-1} shift to the position ids of both branches "
            "(the paper's variant used 400). A no-op up to rounding under rotary position embeddings (Llama and "
            "every preset's LLM): a shift shared by a whole sequence changes no attention score."
        },
    )
    sink_token: str = field(
        default="bos",
        metadata={
            "help": "Departure, on by default (measured in docs/training.md): a token prepended to both branches "
            "before the LLM runs, whose position is left out of the pooling. The first position of a Llama-family "
            "LLM carries a massive activation at the middle layers whatever its token (an attention sink), which "
            "dominates a mean that includes it; with the sink outside the pooled span, every layer learns. 'bos' "
            "(the tokenizer's BOS, else its EOS), any single token of the vocabulary, or 'none': the published "
            "form, spans start at position 0 and nothing is prepended."
        },
    )
    speech_input: str = field(
        default="speech",
        metadata={
            "help": "Speech side of the pair: 'speech' (the projector output alone) or 'mixed' (a mixed "
            "speech-text sequence of the utterance, the paper's variant; rows need word times from align)."
        },
    )
    sinkhorn_blur: float = field(default=0.05, metadata={"help": "Sinkhorn blur (epsilon = blur**p), p = 2."})

    def __post_init__(self):
        super().__post_init__()
        if self.contrastive_loss not in ("infonce", "wasserstein"):
            raise ValueError(f"contrastive_loss must be 'infonce' or 'wasserstein'; got {self.contrastive_loss!r}.")
        if self.speech_input not in ("speech", "mixed"):
            raise ValueError(f"speech_input must be 'speech' or 'mixed'; got {self.speech_input!r}.")
        if self.padding_free:
            raise ValueError(
                "padding_free is not supported by the contrastive trainer: it pools hidden states per sequence, "
                "layer by layer, in both branches, and its text branch runs the bare LLM. Drop --padding_free (the "
                "asr and continuation methods take it)."
            )
        if self.gather_negatives and self.contrastive_loss == "wasserstein":
            raise ValueError(
                "gather_negatives works with the InfoNCE loss only: the Wasserstein variant compares whole "
                "sequences, which are not gathered across processes."
            )
        if self.contrastive_loss == "wasserstein" and self.contrastive_layers not in ("0",):
            logger.info("The Wasserstein variant compares embedding-level sequences: contrastive_layers set to '0'.")
            self.contrastive_layers = "0"


def sink_token_id(tokenizer, sink_token: str, audio_token_id: int) -> int | None:
    """The id of the leading token `sink_token` names (see `ContrastiveTrainingArguments.sink_token`); None for 'none'.

    'bos' falls back to the EOS for an LLM without BOS: any fixed token takes the sink's role, and an end of text
    followed by text is what the LLM saw between its pretraining documents.

    Raises:
        ValueError: If the token is not a single token of the vocabulary, or is the audio placeholder (which the
            model would replace with projector outputs).
    """
    if sink_token == "none":
        return None
    token = (tokenizer.bos_token or tokenizer.eos_token) if sink_token == "bos" else sink_token
    token_id = tokenizer.get_vocab().get(token) if token else None
    if token_id is None:
        raise ValueError(
            f"sink_token {sink_token!r} names no token of the vocabulary: give 'bos', 'none' or one token of it."
        )
    if token_id == audio_token_id:
        raise ValueError(f"sink_token {sink_token!r} is the audio placeholder: the model would replace it with audio.")
    return token_id


def _with_sink(ids: torch.Tensor, mask: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_id` prepended to every row as a valid position, in column 0 whatever the padding side: the text branch
    is right-padded, and the model derives the speech branch's positions from its mask (`cumsum - 1`), so the sink
    sits at position 0 (plus any shift) in both, and padding stays masked out."""
    ids = torch.cat([torch.full_like(ids[:, :1], token_id), ids], 1)
    return ids, torch.cat([torch.ones_like(mask[:, :1]), mask], 1)


def _shifted_positions(mask: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch (left or right) plus a per-row shift: the position-shift variant. Unshifted,
    the model and the LLM derive the same positions themselves."""
    return position_ids_from_mask(mask) + shift[:, None]


class SpeechSide(str, Enum):
    """What the one speech-branch forward of `contrastive_states` runs."""

    SPEECH = "speech"  # the projector output alone (the published method)
    SPEECH_AND_ASR = "speech+asr"  # ... and the ASR sequences as extra rows, whose cross-entropy is the outputs' loss
    MIXED = "mixed"  # a mixed speech-text sequence of the utterance (the paper's variant)
    MIXED_NWP = "mixed+nwp"  # ... with its next-word labels on the text positions, whose loss is the outputs' loss

    @classmethod
    def of(cls, speech_input: str, with_ce: bool) -> SpeechSide:
        """The side `ContrastiveTrainingArguments.speech_input` names, with the cross-entropy term or without."""
        if speech_input == "mixed":
            return cls.MIXED_NWP if with_ce else cls.MIXED
        return cls.SPEECH_AND_ASR if with_ce else cls.SPEECH


def _right_pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def contrastive_states(
    model,
    unwrapped,
    inputs: dict,
    layers: list[int],
    *,
    side: SpeechSide = SpeechSide.SPEECH,
    shift: torch.Tensor | None = None,
    pad_token_id: int = 0,
    sink_token_id: int | None = None,
) -> tuple[dict, object]:
    """Per layer: `(text_states, text_mask, speech_states, speech_mask)` as float32, and the model outputs.

    `model` is what the Trainer gives (possibly DDP-wrapped) and `unwrapped` the bare model. The text branch runs
    under `no_grad` on the bare model (frozen weights only); the speech branch is ONE forward of `model` (so that
    DDP sees one forward per step), on what `side` names. `SPEECH`: the speech-only sequences through the LLM, or
    for layer 0 alone, which needs no LLM, the projector outputs from an audio-only forward. `SPEECH_AND_ASR`: the
    ASR sequences run as extra rows of the same forward (their loss is the outputs' `loss`, a mean over their
    response tokens). `MIXED`: a mixed speech-text sequence (`speech_input_ids` hold text tokens and audio
    placeholders), whose layer 0 is the LLM's input embeddings, so the LLM forward runs for every layer set;
    `MIXED_NWP` carries the mixed sequences' next-word labels in that forward. `shift` (the position-shift variant)
    moves the positions of both branches; the ASR rows keep theirs, while the mixed sequences, being the speech side,
    are shifted for their next-word loss too.
    `sink_token_id` (the attention-sink remedy) is prepended to the text and speech sequences wherever the LLM runs
    (not to the ASR rows); the returned states and masks leave its position out, so they are the same span as
    without it, and layer 0 is unchanged.
    """
    if "encoder_hidden_states" in inputs:
        states, state_lengths = inputs["encoder_hidden_states"], inputs["encoder_lengths"]
    else:  # the frozen encoder runs once, outside the wrapped forward, which then reuses its output
        states, state_lengths = unwrapped.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
    speech_ids, speech_mask = inputs["speech_input_ids"], inputs["speech_attention_mask"]
    text_ids, text_mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    batch_size, speech_width = speech_ids.shape
    deep = any(layer > 0 for layer in layers)
    mixed = side in (SpeechSide.MIXED, SpeechSide.MIXED_NWP)
    skip = 0 if sink_token_id is None else 1  # leading positions left out of what is returned
    # The returned masks are the unprefixed ones: the sink's position is never pooled.
    text_pool_mask, speech_pool_mask = text_mask, speech_mask
    if sink_token_id is not None:
        text_ids, text_mask = _with_sink(text_ids, text_mask, sink_token_id)
        speech_ids, speech_mask = _with_sink(speech_ids, speech_mask, sink_token_id)

    with torch.no_grad():  # the text branch is a fixed target: no gradient, no graph
        text_embeds = unwrapped.embed_tokens(text_ids)
        text_hidden = None
        if deep:
            # Right-padded, so the LLM's own positions (0, 1, ...) are the valid tokens' when unshifted.
            text_hidden = unwrapped.language_model(
                inputs_embeds=text_embeds,
                attention_mask=text_mask,
                position_ids=None if shift is None else _shifted_positions(text_mask, shift),
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states

    if deep or side != SpeechSide.SPEECH:
        ids, mask, labels = speech_ids, speech_mask, None
        if side == SpeechSide.MIXED_NWP:
            labels = inputs["labels"]
            if sink_token_id is not None:
                labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], 1)
        elif side == SpeechSide.SPEECH_AND_ASR:
            width = max(speech_ids.shape[1], inputs["input_ids"].shape[1])
            ids = torch.cat(
                [_right_pad(speech_ids, width, pad_token_id), _right_pad(inputs["input_ids"], width, pad_token_id)]
            )
            mask = torch.cat([_right_pad(speech_mask, width, 0), _right_pad(inputs["attention_mask"], width, 0)])
            labels = torch.cat(
                [torch.full_like(ids[:batch_size], IGNORE_INDEX), _right_pad(inputs["labels"], width, IGNORE_INDEX)]
            )
            states, state_lengths = torch.cat([states, states]), torch.cat([state_lengths, state_lengths])
            if shift is not None:
                shift = torch.cat([shift, torch.zeros_like(shift)])
        outputs = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=None if shift is None else _shifted_positions(mask, shift),
            encoder_hidden_states=states,
            encoder_lengths=state_lengths,
            labels=labels,
            output_hidden_states=deep or mixed,
            use_cache=False,
        )
    else:
        outputs = model(encoder_hidden_states=states, encoder_lengths=state_lengths)
    if not mixed:
        audio_embeds = outputs.audio_hidden_states[:batch_size]  # (B, N, D)
        audio_mask = lengths_to_mask(outputs.audio_lengths[:batch_size], audio_embeds.shape[1]).long()
    per_layer = {}
    for layer in layers:
        text = (text_embeds if layer == 0 else text_hidden[layer])[:, skip:].float()
        if layer == 0 and not mixed:
            per_layer[layer] = (text, text_pool_mask, audio_embeds.float(), audio_mask)
        else:
            speech = outputs.hidden_states[layer][:batch_size, skip : skip + speech_width].float()
            per_layer[layer] = (text, text_pool_mask, speech, speech_pool_mask)
    return per_layer, outputs


class _ZeroTemperatureGradient(TrainerCallback):
    """Clears the learnable temperature's gradient after every optimizer step, as the Trainer does for the model's
    parameters only (`model.zero_grad()`): the temperature lives outside the model."""

    def __init__(self, temperature: LearnableTemperature):
        self.temperature = temperature

    def on_step_end(self, args, state, control, **kwargs):
        self.temperature.zero_grad(set_to_none=True)


class ContrastiveTrainer(SpeechLlmTrainer):
    """Contrastive pretraining; see the module docstring. Logs `loss_layer_<i>`, `loss_contrastive`, `loss_ce`."""

    arguments_class = ContrastiveTrainingArguments

    def __init__(self, model=None, args: ContrastiveTrainingArguments | None = None, data_collator=None, **kwargs):
        self._check_arguments(args)
        processor = kwargs.get("processing_class")
        if processor is None:
            raise ValueError("ContrastiveTrainer needs processing_class (the model's processor): its tokenizer pads.")
        self.layers = contrastive_layer_indices(model.config.text_config.num_hidden_layers, args.contrastive_layers)
        self.sink_token_id = sink_token_id(processor.tokenizer, args.sink_token, model.config.audio_token_id)
        self.speech_side = SpeechSide.of(args.speech_input, with_ce=args.ce_weight > 0)
        # The learnable temperature trains with the projector; it is saved beside it in each checkpoint.
        self.temperature = LearnableTemperature(args.temperature) if args.learnable_temperature else None
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        # The model's forward takes **kwargs, so the Trainer would count label tokens and take the returned loss as
        # already normalised over the accumulated batch; the contrastive loss is a mean over each micro-batch (its
        # negatives are the micro-batch's own), so the Trainer must divide by the accumulation steps instead.
        self.model_accepts_loss_kwargs = False
        if self.temperature is not None:
            self.temperature.to(self.args.device)
            self.add_callback(_ZeroTemperatureGradient(self.temperature))

    def default_collator(self, args, processor, llm_attention, with_task_ids):
        if args.speech_input == "mixed":
            return collator_from_args(MixedContrastiveCollator, args, processor)
        return collator_from_args(ContrastiveCollator, args, processor, task="asr")  # the cross-entropy term's task

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.temperature is not None:
            optimizer.add_param_group({"params": list(self.temperature.parameters()), "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        # The temperature lives outside the DDP-wrapped model: average its gradient across processes by hand.
        if self.temperature is not None and self.args.world_size > 1:
            for parameter in self.temperature.parameters():
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= self.args.world_size
        return loss

    def _tau(self):
        return self.temperature() if self.temperature is not None else self.args.temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        self.augment_encoder(unwrapped)
        shift = None
        if self.args.position_shift > 0 and any(layer > 0 for layer in self.layers):
            batch_size = inputs["speech_input_ids"].shape[0]
            shift = torch.randint(0, self.args.position_shift, (batch_size,), device=inputs["speech_input_ids"].device)
        states, outputs = contrastive_states(
            model,
            unwrapped,
            inputs,
            self.layers,
            side=self.speech_side,
            shift=shift,
            pad_token_id=self.processing_class.tokenizer.pad_token_id,
            sink_token_id=self.sink_token_id,
        )
        per_layer = {}
        for layer, (text_states, text_mask, speech_states, speech_mask) in states.items():
            if self.args.contrastive_loss == "wasserstein":
                output = wasserstein_contrastive_loss(
                    text_states,
                    text_mask,
                    speech_states,
                    speech_mask,
                    temperature=self._tau(),
                    blur=self.args.sinkhorn_blur,
                )
            else:
                output = info_nce(
                    mean_pool(text_states, text_mask),
                    mean_pool(speech_states, speech_mask),
                    temperature=self._tau(),
                    symmetric=self.args.symmetric,
                    gather_negatives=self.args.gather_negatives,
                )
            per_layer[layer] = output.loss
            self.record_metric(f"loss_layer_{layer}", output.loss)
        loss = summed_layer_loss(per_layer)
        self.record_metric("loss_contrastive", loss)
        if self.args.ce_weight > 0:
            self.record_metric("loss_ce", outputs.loss)
            loss = loss + self.args.ce_weight * outputs.loss
        if self.temperature is not None:
            self.record_metric("temperature", self._tau())
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the contrastive loss (plus the weighted CE, when on) as `eval_loss`."""
        return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.temperature is not None and self.args.should_save:
            target = output_dir or self.args.output_dir
            save_file(
                {k: v.detach().cpu() for k, v in self.temperature.state_dict().items()},
                os.path.join(target, TEMPERATURE_FILE),
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TEMPERATURE_FILE)
        if self.temperature is not None and os.path.exists(path):
            self.temperature.load_state_dict(load_file(path))


__all__ = [
    "ContrastiveTrainer",
    "ContrastiveTrainingArguments",
    "SpeechSide",
    "contrastive_states",
    "sink_token_id",
]
