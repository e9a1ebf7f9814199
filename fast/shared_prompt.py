"""Each prompt read once for its G completions in eq. (2)'s forward pass, with gradients (the shared-prompt update).

`models.internals.completion_hidden`, the reference, runs every row's prompt (images included) before its completion: G
times the prompt's work, with gradients. At the paper's shape (two 256-token images, a ~620-token prompt,
completions up to 512 tokens, G=10) about half of the update's token work is a prompt read again. Here, as
sample.py does for sampling (prefill, expand, decode), and with autograd:

  1. `sample.prefill` into a `PromptCache`: the vision tower and the B prompts, once, recording each layer's keys
     and values;
  2. `PromptCache.expand(G)`: each prompt's keys and values read by its G rows (a differentiable copy:
     autograd sums the G rows' gradients back into the prompt's);
  3. `completion_hidden`: the N = B*G completions run over that cache.

In exact arithmetic the hidden states, the log-probabilities and every gradient equal the reference's (Prefix
Grouper, Liu et al. 2025, arXiv 2506.05433, shows the same); tests/test_grpo.py checks them to 1e-5 against
`models.internals.completion_hidden`, with and without activation checkpointing. Seam: the `hidden` argument of
`grpo.completion_logprobs` (the policy update and the KL reference pass); option: `--shared_prompt=true`.
bench/update.py measures the two.

Shapes: B prompts, G rollouts per prompt, N = B*G rows, P prompt tokens, T completion tokens, C hidden size.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from models.internals import final_hidden, layer_masks
from sample import prefill


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


def completion_hidden(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states before and after each completion token: (N, T+1, C), index t predicts token t.

    batch: the processor's output for B prompts (left-padded); completions, completion_mask: (N, T) with
    N = B*G, prompt-major. Index 0 is the last prompt position, index t > 0 follows completion token t-1.
    Each prompt and its images run once (`sample.prefill`, with autograd if enabled); the completions run over
    its cache, each prompt's keys and values read by its G rows.
    """
    B, (N, T) = batch["input_ids"].shape[0], completions.shape
    if N % B:
        raise ValueError(f"completion_hidden: {N} completions do not split into {B} prompts")
    G = N // B
    with final_hidden(model) as prompt_states:
        state = prefill(model, batch, cache=PromptCache())  # B rows: cache, rope deltas, the last position
    last = prompt_states[0][:, -1:]  # (B, 1, C) the hidden state after each prompt
    if torch.is_grad_enabled() and last.requires_grad:
        state.cache, last = prompt_pass_after(state.cache, last)
    repeat = lambda t: t.repeat_interleave(G, dim=0)  # (B, ...) -> (N, ...)
    prompt_mask = repeat(state.attention_mask)  # (N, P)
    mask = completion_mask.to(prompt_mask.dtype)  # (N, T)
    text_position = repeat(state.next_position)[:, None] + mask.cumsum(-1) - 1  # (N, T) real tokens count on
    position_ids = (text_position + repeat(state.rope_deltas)).unsqueeze(0).expand(3, -1, -1)  # (3, N, T) mRoPE
    shared = state.cache.expand(G)
    full_mask = torch.cat([prompt_mask, mask], dim=-1)  # (N, P+T)
    with final_hidden(model) as states:
        model(input_ids=completions, attention_mask=layer_masks(model, shared, full_mask, T),
              position_ids=position_ids, past_key_values=shared, use_cache=True, logits_to_keep=1)
    hidden = torch.cat([repeat(last), states[0]], dim=1)  # (N, T+1, C)
    if getattr(last, "prompt_pass", None) is not None:
        hidden.register_hook(last.prompt_pass)  # its backward runs once the completions' has
    return hidden


def prompt_pass_after(cache: PromptCache, last: torch.Tensor) -> tuple[PromptCache, torch.Tensor]:
    """The completions read the prompt pass's keys, values and last hidden state as leaves of their own; the
    prompt pass's backward runs once theirs has ended, from the gradients those leaves received.

    Why: every weight is used twice, by the prompt pass and by the completion pass, and autograd sums a weight's
    two gradients before it accumulates any: in one backward, each layer's gradient from the completions would
    wait, unreduced, for the prompt pass's backward to reach that layer, every layer's at once at the turn (a bf16
    copy of the model: 14 GiB at 7B, the update's largest term; infra/rehearsal.py measured it). In two, each
    layer's gradient is reduce-scattered as soon as it is whole, once per pass (FSDP2 adds them up).

    Returns the reading side (a cache of leaves, the last hidden state as a leaf); the hook the caller puts on
    the completions' hidden states starts the prompt pass's backward at the end of theirs (autograd's
    queue_callback: before FSDP2's own end-of-backward callback, which reduces the root's gradients)."""
    outputs = [t for layer in cache.layers for t in (layer.keys, layer.values)] + [last]
    leaves = [t.detach().requires_grad_() for t in outputs]
    queued = []

    def backward_prompt_pass() -> None:
        pairs = [(out, leaf.grad) for out, leaf in zip(outputs, leaves) if leaf.grad is not None]
        outputs.clear()  # the last leaf holds this function (a cycle): without these, the prompt's keys, values
        leaves.clear()  # and their gradients would live on until the garbage collector ran
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])

    def queue(grad: torch.Tensor) -> None:
        if not queued:
            queued.append(True)
            torch.autograd.Variable._execution_engine.queue_callback(backward_prompt_pass)

    reading = PromptCache(list(zip(leaves[0:-1:2], leaves[1:-1:2])))
    leaves[-1].prompt_pass = queue
    return reading, leaves[-1]
