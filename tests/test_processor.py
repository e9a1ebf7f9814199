"""Tests for models/processor.py: the image tokens `Processor` puts in a prompt, the rows of a batch (`prompt_rows`)
equal to encoding those prompts alone, and the answer tokens (`answer_token_ids`). tests/test_real_layout.py holds
`Processor` against the official processors.

Run: .venv/bin/python -m pytest -q tests/test_processor.py
"""
from dataclasses import replace

import pytest
import torch

from formats.records import Pair
from models.processor import Processor, answer_token_ids, prompt_rows
from pictures import RED, png_bytes
from prompt import PROMPT
from toy import world as toy


def test_processor_image_tokens():
    processor = Processor(toy.make_tokenizer(), toy.make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112))
    sizes = {"A": (56, 56), "B": (112, 56), "C": (84, 112)}  # (width, height), multiples of 28: no resize
    images = {k: png_bytes(RED, size) for k, size in sizes.items()}
    tokens = {k: (w // 14) * (h // 14) // 4 for k, (w, h) in sizes.items()}  # patches of 14, 2x2 merge
    rows = [("A", "B"), ("C", "A")]
    batch = processor.pairs([Pair("a red circle", (images[a], images[b]), 0) for a, b in rows])
    grid = batch["image_grid_thw"]
    assert (grid.prod(-1) // 4).tolist() == [tokens[k] for row in rows for k in row]
    ids, mm = batch["input_ids"], batch["mm_token_type_ids"]
    image_id = processor.image_token_id
    start, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    for b, row in enumerate(rows):
        seq = ids[b][batch["attention_mask"][b].bool()].tolist()
        runs, k = [], 0
        while k < len(seq):  # each image: <|vision_start|> then a run of image tokens then <|vision_end|>
            if seq[k] == start:
                j = k + 1
                while seq[j] == image_id:
                    j += 1
                assert seq[j] == end
                runs.append(j - k - 1)
                k = j
            k += 1
        assert runs == [tokens[key] for key in row]
        assert seq.count(image_id) == sum(runs)
        assert mm[b].tolist() == [int(t == image_id) for t in ids[b].tolist()]
    assert mm.sum().item() == sum(tokens[k] for row in rows for k in row)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_prompt_rows_equal_encoding_those_prompts_alone():
    """A micro-batch (rows 1..2 of 3) and prompts repeated in any order (eq. (2)'s forward repeats each G times)
    give the ids, masks, patches and grids of encoding just those prompts: the left padding none of them needs is
    cut, each row keeps its own images' patches."""
    processor = Processor(toy.make_tokenizer(), toy.make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112))
    sizes = [((56, 56), (112, 56)), ((84, 112), (56, 56)), ((112, 112), (56, 84))]  # tokens differ per image
    pairs = [Pair("a red circle" + " and more" * n, tuple(png_bytes(RED, s) for s in row), 0)
             for n, row in enumerate(sizes)]
    batch = processor.pairs(pairs)
    for rows in ([1, 2], [0], [2, 2, 0, 0, 1], [1, 1, 1]):
        got, expected = prompt_rows(batch, rows), processor.pairs([pairs[r] for r in rows])
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), (rows, key)


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_answer_token_ids(family):
    tok = toy.make_processor(family).tokenizer
    ids = answer_token_ids(tok)
    assert ids == [tok(a, add_special_tokens=False)["input_ids"][0] for a in PROMPT.answers]
    assert tok.decode(ids[0]) == PROMPT.answers[0] and tok.decode(ids[1]) == PROMPT.answers[1]
    with pytest.raises(ValueError, match="not exactly one token"):
        answer_token_ids(tok, replace(PROMPT, answers=("first image", "2")))
