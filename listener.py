"""The listener: a frozen VLM that reads a rollout's reasoning, without its answer, and says which image wins.

Section 4.3 of the paper. A reasoner trained with plain GRPO can write fluent reasoning that does not support
its own answer. The listener is an independent, frozen copy of the instruct checkpoint the policy starts from
(pi_ref; it may be the very same object as the KL reference model). For each rollout it reads

    the two images, the reasoner's prompt (`prompt.reasoner_messages`), then the assistant turn
    `<think>{reasoning}</think>\\n<answer>`                                   (`prompt.listener_prefix`)

and we take its next-token logits f over the answer vocabulary (`PROMPT.answers`, one token each, naming
image 0 and image 1). A softmax over those tokens gives the probability of each image; for two answers
this is eq. (4), p(b) = sigma(f(b) - f(a)). The probability of the preferred image, p_corr, enters the
reward as r_list = max(0, p_corr - 0.5) (eq. (5), reward.py).

Why the answer is removed: the listener must judge whether the *reasoning* convinces an independent reader.
Shown the reasoner's answer, it could simply copy it, and r_list would reward confident answers instead of
convincing explanations. So it reads the text up to the answer slot and the answer itself never enters:
`reasoning_of` cuts a completion at its first answer tag.

Speed: the images and the prompt are the same for the G rollouts of a pair. We prefill them once per pair
(`sample.prefill`: the vision tower and the prompt run B times, not B*G), copy the KV cache to the G rows
(`sample.expand`), and run only the G reasonings over it (`sample.extend`): one forward of ~100 tokens per
rollout instead of one of images + prompt + reasoning. bench/listener.py measures the difference.

When the listener is the KL reference model (the default), the reference pass over the rollouts (train.py,
grpo.completion_logits) has usually read exactly these tokens already: a well-formed completion begins with
`<think>{reasoning}</think>\n<answer>`. `answer_slots` states when the two reads agree token for token and
checks it per rollout; for those rollouts the listener's answer logits are taken from the reference pass,
and only the others get the listener pass above (`Listener.p_correct(..., known=...)`).

Test: .venv/bin/python -m pytest -q tests/test_listener.py
Bench: .venv/bin/python bench/listener.py
"""
from __future__ import annotations

from typing import Sequence

import torch

import sample
from prompt import PROMPT, Pair, PromptFormat, left_pad, listener_prefix, reasoner_messages

# ----------------------------------------------------------------------------------------------------------
# Text: what the listener reads


def reasoning_of(text: str, fmt: PromptFormat = PROMPT) -> str:
    """The reasoning the listener reads from a completion's text; the answer never gets through.

    Well formed (`<think>R</think>\\n<answer>A</answer>`): exactly R, unstripped, as `reward.parse_completion`
    returns it. Any other text is read tolerantly, in four steps:

    1. cut the text at its first `<answer>`: nothing from the answer slot on;
    2. of what is left, keep what follows the first `<think>` (if any) and precedes the next `</think>` (if
       any): a truncated completion keeps all the reasoning it wrote, and text after `</think>` (where a
       malformed completion may put its bare answer) is dropped;
    3. if a `</answer>` is still inside, the answer sits right before it with no tag marking where it starts:
       no cut is safe, so the listener reads no reasoning at all ("");
    4. delete any think tag still inside (repeated or nested tags), so the listener's own tags stay the only ones.

    A text with no tags at all is read whole: it has no answer slot, so there is nothing to remove. Such a
    completion fails the format check and earns no listener reward anyway (reward.py); it still gets a score.
    """
    head = text.split(fmt.answer_open, 1)[0]  # step 1
    start = head.find(fmt.think_open)
    if start >= 0:  # step 2
        head = head[start + len(fmt.think_open):]
    end = head.find(fmt.think_close)
    if end >= 0:
        head = head[:end]
    if fmt.answer_close in head:  # step 3
        return ""
    return head.replace(fmt.think_open, "").replace(fmt.think_close, "")  # step 4


