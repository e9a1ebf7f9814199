"""Evaluation: a checkpoint -> the paper's numbers (tables 2-5, figures 2-4), and a reward model people can use.

Scoring (sections 4.2 and 5). For a pair (a, b) the reasoner writes k reasonings (sample.py); for each one we
read the probability that b is preferred from its answer logits given that reasoning, eq. (4),
p(b | C) = sigma(f(b | C) - f(a | C)), and average over the k rollouts (Mean@k). A group of n images is scored
against an anchor: the anchor gets 0.5 and every other image its probability of beating the anchor, n - 1
comparisons instead of n (n - 1) / 2 (section 5).

Metrics (pure functions, below): pairwise accuracy over a group's untied pairs (micro as ImageReward's test
script, macro per prompt as the HPSv2 evaluation), pair accuracy, the Rapidata binarized subset and accuracy by
human agreement (figure 3), Mean@j and majority vote (table 2, figure 4), expected calibration error,
listener-reasoner disagreement (figure 2), the "no thinking" ablation (table 5) and the contradiction rate
from a text judge (table 4).

Commands (`--model` is any local Qwen2.5-VL checkpoint directory: a trained reasoner, or the untrained
instruct model for the zero-shot row of table 3; every option: `python evaluate.py --help`):

    python evaluate.py                                    # toy model on toy data, nothing downloaded
    python evaluate.py --model PATH --data imagereward:test.json --images ROOT --out runs/eval --k 3
    torchrun --nproc_per_node=8 evaluate.py --model PATH --data rapidata:a.parquet,b.parquet --out runs/ood \\
        --k 3 --both-orders --no-thinking --listener /models/Qwen2.5-VL-7B-Instruct --judge /models/Qwen2.5-14B-Instruct
    python evaluate.py --model PATH --scoring absolute --data imagereward:test.json --images ROOT --k 3  # --mode=score
    python evaluate.py --model PATH --prompt "a red circle" --images a.png b.png c.png   # reward-model use

Under torchrun each process holds the whole model and takes every N-th comparison; each pair's rollouts are
seeded by (--seed, its index), so N processes give exactly what one gives. Rank 0 runs the listener (figure 2)
and the judge (table 4) on its own and writes the outputs.

Choices the paper leaves open, made here:
1. Mean@k averages probabilities (not logits). Majority vote counts the parsed answers of well-formed
   rollouts; a tie, or no readable answer, scores 0.5, which every metric counts as wrong.
2. The anchor is drawn per prompt from a seeded generator (`--anchor=-1`, the default) or fixed (`--anchor=i`).
3. `--both-orders` (beyond the paper) also shows every pair as (b, a) and averages p(b) with 1 - p(a), which
   removes position bias; both numbers are reported.
4. Tables 4 and 5 use, where the data has votes, the most confident pairs with at least 20 votes
   (`--confident-top`, `--min-votes`); otherwise every pair with a human preference.
5. The judge of table 4 is read, not sampled: it says YES when its next-token logit for the first token of
   "YES" exceeds that of "NO" after the chat template's generation prompt. It judges every well-formed
   rollout (a reasoning and a readable answer) of the pairs of table 5; it reads the reasoning, then
   "Final answer: 1 (the first image)" or "... 2 (the second image)".
6. Expected calibration error bins the confidence max(p, 1 - p) in equal-width bins over [0, 1] (Guo et al.
   2017); the "±" of table 5 is a 95% normal interval, 1.96 sqrt(acc (1 - acc) / n), which is the paper's
   1.2 points at n = 5139 and 72%.
7. Figure 2 is drawn per rollout: the distance between the listener's and the reasoner's (s1, s2) for the
   same reasoning, and whether that rollout's p(b) orders the pair as people do.

Legend for shapes: B pairs, G = k rollouts per pair, N = B*G, T tokens, V vocabulary.
Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import cli
import data
from cli import fail, option
from data import PROMPT, Group, Pair, PromptFormat, left_pad, swapped
from listener import Listener, answer_probs, answer_slots, answer_token_ids, reasoning_of
from reward import parse_completion
from sample import sample as sample_rollouts, stop_token_ids

# ----------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Comparison:
    """The reasoner's verdict on one pair shown as (a, b)."""
    p_b: float  # probability that b is preferred: Mean@k, and averaged over both orders when asked
    probs: list[float]  # p(b) given each rollout's reasoning, eq. (4)
    texts: list[str]  # each rollout's completion
    reasonings: list[str]  # what the answer was read after (the listener reads the same)
    answers: list[int | None]  # each rollout's parsed answer as an image index, None when unreadable
    vote: int | None  # majority vote of `answers`, None on a tie or when no answer is readable
    reversed: Comparison | None = None  # the same pair shown as (b, a), in that order's own terms

    @property
    def p_forward(self) -> float:
        """Mean@k p(b) from the (a, b) order alone."""
        return statistics.fmean(self.probs)


def answer_index(answer: str | None, fmt: PromptFormat = PROMPT) -> int | None:
    """A parsed answer ("1"/"2") -> the index of the image it names (0/1); None stays None."""
    return None if answer is None else fmt.answers.index(answer)


def majority(answers: Sequence[int | None]) -> int | None:
    """The image most rollouts chose; None on a tie or when no rollout gave a readable answer."""
    share = vote_share(answers)
    return None if share == 0.5 else int(share > 0.5)


def vote_share(answers: Sequence[int | None]) -> float:
    """Fraction of readable answers that name image 1; 0.5 when none is readable (a tie: counted wrong)."""
    readable = [a for a in answers if a is not None]
    return sum(readable) / len(readable) if readable else 0.5


