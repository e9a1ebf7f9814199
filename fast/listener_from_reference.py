"""The listener's answer slot read out of the KL reference pass, when the listener is the reference model.

train.py's reference pass reads prompt + completion with the frozen reference model (pi_ref of eq. (2)); the
listener (listener.py) reads prompt + `<think>{reasoning}</think>\\n<answer>` with the same frozen model when no
other listener is given. A well-formed completion begins with exactly that text, so the reference pass has
already computed the listener's logits at the answer slot: `answer_slots` states when the two reads agree token
for token and checks it per rollout. `reference_and_listener` takes p_corr from the reference pass for those
rollouts and runs the listener's own pass on the others only, so a step reads each well-formed rollout once
instead of twice.

Seam: `trainer.score_rollouts` (`score_rollouts` here in place of train.score_rollouts: its reference pass and
`Listener.p_correct`); option: `--listener_from_reference=true` (the listener being the reference model: no
`--listener`).
Test: tests/test_listener.py checks p_corr equal to the listener's own pass.

Shapes: B pairs, G rollouts per pair, N = B*G rows, n rows of a micro-batch, T completion tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

import grpo
from formats.records import Pair
from models.processor import listener_ids
from listener import Listener, preferred, reasonings_by_pair, reasoning_of
from prompt import PROMPT, PromptFormat


def answer_slots(tokenizer, pairs: Sequence[Pair], texts: Sequence[str], completions: torch.Tensor,
                 mask: torch.Tensor, fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(N,) where a forward pass over prompt + completion reads exactly what the listener reads; -1 where not.

    The listener reads the reasoner's prompt, then `c = listener_prefix(reasoning_of(text))` re-encoded as
    text (`models.processor.listener_ids`). A pass of a model over the same prompt followed by the completion's own
    token ids (the reference pass, `models.internals.completion_hidden`) gives the listener's answer logits exactly when
      (a) its model is the listener's model (the listener is the reference model),
      (b) its prompt is the listener's prompt (the same processor and prompt format), and
      (c) the ids of c are the first ids of the completion: completions[n, :len(c)] == c, all of them real
          tokens (mask).
    (a) and (b) are the caller's to ensure; this checks (c) row by row. Where it holds, the pass's logits after
    completion token len(c) - 1 are the listener's answer-slot logits (the same tokens at the same positions,
    under the causal mask nothing after them counts), and the slot is len(c): an index into the T + 1
    positions of `models.internals.completion_hidden`. A well-formed completion usually qualifies; a truncated or
    malformed one never does (c ends with `</think>\\n<answer>`, which it does not hold there), nor one whose
    sampled ids are not the tokenizer's own encoding of its text. texts, completions, mask: N = B*G rows.
    """
    N = completions.shape[0]
    if N % max(len(pairs), 1) or len(texts) != N:
        raise ValueError(f"answer_slots: {len(texts)} texts and {N} completions for {len(pairs)} pairs")
    rows = listener_ids(tokenizer, pairs, reasonings_by_pair(texts, len(pairs), fmt), fmt)
    lengths = mask.sum(-1).tolist()  # real tokens of each completion; they come first
    ids = completions.tolist()
    return torch.tensor([len(c) if len(c) <= n and ids[i][:len(c)] == c else -1
                         for i, (c, n) in enumerate(zip(rows, lengths))], device=completions.device)  # (N,)


def score_rollouts(cfg, trainer, micro, rollouts, pairs: Sequence[Pair], texts: Sequence[str]) -> tuple:
    """train.score_rollouts's stand-in, the same arguments and results: pi_ref's log-probs (N, T), p_corr (N,), and
    the share of rollouts whose p_corr the reference pass gave (`listener_from_reference` in metrics.jsonl)."""
    ref_logp, p_correct, share = reference_and_listener(trainer.reference, trainer.listener, trainer.hidden_fn, micro,
                                                        rollouts.tokens, rollouts.mask, pairs, texts, cfg.temperature,
                                                        trainer.fmt)
    return ref_logp, p_correct, {"listener_from_reference": share}


@torch.no_grad()
def reference_and_listener(reference, listener: Listener, hidden_fn, micro, tokens: torch.Tensor, mask: torch.Tensor,
                           pairs: Sequence[Pair], texts: Sequence[str], temperature: float, fmt: PromptFormat = PROMPT):
    """The reference pass and p_corr together: (ref_logp (N, T), p_correct (N,), the fraction of rows whose
    p_corr the reference pass gave).

    `hidden_fn`: models.internals.completion_hidden or fast.shared_prompt's; `micro`: [(processor batch, row slice)] over
    the N rows; `fmt`: the format the reasoner was asked in. The reference pass is `grpo.reference_logprobs`,
    its hidden states at each row's answer slot (`answer_slots`) kept on the way; rows whose slot it read take
    the listener's probabilities from the LM head there, the others get the listener's own pass. That pass
    gathers the FSDP2 weights, a collective: a rank with no row of its own left scores one row again, so that
    every rank joins it.
    """
    if listener.model is not reference or listener.fmt != fmt:  # conditions (a) and (b) of answer_slots
        raise ValueError("the listener is read from the reference pass only when it is the reference model, asked "
                         "in the reasoner's prompt format")
    slots = answer_slots(listener.processor.tokenizer, pairs, texts, tokens, mask, fmt)  # (N,)
    at_slot, row_slices = [], iter([rows for _, rows in micro])  # reference_logprobs reads `micro` in order

    def hidden(model, *inputs):  # the reference pass's hidden states; each row's at its answer slot kept
        states = hidden_fn(model, *inputs)  # (n, T+1, C)
        slot = slots[next(row_slices)].clamp(min=0)  # (n,)
        at_slot.append(states[torch.arange(len(slot), device=slot.device), slot])  # (n, C)
        return states
    ref_logp = grpo.reference_logprobs(reference, micro, tokens, mask, temperature, hidden)  # (N, T)
    logits = reference.lm_head(torch.cat(at_slot))  # (N, V)
    probs = logits[:, listener.answer_ids].float().softmax(-1)  # (N, 2) eq. (4), right where the slot was read
    unread = slots < 0  # (N,)
    share_read = 1.0 - unread.float().mean()
    if dist.is_initialized():  # every rank asks whether any rank has rows to score
        anyone = unread.any().float()
        dist.all_reduce(anyone)
        if bool(anyone > 0) and not bool(unread.any()):
            unread[0] = True  # scored again below, the same numbers: this rank joins the collective pass
    if bool(unread.any()):
        probs[unread] = own_pass(listener, pairs, texts, unread.nonzero()[:, 0].tolist()).to(probs.device)
    return ref_logp, preferred(probs, pairs), share_read  # (N, T), (N,), ()


def own_pass(listener: Listener, pairs: Sequence[Pair], texts: Sequence[str], rows: list[int]) -> torch.Tensor:
    """(len(rows), 2) by the listener's own pass over the rows' pairs, each pair padded to the same number of
    reasonings with empty ones (`listener.answer_probs` reads G per pair)."""
    G = len(texts) // len(pairs)
    by_pair: dict[int, list[int]] = {}
    for n in rows:
        by_pair.setdefault(n // G, []).append(n)
    width = max(len(ns) for ns in by_pair.values())
    reasonings = [[reasoning_of(texts[n], listener.fmt) for n in ns] + [""] * (width - len(ns)) for ns in by_pair.values()]
    probs = listener.scores([pairs[b] for b in by_pair], reasonings)  # (B', width, 2)
    return torch.cat([probs[i, :len(ns)] for i, ns in enumerate(by_pair.values())])  # (len(rows), 2)
