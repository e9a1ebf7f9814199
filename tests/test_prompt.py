"""Tests for prompt.py: what the listener reads (everything before the answer, never the answer), and the
mapping of ranks onto the rating scale.

Run: .venv/bin/python -m pytest -q tests/test_prompt.py
"""
import pytest

from formats.records import Group, Pair
from prompt import PROMPT, PromptFormat, listener_prefix, reasoner_messages


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