def sampled_p_b(processor, pairs: list[Pair], texts: list[str], rollouts, fmt: PromptFormat) -> torch.Tensor:
    """(B, G) p(b) read from the sampler's own answer logits, NaN where it cannot be.

    Where a completion's first tokens are exactly what the second pass would read (`listener_prefix` of its
    reasoning, as the tokenizer writes it: `listener.answer_slots`), the logits the sampler computed at that
    slot are the second pass's, so eq. (4) is read from them with no second prefill.
    """
    slots = answer_slots(processor.tokenizer, pairs, texts, rollouts.tokens, rollouts.mask, fmt).cpu()  # (N,)
    watched = rollouts.watched.cpu()  # (N, T, 2)
    ok = (slots >= 0) & (slots < watched.shape[1])  # (N,)
    rows = torch.arange(len(slots))
    p = watched[rows, slots.clamp(0, watched.shape[1] - 1)].softmax(-1)[:, 1]  # (N,) eq. (4)
    return torch.where(ok, p, torch.nan).view(len(pairs), -1)  # (B, G)


def _compare_batch(model, processor, pairs: list[Pair], k: int, no_thinking: bool, sampling: dict,
                   fmt: PromptFormat, reuse: bool = True) -> list[Comparison]:
    """k rollouts per pair, then p(b) given each rollout's reasoning, read by the reasoner itself (eq. (4))."""
    if no_thinking:  # table 5: the reasoning is a fixed sentence, so one "rollout" says everything
        reasonings = [[fmt.no_thinking] for _ in pairs]
        texts = [[fmt.answer_prefix(fmt.no_thinking)] for _ in pairs]
        answers = None  # read from the probabilities below: the answer the model would give greedily
    else:
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in processor.pairs(pairs, fmt).items()}
        answer_ids = answer_token_ids(processor.tokenizer, fmt) if reuse else None
        rollouts = sample_rollouts(model, batch, num_samples=k, watch_ids=answer_ids, **sampling)  # rows b*G + g
        flat = rollouts.texts(processor.tokenizer)  # N strings, each up to its stop token
        texts = [flat[b * k:(b + 1) * k] for b in range(len(pairs))]
        reasonings = [[reasoning_of(t) for t in row] for row in texts]
        answers = [[answer_index(parse_completion(t, fmt)[1], fmt) for t in row] for row in texts]
    p_b = sampled_p_b(processor, pairs, flat, rollouts, fmt) if reuse and not no_thinking else None  # (B, G)
    if p_b is None or bool(p_b.isnan().any()):  # a second pass where the sampler did not read the answer slot
        probs = answer_probs(model, processor, pairs, reasonings, fmt=fmt)  # (B, G, 2)
        read = probs[..., 1].float().cpu()  # (B, G) eq. (4): sigma(f(b) - f(a)) = softmax over the two answers
        p_b = read if p_b is None else torch.where(p_b.isnan(), read, p_b)
    out = []
    for b in range(len(pairs)):
        row = p_b[b].tolist()
        row_answers = answers[b] if answers is not None else [None if p == 0.5 else int(p > 0.5) for p in row]
        out.append(Comparison(statistics.fmean(row), row, texts[b], reasonings[b], row_answers, majority(row_answers)))
    return out


def compare_pairs(model, processor, pairs: Sequence[Pair], k: int = 1, both_orders: bool = False,
                  no_thinking: bool = False, max_new_tokens: int = 512, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, generator: torch.Generator | None = None,
                  seeds: Sequence[int] | None = None, fmt: PromptFormat = PROMPT,
                  progress: bool = False, reuse_logits: bool = True) -> list[Comparison]:
    """The batched core: one `Comparison` per pair, p_b = Mean@k probability that image 1 is preferred.

    With `both_orders`, each pair is also shown as (b, a), next to its forward order in the same batch, and
    p_b = (Mean@k p(b | a, b) + 1 - Mean@k p(a | b, a)) / 2; the forward order alone stays in `p_forward`.
    With `no_thinking` nothing is sampled: the reasoning is `fmt.no_thinking` (table 5).
    p(b) is read from the sampler's own logits at the answer slot where it can be (`sampled_p_b`), else by a
    second pass over prompt + reasoning (`reuse_logits=False`: always the second pass).
    `seeds` (one per pair) seed each pair's rollouts on their own, so that a pair's result does not depend on
    the batch or the process it lands in (`compare_all`); otherwise `generator` drives the whole run.
    """
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_token_ids=stop_token_ids(processor.tokenizer), generator=generator,
                    pad_token_id=processor.tokenizer.pad_token_id)  # never the model config's: real ones have none
    shown = [q for p in pairs for q in ((p, swapped(p)) if both_orders else (p,))]
    shown_seeds = None if seeds is None else [2 * s + o for s in seeds for o in ((0, 1) if both_orders else (0,))]
    device = next(model.parameters()).device
    results = []
    with tqdm(total=len(shown), desc="compare", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(shown), batch_size):
            if shown_seeds is not None:  # one generator per pair shown: its G rollouts draw from it alone
                sampling["generator"] = [torch.Generator(device).manual_seed(s)
                                         for s in shown_seeds[start:start + batch_size]]
            results += _compare_batch(model, processor, list(shown[start:start + batch_size]), k, no_thinking,
                                      sampling, fmt, reuse_logits)
            bar.update(len(shown[start:start + batch_size]))  # pairs/s and the time left, from tqdm
    if not both_orders:
        return results
    out = []
    for forward, backward in zip(results[0::2], results[1::2]):
        forward.reversed = backward
        forward.p_b = both_orders_p(forward.probs, backward.probs)
        out.append(forward)
    return out


def both_orders_p(forward_probs: Sequence[float], backward_probs: Sequence[float]) -> float:
    """Mean of p(b) shown as (a, b) and 1 - p(a) shown as (b, a): the position-debiased p(b)."""
    return (statistics.fmean(forward_probs) + 1.0 - statistics.fmean(backward_probs)) / 2


