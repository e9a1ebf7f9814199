"""Tests for reward.py: hand-written completions scored by eq. (5), the distance table, eq. (3) by hand.

Completions are written out here from the tag strings of `prompt.PROMPT` (never the reward code's own
builder), and each expected reward is the arithmetic of eq. (5) written in the test.

Run: .venv/bin/python -m pytest -q tests/test_reward.py
"""
import math

import pytest
import torch

from prompt import PROMPT, PromptFormat
from reward import (accuracy_reward, distance_reward, expected_score, listener_reward, parse_completion,
                    preference_rewards, score_reward, score_rewards)

TH, TH_, AN, AN_ = PROMPT.think_open, PROMPT.think_close, PROMPT.answer_open, PROMPT.answer_close
A0, A1 = PROMPT.answers  # the answers naming image 0 and image 1


def preference_reward(text, label, p_correct=None, **weights) -> dict:
    """`preference_rewards` on one completion, its components as floats."""
    p = None if p_correct is None else torch.tensor([p_correct], dtype=torch.float64)
    return {k: v.item() for k, v in preference_rewards([text], [label], p, **weights).items()}


def format_reward(text) -> float:
    return preference_reward(text, 0, w_list=0.0)["format"]


def eq5(r_fmt, r_acc, p_correct, w_fmt=1.0, w_acc=0.5, w_list=0.5):
    """Eq. (5) written out: r = w_fmt r_fmt + w_acc r_acc + w_list max(0, p - 0.5), nothing without format."""
    r_list = max(0.0, p_correct - 0.5) if r_fmt else 0.0
    return w_fmt * r_fmt + w_acc * (r_acc if r_fmt else 0.0) + w_list * r_list


# (name, completion, well formed?, answer the completion gives)
CASES = [
    ("well formed, image 0", f"{TH}The first image shows the red cat.{TH_}\n{AN}{A0}{AN_}", True, A0),
    ("well formed, image 1", f"{TH}The second is sharper.{TH_}\n{AN}{A1}{AN_}", True, A1),
    ("empty reasoning", f"{TH}{TH_}\n{AN}{A1}{AN_}", True, A1),
    ("unicode reasoning", f"{TH}Das zweite Bild 🐱 ist schöner — 第二张更好.{TH_}\n{AN}{A1}{AN_}", True, A1),
    ("multi-line reasoning", f"{TH}\nline one\n\nline two\n{TH_}\n{AN}{A0}{AN_}", True, A0),
    ("whitespace around everything", f"  \n{TH}r{TH_} \n\n {AN} {A0}\n {AN_}\n\t ", True, A0),
    ("no whitespace between blocks", f"{TH}r{TH_}{AN}{A1}{AN_}", True, A1),
    ("missing think tags", f"r\n{AN}{A0}{AN_}", False, None),
    ("missing answer tags", f"{TH}r{TH_}\n{A0}", False, None),
    ("missing answer close", f"{TH}r{TH_}\n{AN}{A0}", False, None),
    ("empty string", "", False, None),
    ("two answers", f"{TH}r{TH_}\n{AN}{A0}{AN_}\n{AN}{A1}{AN_}", False, None),
    ("two think blocks", f"{TH}a{TH_}{TH}b{TH_}\n{AN}{A0}{AN_}", False, None),
    ("nested think", f"{TH}a{TH}b{TH_}{TH_}\n{AN}{A0}{AN_}", False, None),
    ("answer tag inside think", f"{TH}I say {AN}{A1}{AN_}{TH_}\n{AN}{A0}{AN_}", False, None),
    ("answer before think", f"{AN}{A0}{AN_}\n{TH}r{TH_}", False, None),
    ("text before think", f"Sure! {TH}r{TH_}\n{AN}{A0}{AN_}", False, None),
    ("text after answer", f"{TH}r{TH_}\n{AN}{A0}{AN_} because it is nicer", False, None),
    ("text between blocks", f"{TH}r{TH_}\nSo:\n{AN}{A0}{AN_}", False, None),
    ("answer outside the vocabulary", f"{TH}r{TH_}\n{AN}image {A0}{AN_}", False, None),
    ("both answers at once", f"{TH}r{TH_}\n{AN}{A0}{A1}{AN_}", False, None),
    ("empty answer", f"{TH}r{TH_}\n{AN}{AN_}", False, None),
]


@pytest.mark.parametrize("name,text,ok,answer", CASES, ids=[c[0] for c in CASES])
def test_parse_and_format_reward(name, text, ok, answer):
    reasoning, parsed = parse_completion(text)
    assert parsed == answer
    assert format_reward(text) == (1.0 if ok else 0.0)
    if ok:  # the reasoning is exactly what sits between the think tags
        assert reasoning == text[text.index(TH) + len(TH):text.index(TH_)]


