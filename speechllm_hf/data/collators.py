"""Every collator of speechllm_hf: dataset rows -> the batches the trainers feed the model.

- `SpeechLlmCollator`: prompt (system + user turn with the audio, up to the assistant header) and response are
  tokenised separately and concatenated, exactly as generation sees them; labels on the response plus end-of-turn only.
- `MixedSpeechTextCollator`: word-aligned rows -> mixed speech-text next-word sequences ("audio_nwp"); each speech
  span is its own clip, cut from the utterance and encoded separately.
- `ContrastiveCollator`, `MixedContrastiveCollator`: the contrastive pair's inputs on top of those batches.
- `ContinuationCollator`: BLSP continuation rows, plus the KL teacher's text-only inputs.

Batches are right-padded (the mixed ones as the processor pads), and the model derives position ids from the
attention mask, so the padding side never changes a result. With `padding_free=True` a collator returns the same
sequences packed into one row instead (`pack_sequences`), as transformers' `DataCollatorWithFlattening` and trl's
padding-free collators do; the LLM keeps them apart if its attention can (`padding_free_unsupported`). With an
`augmentation` (`data.augmentation.Augmenter`; off by default) a collator perturbs each clip's waveform before feature
extraction and masks its features after. `collator_from_args` builds any of them from training arguments.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.utils import is_torch_greater_or_equal

from .audio import audio_ref, load_audio
from .augmentation import Augmenter, row_key
from .mixed import cut_audio, mixed_sequence_layout, sample_spans
from .prompts import continuation_request
from .tasks import TASKS, PromptConfig, build_turns, fields_holding

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label nothing is learnt from, as transformers' losses read it
CACHE_COLUMNS = ("feature_length", "encoder_states")
TASK_IDS = "task_ids"  # batch key of task indices into TASKS (return_task_ids=True); not a model input
PREPARE_HINT = "`speechllm-hf prepare` drops unusable rows before training, and counts them by reason."
FLASH_ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Attention implementations that keep packed sequences apart, in transformers 4.57 and 5.x alike. Flash attention runs
# its varlen kernels on the cumulative sequence lengths passed with the packed row (`cu_seq_lens_q/k`, the
# `FlashAttentionKwargs` that DataCollatorWithFlattening also returns). The others get the block-diagonal causal mask
# that `masking_utils.create_causal_mask` builds when there is no attention mask and no cache and the position ids
# restart (`find_packed_sequence_indices`): 4.57 builds it only on torch >= 2.6, and 5.x requires that torch.
PACKED_MASK_ATTENTION = ("eager", "sdpa", "flex_attention")


def padding_free_unsupported(attn_implementation: str | None) -> str | None:
    """Why an LLM with this attention implementation cannot run packed sequences here, or None when it can."""
    if attn_implementation is not None and attn_implementation.startswith("flash_attention_"):
        return None
    if attn_implementation not in PACKED_MASK_ATTENTION:
        return (
            f"padding-free packing needs the LLM's attention to keep packed sequences apart: flash_attention_2/3/4 "
            f"or one of {', '.join(PACKED_MASK_ATTENTION)}; this LLM uses {attn_implementation!r}. Load it with "
            "attn_implementation set to one of those, or turn padding_free off."
        )
    if not is_torch_greater_or_equal("2.6"):
        return (
            f"padding-free packing with {attn_implementation} attention needs torch >= 2.6 (transformers ignores "
            f"packed position ids in its masks before it; torch {torch.__version__} is installed): upgrade torch, use "
            "flash attention, or turn padding_free off."
        )
    return None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch, left or right: each row's real tokens count from 0, padding never shifts them
    (the model's forward applies the same rule when it gets no position ids)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_packed(batch: dict) -> bool:
    """Whether `batch` holds packed sequences (`pack_sequences`): position ids and no attention mask."""
    return "position_ids" in batch and batch.get("attention_mask") is None


def pack_sequences(batch: dict, prefix: str = "", return_flash_attn_kwargs: bool = False) -> dict:
    """A padded batch's sequences back to back in one row, without padding, as `DataCollatorWithFlattening` returns
    them: `input_ids` and `labels` (1, N), `position_ids` (1, N) restarting at 0 for each sequence, no
    `attention_mask`, `use_cache=False`; with `return_flash_attn_kwargs`, the flash-attention `cu_seq_lens_q/k` and
    `max_length_q/k`.

    The label of each sequence's first token is ignored: the loss shifts labels along the packed row, and would
    otherwise have the last token of one sequence predict the first token of the next. No real token predicts a
    row's first token in the padded batch either, so the loss is the padded batch's (the one exception: a labelled
    first token of a left-padded row, which the padded batch has a padding position predict). Per-row `task_ids`
    become per-token (1, N). Audio inputs stay one row per clip: the model fills the audio tokens in order.

    Args:
        batch: a padded batch (`input_ids`, `attention_mask`, optional `labels`); other keys are kept as they are.
        prefix: pack the keys with this prefix instead (the continuation teacher's `teacher_input_ids`, ...).
        return_flash_attn_kwargs: add the sequence boundaries flash attention's varlen kernels take.
    """
    batch = dict(batch)
    valid = batch.pop(f"{prefix}attention_mask").bool()  # (B, L)
    batch[f"{prefix}position_ids"] = position_ids_from_mask(valid)[valid][None]
    batch[f"{prefix}input_ids"] = batch[f"{prefix}input_ids"][valid][None]
    # Said in the batch because the LLM's config usually enables the cache (the Trainer turns off the wrapper's), and
    # with a cache transformers does not build the packed-sequence mask: the sequences would see each other.
    batch[f"{prefix}use_cache"] = False
    if f"{prefix}labels" in batch:
        first = valid & (valid.cumsum(-1) == 1)
        batch[f"{prefix}labels"] = batch[f"{prefix}labels"].masked_fill(first, IGNORE_INDEX)[valid][None]
    if not prefix and TASK_IDS in batch:
        batch[TASK_IDS] = batch[TASK_IDS][:, None].expand_as(valid)[valid][None]
    if return_flash_attn_kwargs:
        lengths = valid.sum(-1, dtype=torch.int32)
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        for name, value in zip(FLASH_ATTENTION_KWARGS, (cu_seq_lens, cu_seq_lens, longest, longest)):
            batch[f"{prefix}{name}"] = value
    return batch


def pad_token_lists(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: (B, L) ids and (B, L) attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def special_token_strings(tokenizer) -> list[str]:
    """Every special token of `tokenizer` as text (BOS, EOS, padding, chat markers, reserved tokens): a row's text that
    holds one would be tokenized as that control token, not as the characters it shows."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added))


def mixed_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """Next-token labels of mixed sequences on text positions only: IGNORE_INDEX on BOS (the first real token), audio
    tokens and padding.

    Args:
        input_ids: (B, N) token ids of `mixed_sequence_layout` texts after placeholder expansion.
        attention_mask: (B, N) 1 on real tokens (left or right padding).
        audio_token_id: The audio placeholder's id.

    Returns:
        (B, N) labels (the model shifts them: position i is predicted from positions < i).
    """
    first = (attention_mask.cumsum(dim=1) == 1) & attention_mask.bool()  # (B, N) the BOS position of each row
    ignored = first | (input_ids == audio_token_id) | ~attention_mask.bool()  # (B, N)
    return input_ids.masked_fill(ignored, IGNORE_INDEX)


def _pad_encoder_states(states: list) -> dict[str, torch.Tensor]:
    tensors = [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in states]  # each (T_i, C)
    lengths = torch.tensor([t.shape[0] for t in tensors])
    return {
        "encoder_hidden_states": torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True),
        "encoder_lengths": lengths,
    }


