"""Rewards: a completion's text (and the listener's confidence) -> numbers, one per reward component.

Pairwise preference (section 4.3): a completion is `<think>reasoning</think>\\n<answer>1|2</answer>` (tags and
answers from `prompt.PROMPT`), rewarded by eq. (5),

    r = w_fmt * r_fmt + w_acc * r_acc + w_list * r_list,    r_list = max(0, p_corr - 0.5),

with (w_fmt, w_acc, w_list) = (1, 0.5, 0.5); p_corr is the listener's probability for the preferred image given the
reasoning alone (listener.py); w_list = 0 is section 5's plain GRPO baseline. Absolute score (section 5): one image
rated from `PROMPT.ratings` (1..5), rewarded by a format check, an exact match and a distance reward (1.0 at
distance 0, 0.75 at 1, 0.5 at 2, else 0); eq. (3) turns the rating tokens' logits into an expected score. Every
function is pure; components are returned raw, only "total" weighted.

Choices the paper leaves open, made here:
1. The format is strict: only whitespace before `<think>`, after `</answer>` and between `</think>` and `<answer>`
   (plus the non-blank part of `fmt.between`, if any); exactly one of each tag, the think block first.
2. r_fmt = 1 needs the stripped answer to be exactly one word of the vocabulary ("<answer>Image 1</answer>"
   fails): a reward model whose answer cannot be read is of no use.
3. Empty reasoning passes the format check: eq. (5) says nothing of its length, and r_list already pays nothing
   for reasoning that does not convince.
4. A completion with a bad format earns nothing else: r_acc = r_list = 0 (and exact = distance = 0).
5. Eq. (3)'s s_hat = sum_i r_i p(r_i) lies in [0, 1] only for ratings in [0, 1]; `expected_score` returns E[r] in
   rating units (1..5): the same order, in the numbers people rate in.
6. The absolute-score rewards have no weights in the paper; here 1, 1, 1, so a well-formed exact answer scores 3.
7. Section 4.2's s_hat "serves as a dense reward during RL" without saying how, and section 5 lists the score
   mode's rewards as format, exact match and distance: we train on those (`score_rewards`), s_hat at test time.

Test: .venv/bin/python -m pytest -q tests/test_reward.py
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import torch

from prompt import PROMPT, PromptFormat

# ----------------------------------------------------------------------------------------------------------
# Pairwise preference: eq. (5)


def preference_rewards(texts: Sequence[str], labels, p_correct=None, w_fmt: float = 1.0, w_acc: float = 0.5,
                       w_list: float = 0.5, fmt: PromptFormat = PROMPT) -> dict[str, torch.Tensor]:
    """Eq. (5) for N completions: each component a tensor (N,), with p_correct's dtype and device when it is a
    floating tensor (the default dtype on the CPU otherwise). `labels` (N,): the index of each completion's
    preferred image; `p_correct` (N,): the listener's probability for it (None only with w_list = 0)."""
    if p_correct is None and w_list != 0:
        raise ValueError(f"p_correct (the listener's probability for the preferred image) is None but "
                         f"w_list={w_list}; pass p_correct, or w_list=0 for the GRPO baseline")
    labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    answers = [parse_completion(text, fmt)[1] for text in texts]
    like = p_correct if torch.is_tensor(p_correct) and p_correct.is_floating_point() else torch.empty(0)
    r_fmt = torch.tensor([float(a is not None) for a in answers], dtype=like.dtype, device=like.device)  # (N,)
    r_acc = torch.tensor([accuracy_reward(a, int(y), fmt) for a, y in zip(answers, labels)],
                         dtype=like.dtype, device=like.device)  # (N,)
    if p_correct is None:
        r_list = torch.zeros_like(r_fmt)  # (N,)
    else:
        p = torch.as_tensor(p_correct, dtype=r_fmt.dtype, device=r_fmt.device)  # (N,)
        if p.shape != r_fmt.shape:
            raise ValueError(f"p_correct has shape {tuple(p.shape)}, expected ({len(texts)},)")
        r_list = listener_reward(p) * r_fmt  # (N,) no listener credit without the format
    total = w_fmt * r_fmt + w_acc * r_acc + w_list * r_list  # (N,) eq. (5)
    return {"format": r_fmt, "accuracy": r_acc, "listener": r_list, "total": total}


