"""Held-out verdicts: one greedy completion per example and what can be said of it, for the learning curves.

Training scores its held-out examples every `--eval_every` steps (infra/trainer.py) and the toy demo scores each
stage (toy/demo.py) with this one function: the answer text of a greedy rollout, right or wrong, well formed or
not; given a listener, its p_corr on the rollout's reasoning and whether it favours the image the answer names;
given a judge (the toy world's rule), whether the answer contradicts the reasoning and whether the reasoning is
true. evaluate.py measures what the paper reports instead: p(b) from k sampled rollouts (eq. (4), Mean@k).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

import reward
import sample
from formats.records import Rated
from models.processor import end_of_turn_ids
from prompt import PROMPT, PromptFormat
from report.metrics import favoured_image


@torch.no_grad()
def greedy_verdicts(policy, processor, examples: Sequence, max_new_tokens: int, listener=None,
                    judge: Callable | None = None, decoder=None, fmt: PromptFormat = PROMPT) -> list[dict]:
    """One dict per example (a Pair, or a Rated image: its exact rating) of its greedy completion:

      right, well_formed   the answer is the preferred image (the rating); the answer is readable at all
      p_correct, agrees    with a `listener.Listener`: its p_corr on the reasoning; it favours the image answered
      contradiction, faithful   with `judge(example, text) -> {"contradiction", "faithful"}`: its verdicts

    Asked and read in `fmt`. Under FSDP2 every rank must call it with the same number of examples, inside
    `infra.parallel.gathered`.
    """
    if not examples:
        return []
    tokenizer = processor.tokenizer
    rollouts = sample.sample(policy, processor.encode(examples, fmt), num_samples=1, max_new_tokens=max_new_tokens,
                             temperature=0.0, stop_token_ids=end_of_turn_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, decoder=decoder)
    texts = rollouts.texts(tokenizer)
    p_correct = listener.p_correct(examples, texts).tolist() if listener is not None else [None] * len(texts)
    out = []
    for example, text, p in zip(examples, texts, p_correct):
        if isinstance(example, Rated):
            answer = reward.parse_completion(text, fmt, fmt.ratings)[1]
            row = {"right": answer == fmt.ratings[example.rating - 1], "well_formed": answer is not None}
        else:
            answer = reward.parse_completion(text, fmt)[1]
            row = {"right": answer == fmt.answers[example.label], "well_formed": answer is not None}
            if p is not None:
                row.update(p_correct=p, agrees=answer == fmt.answers[favoured_image(example.label, p)])
        if judge is not None:
            row.update(judge(example, text))
        out.append(row)
    return out
