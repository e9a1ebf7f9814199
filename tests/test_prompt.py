"""Tests for prompt.py: what the listener reads (everything before the answer, never the answer), the image
tokens `Processor` puts in a prompt, and the mapping of ranks onto the rating scale.

Run: .venv/bin/python -m pytest -q tests/test_prompt.py
"""
import pytest

from toy import world as toy
from pictures import RED, png_bytes
from formats.records import Group, Pair


# ---------------------------------------------------------------- prompts and model inputs
from prompt import PROMPT, Processor, PromptFormat, listener_prefix, reasoner_messages


# ---------------------------------------------------------------- prompts and model inputs


@pytest.mark.parametrize("fmt", [PROMPT, PromptFormat(answers=("LEFT_WINS", "RIGHT_WINS"))])
def test_listener_prefix_excludes_the_answer(fmt):
    from reward import parse_completion
    reasoning = " The first image shows a red cat; the second a blue one. "
    for answer in fmt.answers:
        completion = fmt.completion(reasoning, answer)
        parsed, parsed_answer = parse_completion(completion, fmt)
        assert (parsed, parsed_answer) == (reasoning, answer)
        text = listener_prefix(parsed, fmt)
        assert completion == text + answer + fmt.answer_close  # everything before the answer, nothing after
        assert text.endswith(fmt.answer_open) and fmt.answer_close not in text
        if fmt is not PROMPT:  # distinctive answers: neither appears anywhere in what the listener reads
            assert not any(a in text for a in fmt.answers)


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
    messages = reasoner_messages("a red circle")
    assert [c["type"] for c in messages[0]["content"]] == ["image", "image", "text"]


def test_to_rated_maps_ranks_onto_the_rating_scale():
    """Best rank -> R, worst -> 1, linear between; all tied -> the middle; a pair's winner R, loser 1."""
    from data import to_rated
    from formats.records import Rated
    group = Group("p", ["a", "b", "c", "d", "e"], [1, 2, 3, 5, 3])
    assert [r.rating for r in to_rated([group], 5)] == [5, 4, 3, 1, 3]  # x = 1, 0.75, 0.5, 0, 0.5
    assert [r.rating for r in to_rated([Group("q", ["a", "b"], [2, 2])], 5)] == [3, 3]
    pair = Pair("r", ("x", "y"), label=1)
    assert to_rated([pair], 5) == [Rated("r", "x", 1), Rated("r", "y", 5)]
