"""The prompt format a checkpoint was trained in, written beside its weights: prompt_format.json.

A `prompt.PromptFormat` as a JSON object of its fields (`format_json`), read back strictly (`read_format`).
train.py writes the format a run asks in into every checkpoint and export; evaluate.py and reward_model.py ask a
checkpoint in its own (`checkpoint_format`), or in one given with --prompt_format, and a resumed run refuses a
changed one (`format_differences`). Here, beside the checkpoint's other files (families.py: config and weights,
processor.py: tokenizer and image processor), because it is what a checkpoint directory holds, not the method.
Tests: .venv/bin/python -m pytest -q tests/test_prompt_format.py
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from prompt import PROMPT, PromptFormat


FORMAT_FILE = "prompt_format.json"  # in every step and export directory train.py writes


class FormatError(ValueError):
    """A prompt format file that does not read as a `PromptFormat`; the message names the file and the field."""


def format_json(fmt: PromptFormat) -> str:
    """Every field of `fmt` as a JSON object (tuples as lists): what train.py writes as prompt_format.json."""
    return json.dumps(dataclasses.asdict(fmt), indent=1, ensure_ascii=False) + "\n"


def read_format(path) -> PromptFormat:
    """A JSON object of `PromptFormat`'s fields -> that format; a field left out keeps `PROMPT`'s value.

    Read strictly: an unknown field, a value of the wrong type, a question without `{prompt}` or an answer
    vocabulary that cannot be read back (`field_problem`) raises FormatError naming the file and the field.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a missing file, not JSON, not UTF-8
        raise FormatError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object of PromptFormat's fields, got {json.dumps(raw)[:60]}")
    names = [f.name for f in dataclasses.fields(PromptFormat)]
    for name, value in raw.items():
        if name not in names:
            raise FormatError(f"{path}: unknown field {name!r} (PromptFormat's fields: {', '.join(names)})")
        if problem := field_problem(name, value):
            raise FormatError(f"{path}: field {name!r}: expected {problem}, got {json.dumps(value)[:80]}")
    return PromptFormat(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def field_problem(name: str, value) -> str | None:
    """What field `name` of a format file must hold, when `value` does not hold it; None when it does."""
    if name in ("question", "score_question"):
        try:
            ok = isinstance(value, str) and "{prompt}" in value and bool(value.format(prompt=""))
        except (KeyError, IndexError, ValueError):  # another {field}, or a lone brace
            ok = False
        return None if ok else "a string holding {prompt} and no other {field} (write a brace as {{ or }})"
    if name in ("think_open", "think_close", "answer_open", "answer_close"):
        return None if isinstance(value, str) and value.strip() else "a non-empty string"
    if name in ("between", "no_thinking"):
        return None if isinstance(value, str) else "a string"
    words = isinstance(value, list) and all(isinstance(w, str) and w and w == w.strip() for w in value) and \
        len(set(value)) == len(value)
    if name == "answers":
        return None if words and len(value) == 2 else "a list of two different non-empty words (image 0's, image 1's)"
    if not (words and len(value) >= 2 and value == [str(r) for r in range(1, len(value) + 1)]):
        return 'the ratings "1", "2", ..., "R" for some R >= 2 (the scale data.to_rated maps ranks onto)'
    return None


def format_differences(a: PromptFormat, b: PromptFormat) -> list[str]:
    """The fields in which two formats differ, in `PromptFormat`'s order."""
    return [f.name for f in dataclasses.fields(PromptFormat) if getattr(a, f.name) != getattr(b, f.name)]


def checkpoint_format(checkpoint: str, given: str | PromptFormat = "") -> PromptFormat:
    """The format to ask `checkpoint` in: `given` (a --prompt_format file, or a PromptFormat) when there is one,
    else the checkpoint's own prompt_format.json, else `PROMPT` (a checkpoint written before formats travelled
    with checkpoints, or not by train.py). A given format that differs from the checkpoint's own is used, with
    a warning naming the fields: the checkpoint was trained to answer another question."""
    own_file = Path(checkpoint) / FORMAT_FILE
    own = read_format(own_file) if checkpoint != "toy" and own_file.is_file() else None
    if isinstance(given, str) and not given:
        return own or PROMPT
    fmt = given if isinstance(given, PromptFormat) else read_format(given)
    if own is not None and fmt != own:
        named = given if isinstance(given, str) else "a PromptFormat"
        warnings.warn(f"the prompt format given ({named}) differs from {own_file}, the one {checkpoint} was trained "
                      f"with, in {', '.join(format_differences(own, fmt))}: it is asked in the format given", stacklevel=2)
    return fmt