@dataclass(eq=False)
class _Collator:
    """A padded batch (`padded_batch`), or with `padding_free` its sequences packed into one row (`pack`).

    Args:
        padding_free: return packed batches (see `pack_sequences`).
        return_flash_attn_kwargs: with `padding_free`, add the flash-attention sequence boundaries (for an LLM loaded
            with flash attention; its kernels would otherwise derive them from the position ids).
        augmentation: augment each clip (speed, noise, gain, feature masks), with draws seeded by the row
            (`row_key`) and the augmenter's epoch; None (the default) leaves the audio as it is. Training batches only:
            `SpeechLlmTrainer` evaluates with a copy of the collator without it.
    """

    padding_free: bool = field(default=False, kw_only=True)
    return_flash_attn_kwargs: bool = field(default=False, kw_only=True)
    augmentation: Augmenter | None = field(default=None, kw_only=True)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.padded_batch(rows)
        return self.pack(batch) if self.padding_free else batch

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pack(self, batch: dict) -> dict:
        return pack_sequences(batch, return_flash_attn_kwargs=self.return_flash_attn_kwargs)


@dataclass(eq=False)
class SpeechLlmCollator(_Collator):
    """Collate dataset rows for `SpeechLlmForConditionalGeneration`: labels on the response and its end-of-turn,
    IGNORE_INDEX on the prompt (audio tokens included) and on padding.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        task: default task for rows without a `task` column (see `speechllm_hf.data.tasks`).
        prompts: a `PromptConfig` (defaults to the packaged prompts).
        text_column: the transcript column of ASR rows.
        audio_column: the audio column (path, bytes, array or `datasets` Audio dict).
        max_length: longest sequence; longer responses are cut at the end (counted in `num_truncated`).
        use_cached_features: read `encoder_states` / `feature_length` columns (see `data.feature_cache`) instead
            of decoding audio; every dataset it serves, evaluation sets included, needs them.
        return_task_ids: add `task_ids`, (B,) indices into `TASKS` of each row's task (per token when packed), for
            per-task loss metrics; the model does not take them, so whatever runs the model must remove them
            (`SpeechLlmTrainer` does).
        padding_free, return_flash_attn_kwargs: see `pack_sequences`.
    """

    processor: object
    task: str = "asr"
    prompts: PromptConfig | None = None
    text_column: str = "text"
    audio_column: str = "audio"
    max_length: int = 2048
    use_cached_features: bool = False
    return_task_ids: bool = False
    num_truncated: int = field(default=0, init=False)

    def __post_init__(self):
        if self.use_cached_features and self.augmentation is not None:
            raise ValueError(
                "Augmentation changes the encoder's input at every step, so cached encoder features (computed once "
                "from the clean audio) cannot serve it: drop use_cached_features (feature_cache_dir) or augmentation."
            )
        self.prompts = self.prompts or PromptConfig.from_file()
        audio_token = self.processor.audio_token
        self.special_tokens = [t for t in special_token_strings(self.processor.tokenizer) if t != audio_token]

    def row_task(self, row: dict) -> str:
        """The row's own task (its `task` column), else the collator's."""
        return row.get("task") or self.task

    def prompt_and_response(self, row: dict) -> tuple[str, str]:
        """The rendered prompt (ending with the assistant header) and the response text with its end-of-turn."""
        task, audio_token = self.row_task(row), self.processor.audio_token
        user, response = build_turns(row, task, self.prompts, self.text_column, audio_token)
        holding = fields_holding(row, task, self.prompts, audio_token, self.text_column)
        if holding:
            raise ValueError(
                f"The row's {holding} field(s) hold the audio token {audio_token!r}, which marks where the audio "
                "goes: remove it from the text."
            )
        holding = fields_holding(row, task, self.prompts, self.special_tokens, self.text_column)
        if holding:
            raise ValueError(
                f"The row's {holding} field(s) hold special tokens of the tokenizer, which it would read as control "
                "tokens (end of turn, padding, ...) rather than as text: remove them from the text (`speechllm-hf "
                "train` drops such rows as special_token_in_text)."
            )
        prompt = self.processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        full = self.processor.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        )
        if not full.startswith(prompt):
            raise ValueError(
                "The chat template renders the assistant turn in a way that does not extend the generation prompt; "
                f"cannot separate prompt and response.\nprompt: {prompt!r}\nfull: {full!r}"
            )
        return prompt, full[len(prompt) :]

    def load_clip(self, row: dict):
        """The row's clip as a float32 mono waveform at the processor's rate."""
        if row.get(self.audio_column) is None:
            raise ValueError(f"The row has no audio in column {self.audio_column!r}; its fields are {sorted(row)}.")
        return load_audio(row[self.audio_column], target_rate=self.processor.sampling_rate)

    def each_row(self, rows: list[dict], function) -> list:
        """`function(row)` for every row; a `ValueError` is raised again naming the row and its audio."""
        results = []
        for index, row in enumerate(rows):
            try:
                results.append(function(row))
            except ValueError as err:
                audio = row.get(self.audio_column)
                name = "no audio" if audio is None else f"audio {audio_ref(audio)}"
                raise ValueError(f"Batch row {index} ({name}): {err} {PREPARE_HINT}") from err
        return results

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts, responses = zip(*self.each_row(rows, self.prompt_and_response))
        tokenizer = self.processor.tokenizer
        if self.use_cached_features:
            if any(column not in row for row in rows for column in CACHE_COLUMNS):
                raise ValueError(
                    f"This collator reads cached encoder features, but a row has no {' / '.join(CACHE_COLUMNS)} "
                    f"columns (it has {sorted(rows[0])}): attach the cache to every dataset it serves "
                    "(attach_feature_cache; SpeechLlmTrainer does it for its train_dataset and eval_dataset)."
                )
            lengths = [int(row["feature_length"]) for row in rows]
            expanded = self.processor.expand_audio_placeholders(list(prompts), lengths)
            prompt_ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
            audio = _pad_encoder_states([row["encoder_states"] for row in rows])
        else:
            rate = self.processor.sampling_rate
            clips = self.each_row(rows, self.load_clip)
            if self.augmentation is not None:
                rngs = [self.augmentation.rng(row_key(row, self.audio_column)) for row in rows]
                clips = self.augmentation.waveforms(clips, rngs)
            try:
                batch = self.processor(
                    list(prompts),
                    audio=clips,
                    sampling_rate=rate,
                    padding=False,
                    return_tensors=None,
                    add_special_tokens=False,
                )
            except ValueError as err:  # a clip too short or too long for the encoder
                raise ValueError(f"{err} Audio clip numbers are batch rows. {PREPARE_HINT}") from err
            prompt_ids = batch["input_ids"]
            audio = {
                "input_features": torch.as_tensor(np.asarray(batch["input_features"])),
                "feature_attention_mask": torch.as_tensor(np.asarray(batch["feature_attention_mask"])),
            }
            if self.augmentation is not None:
                audio["input_features"] = self.augmentation.mask_features(**audio, rngs=rngs)
        response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        sequences, labels = [], []
        for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            room = self.max_length - len(prompt)
            if room < 1:
                raise ValueError(
                    f"Batch row {index}: its prompt with its audio tokens is {len(prompt)} tokens long, over "
                    f"max_length={self.max_length}: raise max_length or drop longer audio (prepare --max_duration)."
                )
            if len(response) > room:
                self.num_truncated += 1
                logger.warning(
                    "Truncated a response to fit max_length=%d (%d so far).", self.max_length, self.num_truncated
                )
                response = response[:room]
            sequences.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        input_ids, attention_mask = pad_token_lists(sequences, tokenizer.pad_token_id)
        label_tensor, _ = pad_token_lists(labels, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor, **audio}
        if self.return_task_ids:
            batch[TASK_IDS] = torch.tensor([TASKS.index(self.row_task(row)) for row in rows])
        return batch


