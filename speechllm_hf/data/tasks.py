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


def build_turns(
    row: dict, task: str, prompts: PromptConfig, text_column: str = "text", audio_token: str = "<audio>"
) -> tuple[str, str]:
    """(user turn content with the audio placeholder, response text) for one row.

    Raises:
        ValueError: for an unknown task, or a row missing a field its task needs (naming the field).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    fields = {**DEFAULT_FIELDS, **{k: v for k, v in row.items() if isinstance(v, str)}}
    try:
        instruction = prompts.instructions[task].format_map(fields)
    except KeyError as err:
        raise ValueError(
            f"A {task} row needs the field {err.args[0]!r} for its instruction; the row has {sorted(row)}."
        ) from err
    column = text_column if task == "asr" else RESPONSE_COLUMNS[task]
    response = row.get(column)
    if isinstance(response, (list, tuple)):  # Spoken-SQuAD lists several gold answers; learn the first
        response = response[0] if response else None
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"A {task} row needs a non-empty {column!r} field; the row has {sorted(row)}.")
    user = prompts.user_template.replace("<audio>", audio_token).format(instruction=instruction)
    return user, response


__all__ = ["TASKS", "RESPONSE_COLUMNS", "PromptConfig", "build_turns"]
