"""What the model is asked: the prompt, the answer format, and the tensors the model reads.

Read this file first. A `Pair` (formats/records.py) is one prompt and two images, `label` naming the one people
preferred. The reasoner reads the two images and `PROMPT.question` and answers
`<think>...</think>\n<answer>1</answer>` (or 2); the listener (section 4.3) reads the same messages followed by
the reasoning up to the answer slot (`listener_prefix`), never the reasoner's answer. `Processor` turns chat
messages + images into the tensors the model reads (input_ids, attention_mask, pixel_values, ...), with the
checkpoint's own tokenizer (its chat template) and image processor.

The wording, the tags and the answer vocabulary are defined here only (`PROMPT`, the default). A run may ask in
another format, a JSON file of `PromptFormat`'s fields (`--prompt_format`, `read_format`): train.py writes the
format it used into every checkpoint and export (`prompt_format.json`), and evaluate.py and reward_model.py ask a
checkpoint in its own (`checkpoint_format`), so a checkpoint is never asked a question it was not trained on and a
released checkpoint's format is matched without editing code.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from formats.images import load_image
from formats.layouts import PromptLimit
from formats.records import Pair, Rated


# ----------------------------------------------------------------------------------------------------------
# Prompts: the one place the wording, the tags and the answer vocabulary are defined.


@dataclass(frozen=True)
class PromptFormat:
    question: str = (
        "Prompt: {prompt}\n"
        "Which of the two images above would people prefer for this prompt? Consider how well each image "
        "matches the prompt and its visual quality. Think it through inside <think> </think>, then give your "
        "answer inside <answer> </answer>: 1 for the first image or 2 for the second."
    )
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    between: str = "\n"  # what goes between </think> and <answer> in a well-formed completion
    answers: tuple[str, str] = ("1", "2")  # the answer naming image 0, image 1
    # The absolute-score variant (section 5, eq. (3)): one image, a rating from `ratings`.
    score_question: str = (
        "Prompt: {prompt}\n"
        "Rate how much people would like the image above for this prompt, from 1 (worst) to 5 (best). Think it "
        "through inside <think> </think>, then give the rating inside <answer> </answer>."
    )
    ratings: tuple[str, ...] = ("1", "2", "3", "4", "5")
    no_thinking: str = "I have finished thinking."  # the "no thinking" ablation (table 5)

    def completion(self, reasoning: str, answer: str) -> str:
        """A well-formed completion: `<think>reasoning</think>\\n<answer>answer</answer>`."""
        return self.answer_prefix(reasoning) + answer + self.answer_close

    def answer_prefix(self, reasoning: str) -> str:
        """Everything a completion holds before its answer token: what the listener reads."""
        return f"{self.think_open}{reasoning}{self.think_close}{self.between}{self.answer_open}"


PROMPT = PromptFormat()


def reasoner_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the reasoner: image A, image B, then the question about `prompt`."""
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": fmt.question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def score_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the absolute-score variant: one image, then the rating question."""
    content = [{"type": "image"}, {"type": "text", "text": fmt.score_question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def listener_prefix(reasoning: str, fmt: PromptFormat = PROMPT) -> str:
    """The listener's assistant turn: the reasoner's reasoning, its answer removed, up to the answer slot.

    The listener reads the reasoner's messages followed by this text and we read its next-token logits over
    `fmt.answers` (section 4.3). It never sees the reasoner's answer: only `reasoning` goes in.
    """
    return fmt.answer_prefix(reasoning)


# ----------------------------------------------------------------------------------------------------------
# The format a checkpoint was trained with, written beside its weights: prompt_format.json


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


# ----------------------------------------------------------------------------------------------------------
# Model inputs


class Processor:
    """Chat messages + images -> the tensors a Qwen2.5-VL or Qwen3-VL model reads.

    It does what `Qwen2_5_VLProcessor` and `Qwen3VLProcessor` do for images, with the checkpoint's own tokenizer
    (chat template) and image processor: render the chat template, expand each `<|image_pad|>` into one token per
    merged patch, left-pad the batch, and mark image tokens in `mm_token_type_ids` (what `get_rope_index` reads).
    Written out here because both official processors also build a video processor, which needs torchvision;
    tests/test_real_layout.py checks the ids, masks and grids equal theirs. `min_pixels`/`max_pixels` bound the
    image size, and so the number of image tokens, which dominate cost.
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_pad = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_pad)
        self.merge = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None):
        """The tokenizer and image processor of a local checkpoint directory; `min_pixels`/`max_pixels` override
        its pixel bounds. A tokenizer without a chat template is refused here, naming the directory, not at the
        first prompt ("Cannot use chat template functions")."""
        from transformers import AutoImageProcessor, AutoTokenizer
        from models.families import CheckpointError, tokenizer_problem
        if problem := tokenizer_problem(path):
            raise CheckpointError(f"{path}: {problem}")
        if problem := pixel_bounds_problem(path, min_pixels, max_pixels):
            raise ValueError(problem)
        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as e:  # a damaged file the cheap check above cannot see
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{path}: the tokenizer or image processor does not load ({type(e).__name__}: "
                                  f"{first})") from e
        if not tokenizer.chat_template:
            raise CheckpointError(f"{path}: the tokenizer has no chat template (expected chat_template.jinja, "
                                  f"chat_template.json or a 'chat_template' in tokenizer_config.json)")
        return cls(tokenizer, image_processor)

    def prompt_limit(self, tokens: int, option: str = "--max_prompt_tokens") -> PromptLimit:
        """The longest dataset prompt a run reads, in this tokenizer's tokens (formats/layouts.py checks it)."""
        return PromptLimit(tokens, lambda text: prompt_tokens(self.tokenizer, text), option)

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def __call__(self, messages: Sequence[list[dict]], images: Sequence[Sequence], suffixes: Sequence[str] | None = None,
                 add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """Encode B conversations, each with its images in order, left-padded into one batch.

        `suffixes[b]` is text appended after the generation prompt (the start of the assistant's turn: the
        listener's reasoning prefix, or a supervised target). Returns `input_ids`, `attention_mask` (B, T),
        `mm_token_type_ids` (B, T), `pixel_values` (num_patches, C*t*p*p) and `image_grid_thw` (num_images, 3).
        """
        suffixes = suffixes if suffixes is not None else [""] * len(messages)
        flat_images = [load_image(im) for row in images for im in row]
        vision = self.image_processor(images=flat_images, return_tensors="pt") if flat_images else {}
        grid = vision.get("image_grid_thw")
        tokens_per_image = iter((grid.prod(-1) // self.merge**2).tolist() if grid is not None else [])
        rows = [self._encode(msgs, len(row_images), suffix, add_generation_prompt, tokens_per_image)
                for msgs, row_images, suffix in zip(messages, images, suffixes)]
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        if grid is not None:
            batch["pixel_values"], batch["image_grid_thw"] = vision["pixel_values"], grid
        return batch

    TEXT_MARK = "\ue000"  # a private-use character: where a text of the conversation sits in the template

    def _encode(self, messages: list[dict], n_images: int, suffix: str, add_generation_prompt: bool,
                tokens_per_image) -> list[int]:
        """One conversation -> token ids: the chat template with special tokens, each text as plain text.

        The texts of the messages (the dataset's prompt among them) are tokenized with special tokens split,
        so a prompt holding "<|im_end|>" or "<|image_pad|>" is read as those characters, never as chat
        structure or an image slot. Each `<|image_pad|>` of the template becomes one token per merged patch.
        """
        texts: list[str] = []

        def mark(text: str) -> str:
            texts.append(text)
            return f"{self.TEXT_MARK}{len(texts) - 1}{self.TEXT_MARK}"

        marked = [{**m, "content": mark(m["content"]) if isinstance(m["content"], str) else
                   [{**c, "text": mark(c["text"])} if c.get("type") == "text" else c for c in m["content"]]}
                  for m in messages]
        template = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
        pieces = (template + suffix).split(self.TEXT_MARK)  # template, text number, template, ..., template
        slots = sum(p.count(self.image_pad) for p in pieces[0::2])
        if slots != n_images:
            raise ValueError(f"conversation has {slots} image slots but {n_images} images")
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2:
                ids += self.tokenizer(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
                continue
            parts = piece.split(self.image_pad)
            for k, part in enumerate(parts):  # one <|image_pad|> per merged patch, as the vision tower emits them
                text = part if k == len(parts) - 1 else part + self.image_pad * next(tokens_per_image)
                ids += self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return ids

    def pairs(self, pairs: Sequence[Pair], fmt: PromptFormat | None = None, suffixes=None) -> dict[str, torch.Tensor]:
        """Encode the reasoner's prompt for each pair: its two images and the question about its prompt."""
        fmt = fmt or PROMPT
        return self([reasoner_messages(p.prompt, fmt) for p in pairs], [p.images for p in pairs], suffixes)

    def rated(self, records: Sequence[Rated], fmt: PromptFormat | None = None) -> dict[str, torch.Tensor]:
        """Encode the absolute-score prompt for each record: its one image and the rating question."""
        fmt = fmt or PROMPT
        return self([score_messages(r.prompt, fmt) for r in records], [[r.image] for r in records])

    def encode(self, records: Sequence, fmt: PromptFormat | None = None) -> dict[str, torch.Tensor]:
        """Pairs -> the preference prompt, Rated records -> the rating prompt (`fmt`'s, default `PROMPT`)."""
        return self.rated(records, fmt) if records and isinstance(records[0], Rated) else self.pairs(records, fmt)


def pixel_bounds(path: str) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) of a checkpoint's preprocessor_config.json, in either layout: Qwen2.5-VL's
    `min_pixels`/`max_pixels`, or Qwen3-VL's `size` {`shortest_edge`, `longest_edge`} (both in pixels)."""
    import json
    from pathlib import Path
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None, None  # the processor's loader names the missing file
    config = json.loads(file.read_text())
    size = config.get("size") or {}
    return (config.get("min_pixels", size.get("shortest_edge")), config.get("max_pixels", size.get("longest_edge")))


def pixel_bounds_problem(path: str, min_pixels: int | None, max_pixels: int | None) -> str | None:
    """What is wrong with overriding a checkpoint's pixel bounds so, or None. A `max_pixels` below the
    checkpoint's own `min_pixels` (Qwen3-VL's is 65,536) would make the image processor enlarge small images past
    `max_pixels` while it shrinks large ones: `min_pixels` must then be given too."""
    if max_pixels is None or min_pixels is not None:
        return None
    own_min, _ = pixel_bounds(path)
    if own_min is not None and max_pixels < own_min:
        return (f"max_pixels={max_pixels} is below the min_pixels={own_min} of {path}/preprocessor_config.json: images "
                f"under {own_min} pixels would be enlarged while larger ones are shrunk; give min_pixels (at most "
                f"{max_pixels}) too")
    return None


def prompt_tokens(tokenizer, text: str) -> int:
    """The number of tokens `text` is read as inside a prompt: as `Processor._encode` tokenizes it."""
    return len(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def images_per_row(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, P) image-token marks of a batch -> (B,) number of images in each row (each image is one run of marks)."""
    m = mm_token_type_ids == 1  # (B, P)
    return (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]


def prompt_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows start..stop-1 of a processor batch with their images' patches, the left padding that none of them
    needs cut off: what encoding those prompts alone gives."""
    out = {k: batch[k][start:stop] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    first_used = int(out["attention_mask"].any(0).nonzero()[0]) if out["attention_mask"].any() else 0
    out = {k: v[:, first_used:] for k, v in out.items()}  # (b, P')
    if "image_grid_thw" in batch:
        counts = images_per_row(batch["mm_token_type_ids"])  # (B,) images of each row, in row order
        first, last = int(counts[:start].sum()), int(counts[:stop].sum())
        patches = batch["image_grid_thw"].prod(-1)  # (images,) patches of each image, in order
        out["pixel_values"] = batch["pixel_values"][int(patches[:first].sum()):int(patches[:last].sum())]
        out["image_grid_thw"] = batch["image_grid_thw"][first:last]
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> left-padded `input_ids` and `attention_mask`, both (B, T)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        if r:
            input_ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
