"""The listener: a frozen VLM that reads a rollout's reasoning, without its answer, and says which image wins.

Section 4.3 of the paper. A reasoner trained with plain GRPO can write fluent reasoning that does not support its
own answer. The listener, a frozen copy of the instruct checkpoint the policy starts from (pi_ref), reads for each
rollout the two images, the reasoner's prompt and the assistant turn `<think>{reasoning}</think>\\n<answer>`
(`prompt.listener_prefix`). Its next-token logits f at that answer slot, over the two answer tokens (`PROMPT.answers`),
give each image's probability, eq. (4): p(b) = sigma(f(b) - f(a)). The preferred image's is p_corr
(`Listener.p_correct`), and r_list = max(0, p_corr - 0.5) (eq. (5), reward.py). The answer is removed
(`reasoning_of`): shown it, the listener could copy it, and r_list would reward confident answers instead of
convincing reasoning. Each pair's images and prompt are prefilled once and the cache copied to its G reasonings
(sample.py's `prefill`, `expand`, `extend`); fast/listener_from_reference.py reads the slot out of the KL pass.

Where this departs from the paper, and why:
1. Section 4.3's p_corr = pi_ref(y* | C) is over the whole vocabulary; here it is renormalised over the two answer
   tokens (eq. (4)'s softmax), so r_list pays for preferring the right image, not for putting probability on
   answer tokens rather than other text (the format reward checks that).
2. The reasoning is read as text, not as the sampled ids: `reasoning_of` cuts it out and `listener_prefix` writes
   it back between the format's own tags, tokenised as the tokenizer writes them. What a completion put between
   `</think>` and `<answer>`, and other ids spelling the same text, are normalised away (the paper does not say):
   the reward depends on what the reasoning says, not on how it was spelled.

Shapes: B pairs, G reasonings per pair, N = B*G, K answer tokens, V vocabulary.
Test: .venv/bin/python -m pytest -q tests/test_listener.py        Bench: .venv/bin/python bench/listener.py
"""
from __future__ import annotations

from typing import Sequence

import torch

import sample
from formats.records import Pair
from models.internals import model_device
from models.processor import answer_token_ids, left_pad, listener_ids
from prompt import PROMPT, PromptFormat


class Listener:
    """A frozen VLM scoring reasoning (section 4.3): the reference model, never the policy being trained. `model`
    is frozen here (requires_grad_(False), eval()): a judge, not a learner."""

    def __init__(self, model, processor, fmt: PromptFormat = PROMPT):
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.fmt = fmt
        self.answer_ids = answer_token_ids(processor.tokenizer, fmt)  # fails now, not mid-training

    def p_correct(self, pairs: Sequence[Pair], texts: Sequence[str]) -> torch.Tensor:
        """(N,): p_corr of eq. (5) for N = B*G completion texts, prompt-major (texts[b*G + g] answers pair b), each
        reasoning read without its answer (`reasoning_of`), the pair's label picking the image."""
        B = len(pairs)
        if B == 0 or len(texts) % B:
            raise ValueError(f"{len(texts)} texts do not split into {B} pairs with the same number of rollouts")
        if any(p.label not in (0, 1) for p in pairs):
            raise ValueError(f"pair labels must be 0 or 1, got {[p.label for p in pairs]}")
        probs = self.scores(pairs, reasonings_by_pair(texts, B, self.fmt))  # (B, G, 2)
        return preferred(probs.reshape(len(texts), -1), pairs)  # (N,)

    def scores(self, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, G, 2): the listener's probability of image 0 and image 1 of pair b given reasoning g."""
        return answer_probs(self.model, self.processor, pairs, reasonings, self.fmt)


def preferred(probs: torch.Tensor, pairs: Sequence[Pair]) -> torch.Tensor:
    """(N, 2) the probability of each image, N = B*G rows prompt-major -> (N,) the preferred image's: p_corr."""
    labels = torch.tensor([p.label for p in pairs], device=probs.device).repeat_interleave(len(probs) // len(pairs))
    return probs.gather(-1, labels[:, None])[:, 0]  # (N,)


# ----------------------------------------------------------------------------------------------------------
# Reading the answer slot


def answer_probs(model, processor, pairs: Sequence[Pair], reasonings: Sequence[Sequence[str]],
                 fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """A model's probability of each image, eq. (4), given each of the G reasonings `reasonings[b]` (answers removed:
    `reasoning_of`) on each of B pairs: (B, G, 2), float32, no gradient. Under FSDP2 every rank must call it."""
    B, G = len(pairs), len(reasonings[0]) if reasonings else 0
    if len(reasonings) != B or any(len(rs) != G for rs in reasonings):
        raise ValueError(f"{B} pairs need {B} lists of reasonings, all as long; got {[len(rs) for rs in reasonings]}")
    if B == 0 or G == 0:
        return torch.zeros(B, G, len(fmt.answers))
    tokenizer = processor.tokenizer
    rows = listener_ids(tokenizer, pairs, reasonings, fmt)  # N continuations
    logits = slot_logits(model, processor.pairs(pairs, fmt), rows, answer_token_ids(tokenizer, fmt),
                         tokenizer.pad_token_id)  # (N, 2)
    return logits.softmax(-1).view(B, G, -1)  # (B, G, 2) eq. (4): sigma(f(b) - f(a)) for image b


@torch.no_grad()
def slot_logits(model, prompts: dict, continuations: Sequence[Sequence[int]], answer_ids: Sequence[int],
                pad_token_id: int) -> torch.Tensor:
    """(N, K) float32 logits of the K `answer_ids` right after each of N = B*G continuations (token id lists,
    prompt-major) of a processor batch of B prompts: each prompt runs once (`sample.prefill`), its cache is copied
    to its G rows (`sample.expand`), and the continuations, left-padded to end at the answer slot, run over it
    with the LM head at the last position only (`sample.extend`)."""
    B = prompts["input_ids"].shape[0]
    if len(continuations) % B:
        raise ValueError(f"{len(continuations)} continuations do not split into {B} prompts")
    padded = left_pad(continuations, pad_token_id)  # input_ids, attention_mask: (N, T)
    device = model_device(model)
    state = sample.expand(sample.prefill(model, prompts), len(continuations) // B)  # B rows -> N rows
    sample.extend(model, state, padded["input_ids"].to(device), padded["attention_mask"].to(device),
                  logits_to_keep=1)  # (N, 1, V)
    return state.logits[:, list(answer_ids)].float()  # (N, K): after each row's last real token


# ----------------------------------------------------------------------------------------------------------
# Text: what the listener reads


def reasoning_of(text: str, fmt: PromptFormat = PROMPT) -> str:
    """The reasoning the listener reads from a completion's text; the answer never gets through.

    Well formed (`<think>R</think>\\n<answer>A</answer>`): exactly R, unstripped, as `reward.parse_completion`
    returns it. Any other text is read tolerantly: 1. cut at its first `<answer>`; 2. keep what follows the first
    `<think>` (if any) up to the next `</think>` (if any), so a truncated completion keeps its reasoning and a bare
    answer after `</think>` is dropped; 3. a `</answer>` still inside ends an answer whose start is unmarked, so
    read ""; 4. delete think tags left inside. A text with no tags is read whole (it fails the format check).
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


def reasonings_by_pair(texts: Sequence[str], B: int, fmt: PromptFormat = PROMPT) -> list[list[str]]:
    """N = B*G completion texts, prompt-major -> the reasoning of each, as B lists of G (`reasoning_of`)."""
    G = len(texts) // B
    return [[reasoning_of(t, fmt) for t in texts[b * G:(b + 1) * G]] for b in range(B)]