def compare(model, processor, prompt: str, image_a, image_b, k: int = 1, **kwargs) -> Comparison:
    """Which of two images people would prefer for `prompt`: `.p_b` is the Mean@k probability for image b."""
    return compare_pairs(model, processor, [Pair(prompt, (image_a, image_b), label=0)], k=k, **kwargs)[0]


def anchor_pairs(prompt: str, images: Sequence, anchor: int, ranking: Sequence[int] | None = None) -> list[Pair]:
    """The n - 1 pairs (anchor, image_i), i != anchor; label 1 when people ranked image i above the anchor."""
    if not 0 <= anchor < len(images):
        raise ValueError(f"anchor {anchor} is not an index into {len(images)} images")
    return [Pair(prompt, (images[anchor], images[i]), int(ranking is not None and ranking[i] < ranking[anchor]))
            for i in range(len(images)) if i != anchor]


def anchor_scores(n: int, anchor: int, p_beats_anchor: Sequence[float]) -> list[float]:
    """Section 5: the anchor scores 0.5, image i its probability of beating the anchor (n - 1 values in order)."""
    if len(p_beats_anchor) != n - 1:
        raise ValueError(f"{n} images need {n - 1} anchor comparisons, got {len(p_beats_anchor)}")
    scores = list(p_beats_anchor)
    scores.insert(anchor, 0.5)
    return scores


def score_group(model, processor, prompt: str, images: Sequence, k: int = 1, anchor: int = 0, **kwargs) -> list[float]:
    """A score per image from n - 1 batched comparisons against `images[anchor]`; higher is preferred."""
    results = compare_pairs(model, processor, anchor_pairs(prompt, images, anchor), k=k, **kwargs)
    return anchor_scores(len(images), anchor, [r.p_b for r in results])


# ----------------------------------------------------------------------------------------------------------
# Metrics: pure functions of scores and human labels


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


def mean_at(probs: Sequence[float], j: int) -> float:
    """Mean@j: the average p(b) over the first j rollouts."""
    return statistics.fmean(probs[:j])


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