def answer_token_ids(tokenizer, fmt: PromptFormat = PROMPT) -> list[int]:
    """The token id of each answer in `fmt.answers`, as the tokenizer writes it right after the answer slot.

    Raises ValueError when an answer is not exactly one token there (then one next-token distribution cannot
    score it), or when two answers share a token.
    """
    slot_text = fmt.answer_prefix("")
    slot = tokenizer(slot_text, add_special_tokens=False)["input_ids"]
    ids = []
    for answer in fmt.answers:
        full = tokenizer(slot_text + answer, add_special_tokens=False)["input_ids"]
        if len(full) != len(slot) + 1 or full[:len(slot)] != slot:
            raise ValueError(f"answer {answer!r} of fmt.answers is not exactly one token after {slot_text!r}: "
                             f"the tokenizer writes it as {full[len(slot):]}")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"fmt.answers {fmt.answers} share a token: ids {ids}")
    return ids


def continuation_ids(tokenizer, prompt_text: str, suffixes: Sequence[str]) -> list[list[int]]:
    """Token ids of each suffix as the tokenizer writes it after `prompt_text` (not tokenized on its own).

    Tokenizing prompt + suffix together and dropping the prompt's ids gives exactly the ids of a single
    full-text encoding, whatever the tokenizer merges at the seam; we check the prompt's ids are a prefix.
    """
    head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    rows = tokenizer([prompt_text + s for s in suffixes], add_special_tokens=False)["input_ids"]
    for g, row in enumerate(rows):
        if row[:len(head)] != head:
            raise ValueError(f"suffix {g} ({suffixes[g][:40]!r}...) changes how the prompt before it is tokenized")
    return [row[len(head):] for row in rows]


# ----------------------------------------------------------------------------------------------------------
# Scoring


def answer_probs(model, processor, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]],
                 fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """The listener's probability of each image, given each reasoning: (B, G, 2), float32, no gradient.

    `pairs`: B pairs; `reasonings[b]`: the G reasonings (answers already removed, see `reasoning_of`) to
    score on pair b, the same G for every pair. Per pair the images and prompt are prefilled once, the cache
    is copied to G rows and the G continuations `listener_prefix(r)` (left-padded) run over it.
    Under FSDP2 every rank must call it: the weights are gathered collectively (`sample.gathered`).
    """
    B = len(pairs)
    if len(reasonings) != B:
        raise ValueError(f"{B} pairs but {len(reasonings)} lists of reasonings")
    G = len(reasonings[0]) if B else 0
    if any(len(rs) != G for rs in reasonings):
        raise ValueError(f"every pair needs the same number of reasonings, got {[len(rs) for rs in reasonings]}")
    if B == 0 or G == 0:
        return torch.zeros(B, G, len(fmt.answers))
    tokenizer = processor.tokenizer
    answer_ids = answer_token_ids(tokenizer, fmt)
    rows = listener_ids(tokenizer, pairs, reasonings, fmt)  # N = B*G continuations, prompt-major
    # Left-padded, so that every row's answer slot is the last position: the LM head runs there only.
    continuation = left_pad(rows, tokenizer.pad_token_id)  # input_ids, attention_mask: (N, T)

    device = sample.model_device(model)
    with torch.no_grad(), sample.gathered(model):
        prefix = sample.expand(sample.prefill(model, processor.pairs(pairs, fmt)), G)  # B rows -> N rows
        sample.extend(model, prefix, continuation["input_ids"].to(device), continuation["attention_mask"].to(device),
                      logits_to_keep=1)  # (N, 1, V)
    probs = slot_probs(prefix.logits, answer_ids)  # (N, 2): the logits after each row's last real token
    return probs.view(B, G, -1)  # (B, G, 2)


def slot_probs(slot_logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """(N, V) next-token logits at the answer slot -> (N, 2) probability of each image, float32.

    A softmax over the answer tokens' logits f: for two answers eq. (4), p(b) = sigma(f(b) - f(a)).
    """
    return slot_logits[:, list(answer_ids)].float().softmax(-1)  # (N, 2)


def listener_ids(tokenizer, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]],
                 fmt: PromptFormat = PROMPT) -> list[list[int]]:
    """The token ids the listener reads after each pair's prompt: `listener_prefix(r)` for each reasoning r of
    `reasonings[b]`, written as the tokenizer writes it after the prompt; flat, prompt-major."""
    rows = []
    for pair, rs in zip(pairs, reasonings):
        prompt_text = tokenizer.apply_chat_template(reasoner_messages(pair.prompt, fmt), tokenize=False,
                                                    add_generation_prompt=True)
        rows += continuation_ids(tokenizer, prompt_text, [listener_prefix(r, fmt) for r in rs])
    return rows