@dataclass(eq=False)
class MixedSpeechTextCollator(_Collator):
    """Collate word-aligned rows (`words`: `[{"word", "start", "end"}]`, from `speechllm-hf align`) into mixed
    speech-text batches: `BOS + spans + end-of-turn` with labels on the text positions only (`mixed_labels`), plus the
    bare transcript tokens (`text_input_ids`) for the contrastive variant that compares a mixed sequence with its text.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        audio_column, text_column: the row's audio and transcript columns.
        seed: spans are drawn from a generator seeded with `(seed, row id or audio path)`, so a row gets the same
            spans in every epoch and on resume, whatever the batch order.
        text_span, speech_span: (min, max) words per span (the paper's 4-10 and 2-5).
        padding_free, return_flash_attn_kwargs: see `pack_sequences`.
    """

    processor: object
    audio_column: str = "audio"
    text_column: str = "text"
    seed: int = 0
    text_span: tuple[int, int] = (4, 10)
    speech_span: tuple[int, int] = (2, 5)

    def spans(self, row: dict) -> list[dict]:
        if not row.get("words"):
            raise ValueError("Mixed speech-text training needs word times: run `speechllm-hf align` on the data.")
        key = row.get("id") or str(
            row[self.audio_column].get("path") if isinstance(row[self.audio_column], dict) else row[self.audio_column]
        )
        return sample_spans(row["words"], random.Random(f"{self.seed}:{key}"), self.text_span, self.speech_span)

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        processor, tokenizer = self.processor, self.processor.tokenizer
        rate = processor.sampling_rate
        texts, clips, rngs = [], [], []
        for row in rows:
            spans = self.spans(row)
            text, _ = mixed_sequence_layout(spans, tokenizer, processor.audio_token)
            waveform = load_audio(row[self.audio_column], target_rate=rate)
            row_clips = [cut_audio(waveform, rate, s["start"], s["end"]) for s in spans if s["kind"] == "speech"]
            if self.augmentation is not None:  # each span its own clip, drawn in turn from the row's generator
                rngs += [self.augmentation.rng(row_key(row, self.audio_column))] * len(row_clips)
            clips += row_clips
            texts.append(text)
        if self.augmentation is not None:
            clips = self.augmentation.waveforms(clips, rngs)
        batch = dict(processor(texts, audio=clips or None, sampling_rate=rate, add_special_tokens=False))
        if self.augmentation is not None and clips:
            batch["input_features"] = self.augmentation.mask_features(
                batch["input_features"], batch["feature_attention_mask"], rngs
            )
        batch["labels"] = mixed_labels(batch["input_ids"], batch["attention_mask"], processor.audio_token_id)
        tokens = tokenizer([row[self.text_column] for row in rows], add_special_tokens=False)["input_ids"]
        batch["text_input_ids"], batch["text_attention_mask"] = pad_token_lists(tokens, tokenizer.pad_token_id)
        return batch


