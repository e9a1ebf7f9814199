"""Metrics: the paper's numbers from scores and human labels. Pure functions: numbers in, numbers out.

Pairwise accuracy over a group's untied pairs (micro as ImageReward's test script, macro per prompt as the HPSv2
evaluation), pair accuracy, the Rapidata binarized and confident subsets and accuracy by human agreement
(figure 3), expected calibration error, the listener-reasoner distance binned (figure 2), the 95% interval of
table 5; and what rollouts show during training (a GRPO step's metrics, the held-out verdicts' agreement with
the listener). judge.py holds table 4's contradiction judge, which runs a model.

Choices the paper leaves open, made here (evaluate.py lists those of the scoring):
1. Expected calibration error bins the confidence max(p, 1 - p) in equal-width bins over [0, 1] (Guo et al.
   2017); the "±" of table 5 is a 95% normal interval, 1.96 sqrt(acc (1 - acc) / n), which is the paper's
   1.2 points at n = 5139 and 72%.
2. Figure 2 is drawn per rollout: the distance between the listener's and the reasoner's (s1, s2) for the
   same reasoning, and whether that rollout's p(b) orders the pair as people do.
3. Tables 4 and 5 use, where the data has votes, the most confident pairs with at least 20 votes
   (`confident_or_labelled`; evaluate.py's `--confident-top`, `--min-votes`); otherwise every pair with a human
   preference.

Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Sequence

import torch

from formats.records import Group, Pair
from prompt import PROMPT, PromptFormat
from reward import parse_completion


# ----------------------------------------------------------------------------------------------------------
# Accuracy, agreement and calibration: pure functions of scores and human labels


def pairwise_accuracy(groups: Sequence[Group], scores: Sequence[Sequence[float]]) -> dict:
    """Accuracy over every pair of images people did not tie (ranking 1 is best); a predicted tie is wrong.

    `micro`: over all pairs (ImageReward's test script); `macro`: per prompt, then averaged (HPSv2's).
    """
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups but {len(scores)} score lists")
    right = total = 0
    per_prompt = []
    for g, (group, s) in enumerate(zip(groups, scores)):
        if len(s) != len(group.ranking):
            raise ValueError(f"group {g}: {len(group.ranking)} ranked images but {len(s)} scores")
        r = n = 0
        for i, j in combinations(range(len(s)), 2):
            if group.ranking[i] == group.ranking[j]:
                continue  # a human tie says nothing about the order
            n += 1
            r += s[i] != s[j] and (s[i] > s[j]) == (group.ranking[i] < group.ranking[j])
        if n:
            right, total = right + r, total + n
            per_prompt.append(r / n)
    return {"micro": right / total if total else math.nan,
            "macro": statistics.fmean(per_prompt) if per_prompt else math.nan,
            "prompts": len(per_prompt), "pairs": total}


def pair_accuracy(pairs: Sequence[Pair], p_b: Sequence[float]) -> float:
    """Fraction of pairs where (p > 0.5) == (label == 1); p == 0.5 is wrong."""
    if len(pairs) != len(p_b):
        raise ValueError(f"{len(pairs)} pairs but {len(p_b)} probabilities")
    if not pairs:
        return math.nan
    return statistics.fmean(float(p != 0.5 and (p > 0.5) == (pair.label == 1)) for pair, p in zip(pairs, p_b))


def winner_share(pair: Pair, index: int | None = None) -> float:
    """The winner's share of the human votes (in [0.5, 1])."""
    if pair.votes is None or sum(pair.votes) <= 0:
        raise ValueError(f"pair {'' if index is None else index} ({pair.prompt[:40]!r}) has no votes")
    return max(pair.votes) / sum(pair.votes)


def binarized(pairs: Sequence[Pair], min_share: float = 0.8, min_votes: float = 15) -> list[int]:
    """Indices of the paper's binarized subset: the winner has >= 80% of the votes, > 15 votes in total."""
    return [i for i, p in enumerate(pairs) if winner_share(p, i) >= min_share and sum(p.votes) > min_votes]


def confident(pairs: Sequence[Pair], min_votes: float = 20, top: int | None = None) -> list[int]:
    """Indices of pairs with at least `min_votes` votes, most confident (winner's share) first, `top` of them."""
    keep = [i for i, p in enumerate(pairs) if sum(p.votes or ()) >= min_votes]
    keep.sort(key=lambda i: -winner_share(pairs[i], i))
    return keep[:top]


