"""Chat messages + images -> the tensors a Qwen2.5-VL or Qwen3-VL model reads, with a checkpoint's own tokenizer
and image processor (`Processor`), and the batch arithmetic around them: left padding, the rows of a batch with
their images (`prompt_rows`), the tokens a text is read as inside a prompt (`prompt_tokens`) and after one
(`continuation_ids`, and `listener_ids`: what the listener reads), the token of each answer word
(`answer_token_ids`), the end-of-turn ids every rollout stops at, a checkpoint's pixel bounds.

prompt.py says what is asked; this file turns it into input_ids, attention_mask, mm_token_type_ids (B, P),
pixel_values (patches, C*t*p*p) and image_grid_thw (images, 3). Shapes: B prompts, P prompt tokens.
Tests: .venv/bin/python -m pytest -q tests/test_processor.py tests/test_real_layout.py
"""
from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import torch

from formats.images import load_image
from formats.layouts import PromptLimit
from formats.records import Pair, Rated
from prompt import PROMPT, PromptFormat, listener_prefix, reasoner_messages, score_messages


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


def continuation_ids(tokenizer, prompt_text: str, suffixes: Sequence[str]) -> list[list[int]]:
    """Token ids of each suffix as the tokenizer writes it after `prompt_text` (not tokenized on its own).

    Tokenizing prompt + suffix together and dropping the prompt's ids gives exactly the ids of a single
    full-text encoding, whatever the tokenizer merges at the seam; we check the prompt's ids are a prefix.
    """
    head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    rows = tokenizer([prompt_text + s for s in suffixes], add_special_tokens=False)["input_ids"]
    for g, row in enumerate(rows):
        if row[:len(head)] != head:
            raise ValueError(f"suffix {g} ({suffixes[g][:40]!r}...) changes how the prompt before it is tokenized")
    return [row[len(head):] for row in rows]


def listener_ids(tokenizer, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]],
                 fmt: PromptFormat = PROMPT) -> list[list[int]]:
    """The token ids the listener reads after each pair's prompt: `listener_prefix(r)` for each reasoning r of
    `reasonings[b]`, written as the tokenizer writes it after the prompt; flat, prompt-major."""
    rows = []
    for pair, rs in zip(pairs, reasonings):
        prompt_text = tokenizer.apply_chat_template(reasoner_messages(pair.prompt, fmt), tokenize=False,
                                                    add_generation_prompt=True)
        rows += continuation_ids(tokenizer, prompt_text, [listener_prefix(r, fmt) for r in rs])
    return rows


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokenizer's end-of-turn ids, `<|im_end|>` (Qwen chat models' eos) and `<|endoftext|>`: the stop ids
    training and evaluation both pass, so that a completion ends the same way in both."""
    ids = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def answer_token_ids(tokenizer, fmt: PromptFormat = PROMPT, answers: Sequence[str] | None = None) -> list[int]:
    """The token id of each answer (`fmt.answers` unless given), as the tokenizer writes it right after the
    answer slot.

    Raises ValueError when an answer is not exactly one token there (then one next-token distribution cannot
    score it), or when two answers share a token.
    """
    answers = fmt.answers if answers is None else answers
    slot_text = fmt.answer_prefix("")
    slot = tokenizer(slot_text, add_special_tokens=False)["input_ids"]
    ids = []
    for answer in answers:
        full = tokenizer(slot_text + answer, add_special_tokens=False)["input_ids"]
        if len(full) != len(slot) + 1 or full[:len(slot)] != slot:
            raise ValueError(f"answer {answer!r} is not exactly one token after {slot_text!r}: the tokenizer "
                             f"writes it as {full[len(slot):]}")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {tuple(answers)} share a token: ids {ids}")
    return ids


def images_per_row(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, P) image-token marks of a batch -> (B,) number of images in each row (each image is one run of marks)."""
    m = mm_token_type_ids == 1  # (B, P)
    return (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]


def prompt_rows(batch: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The prompts `rows` of a processor batch, in that order (a row may come again), each with its images'
    patches, and the left padding none of them needs cut off: what encoding those prompts alone gives.

    A micro-batch is `prompt_rows(batch, range(i, j))`; eq. (2)'s forward repeats each prompt G times,
    `prompt_rows(batch, [b for b in range(B) for _ in range(G)])` (rows b*G .. b*G+G-1 are prompt b).
    """
    index = torch.as_tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)  # (n,)
    out = {k: batch[k][index] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}  # (n, P)
    used = out["attention_mask"].any(0)  # (P,) the columns some row needs
    out = {k: v[:, int(used.nonzero()[0]) if used.any() else 0:] for k, v in out.items()}  # (n, P')
    if "image_grid_thw" in batch:
        grid = batch["image_grid_thw"]  # (images, 3): every row's images, in row order
        first = [0, *accumulate(images_per_row(batch["mm_token_type_ids"]).tolist())]  # row b: first[b]..first[b+1]-1
        start = [0, *accumulate(grid.prod(-1).tolist())]  # image i: patches start[i]..start[i+1]-1
        images = [i for b in index.tolist() for i in range(first[b], first[b + 1])]  # the rows' images, in order
        patches = [p for i in images for p in range(start[i], start[i + 1])]
        out["pixel_values"] = batch["pixel_values"][torch.tensor(patches, device=grid.device)]
        out["image_grid_thw"] = grid[torch.tensor(images, device=grid.device)]
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
