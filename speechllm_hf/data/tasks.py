"""Tasks and prompts: how a data row becomes a user turn (audio + instruction) and the response to learn.

| task | instruction from | response column |
|---|---|---|
| asr | the prompt file | `text` (or `--text_column`, e.g. MuST-C's `sentence`) |
| st | the prompt file, with `source_language` / `target_language` | `translation` |
| sqa | the row's `question` | `answer` (the first one when it is a list) |
| continuation | the prompt file (BLSP's continuation instruction) | `continuation` |
| instruction | the row's `instruction` | `response` |

A row may carry its own `task` column (multi-task data); otherwise the dataset's task applies.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

import yaml

TASKS = ("asr", "st", "sqa", "continuation", "instruction")
RESPONSE_COLUMNS = {
    "asr": "text",
    "st": "translation",
    "sqa": "answer",
    "continuation": "continuation",
    "instruction": "response",
}
# Used when a row does not name its languages (MuST-C is English -> X).
DEFAULT_FIELDS = {"source_language": "English"}


@dataclass
class PromptConfig:
    """Where the audio goes in the user turn, and one instruction template per task."""

    user_template: str = "<audio>\n{instruction}"
    instructions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | None = None) -> PromptConfig:
        """Read a prompt YAML (`user_template`, `instructions`); None gives the packaged defaults."""
        if path is None:
            text = resources.files("speechllm_hf").joinpath("prompts/default.yaml").read_text()
        elif path in ("default", "blsp"):
            text = resources.files("speechllm_hf").joinpath(f"prompts/{path}.yaml").read_text()
        else:
            with open(path) as file:
                text = file.read()
        data = yaml.safe_load(text) or {}
        unknown = set(data.get("instructions", {})) - set(TASKS)
        if unknown:
            raise ValueError(f"Prompt file {path} names unknown tasks {sorted(unknown)}; tasks are {TASKS}.")
        defaults = cls() if path is None else cls.from_file(None)
        return cls(
            user_template=data.get("user_template", defaults.user_template),
            instructions={**defaults.instructions, **data.get("instructions", {})},
        )


def check_task(task: str) -> None:
    """Raises a `ValueError` naming the known tasks when `task` is not one of them."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")


def response_column(task: str, text_column: str = "text") -> str:
    """The column holding what a `task` row teaches: the transcript column for ASR, fixed names otherwise."""
    return text_column if task == "asr" else RESPONSE_COLUMNS[task]


def _template_fields(task: str, prompts: PromptConfig) -> list[str]:
    """Every field `task`'s instruction template reads, in order, once each."""
    names = [name for _, name, _, _ in string.Formatter().parse(prompts.instructions.get(task, "")) if name]
    return list(dict.fromkeys(names))


def instruction_fields(task: str, prompts: PromptConfig) -> list[str]:
    """The row fields that `task`'s instruction template reads and that have no default (e.g. `target_language`)."""
    return [name for name in _template_fields(task, prompts) if name not in DEFAULT_FIELDS]


def required_columns(task: str, prompts: PromptConfig, text_column: str = "text") -> list[str]:
    """Every column a `task` row needs: its instruction's fields, then its response column."""
    check_task(task)
    return [*instruction_fields(task, prompts), response_column(task, text_column)]


def _present(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _response(row: dict, task: str, text_column: str):
    response = row.get(response_column(task, text_column))
    if isinstance(response, (list, tuple)):  # Spoken-SQuAD lists several gold answers; learn the first
        response = response[0] if response else None
    return response


def missing_fields(row: dict, task: str, prompts: PromptConfig, text_column: str = "text") -> list[str]:
    """The fields that `row` lacks, or leaves blank, among those its `task` needs (instruction fields, then the
    response column). `prepare_dataset` drops such rows; `build_turns` refuses them.

    Raises:
        ValueError: for an unknown task.
    """
    check_task(task)
    missing = [name for name in instruction_fields(task, prompts) if not _present(row.get(name))]
    if not _present(_response(row, task, text_column)):
        missing.append(response_column(task, text_column))
    return missing


def fields_holding(
    row: dict, task: str, prompts: PromptConfig, tokens: str | Iterable[str], text_column: str = "text"
) -> list[str]:
    """The fields of `row` that its `task` writes into the conversation (instruction fields, response) and whose
    text holds `tokens` (one token, or any of several). The audio token in a row's text would be read as a second
    audio placeholder (or an audio position in the response), another special token as a control token (end of
    turn, padding, ...): `prepare_dataset` drops such rows, the collator refuses them."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    values = {name: row.get(name) for name in _template_fields(task, prompts)}
    values[response_column(task, text_column)] = _response(row, task, text_column)
    return [
        name for name, value in values.items() if isinstance(value, str) and any(token in value for token in tokens)
    ]


def check_columns(
    column_names: Iterable[str], tasks: Iterable[str], prompts: PromptConfig, text_column: str = "text"
) -> None:
    """Checks, before any row is read, that `tasks` are known and that their columns exist.

    Args:
        column_names: The dataset's columns.
        tasks: The tasks its rows have (the dataset's task, and the values of its `task` column).
        prompts: The prompts whose instructions the rows fill in.
        text_column: The transcript column of ASR rows.

    Raises:
        ValueError: naming an unknown task, or the columns a task needs that the dataset lacks.
    """
    column_names = list(column_names)
    for task in sorted(set(tasks)):
        absent = [name for name in required_columns(task, prompts, text_column) if name not in column_names]
        if absent:
            raise ValueError(
                f"{task} rows need the column(s) {absent}, which the dataset lacks; its columns are {column_names}. "
                "Name the transcript column with --text_column, or add the missing fields."
            )


def build_turns(
    row: dict, task: str, prompts: PromptConfig, text_column: str = "text", audio_token: str = "<audio>"
) -> tuple[str, str]:
    """(user turn content with the audio placeholder, response text) for one row.

    Raises:
        ValueError: for an unknown task, or a row missing a field its task needs (naming the field).
    """
    missing = missing_fields(row, task, prompts, text_column)
    if missing:
        raise ValueError(f"A {task} row needs non-empty {missing} field(s); the row has {sorted(row)}.")
    fields = {**DEFAULT_FIELDS, **{k: v for k, v in row.items() if isinstance(v, str)}}
    instruction = prompts.instructions[task].format_map(fields)
    user = prompts.user_template.replace("<audio>", audio_token).format(instruction=instruction)
    return user, _response(row, task, text_column)


__all__ = [
    "TASKS",
    "RESPONSE_COLUMNS",
    "PromptConfig",
    "check_task",
    "response_column",
    "instruction_fields",
    "required_columns",
    "missing_fields",
    "fields_holding",
    "check_columns",
    "build_turns",
]