def test_out_of_vocabulary_keeps_reasoning_but_fails_format():
    text = f"{TH}why{TH_}\n{AN}3{AN_}"
    assert parse_completion(text) == ("why", None)
    assert format_reward(text) == 0.0
    # the same text is well formed in the rating vocabulary of the absolute-score variant
    assert parse_completion(text, vocabulary=PROMPT.ratings) == ("why", "3")


def test_completion_round_trip():
    for reasoning in ["", "plain", " padded \n", "ü → ✓"]:
        for answer in PROMPT.answers:
            text = PROMPT.completion(reasoning, answer)
            assert parse_completion(text) == (reasoning, answer)
            assert PROMPT.answer_prefix(reasoning) + answer + AN_ == text


def test_other_tags_are_escaped():
    fmt = PromptFormat(think_open="(*think*)", think_close="(/think)", answer_open="[a+]", answer_close="[/a+]",
                       between=" Answer: ", answers=("A", "B"))
    assert parse_completion("(*think*)x.y(/think) Answer: [a+]B[/a+]", fmt) == ("x.y", "B")
    assert parse_completion("(*think*)x(/think)\n  Answer:[a+] A [/a+]", fmt) == ("x", "A")
    assert parse_completion("(*think*)x(/think)[a+]A[/a+]", fmt) == (None, None)  # "Answer:" missing
    assert parse_completion("(*thinkkk*)x(/think) Answer: [a+]A[/a+]", fmt) == (None, None)
    assert parse_completion(f"{TH}x{TH_}\n{AN}{A0}{AN_}", fmt) == (None, None)  # the default tags


@pytest.mark.parametrize("name,text,ok,answer", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("p_correct", [0.3, 0.5, 0.9])
def test_preference_reward_is_eq5(name, text, ok, answer, label, p_correct):
    r_fmt = 1.0 if ok else 0.0
    r_acc = 1.0 if answer == PROMPT.answers[label] else 0.0
    out = preference_reward(text, label, p_correct)
    assert out["format"] == r_fmt
    assert out["accuracy"] == (r_acc if ok else 0.0)
    assert out["listener"] == pytest.approx(max(0.0, p_correct - 0.5) if ok else 0.0)
    assert out["total"] == pytest.approx(eq5(r_fmt, r_acc, p_correct))
    baseline = preference_reward(text, label, None, w_list=0.0)  # GRPO baseline: format + exact match
    assert baseline["total"] == pytest.approx(eq5(r_fmt, r_acc, 0.0, w_list=0.0))


def test_preference_reward_worked_examples():
    right = f"{TH}The first image follows the prompt.{TH_}\n{AN}{A0}{AN_}"
    wrong = f"{TH}The second image is sharper.{TH_}\n{AN}{A1}{AN_}"
    assert preference_reward(right, 0, 0.9)["total"] == pytest.approx(1.0 + 0.5 * 1.0 + 0.5 * 0.4)  # 1.2
    assert preference_reward(right, 0, 0.3)["total"] == pytest.approx(1.0 + 0.5 * 1.0)  # 1.5
    # a wrong answer still earns the listener's credit: it rewards the reasoning, not the answer
    assert preference_reward(wrong, 0, 0.8)["total"] == pytest.approx(1.0 + 0.5 * 0.3)  # 1.15
    assert preference_reward(right + " ok", 0, 1.0)["total"] == 0.0  # bad format: nothing at all
    assert preference_reward(right, 0, 0.9, w_fmt=2.0, w_acc=1.0, w_list=3.0)["total"] == pytest.approx(
        2.0 + 1.0 + 3.0 * 0.4)


def test_preference_reward_needs_listener_unless_baseline():
    text = f"{TH}r{TH_}\n{AN}{A0}{AN_}"
    with pytest.raises(ValueError, match="p_correct"):
        preference_reward(text, 0)
    with pytest.raises(ValueError, match="p_correct"):
        preference_rewards([text], [0])
    assert preference_reward(text, 0, w_list=0.0) == {"format": 1.0, "accuracy": 1.0, "listener": 0.0,
                                                      "total": 1.5}
    with pytest.raises(ValueError, match="label"):
        accuracy_reward(A0, 2)


def test_accuracy_reward():
    assert accuracy_reward(A0, 0) == 1.0 and accuracy_reward(A1, 1) == 1.0
    assert accuracy_reward(A1, 0) == 0.0 and accuracy_reward(A0, 1) == 0.0
    assert accuracy_reward(None, 0) == 0.0 and accuracy_reward(None, 1) == 0.0


def test_listener_reward():
    assert listener_reward(0.3) == 0.0
    assert listener_reward(0.5) == 0.0
    assert listener_reward(0.9) == pytest.approx(0.4)
    t = listener_reward(torch.tensor([[0.3, 0.5], [0.9, 1.0]]))
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.0], [0.4, 0.5]]))
    with pytest.raises(ValueError, match="p_correct"):
        listener_reward(1.5)