@dataclass(eq=False)
class ContrastiveCollator(SpeechLlmCollator):
    """The ASR batch (for the optional cross-entropy) plus the two contrastive inputs: the bare transcript tokens
    (`text_input_ids`) and, per clip, a sequence of its audio tokens alone (`speech_input_ids`, no prompt)."""

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().padded_batch(rows)
        tokenizer = self.processor.tokenizer
        tokens = tokenizer([row[self.text_column] for row in rows], add_special_tokens=False)["input_ids"]
        batch["text_input_ids"], batch["text_attention_mask"] = pad_token_lists(tokens, tokenizer.pad_token_id)
        if "feature_attention_mask" in batch:
            feature_lengths = batch["feature_attention_mask"].sum(-1).tolist()
        else:
            feature_lengths = [int(row["feature_length"]) for row in rows]
        speech = [[self.processor.audio_token_id] * self.processor.num_audio_tokens(n) for n in feature_lengths]
        batch["speech_input_ids"], batch["speech_attention_mask"] = pad_token_lists(speech, tokenizer.pad_token_id)
        return batch


@dataclass(eq=False)
class MixedContrastiveCollator(MixedSpeechTextCollator):
    """Mixed speech-text sequences as the speech side of the contrastive pair (and, with `ce_weight`, their
    next-word loss on the text positions as the cross-entropy term)."""

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().padded_batch(rows)
        batch["speech_input_ids"], batch["speech_attention_mask"] = batch["input_ids"], batch["attention_mask"]
        return batch


