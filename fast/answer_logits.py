"""p(b) read from the logits the sampler computed at the answer slot, instead of a second pass (evaluation).

evaluate.py scores a pair by eq. (4) on each of its k reasonings: the reasoner reads prompt + `<think>{reasoning}
</think>\\n<answer>` and its logits at the answer slot give p(b). The reference does that in a second pass
(`listener.answer_probs` with the reasoner as the reader). But a well-formed rollout wrote exactly those tokens
before its answer, so the sampler has already computed those logits: `WatchAnswers` keeps the answer tokens'
logits at every decode step, and `sampled_p_b` reads them at each rollout's answer slot where the sampled ids are
the tokenizer's own encoding of the text (fast/listener_from_reference.py's `answer_slots`); the other rollouts
(NaN here) get the second pass.

Seam: evaluate.compare_pairs, around sample.py's decoder; option: `--reuse_sampler_logits=true`.
Test: tests/test_evaluate.py checks p(b) equal to the second pass's.

Shapes: B pairs, G = k rollouts per pair, N = B*G rows, T steps, K watched tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fast.listener_from_reference import answer_slots
from formats.records import Pair
from prompt import PromptFormat
from sample import CopiedCache


class WatchAnswers:
    """A decoder (sample.py's steps 2-3) around another that keeps the logits of `ids` at every step."""

    def __init__(self, ids: Sequence[int], decoder=None):
        self.ids, self.decoder = list(ids), CopiedCache() if decoder is None else decoder
        self.seen: list[torch.Tensor] = []

    def start(self, model, prefix, G: int, max_new_tokens: int) -> torch.Tensor:
        logits = self.decoder.start(model, prefix, G, max_new_tokens)  # (N, V)
        self.seen = [logits[:, self.ids].float()]
        return logits

    def step(self, token: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.step(token, live)  # (N, V)
        self.seen.append(logits[:, self.ids].float())
        return logits

    def watched(self) -> torch.Tensor:
        """(N, T, K): at step t, the logits the sampler chose token t from."""
        return torch.stack(self.seen, dim=1)


def sampled_p_b(processor, pairs: Sequence[Pair], texts: Sequence[str], rollouts, watched: torch.Tensor,
                fmt: PromptFormat) -> torch.Tensor:
    """(B, G) p(b) read from the sampler's own answer logits (`watched` (N, T, 2)), NaN where it cannot be."""
    slots = answer_slots(processor.tokenizer, pairs, texts, rollouts.tokens, rollouts.mask, fmt).cpu()  # (N,)
    watched = watched.cpu()[:, :rollouts.tokens.shape[1]]  # (N, T, 2)
    ok = (slots >= 0) & (slots < watched.shape[1])  # (N,)
    rows = torch.arange(len(slots))
    p = watched[rows, slots.clamp(0, watched.shape[1] - 1)].softmax(-1)[:, 1]  # (N,) eq. (4)
    return torch.where(ok, p, torch.nan).view(len(pairs), -1)  # (B, G)