def interval95(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on n items (the ± of table 5)."""
    return 1.96 * math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan


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


# ----------------------------------------------------------------------------------------------------------
# Loading models and data


@dataclass
class Config:
    """Every option of `evaluate.py`: `--name=value` or `--name value` (dashes or underscores), `--help` lists them."""
    model: str = option("toy", "reasoner checkpoint (a local Qwen2.5-VL directory with safetensors weights); the "
                               "untrained instruct model gives the zero-shot row of table 3; 'toy' builds the tiny "
                               "random model and, without --data, toy data")
    data: str = option("", "imagereward:JSON | hpdv2:JSON | rapidata:P1,P2 | pickapic:P (see data.load)")
    images: list = option([], "image root of --data; with --prompt, the image files to score")
    prompt: str = option("", "score --images for this prompt and print the best one (reward-model use)")
    out: str = option("runs/eval", "folder for results.json, results.md, rollouts.jsonl and the figures")
    k: int = option(1, "reasoning rollouts per comparison (Mean@k, majority vote)", min=1)
    both_orders: bool = option(False, "also compare (b, a) and average with 1 - p: removes position bias")
    no_thinking: bool = option(False, "also run the table 5 ablation: the reasoning replaced by a fixed sentence")
    listener: str = option("", "frozen listener checkpoint for figure 2 ('toy': a second random toy model)")
    judge: str = option("", "causal LM judging contradictions for table 4 ('toy': a tiny random Qwen2)")
    limit: int = option(0, "evaluate the first N records of --data (0: all)", min=0)
    skip_bad: bool = option(False, "leave out bad records and unreadable images, counted in results.json")
    exclude: str = option("", "records to leave out: the file `python data.py check` writes")
    anchor: int = option(-1, "anchor image index per prompt; -1 draws one per prompt from --seed", min=-1)
    max_new_tokens: int = option(512, "reasoning length cap", min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts (0: greedy)", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    batch_size: int = option(8, "pairs per batch (each gives k rollouts)", min=1)
    judge_batch_size: int = option(8, "judge prompts per batch", min=1)
    min_pixels: int = option(0, "image processor min_pixels (0: the checkpoint's)", min=0)
    max_pixels: int = option(0, "image processor max_pixels (0: the checkpoint's); bounds the image tokens", min=0)
    min_votes: int = option(20, "tables 4 and 5: pairs with at least this many votes ...", min=0)
    confident_top: int = option(5139, "... and, of those, the most confident N (the paper's 5139; 0: all)", min=0)
    toy_prompts: int = option(6, "prompts in the toy test set written when --model toy has no --data", min=1)
    seed: int = option(0, "seed of the anchors and of the sampler", min=0)
    scoring: str = option("pairwise", "pairwise: each image against an anchor, eq. (4); absolute: each image rated "
                                      "alone, its expected rating, eq. (3) (checkpoints of train.py --mode=score; "
                                      "table 3's abs-score row)", choices=("pairwise", "absolute"))

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        for name in ("model", "listener", "judge"):
            if getattr(self, name) not in ("", "toy"):
                cli.check_checkpoint(name, getattr(self, name))
        if self.prompt:
            if len(self.images) < 2:
                fail("images", self.images, "at least two image files to compare with --prompt")
            for path in self.images:
                if not Path(path).is_file():
                    fail("images", self.images, f"image files that exist ({path} does not)")
            if self.anchor >= len(self.images):
                fail("anchor", self.anchor, f"-1 or an index below the {len(self.images)} --images")
            return
        if self.data:
            cli.check_dataset("data", self.data)
        elif self.model != "toy":
            fail("data", self.data, "a dataset with a real --model (e.g. --data imagereward:test.json), or --prompt")
        if len(self.images) > 1:
            fail("images", self.images, "one image root with --data (several files only with --prompt)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            fail("min_pixels", self.min_pixels, f"at most --max_pixels={self.max_pixels}")


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """The command line -> a checked Config (cli.py: `--name=value` or `--name value`, `--help`)."""
    return cli.parse(Config, argv, __doc__)


def device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


@functools.lru_cache(maxsize=1)
def toy_processor():
    """The toy processor, built once per process (training its tokenizer takes a second or two)."""
    return data.Processor.toy()


def load_reasoner(path: str, cfg: Config, seed: int = 0):
    """A Qwen2.5-VL checkpoint (reasoner or listener) and its processor; 'toy' builds a random toy model."""
    device, dtype = device_and_dtype()
    if path == "toy":
        import toy
        processor = toy_processor()
        return toy.make_model(processor.tokenizer, seed=seed).to(device), processor
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               local_files_only=True).to(device).eval()
    return model, data.Processor.from_pretrained(path, cfg.min_pixels or None, cfg.max_pixels or None)


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


def load_judge(path: str):
    """(model, tokenizer) of any causal LM with a chat template; 'toy' gives `make_toy_judge`."""
    device, dtype = device_and_dtype()
    if path == "toy":
        tokenizer = toy_processor().tokenizer
        return make_toy_judge(tokenizer).to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_records(cfg: Config, scratch: str) -> tuple[str, list, int]:
    """(spec, records, unreadable images left out) of --data; with --model toy and no --data, a toy ImageReward
    test set under `scratch`. With --skip_bad every image is decoded first, and a pair with an unreadable image
    (or that image of a group) is left out."""
    spec, root = cfg.data, (cfg.images[0] if cfg.images else None)
    if not spec:
        if cfg.model != "toy":
            raise ValueError("--data is required with a real --model (e.g. --data imagereward:test.json)")
        import toy
        paths = toy.write_dataset(scratch, n_train=0, n_test=cfg.toy_prompts, seed=cfg.seed)
        spec, root = f"imagereward:{paths['test']}", str(paths["test_images"])
    records = list(data.load(spec, root, skip_bad=cfg.skip_bad, exclude=cfg.exclude))
    records = records[:cfg.limit] if cfg.limit else records
    return (spec, *data.drop_unreadable(records)) if cfg.skip_bad else (spec, records, 0)


# ----------------------------------------------------------------------------------------------------------
# One evaluation: compare, then every metric the data allows


@dataclass
class Plan:
    """What gets compared for a dataset: pairs, or each group's anchor pairs, and how to score the result."""
    compared: list[Pair]  # the comparisons to run
    labelled: list[int]  # indices into `compared` that carry a human preference (no tie)
    groups: list[Group] | None = None  # group datasets: the groups, and each group's anchor
    anchors: list[int] | None = None

    def accuracy(self, p: Sequence[float]) -> dict:
        """Headline accuracy for one p(b) per comparison: pairwise (micro/macro) for groups, pair accuracy else."""
        if self.groups is None:
            return {"accuracy": pair_accuracy(self.compared, p), "pairs": len(self.compared)}
        scores, start = [], 0
        for group, anchor in zip(self.groups, self.anchors):
            n = len(group.images)
            scores.append(anchor_scores(n, anchor, p[start:start + n - 1]))
            start += n - 1
        result = pairwise_accuracy(self.groups, scores)
        return {"accuracy": result["micro"], **result}


def plan(records: list, anchor: int, seed: int) -> Plan:
    """Pairs are compared as they are; a group of n images becomes n - 1 comparisons against its anchor.

    Groups of fewer than two images have nothing to compare: they are left out, and counted on stderr. A fixed
    `anchor` must index into every group that is left.
    """
    if not records:
        raise ValueError("the dataset is empty")
    if isinstance(records[0], Pair):
        return Plan(records, list(range(len(records))))
    single = sum(len(g.images) < 2 for g in records)
    if single:
        print(f"{single} of {len(records)} groups have fewer than two images: nothing to compare, left out",
              file=sys.stderr)
        records = [g for g in records if len(g.images) >= 2]
        if not records:
            raise ValueError("no group of the dataset has two images to compare")
    smallest = min(range(len(records)), key=lambda i: len(records[i].images))
    if anchor >= len(records[smallest].images):
        fail("anchor", anchor, f"-1 (a seeded anchor per prompt) or an index below {len(records[smallest].images)}: "
             f"group {smallest} ({records[smallest].prompt[:40]!r}) has {len(records[smallest].images)} images")
    rng = random.Random(seed)
    anchors = [anchor if anchor >= 0 else rng.randrange(len(g.images)) for g in records]
    compared, labelled = [], []
    for group, a in zip(records, anchors):
        others = [i for i in range(len(group.images)) if i != a]
        labelled += [len(compared) + n for n, i in enumerate(others) if group.ranking[i] != group.ranking[a]]
        compared += anchor_pairs(group.prompt, group.images, a, group.ranking)
    return Plan(compared, labelled, records, anchors)


def variants(results: Sequence[Comparison], k: int) -> dict[str, list[float]]:
    """Named ways to turn the rollouts into one p(b) per comparison: Mean@j, Vote@j (j <= k), both orders."""
    out = {}
    for j in range(1, k + 1):
        out[f"mean@{j}"] = [mean_at(r.probs, j) for r in results]
        out[f"vote@{j}"] = [vote_share(r.answers[:j]) for r in results]
        if results and results[0].reversed is not None:
            out[f"mean@{j} both orders"] = [both_orders_p(r.probs[:j], r.reversed.probs[:j]) for r in results]
    return out


def focus(p: Plan, min_votes: int, top: int) -> list[int]:
    """Tables 4-5: the most confident pairs with enough votes when the data has votes, else every labelled one."""
    if all(p.compared[i].votes is not None for i in p.labelled) and p.groups is None and p.labelled:
        return confident(p.compared, min_votes, top or None)
    return p.labelled


def knobs(cfg: Config) -> dict:
    """The sampling arguments of `compare_pairs`, with a seeded generator on the model's device."""
    generator = torch.Generator(device_and_dtype()[0]).manual_seed(cfg.seed)
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                batch_size=cfg.batch_size, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# The absolute-score variant (section 5): each image rated alone, scored by its expected rating, eq. (3)


def rating_logits(model, processor, records: Sequence[data.Rated], reasonings: Sequence[Sequence[str]],
                  fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(B, G, R) logits of the R rating tokens at the answer slot, given each of the G reasonings of record b.

    As `listener.answer_probs`, on the rating prompt: one prefill per image, copied to its G continuations.
    """
    import sample
    from listener import answer_token_ids, continuation_ids
    tokenizer, B, G = processor.tokenizer, len(records), len(reasonings[0])
    ids = answer_token_ids(tokenizer, dataclasses.replace(fmt, answers=fmt.ratings))  # one token per rating
    rows = []
    for record, rs in zip(records, reasonings):
        prompt = tokenizer.apply_chat_template(data.score_messages(record.prompt, fmt), tokenize=False,
                                               add_generation_prompt=True)
        rows += continuation_ids(tokenizer, prompt, [fmt.answer_prefix(r) for r in rs])
    continuation = left_pad(rows, tokenizer.pad_token_id)  # (N, T)
    device = sample.model_device(model)
    with torch.no_grad(), sample.gathered(model):
        prefix = sample.expand(sample.prefill(model, processor.rated(records, fmt)), G)  # B rows -> N rows
        sample.extend(model, prefix, continuation["input_ids"].to(device), continuation["attention_mask"].to(device),
                      logits_to_keep=1)
    return prefix.logits[:, ids].float().view(B, G, -1)  # (B, G, R)


def rate_images(model, processor, records: Sequence[data.Rated], k: int, seeds: Sequence[int], batch_size: int,
                fmt: PromptFormat = PROMPT, progress: bool = False, **sampling) -> list[list[float]]:
    """k rollouts of the rating prompt per image, then the expected rating given each reasoning (eq. (3)):
    one list of k expected ratings per record. `seeds` (one per record) seed each record's rollouts."""
    from reward import expected_score
    device = next(model.parameters()).device
    sampling.update(stop_token_ids=stop_token_ids(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    out = []
    with tqdm(total=len(records), desc="rate", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start:start + batch_size])
            batch = {key: v.to(device) for key, v in processor.rated(chunk, fmt).items()}
            generators = [torch.Generator(device).manual_seed(s) for s in seeds[start:start + batch_size]]
            texts = sample_rollouts(model, batch, num_samples=k, generator=generators, **sampling).texts(processor.tokenizer)
            reasonings = [[reasoning_of(t, fmt) for t in texts[b * k:(b + 1) * k]] for b in range(len(chunk))]
            logits = rating_logits(model, processor, chunk, reasonings, fmt)  # (B, G, R)
            out += expected_score(logits, fmt.ratings).cpu().tolist()  # (B, G) eq. (3)
            bar.update(len(chunk))
    return out


def absolute_scores(records: list, cfg: Config, model, processor) -> tuple[list, list[list[float]]]:
    """Every image of the dataset rated (split over the processes): (the rated images, their k expected ratings).
    A group's images come in order; a pair gives its two images."""
    items = [data.Rated(r.prompt, im, 0) for r in records for im in r.images]
    rank, world = distributed()
    mine = list(range(rank, len(items), world))
    scores = rate_images(model, processor, [items[i] for i in mine], cfg.k, [hash((cfg.seed, i)) % 2**62 for i in mine],
                         cfg.batch_size, progress=rank == 0, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    if world > 1:
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, list(zip(mine, scores)))
        scores = [s for _, s in sorted(x for part in parts for x in part)]
    return items, scores


def absolute_report(records: list, scores: list[list[float]], k: int) -> dict:
    """Table 3's abs-score row: accuracy of the Mean@j expected ratings (j <= k), pairwise for groups (micro and
    macro) and per pair for pairs (a tie is wrong, as everywhere)."""
    accuracy = {}
    for j in range(1, k + 1):
        flat = [mean_at(s, j) for s in scores]
        per_record, start = [], 0
        for r in records:
            per_record.append(flat[start:start + len(r.images)])
            start += len(r.images)
        if isinstance(records[0], Group):
            result = pairwise_accuracy(records, per_record)
            accuracy[f"mean@{j}"] = {"accuracy": result["micro"], **result}
        else:
            p_b = [0.5 if s[0] == s[1] else float(s[1] > s[0]) for s in per_record]
            accuracy[f"mean@{j}"] = {"accuracy": pair_accuracy(records, p_b), "pairs": len(records)}
    return {"scoring": "absolute", "layout": "groups" if isinstance(records[0], Group) else "pairs",
            "records": len(records), "images": sum(len(r.images) for r in records), "k": k, "accuracy": accuracy}


def run_absolute(cfg: Config, spec: str, records: list) -> dict | None:
    """The absolute-score evaluation: rate every image, rank each group by expected rating, write the outputs."""
    model, processor = load_reasoner(cfg.model, cfg)
    items, scores = absolute_scores(records, cfg, model, processor)
    if distributed()[0] != 0:
        return None
    report = {"model": cfg.model, "data": spec, **absolute_report(records, scores, cfg.k), "config": dataclasses.asdict(cfg)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    (out / "results.md").write_text(markdown_tables(report))
    with open(out / "ratings.jsonl", "w") as f:
        for item, s in zip(items, scores):
            f.write(json.dumps({"prompt": item.prompt, "image": item.image if isinstance(item.image, str) else None,
                                "expected_ratings": s}) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N evaluate.py ...` splits the comparisons N ways


def distributed() -> tuple[int, int]:
    """(rank, world size): joins torchrun's process group when launched by torchrun, else (0, 1)."""
    import os
    import torch.distributed as dist
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def compare_all(model, processor, pairs: Sequence[Pair], seed: int, **kwargs) -> list[Comparison]:
    """`compare_pairs` on every pair, split over the processes (rank r takes pairs r, r + N, ...); every rank
    gets all the results. Pair i's rollouts are seeded by (seed, i), so 1 and N processes give the same."""
    rank, world = distributed()
    mine = list(range(rank, len(pairs), world))
    seeds = [hash((seed, i)) % 2**62 for i in mine]
    results = compare_pairs(model, processor, [pairs[i] for i in mine], seeds=seeds, progress=rank == 0, **kwargs)
    if world == 1:
        return results
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, list(zip(mine, results)))
    out = [None] * len(pairs)
    for part in parts:
        for i, r in part:
            out[i] = r
    return out


def vote_metrics(p: Plan, probs: dict[str, list[float]]) -> dict:
    """Rapidata: binarized accuracy and accuracy by agreement threshold (figure 3), for each variant."""
    if p.groups is not None or any(pair.votes is None for pair in p.compared):
        return {}
    keep = binarized(p.compared)
    sub = [p.compared[i] for i in keep]
    return {"binarized": {name: {"accuracy": pair_accuracy(sub, [v[i] for i in keep]), "pairs": len(keep)}
                          for name, v in probs.items()},
            "by_agreement": {name: accuracy_by_agreement(p.compared, v) for name, v in probs.items()
                             if name.startswith("mean@")}}


def no_thinking_metrics(model, processor, p: Plan, results, subset: list[int], cfg: Config) -> dict:
    """Table 5: accuracy with and without the reasoning on the same pairs."""
    pairs = [p.compared[i] for i in subset]
    plain = compare_all(model, processor, pairs, cfg.seed, both_orders=cfg.both_orders, no_thinking=True,
                        batch_size=cfg.batch_size)
    rows = {"w/ thinking, Mean@1": [mean_at(results[i].probs, 1) for i in subset],
            f"w/ thinking, Mean@{cfg.k}": [results[i].p_forward for i in subset],
            "w/o thinking": [r.p_forward for r in plain]}
    if cfg.both_orders:
        rows[f"w/ thinking, Mean@{cfg.k}, both orders"] = [results[i].p_b for i in subset]
        rows["w/o thinking, both orders"] = [r.p_b for r in plain]
    table = {}
    for name, v in rows.items():
        accuracy = pair_accuracy(pairs, v)
        table[name] = {"accuracy": accuracy, "pm95": interval95(accuracy, len(pairs)), "pairs": len(pairs)}
    return table


def disagreement_metrics(listener_model, listener_processor, p: Plan, results, cfg: Config) -> dict:
    """Figure 2: per rollout, ||listener (s1, s2) - reasoner (s1, s2)|| for the same reasoning, binned."""
    listener = Listener(listener_model, listener_processor)
    distances, correct = [], []
    for start in tqdm(range(0, len(p.labelled), cfg.batch_size), desc="listener"):
        idx = p.labelled[start:start + cfg.batch_size]
        scores = listener.scores([p.compared[i] for i in idx], [results[i].reasonings for i in idx])  # (B, G, 2)
        reasoner = torch.tensor([[[1 - q, q] for q in results[i].probs] for i in idx])  # (B, G, 2)
        distances += score_distance(reasoner, scores.float().cpu()).flatten().tolist()  # (N,)
        correct += [(q != 0.5 and (q > 0.5) == (p.compared[i].label == 1)) for i in idx for q in results[i].probs]
    return {"bins": accuracy_by_bin(distances, correct),
            "mean_distance": statistics.fmean(distances) if distances else None}


def contradiction_metrics(judge_path: str, results, subset: list[int], cfg: Config, fmt: PromptFormat = PROMPT) -> dict:
    """Table 4: fraction of well-formed rollouts whose answer the judge finds contradicts their reasoning."""
    items = [parse_completion(t, fmt) for i in subset for t in results[i].texts]
    items = [(r, f"{a} (the {'first' if a == fmt.answers[0] else 'second'} image)") for r, a in items if a is not None]
    if not items:
        return {"rate": None, "judged": 0}
    judge_model, judge_tokenizer = load_judge(judge_path)
    rate = contradiction_rate(judge_model, judge_tokenizer, [r for r, _ in items], [a for _, a in items],
                              cfg.judge_batch_size)
    return {"rate": rate, "judged": len(items)}


def run(cfg: Config) -> dict | None:
    """Evaluate `cfg.model` on `cfg.data`; write results.json, results.md, rollouts.jsonl and figures to `cfg.out`.

    Under torchrun the comparisons are split over the processes; rank 0 computes the metrics, runs the
    listener and the judge, writes the outputs and returns the report (the other ranks return None).
    """
    torch.manual_seed(cfg.seed)
    rank, _ = distributed()
    with tempfile.TemporaryDirectory() as scratch:  # the toy data lives here while it is read
        spec, records, unreadable = load_records(cfg, scratch)
        if cfg.scoring == "absolute":
            return run_absolute(cfg, spec, records)
        p = plan(records, cfg.anchor, cfg.seed)  # the data is checked before the model loads
        model, processor = load_reasoner(cfg.model, cfg)
        sampling = {k: v for k, v in knobs(cfg).items() if k != "generator"}
        results = compare_all(model, processor, p.compared, cfg.seed, k=cfg.k, both_orders=cfg.both_orders, **sampling)
        subset = focus(p, cfg.min_votes, cfg.confident_top)
        plain = no_thinking_metrics(model, processor, p, results, subset, cfg) if cfg.no_thinking else None
        if rank != 0:
            return None
        probs = variants(results, cfg.k)
        report = {"model": cfg.model, "data": spec, "layout": "pairs" if p.groups is None else "groups",
                  "records": len(records), "unreadable_images": unreadable, "comparisons": len(p.compared), "k": cfg.k,
                  "well_formed": statistics.fmean(a is not None for r in results for a in r.answers),
                  "accuracy": {name: p.accuracy(v) for name, v in probs.items()},
                  "ece": expected_calibration_error([results[i].p_b for i in p.labelled],
                                                    [p.compared[i].label for i in p.labelled]),
                  **vote_metrics(p, probs)}
        if plain is not None:
            report["no_thinking"] = plain
        if cfg.listener:
            report["disagreement"] = disagreement_metrics(*load_reasoner(cfg.listener, cfg, seed=1), p, results, cfg)
        if cfg.judge:
            report["contradiction"] = contradiction_metrics(cfg.judge, results, subset, cfg)
    report["config"] = dataclasses.asdict(cfg)
    write_outputs(Path(cfg.out), report, p, results)
    return report


# ----------------------------------------------------------------------------------------------------------
# Outputs: results.json, results.md (the layout of tables 2-5), rollouts.jsonl, figures 2-4 as PNG


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown_tables(report: dict) -> str:
    """The report as markdown tables laid out like the paper's tables 2-5 (and the data of figures 2-3)."""
    if report.get("scoring") == "absolute":
        name, k, acc = Path(report["model"]).name or report["model"], report["k"], report["accuracy"]
        lines = [f"# {name} on {report['data']} (absolute scores, eq. (3))", "",
                 f"{report['records']} records, {report['images']} images rated, k = {k}", "",
                 "## Table 3: accuracy", ""]
        return "\n".join(lines + _table(["Method", "Accuracy (%)", "Pairs"],
                                         [[f"{name} (abs score), Mean@{j}", _pct(acc[f"mean@{j}"]["accuracy"]),
                                           acc[f"mean@{j}"]["pairs"]] for j in range(1, k + 1)])) + "\n"
    name, k, acc = Path(report["model"]).name or report["model"], report["k"], report["accuracy"]
    orders = [""] + ([" both orders"] if "mean@1 both orders" in acc else [])
    mk = lambda o: acc[f"mean@{k}" + o]  # Mean@k accuracy of one order setting
    lines = [f"# {name} on {report['data']}", "",
             f"{report['records']} records, {report['comparisons']} comparisons, k = {k}, "
             f"{_pct(report['well_formed'])}% of rollouts well formed, ECE {report['ece']:.3f}", "",
             "## Table 2: Mean@1 vs Mean@k (and majority vote)", ""]
    lines += _table(["Model", "Mean@1 (%)", f"Mean@{k} (%)", f"Vote@{k} (%)"],
                    [[name + o, _pct(acc["mean@1" + o]["accuracy"]), _pct(mk(o)["accuracy"]),
                      "-" if o else _pct(acc[f"vote@{k}"]["accuracy"])] for o in orders])
    lines += ["", "## Table 3: accuracy", ""]
    if report["layout"] == "groups":
        lines += _table(["Method", "Accuracy (%)", "Macro (%)", "Prompts", "Pairs"],
                        [[f"{name}{o}, Mean@{k}", _pct(mk(o)["micro"]), _pct(mk(o)["macro"]), mk(o)["prompts"],
                          mk(o)["pairs"]] for o in orders])
    else:
        binar = report.get("binarized", {})
        b = lambda o: binar.get(f"mean@{k}" + o, {"accuracy": None, "pairs": "-"})
        lines += _table(["Method", "Accuracy (%)", "Pairs", "Binarized (%)", "Binarized pairs"],
                        [[f"{name}{o}, Mean@{k}", _pct(mk(o)["accuracy"]), mk(o)["pairs"], _pct(b(o)["accuracy"]),
                          b(o)["pairs"]] for o in orders])
    if "contradiction" in report:
        c = report["contradiction"]
        lines += ["", "## Table 4: contradictions (the judge says the answer contradicts the reasoning)", ""]
        lines += _table(["Model", "Contradictory Examples (%)", "Judged rollouts"],
                        [[name, _pct(c["rate"]), c["judged"]]])
    if "no_thinking" in report:
        lines += ["", '## Table 5: reasoning replaced by "I have finished thinking."', ""]
        lines += _table(["Model", "Accuracy (%)", "Pairs"],
                        [[f"{name} {row}", f"{_pct(v['accuracy'])} ± {_pct(v['pm95'])}", v["pairs"]]
                         for row, v in report["no_thinking"].items()])
    if "by_agreement" in report:
        lines += ["", f"## Figure 3: accuracy by human agreement (Mean@{k})", ""]
        lines += _table(["Winner's share >= (%)", "Pairs", "Accuracy (%)"],
                        [[r["threshold"], r["pairs"], _pct(r["accuracy"])]
                         for r in report["by_agreement"][f"mean@{k}"]])
    if "disagreement" in report:
        lines += ["", "## Figure 2: accuracy by listener-reasoner distance (per rollout)", ""]
        lines += _table(["Distance", "Rollouts", "Accuracy (%)"],
                        [[f"{b['low']:.2f}-{b['high']:.2f}", b["n"], _pct(b["accuracy"])]
                         for b in report["disagreement"]["bins"]])
    return "\n".join(lines) + "\n"


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
              size: tuple[int, int] = (640, 420)) -> None:
    """A line chart on y in [0, 1] with markers and a legend, drawn with PIL: name -> (xs, ys); None ys skipped."""
    from PIL import Image, ImageDraw, ImageFont
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    image, font = Image.new("RGB", size, "white"), ImageFont.load_default()
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 40, size[0] - 20, size[1] - 50
    xs_all = sorted({x for xs, _ in series.values() for x in xs}) or [0, 1]
    x0, x1 = xs_all[0], (xs_all[-1] if xs_all[-1] > xs_all[0] else xs_all[0] + 1)
    at = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - y * (bottom - top))
    pen.rectangle((left, top, right, bottom), outline="black")
    x_ticks = xs_all if len(xs_all) <= 11 else [x0 + i * (x1 - x0) / 4 for i in range(5)]
    for x in x_ticks:
        pen.text((at(x, 0)[0] - 8, bottom + 5), f"{x:.3g}", fill="black", font=font)
    for y in (0, 0.25, 0.5, 0.75, 1):
        pen.line((left - 4, at(x0, y)[1], left, at(x0, y)[1]), fill="black")
        pen.text((25, at(x0, y)[1] - 6), f"{y:.2f}", fill="black", font=font)
    pen.text((left, 10), title, fill="black", font=font)
    pen.text(((left + right) // 2 - 40, size[1] - 25), xlabel, fill="black", font=font)
    pen.text((5, 22), ylabel, fill="black", font=font)
    for n, (name, (xs, ys)) in enumerate(series.items()):
        colour = colours[n % len(colours)]
        xy = [at(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(xy) > 1:
            pen.line(xy, fill=colour, width=2)
        for cx, cy in xy:
            pen.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        pen.text((right - 170, top + 8 + 14 * n), f"- {name}", fill=colour, font=font)
    image.save(path)


def write_figures(out: Path, report: dict) -> list[Path]:
    """Figure 2 (with a listener), figure 3 (with votes), figure 4 (always): PNGs under `out`."""
    k, acc, written = report["k"], report["accuracy"], []
    js = list(range(1, k + 1))
    series = {"Mean@j": (js, [acc[f"mean@{j}"]["accuracy"] for j in js]),
              "Majority vote@j": (js, [acc[f"vote@{j}"]["accuracy"] for j in js])}
    if "mean@1 both orders" in acc:
        series["Mean@j, both orders"] = (js, [acc[f"mean@{j} both orders"]["accuracy"] for j in js])
    written.append(out / "figure4_rollouts.png")
    line_plot(written[-1], "Figure 4: accuracy vs rollouts", "rollouts j", "accuracy", series)
    if "by_agreement" in report:
        series = {name: ([r["threshold"] for r in rows], [r["accuracy"] if r["pairs"] else None for r in rows])
                  for name, rows in report["by_agreement"].items() if name in ("mean@1", f"mean@{k}") or
                  name == f"mean@{k} both orders"}
        written.append(out / "figure3_agreement.png")
        line_plot(written[-1], "Figure 3: accuracy vs human agreement", "winner's vote share >= (%)", "accuracy",
                  series)
    if "disagreement" in report:
        bins = report["disagreement"]["bins"]
        written.append(out / "figure2_disagreement.png")
        line_plot(written[-1], "Figure 2: accuracy vs listener-reasoner distance", "L2 distance (bin centre)",
                  "accuracy", {"accuracy": ([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins])})
    return written


def finite(x):
    """The report with NaN and infinities as None (null): JSON has no NaN, and an undefined metric is unknown."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_outputs(out: Path, report: dict, p: Plan, results: Sequence[Comparison]) -> None:
    """results.json (the report), results.md (tables), rollouts.jsonl (one line per comparison), figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    (out / "results.md").write_text(markdown_tables(report))
    with open(out / "rollouts.jsonl", "w") as f:
        labelled = set(p.labelled)
        for i, (pair, r) in enumerate(zip(p.compared, results)):
            images = [im if isinstance(im, str) else None for im in pair.images]  # paths; bytes are not written
            row = {"prompt": pair.prompt, "images": images, "label": pair.label, "labelled": i in labelled,
                   "votes": pair.votes, "p_b": r.p_b, "probs": r.probs, "answers": r.answers, "texts": r.texts}
            if r.reversed is not None:
                row["reversed"] = {"probs": r.reversed.probs, "answers": r.reversed.answers, "texts": r.reversed.texts}
            f.write(json.dumps(finite(row), allow_nan=False) + "\n")
    write_figures(out, report)


# ----------------------------------------------------------------------------------------------------------
# Command line


def rank_images(cfg: Config) -> list[float]:
    """Reward-model use: score `cfg.images` for `cfg.prompt` against an anchor, print the scores and the best."""
    if len(cfg.images) < 2:
        raise ValueError(f"--prompt needs at least two --images to compare, got {cfg.images}")
    model, processor = load_reasoner(cfg.model, cfg)
    scores = score_group(model, processor, cfg.prompt, cfg.images, k=cfg.k, anchor=max(cfg.anchor, 0),
                         both_orders=cfg.both_orders, **knobs(cfg))
    for path, s in zip(cfg.images, scores):
        print(f"{s:.4f}  {path}")
    print(f"best: {cfg.images[max(range(len(scores)), key=scores.__getitem__)]}")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(argv)
    except cli.OptionError as e:  # found once the data is read (e.g. --anchor against the groups' sizes)
        raise SystemExit(f"evaluate.py: error: {e}")


def _main(argv: Sequence[str] | None) -> None:
    cfg = parse_config(argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=1), file=sys.stderr)
    if cfg.prompt:
        rank_images(cfg)
        return
    report = run(cfg)
    if report is not None:  # rank 0
        print(markdown_tables(report))
        print(f"wrote {cfg.out}/results.json, results.md and "
              f"{'ratings.jsonl' if cfg.scoring == 'absolute' else 'rollouts.jsonl and figures'}")


if __name__ == "__main__":
    main()
