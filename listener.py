"""The listener: a frozen VLM that reads a rollout's reasoning, without its answer, and says which image wins.

Section 4.3 of the paper. A reasoner trained with plain GRPO can write fluent reasoning that does not support
its own answer. The listener is a frozen copy of the instruct checkpoint the policy starts from (pi_ref). For
each rollout it reads

    the two images, the reasoner's prompt (`prompt.reasoner_messages`), then the assistant turn
    `<think>{reasoning}</think>\\n<answer>`                                   (`prompt.listener_prefix`)

and we take its next-token logits f at that answer slot over the answer vocabulary (`PROMPT.answers`, one token
each, naming image 0 and image 1). A softmax over those two logits gives the probability of each image, eq. (4):
p(b) = sigma(f(b) - f(a)). The probability of the preferred image is p_corr, and the reward is
r_list = max(0, p_corr - 0.5) (eq. (5), reward.py). `Listener.p_correct` computes p_corr, in one place.

Why the answer is removed: the listener must judge whether the *reasoning* convinces an independent reader.
Shown the reasoner's answer, it could simply copy it, and r_list would reward confident answers instead of
convincing explanations. So it reads the text up to the answer slot and the answer itself never enters:
`reasoning_of` cuts a completion at its first answer tag.

The images and the prompt are the same for the G rollouts of a pair, so each pair is prefilled once and its
cache copied to its G reasonings (sample.py's `prefill`, `expand`, `extend`), as the sampler does.
fast/listener_from_reference.py reads the answer slot out of the KL reference pass instead, when the listener
is the reference model.

Where this departs from the paper, and why:
1. p_corr = pi_ref(y* | C) in section 4.3 is the probability of the answer token in the whole vocabulary; here
   it is renormalised over the two answer tokens (eq. (4)'s softmax). Then p_corr + p_wrong = 1, and r_list pays
   for the listener preferring the right image, not for how much of its probability it puts on answer tokens
   rather than on other text (which the format reward already checks).
2. The listener reads the reasoning as text, not the sampled ids: `reasoning_of` cuts it out of the completion's
   text and `listener_prefix` writes it back between the format's own tags, `</think>\\n<answer>` included,
   tokenised as the tokenizer writes that text. What a completion put between its `</think>` and `<answer>`,
   and ids that spell the same text in other tokens, are normalised away (the paper does not say); the reward
   then depends on what the reasoning says, not on how it was spelled.

Shapes: B pairs, G reasonings per pair, N = B*G, K answer tokens, V vocabulary.
Test: .venv/bin/python -m pytest -q tests/test_listener.py        Bench: .venv/bin/python bench/listener.py
"""
from __future__ import annotations

from typing import Sequence

import torch

import sample
from formats.records import Pair
from models.processor import continuation_ids, left_pad
from prompt import PROMPT, PromptFormat, listener_prefix, reasoner_messages


class Listener:
    """A frozen VLM scoring reasoning (section 4.3). Pass the reference model, never the policy being trained.

    `model` is frozen here (requires_grad_(False), eval()): it is a judge, not a learner.
    """

    def __init__(self, model, processor, fmt: PromptFormat = PROMPT):
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.fmt = fmt
        self.answer_ids = answer_token_ids(processor.tokenizer, fmt)  # fails now, not mid-training

    def p_correct(self, pairs: Sequence[Pair], texts: Sequence[str]) -> torch.Tensor:
        """(N,): p_corr of eq. (5) for N = B*G completion texts, prompt-major (texts[b*G + g] answers pair b).

        Each text's reasoning is read with its answer removed (`reasoning_of`); the pair's label picks the image.
        """
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
    """A model's probability of each image, given each reasoning: (B, G, 2), float32, no gradient; eq. (4).

    `pairs`: B pairs; `reasonings[b]`: the G reasonings (answers already removed, see `reasoning_of`) to read on
    pair b, the same G for every pair. Under FSDP2 every rank must call it (each forward gathers the weights).
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
    rows = listener_ids(tokenizer, pairs, reasonings, fmt)  # N continuations
    logits = slot_logits(model, processor.pairs(pairs, fmt), rows, answer_token_ids(tokenizer, fmt),
                         tokenizer.pad_token_id)  # (N, 2)
    return logits.softmax(-1).view(B, G, -1)  # (B, G, 2) eq. (4): sigma(f(b) - f(a)) for image b


@torch.no_grad()
def slot_logits(model, prompts: dict, continuations: Sequence[Sequence[int]], answer_ids: Sequence[int],
                pad_token_id: int) -> torch.Tensor:
    """(N, K) float32 logits of the K `answer_ids` right after each of N continuations of the B prompts.

    `prompts`: a processor batch of B prompts; `continuations`: N = B*G token id lists, prompt-major (row
    b*G + g continues prompt b). Each prompt and its images run once (`sample.prefill`), its cache is copied
    to its G rows (`sample.expand`), and the continuations, left-padded so that every row ends at its answer
    slot, run over it with the LM head at the last position only (`sample.extend`).
    """
    B = prompts["input_ids"].shape[0]
    if len(continuations) % B:
        raise ValueError(f"{len(continuations)} continuations do not split into {B} prompts")
    padded = left_pad(continuations, pad_token_id)  # input_ids, attention_mask: (N, T)
    device = sample.model_device(model)
    state = sample.expand(sample.prefill(model, prompts), len(continuations) // B)  # B rows -> N rows
    sample.extend(model, state, padded["input_ids"].to(device), padded["attention_mask"].to(device),
                  logits_to_keep=1)  # (N, 1, V)
    return state.logits[:, list(answer_ids)].float()  # (N, K): after each row's last real token


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


def reasonings_by_pair(texts: Sequence[str], B: int, fmt: PromptFormat = PROMPT) -> list[list[str]]:
    """N = B*G completion texts, prompt-major -> the reasoning of each, as B lists of G (`reasoning_of`)."""
    G = len(texts) // B
    return [[reasoning_of(t, fmt) for t in texts[b * G:(b + 1) * G]] for b in range(B)]


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


def answer_token_ids(tokenizer, fmt: PromptFormat = PROMPT, answers: Sequence[str] | None = None) -> list[int]:
    """The token id of each answer (`fmt.answers` unless given), as the tokenizer writes it right after the
    answer slot.

    Raises ValueError when an answer is not exactly one token there (then one next-token distribution cannot
    score it), or when two answers share a token.
    """
    answers = fmt.answers if answers is None else answers
    slot_text = fmt.answer_prefix("")
    slot = tokenizer(slot_text, add_special_tokens=False)["input_ids"]
    ids = []
    for answer in answers:
        full = tokenizer(slot_text + answer, add_special_tokens=False)["input_ids"]
        if len(full) != len(slot) + 1 or full[:len(slot)] != slot:
            raise ValueError(f"answer {answer!r} is not exactly one token after {slot_text!r}: the tokenizer "
                             f"writes it as {full[len(slot):]}")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {tuple(answers)} share a token: ids {ids}")
    return ids
