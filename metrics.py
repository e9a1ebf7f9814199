"""Metrics: the paper's numbers from scores, human labels and a second reader of the reasoning.

Pure functions of scores and labels: pairwise accuracy over a group's untied pairs (micro as ImageReward's test
script, macro per prompt as the HPSv2 evaluation), pair accuracy, the Rapidata binarized and confident subsets
and accuracy by human agreement (figure 3), expected calibration error, the listener-reasoner distance binned
(figure 2), the 95% interval of table 5. Then the contradiction judge of table 4: a text model that reads a
reasoning and its final answer and says whether they contradict.

Choices the paper leaves open, made here (evaluate.py lists those of the scoring):
1. The judge of table 4 is read, not sampled: it says YES when its next-token logit for the first token of
   "YES" exceeds that of "NO" after the chat template's generation prompt. evaluate.py has it judge every
   well-formed rollout (a reasoning and a readable answer) of the pairs of table 5; it reads the reasoning,
   then "Final answer: 1 (the first image)" or "... 2 (the second image)".
2. Expected calibration error bins the confidence max(p, 1 - p) in equal-width bins over [0, 1] (Guo et al.
   2017); the "±" of table 5 is a 95% normal interval, 1.96 sqrt(acc (1 - acc) / n), which is the paper's
   1.2 points at n = 5139 and 72%.
3. Figure 2 is drawn per rollout: the distance between the listener's and the reasoner's (s1, s2) for the
   same reasoning, and whether that rollout's p(b) orders the pair as people do.

Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Sequence

import torch
from tqdm import tqdm

from listener import Listener
from prompt import Group, Pair, left_pad


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


def pair_accuracy(pairs: Sequence[Pair], p_second: Sequence[float]) -> float:
    """Fraction of pairs where (p > 0.5) == (label == 1); p == 0.5 is wrong."""
    if len(pairs) != len(p_second):
        raise ValueError(f"{len(pairs)} pairs but {len(p_second)} probabilities")
    if not pairs:
        return math.nan
    return statistics.fmean(float(p != 0.5 and (p > 0.5) == (pair.label == 1)) for pair, p in zip(pairs, p_second))


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


def accuracy_by_agreement(pairs: Sequence[Pair], p_second: Sequence[float],
                          thresholds: Sequence[float] = tuple(range(50, 101, 5))) -> list[dict]:
    """Figure 3: accuracy over the pairs whose winner has at least `threshold` percent of the votes."""
    shares = [100 * winner_share(p, i) for i, p in enumerate(pairs)]
    rows = []
    for t in thresholds:
        keep = [i for i, s in enumerate(shares) if s >= t - 1e-9]
        rows.append({"threshold": t, "pairs": len(keep),
                     "accuracy": pair_accuracy([pairs[i] for i in keep], [p_second[i] for i in keep])})
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


def accuracy_with_interval(pairs: Sequence[Pair], p_second: Sequence[float]) -> dict:
    """Table 5's cell: pair accuracy, the half-width of its 95% interval, and the number of pairs."""
    accuracy = pair_accuracy(pairs, p_second)
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

    `dataset`: the `eval_inputs.DatasetPairs` that `probs` hold one p(b) per comparison of; {} for groups or
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


def disagreement_metrics(listener_model, listener_processor, dataset, results, cfg) -> dict:
    """Figure 2: per rollout, ||listener (s1, s2) - reasoner (s1, s2)|| for the same reasoning, binned.

    `dataset` is an `eval_inputs.DatasetPairs`, `results` the `evaluate.Comparison` of each of its labelled
    comparisons; the listener reads `cfg.batch_size` pairs at a time."""
    listener = Listener(listener_model, listener_processor)
    distances, correct = [], []
    for start in tqdm(range(0, len(dataset.labelled), cfg.batch_size), desc="listener"):
        idx = dataset.labelled[start:start + cfg.batch_size]
        scores = listener.scores([dataset.compared[i] for i in idx], [results[i].reasonings for i in idx])  # (B, G, 2)
        reasoner = torch.tensor([[[1 - q, q] for q in results[i].probs] for i in idx])  # (B, G, 2)
        distances += score_distance(reasoner, scores.float().cpu()).flatten().tolist()  # (N,)
        correct += [(q != 0.5 and (q > 0.5) == (dataset.compared[i].label == 1)) for i in idx for q in results[i].probs]
    return {"bins": accuracy_by_bin(distances, correct),
            "mean_distance": statistics.fmean(distances) if distances else None}


# ----------------------------------------------------------------------------------------------------------
# Contradiction judge (table 4)

JUDGE_SYSTEM = ("You are an expert factual verifier. Determine whether the model's final answer contradicts its "
                "reasoning. Reply with the single word YES if it contradicts, otherwise NO. Answer only YES or NO.")


def judge_messages(reasoning: str, answer: str) -> list[dict]:
    """The paper's system prompt, then the reasoning and the final answer."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Reasoning:\n{reasoning.strip()}\n\nFinal answer: {answer}"}]


def judge_margins(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                  batch_size: int = 8) -> list[float]:
    """logit("YES") - logit("NO") of the judge's next token (first token of each word), one per item."""
    if len(reasonings) != len(answers):
        raise ValueError(f"{len(reasonings)} reasonings but {len(answers)} answers")
    yes, no = (judge_tokenizer.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO"))
    if yes == no:
        raise ValueError("the judge's tokenizer starts YES and NO with the same token")
    pad = judge_tokenizer.pad_token_id if judge_tokenizer.pad_token_id is not None else judge_tokenizer.eos_token_id
    device = next(judge_model.parameters()).device
    margins = []
    for start in range(0, len(reasonings), batch_size):
        rows = [judge_tokenizer.apply_chat_template(judge_messages(r, a), tokenize=False, add_generation_prompt=True)
                for r, a in zip(reasonings[start:start + batch_size], answers[start:start + batch_size])]
        batch = left_pad([judge_tokenizer(t, add_special_tokens=False)["input_ids"] for t in rows], pad)
        mask = batch["attention_mask"].to(device)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) each row counts from its first real token
        with torch.no_grad():
            logits = judge_model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                 position_ids=positions, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        margins += (logits[:, yes] - logits[:, no]).tolist()
    return margins


def judge_verdicts(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                   batch_size: int = 8) -> list[bool]:
    """True where the judge says YES (the answer contradicts the reasoning): logit(YES) > logit(NO)."""
    return [m > 0 for m in judge_margins(judge_model, judge_tokenizer, reasonings, answers, batch_size)]


def contradiction_rate(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                       batch_size: int = 8) -> float:
    """Table 4: the fraction of (reasoning, answer) pairs the judge calls contradictory."""
    verdicts = judge_verdicts(judge_model, judge_tokenizer, reasonings, answers, batch_size)
    return statistics.fmean(verdicts) if verdicts else math.nan


def make_toy_judge(tokenizer, seed: int = 0):
    """A tiny random `Qwen2ForCausalLM` over `tokenizer`: the judge of table 4 with nothing downloaded.

    Weights drawn wider than usual (std 0.3) so that its verdict depends on what it reads.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval()