def accuracy_reward(answer: str | None, label: int, fmt: PromptFormat = PROMPT) -> float:
    """r_acc = I[a = y*]: 1 when `answer` names image `label` (0 or 1), 0 otherwise (also for None)."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1 (the index of the preferred image), got {label!r}")
    return float(answer == fmt.answers[label])


def listener_reward(p_correct):
    """r_list = max(0, p_correct - 0.5), for a float or elementwise for a tensor of any shape."""
    if torch.is_tensor(p_correct):
        return (p_correct - 0.5).clamp(min=0.0)  # same shape as p_correct
    if not 0.0 <= p_correct <= 1.0:
        raise ValueError(f"p_correct is a probability, got {p_correct!r}")
    return max(0.0, p_correct - 0.5)


# ----------------------------------------------------------------------------------------------------------
# Parsing


def parse_completion(text: str, fmt: PromptFormat = PROMPT,
                     vocabulary: Sequence[str] | None = None) -> tuple[str | None, str | None]:
    """Split a completion into (reasoning, answer), strictly (choices 1-2 at the top): (None, None) when the tags
    are missing, repeated, nested, out of order or surrounded by anything but whitespace; (reasoning, None) when
    the stripped answer is not exactly one word of `vocabulary` (`fmt.answers` unless given; `fmt.ratings` for the
    absolute score). `reasoning` is the text between the think tags, unstripped: `fmt.answer_prefix(reasoning)`
    rebuilds what the reasoner wrote.
    """
    tags = (fmt.think_open, fmt.think_close, fmt.answer_open, fmt.answer_close)
    if any(text.count(tag) != 1 for tag in tags):  # exactly one of each: no nesting, no second block
        return None, None
    match = _completion_pattern(fmt).fullmatch(text)
    if match is None:
        return None, None
    reasoning, answer = match.group(1), match.group(2).strip()
    vocabulary = fmt.answers if vocabulary is None else vocabulary
    return reasoning, (answer if answer in vocabulary else None)


@functools.lru_cache(maxsize=None)
def _completion_pattern(fmt: PromptFormat) -> re.Pattern:
    """`\\s* <think> (reasoning) </think> \\s* [between] \\s* <answer> (answer) </answer> \\s*`, tags escaped."""
    between = re.escape(fmt.between.strip()) + r"\s*" if fmt.between.strip() else ""
    return re.compile(
        rf"\s*{re.escape(fmt.think_open)}(.*){re.escape(fmt.think_close)}\s*{between}"
        rf"{re.escape(fmt.answer_open)}(.*){re.escape(fmt.answer_close)}\s*",
        re.DOTALL,
    )


# ----------------------------------------------------------------------------------------------------------
# Absolute score (section 5): eq. (3), exact match, distance


def score_rewards(texts: Sequence[str], target_ratings, w_fmt: float = 1.0, w_exact: float = 1.0,
                  w_dist: float = 1.0, fmt: PromptFormat = PROMPT) -> dict[str, torch.Tensor]:
    """`score_reward` for N completions: each component a tensor (N,)."""
    targets = target_ratings.tolist() if torch.is_tensor(target_ratings) else list(target_ratings)
    if len(targets) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(targets)} target ratings")
    rows = [score_reward(t, y, w_fmt, w_exact, w_dist, fmt) for t, y in zip(texts, targets)]
    return {key: torch.tensor([row[key] for row in rows]) for key in ("format", "exact", "distance", "total")}


def score_reward(text: str, target_rating: float, w_fmt: float = 1.0, w_exact: float = 1.0,
                 w_dist: float = 1.0, fmt: PromptFormat = PROMPT) -> dict[str, float]:
    """Absolute-score reward for one completion: {"format", "exact", "distance", "total"}.

    `target_rating` is the ground-truth rating as a number (one of `rating_values(fmt.ratings)`).
    """
    if target_rating not in rating_values(fmt.ratings):
        raise ValueError(f"target_rating must be one of {fmt.ratings}, got {target_rating!r}")
    _, answer = parse_completion(text, fmt, fmt.ratings)
    r_fmt = float(answer is not None)
    r_exact = 0.0 if answer is None else float(float(answer) == target_rating)
    r_dist = 0.0 if answer is None else distance_reward(float(answer), target_rating)
    total = w_fmt * r_fmt + w_exact * r_exact + w_dist * r_dist
    return {"format": r_fmt, "exact": r_exact, "distance": r_dist, "total": total}


def distance_reward(pred, target):
    """1.0 at |pred - target| = 0, 0.75 at 1, 0.5 at 2, 0 otherwise (integer ratings; floats or tensors)."""
    if torch.is_tensor(pred) or torch.is_tensor(target):
        d = (torch.as_tensor(pred) - torch.as_tensor(target)).abs().float()  # same shape as pred
        return torch.where(d <= 2, 1.0 - 0.25 * d, torch.zeros_like(d))
    d = abs(pred - target)
    return 1.0 - 0.25 * d if d <= 2 else 0.0


def expected_score(rating_logits: torch.Tensor, ratings: Sequence[str] = PROMPT.ratings) -> torch.Tensor:
    """Eq. (3): E[r] = sum_i r_i softmax(f)_i over the rating tokens, in rating units.

    `rating_logits` (..., R) are the logits at the answer position gathered at the R rating tokens, in the
    order of `ratings`. Returns (...,).
    """
    if rating_logits.shape[-1] != len(ratings):
        raise ValueError(f"rating_logits has {rating_logits.shape[-1]} entries in its last dimension, "
                         f"expected one per rating {tuple(ratings)}")
    values = torch.tensor(rating_values(ratings), dtype=rating_logits.dtype, device=rating_logits.device)  # (R,)
    p = rating_logits.softmax(-1)  # (..., R) eq. (3)
    return (p * values).sum(-1)  # (...,)


def rating_values(ratings: Sequence[str] = PROMPT.ratings) -> list[float]:
    """The ratings as numbers: ("1", ..., "5") -> [1.0, ..., 5.0]."""
    try:
        return [float(r) for r in ratings]
    except ValueError as e:
        raise ValueError(f"ratings must be numbers written as text, got {tuple(ratings)}") from e
