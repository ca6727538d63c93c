"""SpeechLlmCollator: rows -> a padded training batch with labels on the response plus end-of-turn only.

The prompt (system + user turn with the audio, up to the assistant header) and the response are tokenised
separately and concatenated, exactly as generation sees them: the model is trained on the token sequence it will
later be prompted with. Labels are -100 on the prompt (audio tokens included) and on padding.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .audio import audio_ref, load_audio
from .tasks import TASKS, PromptConfig, build_turns, fields_holding

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_COLUMNS = ("feature_length", "encoder_states")
TASK_IDS = "task_ids"  # batch key of per-row task indices (return_task_ids=True); not a model input
PREPARE_HINT = "`speechllm-hf prepare` drops unusable rows before training, and counts them by reason."


class SpeechLlmCollator:
    """Collate dataset rows for `SpeechLlmForConditionalGeneration`.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        task: default task for rows without a `task` column (see `speechllm_hf.data.tasks`).
        prompts: a `PromptConfig` (defaults to the packaged prompts).
        text_column: the transcript column of ASR rows.
        audio_column: the audio column (path, bytes, array or `datasets` Audio dict).
        max_length: longest sequence; longer responses are cut at the end (counted in `num_truncated`).
        use_cached_features: read `encoder_states` / `feature_length` columns (see `data.feature_cache`) instead
            of decoding audio; every dataset it serves, evaluation sets included, needs them.
        return_task_ids: add `task_ids`, (B,) indices into `TASKS` of each row's task, for per-task loss metrics;
            the model does not take them, so whatever runs the model must remove them (`SpeechLlmTrainer` does).
    """

    def __init__(
        self,
        processor,
        task: str = "asr",
        prompts: PromptConfig | None = None,
        text_column: str = "text",
        audio_column: str = "audio",
        max_length: int = 2048,
        use_cached_features: bool = False,
        return_task_ids: bool = False,
    ):
        self.processor = processor
        self.task = task
        self.prompts = prompts or PromptConfig.from_file()
        self.text_column = text_column
        self.audio_column = audio_column
        self.max_length = max_length
        self.use_cached_features = use_cached_features
        self.return_task_ids = return_task_ids
        self.num_truncated = 0
        self.special_tokens = [t for t in special_token_strings(processor.tokenizer) if t != processor.audio_token]

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

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
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
        # Right padding: position ids come from the attention mask, so the side does not change the result.
        input_ids, attention_mask = pad_token_lists(sequences, tokenizer.pad_token_id)
        label_tensor, _ = pad_token_lists(labels, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor, **audio}
        if self.return_task_ids:
            batch[TASK_IDS] = torch.tensor([TASKS.index(self.row_task(row)) for row in rows])
        return batch


def special_token_strings(tokenizer) -> list[str]:
    """Every special token of `tokenizer` as text (BOS, EOS, padding, chat markers, reserved tokens): a row's text that
    holds one would be tokenized as that control token, not as the characters it shows."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added))


def pad_token_lists(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: (B, L) ids and (B, L) attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def _pad_encoder_states(states: list) -> dict[str, torch.Tensor]:
    tensors = [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in states]  # each (T_i, C)
    lengths = torch.tensor([t.shape[0] for t in tensors])
    return {
        "encoder_hidden_states": torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True),
        "encoder_lengths": lengths,
    }


__all__ = [
    "SpeechLlmCollator",
    "IGNORE_INDEX",
    "CACHE_COLUMNS",
    "PREPARE_HINT",
    "TASK_IDS",
    "pad_token_lists",
    "special_token_strings",
]
