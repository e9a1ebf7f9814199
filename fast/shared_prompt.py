"""Each prompt read once for its G completions in eq. (2)'s forward pass, with gradients (the shared-prompt update).

`grpo.completion_logits`, the reference, runs every row's prompt (images included) before its completion: G
times the prompt's work, with gradients. At the paper's shape (two 256-token images, a ~620-token prompt,
completions up to 512 tokens, G=10) about half of the update's token work is a prompt read again. Here, as
sample.py does for sampling (prefill, expand, decode), and with autograd:

  1. `prompt_pass`: the vision tower and the B prompts, once, recording each layer's keys and values;
  2. `PromptCache.expand(G)`: each prompt's keys and values read by its G rows (a differentiable copy:
     autograd sums the G rows' gradients back into the prompt's);
  3. `completion_logits`: the N = B*G completions run over that cache.

In exact arithmetic the logits and every gradient equal the reference's (Prefix Grouper, Liu et al. 2025, arXiv
2506.05433, shows the same); tests/test_grpo.py checks both to 1e-5 against `grpo.completion_logits`, with and
without activation checkpointing. Seam: train.py's log-probability function (the policy update and the KL
reference pass); option: `--shared_prompt=true`. bench/update.py measures the two.

Shapes: B prompts, G rollouts per prompt, N = B*G rows, P prompt tokens, T completion tokens, V vocabulary.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sample import layer_masks


class PromptCache(DynamicCache):
    """The prompts' keys and values in a pass with gradients: the prompt pass records them, the completion pass
    reads them. Neither pass grows the cache.

    Each attention layer calls `update(k, v, layer)`. Recording (the prompt pass): store k, v as they are (set,
    not appended) and return them. Reading (`expand(G)`): return (cat(prompt keys repeated G times, k), same for
    values) and store nothing. Why neither appends: activation checkpointing runs each layer again in the
    backward pass, which calls `update` again; an appending cache (DynamicCache) would hand the recomputed
    layer its own keys twice. The repeat runs inside the layer, so with checkpointing only the B prompt rows of
    keys and values stay in memory between forward and backward, not N.
    """

    def __init__(self, kv=(), group_size: int | None = None):
        super().__init__()
        self.group_size = group_size  # None: recording
        for i, (k, v) in enumerate(kv):
            self._store(i, k, v)

    def _store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        layer.keys, layer.values, layer.is_initialized = keys, values, True  # (B, kv heads, P, head dim)
        layer.dtype, layer.device = keys.dtype, keys.device

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.group_size is None:
            self._store(layer_idx, key_states, value_states)
            return key_states, value_states
        layer, G = self.layers[layer_idx], self.group_size
        keys = torch.cat([layer.keys.repeat_interleave(G, dim=0), key_states], dim=-2)  # (N, heads, P+T, d)
        values = torch.cat([layer.values.repeat_interleave(G, dim=0), value_states], dim=-2)  # (N, heads, P+T, d)
        return keys, values

    def expand(self, group_size: int) -> "PromptCache":
        """A reading cache: each prompt's keys and values seen by `group_size` rows (rows b*G .. b*G+G-1)."""
        return PromptCache([(layer.keys, layer.values) for layer in self.layers], group_size)


def prompt_pass(model, batch: dict):
    """The vision tower and the B left-padded prompts, once, with autograd if enabled.

    Returns (PromptCache recording every layer, rope_deltas (B, 1), logits (B, V) at the last prompt position).
    mRoPE positions come from the model's `get_rope_index` (images advance positions less than their count);
    a completion token's position is then its text position + rope delta (sample.py explains).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, P), (B, P)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("completion_logits: batch['attention_mask'] must be left-padded (last column all ones)")
    position_ids, rope_deltas = model.model.get_rope_index(input_ids, batch["mm_token_type_ids"],
                                                           batch.get("image_grid_thw"),
                                                           attention_mask=attention_mask)  # (3, B, P), (B, 1)
    cache = PromptCache()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"), logits_to_keep=1)
    return cache, rope_deltas.to(input_ids.device), out.logits[:, -1]  # (B, 1), (B, V)


def completion_logits(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits before and after each completion token: (N, T+1, V), index t predicts token t.

    batch: the processor's output for B prompts (left-padded); completions, completion_mask: (N, T) with
    N = B*G, prompt-major. Index 0 is the last prompt position, index t > 0 follows completion token t-1.
    Each prompt and its images run once (`prompt_pass`); the completions run over its cache.
    """
    B, (N, T) = batch["input_ids"].shape[0], completions.shape
    if N % B:
        raise ValueError(f"completion_logits: {N} completions do not split into {B} prompts")
    G = N // B
    cache, rope_deltas, first = prompt_pass(model, batch)  # first: (B, V)
    repeat = lambda t: t.repeat_interleave(G, dim=0)  # (B, ...) -> (N, ...)
    prompt_mask = repeat(batch["attention_mask"])  # (N, P)
    mask = completion_mask.to(prompt_mask.dtype)  # (N, T)
    text_position = prompt_mask.sum(-1, keepdim=True) + mask.cumsum(-1) - 1  # (N, T) real tokens count on
    position_ids = (text_position + repeat(rope_deltas)).unsqueeze(0).expand(3, -1, -1)  # (3, N, T) mRoPE
    shared = cache.expand(G)
    full_mask = torch.cat([prompt_mask, mask], dim=-1)  # (N, P+T)
    logits = model(input_ids=completions, attention_mask=layer_masks(model, shared, full_mask, T),
                   position_ids=position_ids, past_key_values=shared, use_cache=True).logits  # (N, T, V)
    return torch.cat([repeat(first)[:, None], logits], dim=1)  # (N, T+1, V)
