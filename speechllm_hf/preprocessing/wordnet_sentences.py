"""English sentences for synthetic speech: the usage examples quoted in WordNet 3.0's glosses, as ASR references.

WordNet's glosses quote about 48,000 short usage examples ("the children played in the yard"), mostly whole sentences,
some phrases. Debian ships the database as ``wordnet-base`` (``apt-get install wordnet-base``, files in
``/usr/share/wordnet``) under the WordNet 3.0 licence: use, copy, modify and distribute for any purpose, without fee,
keeping Princeton's copyright notice (`LICENCE`).

Each example becomes a reference the way an ASR scorer would write it: lower case, hyphens as spaces, no punctuation
but apostrophes inside words. An example whose spoken form the reference cannot pin down is dropped, never silently:
`load_wordnet_sentences` counts each reason, and the counts add up to the examples read.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
LICENCE = {
    "name": "WordNet 3.0 licence (permissive: use, copy, modify and distribute for any purpose, keep the notice)",
    "notice": "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.",
    "debian_package": "wordnet-base",
}
MIN_WORDS, MAX_WORDS = 4, 20
# Checked in this order on the raw example; the first that applies is the reason it is dropped.
_DROP_PATTERNS = {
    "digits": re.compile(r"\d"),  # "in 1896", "25,000 troops": spelled out by espeak-ng, not by the reference
    "symbol": re.compile(r"[$%/+=^&@#*<>\[\]{}_|~\\]"),  # "30%", "$5": spoken words the text does not hold
    "period": re.compile(r"\."),  # abbreviations ("St. Louis", "a.m."), ellipses, quotes of several sentences
    "acronym": re.compile(r"\b[A-Z]{2,}\b"),  # "DNA", "World War II": spelled or read as a word, the text can't say
}
DROP_REASONS = (*_DROP_PATTERNS, "length", "duplicate")
_EXAMPLE = re.compile(r'"([^"]*)"')
_NOT_WORD_CHARACTER = re.compile(r"[^a-z' ]+")
_STRAY_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")  # quotes like `word' and a plural possessive's


@dataclass
class WordNetSentences:
    """Distinct references in file order, why the other examples were dropped, and the data files' digest."""

    sentences: list[str]
    examples: int
    dropped: dict[str, int]
    sha256: str


def to_reference(example: str) -> tuple[str | None, str | None]:
    """``(reference, None)`` for a usable example, ``(None, reason)`` for one to drop (reason in `DROP_REASONS`)."""
    for reason, pattern in _DROP_PATTERNS.items():
        if pattern.search(example):
            return None, reason
    text = _NOT_WORD_CHARACTER.sub(" ", example.lower().replace("`", "'"))
    words = _STRAY_APOSTROPHE.sub(" ", text).split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None, "length"
    return " ".join(words), None


def load_wordnet_sentences(wordnet_dir: str | Path = WORDNET_DIR) -> WordNetSentences:
    """Reads every usage example of WordNet's four data files and keeps the distinct usable references."""
    wordnet_dir = Path(wordnet_dir)
    paths = [wordnet_dir / name for name in DATA_FILES]
    if not all(path.is_file() for path in paths):
        raise FileNotFoundError(
            f"WordNet data files {', '.join(DATA_FILES)} not found in {wordnet_dir}: "
            "install them with `apt-get install wordnet-base`"
        )
    digest = hashlib.sha256()
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    sentences: dict[str, None] = {}  # insertion-ordered set: the order, and so a seeded shuffle, is reproducible
    examples = 0
    for path in paths:
        data = path.read_bytes()
        digest.update(data)
        for line in data.decode("utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header lines
                continue
            for example in _EXAMPLE.findall(line.split(" | ", 1)[1]):
                examples += 1
                reference, reason = to_reference(example)
                if reference is None or reference in sentences:
                    dropped[reason or "duplicate"] += 1
                else:
                    sentences[reference] = None
    return WordNetSentences(list(sentences), examples, dict(dropped), digest.hexdigest())


__all__ = [
    "WORDNET_DIR",
    "DATA_FILES",
    "LICENCE",
    "MIN_WORDS",
    "MAX_WORDS",
    "DROP_REASONS",
    "WordNetSentences",
    "to_reference",
    "load_wordnet_sentences",
]