def accuracy_by_agreement(pairs: Sequence[Pair], p_b: Sequence[float],
                          thresholds: Sequence[float] = tuple(range(50, 101, 5))) -> list[dict]:
    """Figure 3: accuracy over the pairs whose winner has at least `threshold` percent of the votes."""
    shares = [100 * winner_share(p, i) for i, p in enumerate(pairs)]
    rows = []
    for t in thresholds:
        keep = [i for i, s in enumerate(shares) if s >= t - 1e-9]
        rows.append({"threshold": t, "pairs": len(keep),
                     "accuracy": pair_accuracy([pairs[i] for i in keep], [p_b[i] for i in keep])})
    return rows


def expected_calibration_error(probs: Sequence[float], labels: Sequence[int], bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - confidence_b|, confidence max(p, 1 - p), equal-width bins on [0, 1].

    `probs` are p(label == 1); a prediction is right when (p > 0.5) == (label == 1) (p == 0.5 is wrong). Bin b
    holds confidences in [b / bins, (b + 1) / bins), the last bin also holds 1.
    """
    if len(probs) != len(labels):
        raise ValueError(f"{len(probs)} probabilities but {len(labels)} labels")
    if not probs:
        return math.nan
    binned = [[] for _ in range(bins)]
    for p, y in zip(probs, labels):
        confidence = max(p, 1 - p)
        binned[min(int(confidence * bins), bins - 1)].append((confidence, float(p != 0.5 and (p > 0.5) == (y == 1))))
    n = len(probs)
    return sum(len(b) / n * abs(statistics.fmean(c for c, _ in b) - statistics.fmean(r for _, r in b))
               for b in binned if b)


def interval95(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on n items (the ± of table 5)."""
    return 1.96 * math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan


def accuracy_with_interval(pairs: Sequence[Pair], p_b: Sequence[float]) -> dict:
    """Table 5's cell: pair accuracy, the half-width of its 95% interval, and the number of pairs."""
    accuracy = pair_accuracy(pairs, p_b)
    return {"accuracy": accuracy, "pm95": interval95(accuracy, len(pairs)), "pairs": len(pairs)}


def rating_accuracy(records: Sequence[Group | Pair], ratings: Sequence[float]) -> dict:
    """Table 3's abs-score row: accuracy of one score per image (the records' images in order), pairwise for
    groups (micro and macro) and per pair for pairs (a tie is wrong, as everywhere)."""
    per_record, start = [], 0
    for r in records:
        per_record.append(ratings[start:start + len(r.images)])
        start += len(r.images)
    if isinstance(records[0], Group):
        result = pairwise_accuracy(records, per_record)
        return {"accuracy": result["micro"], **result}
    p_b = [0.5 if s[0] == s[1] else float(s[1] > s[0]) for s in per_record]
    return {"accuracy": pair_accuracy(records, p_b), "pairs": len(records)}


def vote_metrics(dataset, probs: dict[str, list[float]]) -> dict:
    """Rapidata: binarized accuracy and accuracy by agreement threshold (figure 3), for each rule of `probs`.

    `dataset`: the `data.DatasetPairs` that `probs` hold one p(b) per comparison of; {} for groups or
    for pairs without votes."""
    pairs = dataset.compared
    if dataset.groups is not None or any(pair.votes is None for pair in pairs):
        return {}
    keep = binarized(pairs)
    sub = [pairs[i] for i in keep]
    return {"binarized": {name: {"accuracy": pair_accuracy(sub, [v[i] for i in keep]), "pairs": len(keep)}
                          for name, v in probs.items()},
            "by_agreement": {name: accuracy_by_agreement(pairs, v) for name, v in probs.items()
                             if name.startswith("mean@")}}


# ----------------------------------------------------------------------------------------------------------
# Listener-reasoner distance (figure 2)


def score_distance(reasoner: torch.Tensor, listener: torch.Tensor) -> torch.Tensor:
    """Figure 2: ||(s1, s2)_listener - (s1, s2)_reasoner||_2 for the same reasoning; (..., 2) -> (...)."""
    return (listener.float() - reasoner.float()).norm(dim=-1)


def accuracy_by_bin(values: Sequence[float], correct: Sequence[bool], bins: int = 10,
                    high: float = math.sqrt(2)) -> list[dict]:
    """Accuracy of the items whose value falls in each of `bins` equal bins of [0, high] (figure 2)."""
    binned = [[] for _ in range(bins)]
    for v, c in zip(values, correct):
        binned[min(int(v / high * bins), bins - 1)].append(float(c))
    return [{"low": b * high / bins, "high": (b + 1) * high / bins, "n": len(r),
             "accuracy": statistics.fmean(r) if r else None} for b, r in enumerate(binned)]


def confident_or_labelled(dataset, min_votes: int, top: int) -> list[int]:
    """The comparisons of tables 4-5 (indices into `dataset.compared`, a data.DatasetPairs): the most
    confident pairs with enough votes when the data has votes, else every labelled one."""
    if all(dataset.compared[i].votes is not None for i in dataset.labelled) and dataset.groups is None \
            and dataset.labelled:
        return confident(dataset.compared, min_votes, top or None)
    return dataset.labelled


# ----------------------------------------------------------------------------------------------------------
# What rollouts show during training: a GRPO step's (grpo.py's loss, train.py) and the held-out verdicts (heldout.py)


@torch.no_grad()
def loss_metrics(ratio, adv, kl, keep, clip_low, clip_high) -> dict:
    """What `grpo.grpo_loss` saw, means over this batch's loss tokens, as 0-dim tensors (no host sync here): the
    KL, the shares of tokens clipped on each side, the ratio, the length of the completions left in the loss."""
    w = keep.to(ratio.dtype)  # (N, T)
    n = w.sum().clamp(min=1)
    lengths = w.sum(dim=1)  # (N,)
    low = (ratio < 1 - clip_low) & (adv < 0) & keep  # (N, T) clipped term chosen on the low side
    high = (ratio > 1 + clip_high) & (adv > 0) & keep  # (N, T) clipped term chosen on the high side
    return {
        "kl": (kl * w).sum() / n,
        "clip_low": low.sum() / n,
        "clip_high": high.sum() / n,
        "ratio": (ratio * w).sum() / n,
        "length": lengths.sum() / (lengths > 0).sum().clamp(min=1),  # over completions left in the loss
    }


def rollout_metrics(examples: Sequence, texts: Sequence[str], rollouts, rewards: dict, p_correct, group_size: int,
                    fmt: PromptFormat = PROMPT) -> dict:
    """What a GRPO step's N rollouts looked like, as 0-dim tensors: each reward component's mean, the reward's
    spread, the share of groups whose rewards all tie, lengths, the share cut at max_new_tokens; with a listener,
    its mean p_corr and how often the answer names the image it favours. `examples[n]`: what rollout n answers."""
    lengths = rollouts.mask.sum(-1).float()  # (N,)
    total = rewards["total"]  # (N,)
    out = {f"reward_{k}": v.mean() for k, v in rewards.items() if k != "total"}  # each component
    out.update({"reward": total.mean(), "reward_std": total.std(unbiased=False),
                "flat_groups": (total.view(-1, group_size).std(-1, unbiased=False) == 0).float().mean(),
                "length": lengths.mean(), "length_max": lengths.max(), "truncated": (~rollouts.stopped).float().mean(),
                "tokens": lengths.sum()})
    if p_correct is not None:
        answers = [parse_completion(t, fmt)[1] for t in texts]
        answered = torch.tensor([-1 if a is None else fmt.answers.index(a) for a in answers], device=p_correct.device)
        labels = torch.tensor([e.label for e in examples], device=p_correct.device)  # (N,)
        out["listener_p_correct"] = p_correct.mean()
        out["listener_agreement"] = (answered == favoured_image(labels, p_correct)).float().mean()
    return out


def favoured_image(label, p_correct):
    """The image the listener favours: the preferred one (`label`) when its p_corr is above 0.5, else the other;
    for numbers, or elementwise for tensors (no host sync)."""
    if torch.is_tensor(p_correct):
        return torch.where(p_correct > 0.5, label, 1 - label)
    return label if p_correct > 0.5 else 1 - label