@dataclass(eq=False)
class ContinuationCollator(SpeechLlmCollator):
    """`SpeechLlmCollator` for continuation rows that can also build the KL teacher's text-only inputs.

    The teacher sequence is the request `continue-writing` gave the text LLM (`continuation_request`: the row's
    instruction, a space, its transcript from `text_column`) as the user turn of the model's chat template, followed
    by exactly the student's response tokens (after any `max_length` cut), labelled the same way:
    `teacher_input_ids`, `teacher_attention_mask` and `teacher_labels`, right-padded (packed like the student's
    sequences with `padding_free`). With the whisper-cnn chat template this is BLSP's continuation prompt,
    `<s>###[Human]:{instruction} {transcript}\n\n\n###[Assistant]:`.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        with_teacher: build the teacher tensors.
        task and the rest: as for `SpeechLlmCollator` (task defaults to "continuation").
    """

    task: str = "continuation"
    with_teacher: bool = False

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

    def padded_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().padded_batch(rows)
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

    def pack(self, batch: dict) -> dict:
        batch = super().pack(batch)
        if not self.with_teacher:
            return batch
        return pack_sequences(batch, "teacher_", return_flash_attn_kwargs=self.return_flash_attn_kwargs)


def collator_from_args(collator_class: type, args, processor, llm_attention: str | None = None, **kwargs):
    """The collator a trainer uses when it is given none: `collator_class` set up from its training arguments.

    Args:
        collator_class: one of this module's collators.
        args: `SpeechLlmTrainingArguments` (or a subclass): the columns, and for the speech collators the task, prompt
            file, `max_length` and whether a feature cache is read; `padding_free` and the `augment_*` settings for
            all.
        processor: the model's `SpeechLlmProcessor`.
        llm_attention: the LLM's attention implementation; a flash attention gets the sequence boundaries of packed
            batches.
        **kwargs: further settings of `collator_class`, or ones that replace those read from `args`.
    """
    settings = {
        "audio_column": args.audio_column,
        "text_column": args.text_column,
        "padding_free": args.padding_free,
        "return_flash_attn_kwargs": args.padding_free and str(llm_attention).startswith("flash_attention_"),
        "augmentation": Augmenter.from_args(args, processor),
    }
    if issubclass(collator_class, MixedSpeechTextCollator):
        settings["seed"] = args.seed
    else:
        settings |= {
            "task": args.task,
            "prompts": PromptConfig.from_file(args.prompt_file),
            "max_length": args.max_length,
            "use_cached_features": args.feature_cache_dir is not None,
        }
    return collator_class(processor, **{**settings, **kwargs})


__all__ = [
    "SpeechLlmCollator",
    "MixedSpeechTextCollator",
    "ContrastiveCollator",
    "MixedContrastiveCollator",
    "ContinuationCollator",
    "collator_from_args",
    "pack_sequences",
    "is_packed",
    "padding_free_unsupported",
    "position_ids_from_mask",
    "mixed_labels",
    "pad_token_lists",
    "special_token_strings",
    "IGNORE_INDEX",
    "CACHE_COLUMNS",
    "PREPARE_HINT",
    "TASK_IDS",
    "PACKED_MASK_ATTENTION",
    "FLASH_ATTENTION_KWARGS",
]