def test_preference_rewards_batch_equals_one_at_a_time():
    texts = [c[1] for c in CASES]
    labels = [i % 2 for i in range(len(texts))]
    p = torch.linspace(0.0, 1.0, len(texts), dtype=torch.float64)  # (N,)
    for weights in [{}, {"w_list": 0.0}, {"w_fmt": 0.5, "w_acc": 2.0, "w_list": 1.5}]:
        batch = preference_rewards(texts, torch.tensor(labels), p, **weights)
        for key in ("format", "accuracy", "listener", "total"):
            items = [preference_reward(t, y, float(pi), **weights)[key] for t, y, pi in zip(texts, labels, p)]
            assert batch[key].shape == (len(texts),)
            torch.testing.assert_close(batch[key], torch.tensor(items, dtype=torch.float64))
    baseline = preference_rewards(texts, labels, None, w_list=0.0)
    items = [preference_reward(t, y, None, w_list=0.0)["total"] for t, y in zip(texts, labels)]
    torch.testing.assert_close(baseline["total"], torch.tensor(items))


# ----------------------------------------------------------------------------------------------------------
# Absolute score


def test_distance_reward_table():
    table = {0: 1.0, 1: 0.75, 2: 0.5}  # section 5; any larger distance earns 0
    values = [int(r) for r in PROMPT.ratings]
    for pred in values:
        for target in values:
            assert distance_reward(pred, target) == table.get(abs(pred - target), 0.0)
    preds = torch.tensor([p for p in values for _ in values])  # (R*R,)
    targets = torch.tensor([t for _ in values for t in values])  # (R*R,)
    expected = torch.tensor([table.get(abs(int(p) - int(t)), 0.0) for p, t in zip(preds, targets)])
    torch.testing.assert_close(distance_reward(preds, targets), expected)


def test_expected_score_by_hand():
    logits = torch.tensor([[0.1, -1.0, 2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [9.0, -9.0, 0.0, 1.0, -2.0]],
                          dtype=torch.float64)  # (3, R)
    got = expected_score(logits)  # (3,)
    for row, score in zip(logits.tolist(), got.tolist()):
        z = sum(math.exp(f) for f in row)
        by_hand = sum(float(r) * math.exp(f) / z for r, f in zip(PROMPT.ratings, row))
        assert score == pytest.approx(by_hand, rel=1e-12)
    assert got[1].item() == pytest.approx(sum(map(float, PROMPT.ratings)) / len(PROMPT.ratings))  # uniform
    with pytest.raises(ValueError, match="rating"):
        expected_score(torch.zeros(2, len(PROMPT.ratings) + 1))


def test_score_reward():
    def text(rating):
        return f"{TH}Sharp, matches the prompt.{TH_}\n{AN}{rating}{AN_}"

    assert score_reward(text("4"), 4) == {"format": 1.0, "exact": 1.0, "distance": 1.0, "total": 3.0}
    assert score_reward(text("4"), 3)["total"] == 1.0 + 0.0 + 0.75
    assert score_reward(text("4"), 2)["total"] == 1.0 + 0.0 + 0.5
    assert score_reward(text("4"), 1)["total"] == 1.0 + 0.0 + 0.0
    assert score_reward(text(" 5 "), 5, w_fmt=0.5, w_exact=2.0, w_dist=0.25)["total"] == 0.5 + 2.0 + 0.25
    for bad in [text("6"), text("4.0"), text("four"), text("4") + " done", f"{AN}4{AN_}"]:
        assert score_reward(bad, 4) == {"format": 0.0, "exact": 0.0, "distance": 0.0, "total": 0.0}
    with pytest.raises(ValueError, match="target_rating"):
        score_reward(text("4"), 7)


def test_score_rewards_batch_equals_items():
    texts = [f"{TH}r{TH_}\n{AN}{r}{AN_}" for r in PROMPT.ratings] + [f"{TH}r{TH_}{AN}9{AN_}", "no tags"]
    targets = [3, 3, 3, 1, 5, 2, 4]
    batch = score_rewards(texts, torch.tensor(targets))
    for key in ("format", "exact", "distance", "total"):
        items = []
        for t, y in zip(texts, targets):  # written out: format, then exact and distance only if well formed
            _, answer = parse_completion(t, vocabulary=PROMPT.ratings)
            ok = answer is not None
            exact = float(ok and int(answer) == y)
            dist = {0: 1.0, 1: 0.75, 2: 0.5}.get(abs(int(answer) - y), 0.0) if ok else 0.0
            items.append({"format": float(ok), "exact": exact, "distance": dist, "total": float(ok) + exact + dist}[key])
        torch.testing.assert_close(batch[key], torch.tensor(items))
