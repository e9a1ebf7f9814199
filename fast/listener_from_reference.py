"""The listener's answer slot read out of the KL reference pass, when the listener is the reference model.

train.py's reference pass reads prompt + completion with the frozen reference model (pi_ref of eq. (2)); the
listener (listener.py) reads prompt + `<think>{reasoning}</think>\\n<answer>` with the same frozen model when no
other listener is given. A well-formed completion begins with exactly that text, so the reference pass has
already computed the listener's logits at the answer slot: `answer_slots` states when the two reads agree token
for token and checks it per rollout. `reference_and_listener` takes p_corr from the reference pass for those
rollouts and runs the listener's own pass on the others only, so a step reads each well-formed rollout once
instead of twice.

Seam: train.grpo_step, in place of its reference pass and `Listener.p_correct`; option:
`--listener_from_reference=true` (with the listener being the reference model: no `--listener`).
Test: tests/test_listener.py checks p_corr equal to the listener's own pass.

Shapes: B pairs, G rollouts per pair, N = B*G rows, n rows of a micro-batch, T completion tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

import grpo
from formats.records import Pair
from listener import Listener, listener_ids, reasoning_of
from prompt import PROMPT, PromptFormat


def answer_slots(tokenizer, pairs: Sequence[Pair], texts: Sequence[str], completions: torch.Tensor,
                 mask: torch.Tensor, fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(N,) where a forward pass over prompt + completion reads exactly what the listener reads; -1 where not.

    The listener reads the reasoner's prompt, then `c = listener_prefix(reasoning_of(text))` re-encoded as
    text (`listener.listener_ids`). A pass of a model over the same prompt followed by the completion's own
    token ids (the reference pass, `grpo.completion_hidden`) gives the listener's answer logits exactly when
      (a) its model is the listener's model (the listener is the reference model),
      (b) its prompt is the listener's prompt (the same processor and prompt format), and
      (c) the ids of c are the first ids of the completion: completions[n, :len(c)] == c, all of them real
          tokens (mask).
    (a) and (b) are the caller's to ensure; this checks (c) row by row. Where it holds, the pass's logits after
    completion token len(c) - 1 are the listener's answer-slot logits (the same tokens at the same positions,
    under the causal mask nothing after them counts), and the slot is len(c): an index into the T + 1
    positions of `grpo.completion_hidden`. A well-formed completion usually qualifies; a truncated or
    malformed one never does (c ends with `</think>\\n<answer>`, which it does not hold there), nor one whose
    sampled ids are not the tokenizer's own encoding of its text. texts, completions, mask: N = B*G rows.
    """
    N = completions.shape[0]
    if N % max(len(pairs), 1) or len(texts) != N:
        raise ValueError(f"answer_slots: {len(texts)} texts and {N} completions for {len(pairs)} pairs")
    G = N // len(pairs)
    reasonings = [[reasoning_of(t, fmt) for t in texts[b * G:(b + 1) * G]] for b in range(len(pairs))]
    rows = listener_ids(tokenizer, pairs, reasonings, fmt)
    lengths = mask.sum(-1).tolist()  # real tokens of each completion; they come first
    ids = completions.tolist()
    return torch.tensor([len(c) if len(c) <= n and ids[i][:len(c)] == c else -1
                         for i, (c, n) in enumerate(zip(rows, lengths))], device=completions.device)  # (N,)


@torch.no_grad()
def reference_and_listener(reference, listener: Listener, hidden_fn, micro, tokens: torch.Tensor, mask: torch.Tensor,
                           pairs: Sequence[Pair], texts: Sequence[str], temperature: float, fmt: PromptFormat = PROMPT):
    """The reference pass and p_corr together: (ref_logp (N, T), p_correct (N,), the fraction of rows whose
    p_corr the reference pass gave).

    `hidden_fn`: grpo.completion_hidden or fast.shared_prompt's; `micro`: [(processor batch, row slice)] over
    the N rows; `fmt`: the format the reasoner was asked in. Rows whose answer slot the reference pass reads
    (`answer_slots`) take the listener's probabilities from the LM head at that slot; the others get the
    listener's own pass. That pass gathers the FSDP2 weights, a collective: a rank with no row of its own left
    scores one row again, so that every rank joins it.
    """
    if listener.model is not reference or listener.fmt != fmt:  # conditions (a) and (b) of answer_slots
        raise ValueError("the listener is read from the reference pass only when it is the reference model, asked "
                         "in the reasoner's prompt format")
    slots = answer_slots(listener.processor.tokenizer, pairs, texts, tokens, mask, fmt)  # (N,)
    ref_logp, probs = [], []
    for mb, rows in micro:
        hidden = hidden_fn(reference, mb, tokens[rows], mask[rows])  # (n, T+1, C)
        ref_logp.append(grpo.token_logprobs(reference.lm_head, hidden[:, :-1], tokens[rows], temperature))  # (n, T)
        slot = slots[rows].clamp(min=0)  # (n,)
        at_slot = reference.lm_head(hidden[torch.arange(len(slot), device=slot.device), slot])  # (n, V)
        probs.append(at_slot[:, listener.answer_ids].float().softmax(-1))  # (n, 2) eq. (4)
    probs = torch.cat(probs)  # (N, 2), right where the reference pass could read the slot
    unread = slots < 0  # (N,)
    share_read = 1.0 - unread.float().mean()
    if dist.is_initialized():  # every rank asks whether any rank has rows to score
        anyone = unread.any().float()
        dist.all_reduce(anyone)
        if bool(anyone > 0) and not bool(unread.any()):
            unread[0] = True  # scored again below, the same numbers: this rank joins the collective pass
    if bool(unread.any()):
        probs[unread] = own_pass(listener, pairs, texts, unread.nonzero()[:, 0].tolist()).to(probs.device)
    labels = torch.tensor([p.label for p in pairs], device=probs.device).repeat_interleave(len(texts) // len(pairs))
    return torch.cat(ref_logp), probs.gather(-1, labels[:, None])[:, 0], share_read  # (N, T), (N,), ()


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