def answer_slots(tokenizer, pairs: Sequence[Pair], texts: Sequence[str], completions: torch.Tensor,
                 mask: torch.Tensor, fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(N,) where a forward pass over prompt + completion reads exactly what the listener reads; -1 where not.

    The listener reads the reasoner's prompt, then `c = listener_prefix(reasoning_of(text))` re-encoded as
    text (`listener_ids`). A pass of a model over the same prompt followed by the completion's own token ids
    (the reference pass, `grpo.completion_logits`) gives the listener's answer logits exactly when
      (a) its model is the listener's model (the listener is the reference model),
      (b) its prompt is the listener's prompt (the same processor and prompt format), and
      (c) the ids of c are the first ids of the completion: completions[n, :len(c)] == c, all of them real
          tokens (mask).
    (a) and (b) are the caller's to ensure; this checks (c) row by row. Where it holds, the pass's logits after
    completion token len(c) - 1 are the listener's answer-slot logits (the same tokens at the same positions,
    under the causal mask nothing after them counts), and the slot is len(c): an index into the T + 1
    positions of `grpo.completion_logits`. A well-formed completion usually qualifies; a truncated or
    malformed one never does (c ends with `</think>\n<answer>`, which it does not hold there), nor one whose
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


class Listener:
    """A frozen VLM scoring reasoning (section 4.3). Pass the reference model, never the policy being trained.

    `model` is frozen here (requires_grad_(False), eval()): it is a judge, not a learner.
    """

    def __init__(self, model, processor, fmt: PromptFormat = PROMPT):
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.fmt = fmt
        self.answer_ids = answer_token_ids(processor.tokenizer, fmt)  # fails now, not mid-training

    def scores(self, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, G, 2): the listener's probability of image 0 and image 1 of pair b given reasoning g."""
        return answer_probs(self.model, self.processor, pairs, reasonings, self.fmt)

    def p_correct(self, pairs: Sequence[Pair], texts: Sequence[str], known: torch.Tensor | None = None) -> torch.Tensor:
        """(N,): p_corr of eq. (5) for N = B*G completion texts, prompt-major (texts[b*G + g] answers pair b).

        Each text's reasoning is read with `reasoning_of` (the answer removed); the pair's label picks the
        image. `known` (N, 2): the listener's probabilities where they were already read (from the reference
        pass, see `answer_slots`), NaN rows elsewhere; only the NaN rows are scored here. Under FSDP2 every
        rank must call this with rows to score, or none: the pass gathers the weights collectively.
        """
        B = len(pairs)
        if B == 0 or len(texts) % B:
            raise ValueError(f"{len(texts)} texts do not split into {B} pairs with the same number of rollouts")
        if any(p.label not in (0, 1) for p in pairs):
            raise ValueError(f"pair labels must be 0 or 1, got {[p.label for p in pairs]}")
        G = len(texts) // B
        probs = torch.full((len(texts), len(self.fmt.answers)), float("nan")) if known is None else known.float()
        todo = torch.isnan(probs).any(-1).nonzero()[:, 0].tolist()  # rows to score here
        if todo:
            probs = probs.to(sample.model_device(self.model)).clone()
            probs[todo] = self._scores(pairs, texts, todo, G)
        labels = torch.tensor([p.label for p in pairs], device=probs.device).repeat_interleave(G)  # (N,)
        return probs.gather(-1, labels[:, None])[:, 0]  # (N,)

    def _scores(self, pairs, texts, rows: list[int], G: int) -> torch.Tensor:
        """(len(rows), 2) by the listener's own pass over the rows' pairs, each padded to the same number of
        reasonings with empty ones (`answer_probs` scores G per pair)."""
        by_pair: dict[int, list[int]] = {}
        for n in rows:
            by_pair.setdefault(n // G, []).append(n)
        width = max(len(ns) for ns in by_pair.values())
        reasonings = [[reasoning_of(texts[n], self.fmt) for n in ns] + [""] * (width - len(ns)) for ns in by_pair.values()]
        probs = self.scores([pairs[b] for b in by_pair], reasonings)  # (B', width, 2)
        return torch.cat([probs[i, :len(ns)] for i, ns in enumerate(by_pair.values())])  # (len(rows), 2)
