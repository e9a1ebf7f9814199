"""GRPO: turn the rewards of a group of rollouts into a loss.

Section 3.3 of the paper (Group Relative Policy Optimisation):

    eq. (1)  A_i = (r_i - mu) / (sigma + eps),  mu, sigma^2 = mean and population variance of the G rewards
    eq. (2)  L(theta) = E_i[ min(rho_i A_i, clip(rho_i, 1 +- eps) A_i) - lambda KL(pi_theta || pi_ref) ]

`group_advantages` is eq. (1), `grpo_loss` is the negative of eq. (2) (we minimise), `loss_mask` drops
truncated completions from the loss, `loss_counts` gives the token and completion counts that make the
loss exact across micro-batches and ranks. `completion_logprobs` gives the log-probabilities eq. (2) needs,
under the policy or the reference model, reading each prompt and its images once for its G completions (with
gradients too; see the section at the end). Rows are ordered prompt-major everywhere: rows b*G .. b*G+G-1
are the G rollouts of prompt b. Legend: B prompts, G rollouts per prompt, N = B*G, T completion tokens.
Tests: .venv/bin/python -m pytest -q tests/test_grpo.py

Where this departs from the paper's eq. (1)-(2), and why:

1. Per-token ratio. Eq. (2) writes rho_i = pi_theta(a_i|s) / pi_old(a_i|s) for the whole completion a_i.
   We use one ratio per token, rho_i,t = exp(logp_i,t - old_logp_i,t), and clip each token, as GRPO
   (DeepSeekMath, Shao et al. 2024) and PPO for language models do: a product of hundreds of per-token
   ratios almost always leaves [1-eps, 1+eps], and clipping it would switch off most updates.
2. Standard deviation. Population std (divide by G) plus eps, as eq. (1) says. One addition: a group whose
   rewards are all equal gets advantages of exactly 0. In floating point r_i - mu is then often a tiny
   non-zero number (0.1 repeated ten times in float32 gives about 7e-9, and so does sigma), and dividing
   by sigma + eps would turn that rounding noise into advantages of about 0.01 that train on nothing.
   `scale=False` drops the division (Dr. GRPO, Liu et al. 2025: dividing by sigma weights prompts that
   are almost always solved, or almost never, more than the others).
3. KL estimator. The paper does not say how KL(pi_theta || pi_ref) is estimated. We use the k3 estimator
   of Schulman (2020, "Approximating KL divergence"), exp(ref - logp) - (ref - logp) - 1, per token, on
   the sampled tokens, and add beta * k3 (beta is the paper's lambda) to each token's loss, as
   DeepSeekMath does. k3 is never negative and has a low variance; the exact KL would need the full
   vocabulary distribution of both models at every position.
4. Aggregation. E_i in eq. (2) is a mean over completions; `loss_type="sequence"` takes the mean over each
   completion's tokens and then over completions (the GRPO paper). Two other choices are offered because
   the sequence mean gives each token of a long completion less weight than a token of a short one:
   "token" divides the sum over all tokens by the number of tokens (DAPO, Yu et al. 2025), "dr_grpo"
   divides by N * max_new_tokens, a constant (Dr. GRPO, Liu et al. 2025). The divisors may be global
   counts (all micro-batches, all ranks) so that summed micro-batch losses give the exact batch loss.
5. Asymmetric clip. eq. (2) clips at 1 +- eps; we take `clip_low` and `clip_high` apart. Equal values
   (0.2, 0.2) are the paper; a larger clip_high ("clip-higher", DAPO) lets unlikely tokens gain
   probability faster, which keeps the policy from collapsing to low entropy.
6. Several passes per batch. The paper does not say how many optimisation steps use one batch of
   rollouts. With num_iterations > 1, old_logp is computed once, from the policy that sampled the
   rollouts, and kept for every pass; on the first pass rho = 1 and the gradient is the plain policy
   gradient, later passes are where clipping acts.
7. Truncated completions. A completion cut at max_new_tokens has no final answer, so its reward punishes
   its length rather than its reasoning. `loss_mask(..., mask_truncated=True)` leaves such completions out
   of the loss (DAPO's overlong filtering); they still count in the group statistics of eq. (1).
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LOSS_TYPES = ("sequence", "token", "dr_grpo")


# eq. (1): group-normalised advantage
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each group of `group_size` consecutive rows; (N,) -> (N,).

    Population std (divide by G), as eq. (1). scale=False gives r_i - mean. A group whose rewards are all
    equal gives exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape (N,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards: N={rewards.numel()} is not a multiple of group_size={group_size}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    r = r.view(-1, group_size)  # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)  # (B, G)
    std = r.std(dim=1, correction=0, keepdim=True)  # (B, 1) population std
    flat = (r == r[:, :1]).all(dim=1, keepdim=True) | (std == 0)  # (B, 1) rounding noise is not signal
    centred = centred.masked_fill(flat, 0.0)  # (B, G)
    adv = centred / (std + eps) if scale else centred  # (B, G)
    return adv.reshape(-1)  # (N,)


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """Zero the rows of truncated completions when mask_truncated (DAPO overlong filtering); (N, T) -> (N, T)."""
    if truncated.shape != completion_mask.shape[:1]:
        raise ValueError(f"truncated: expected shape ({completion_mask.shape[0]},), got {tuple(truncated.shape)}")
    if not mask_truncated:
        return completion_mask
    keep = ~truncated.bool()  # (N,)
    return completion_mask * keep[:, None].to(completion_mask.dtype)  # (N, T)


def loss_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of loss tokens, number of completions with at least one loss token) of a (N, T) mask.

    Sum these over micro-batches and all-reduce them over ranks to get `num_tokens` and `num_sequences`.
    """
    per_row = mask.bool().sum(dim=1)  # (N,)
    return per_row.sum(), (per_row > 0).sum()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman 2020): exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp  # (N, T)
    return torch.exp(d) - d - 1  # (N, T), >= 0


def _divisor(given, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The caller's global count if given, else the local one; at least 1 so an empty batch gives 0, not NaN."""
    count = local if given is None else given
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, num_tokens=None,
              num_sequences=None, max_new_tokens=None) -> torch.Tensor:
    """Reduce a (N, T) per-token loss to a scalar as `loss_type` says (departure 4 at the top)."""
    w = mask.to(per_token.dtype)  # (N, T)
    local_tokens, local_sequences = loss_counts(mask)
    if loss_type == "sequence":  # mean over each completion's tokens, then over completions (GRPO)
        per_seq = (per_token * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # (N,)
        return per_seq.sum() / _divisor(num_sequences, local_sequences, per_token)
    if loss_type == "token":  # mean over all tokens of the batch (DAPO)
        return (per_token * w).sum() / _divisor(num_tokens, local_tokens, per_token)
    if loss_type == "dr_grpo":  # sum over tokens / (N * max_new_tokens) (Dr. GRPO)
        if max_new_tokens is None:
            raise ValueError("loss_type='dr_grpo' needs max_new_tokens")
        return (per_token * w).sum() / (_divisor(num_sequences, local_sequences, per_token) * max_new_tokens)
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


def _check_shapes(logp, old_logp, ref_logp, advantages, mask):
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)} like logp, got {tuple(x.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected shape ({logp.shape[0]},), got {tuple(advantages.shape)}")


# eq. (2): clipped surrogate minus the KL penalty, negated
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, beta=0.04,
              loss_type="sequence", num_tokens=None, max_new_tokens=None, num_sequences=None):
    """The GRPO loss (negative of eq. (2)) and a dict of detached scalar metrics.

    logp, old_logp, ref_logp: (N, T) log-probabilities of the sampled completion tokens under the policy,
    the policy that sampled them, and the reference model; ref_logp may be None when beta == 0.
    advantages: (N,) from group_advantages. mask: (N, T), 1 on completion tokens including the stop token.
    num_tokens / num_sequences: global counts from loss_counts (all micro-batches, all ranks); None means
    this batch's counts. Gradient flows only through logp; positions where mask == 0 get exactly zero.
    """
    _check_shapes(logp, old_logp, ref_logp, advantages, mask)
    if beta != 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but beta={beta}; pass the reference log-probs or set beta=0")
    keep = mask.bool()  # (N, T)
    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 log-probs: do the loss math in fp32
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)  # (N, T)
    ref_logp = None if ref_logp is None else ref_logp.to(dtype)  # (N, T)
    adv = advantages.detach().to(dtype)[:, None]  # (N, 1)
    # Padding may hold any value (even -inf): fill it before exp so it can neither overflow nor give NaN grads.
    log_ratio = (logp - old_logp.detach()).masked_fill(~keep, 0.0)  # (N, T)
    ratio = torch.exp(log_ratio)  # (N, T) per-token rho (departure 1)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)  # (N, T)
    surrogate = torch.minimum(ratio * adv, clipped * adv)  # (N, T) eq. (2)
    kl = torch.zeros_like(ratio)  # (N, T)
    if ref_logp is not None:
        kl = kl_k3(logp.masked_fill(~keep, 0.0), ref_logp.detach().masked_fill(~keep, 0.0))  # (N, T)
    per_token = -(surrogate - beta * kl)  # (N, T)
    loss = aggregate(per_token, keep, loss_type, num_tokens, num_sequences, max_new_tokens)
    return loss, _metrics(ratio, adv, kl, keep, clip_low, clip_high)


@torch.no_grad()
def _metrics(ratio, adv, kl, keep, clip_low, clip_high) -> dict:
    """Means over this batch's loss tokens, as 0-dim tensors (no host sync here)."""
    w = keep.to(ratio.dtype)  # (N, T)
    n = w.sum().clamp(min=1)
    lengths = w.sum(dim=1)  # (N,)
    low = (ratio < 1 - clip_low) & (adv < 0) & keep  # (N, T) clipped term chosen on the low side
    high = (ratio > 1 + clip_high) & (adv > 0) & keep  # (N, T) clipped term chosen on the high side
    return {
        "kl": (kl * w).sum() / n,
        "clip_low": low.sum() / n,
        "clip_high": high.sum() / n,
        "ratio": (ratio * w).sum() / n,
        "length": lengths.sum() / (lengths > 0).sum().clamp(min=1),  # over completions left in the loss
    }


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probabilities of completions, with their images: each prompt read once per group
#
# The G completions of a prompt share its images and its prompt tokens. Repeating the prompt G times (what a
# plain forward over prompt + completion does) runs the vision tower and every prompt token G times, with
# gradients: at the paper's shape (two 256-token images, a ~620-token prompt, completions up to 512 tokens,
# G=10) about half of the update's token work is a prompt read again. Instead, as sample.py does for sampling
# (prefill, expand, extend), and with autograd:
#
#   1. `prompt_pass`: the vision tower and the B prompts, once, recording each layer's keys and values;
#   2. `PromptCache.expand(G)`: each prompt's keys and values read by its G rows (a differentiable copy:
#      autograd sums the G rows' gradients back into the prompt's);
#   3. `completion_logits`: the N = B*G completions run over that cache.
#
# In exact arithmetic the log-probabilities and every gradient equal those of the repeated forward (Prefix
# Grouper, Liu et al. 2025, arXiv 2506.05433, shows the same); tests/test_grpo.py checks both to 1e-5 against
# the repeated forward, with and without activation checkpointing.


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
        raise ValueError("completion_logprobs: batch['attention_mask'] must be left-padded (last column all ones)")
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
    from sample import layer_masks
    B, (N, T) = batch["input_ids"].shape[0], completions.shape
    if N % B:
        raise ValueError(f"completion_logprobs: {N} completions do not split into {B} prompts")
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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024) -> torch.Tensor:
    """log_softmax(logits / temperature) at `tokens`: (N, T, V), (N, T) -> (N, T) float32, `chunk` positions
    at a time (the logits may be bf16). Without autograd (the reference pass) this bounds the fp32 copy to one
    chunk; with autograd it does not: each chunk's fp32 logits are kept for the backward pass, so the saved
    tensors add up to a whole (N, T, V) in fp32 whatever the chunk."""
    out = []
    for t in range(0, tokens.shape[1], chunk):
        part = logits[:, t:t + chunk].float() / max(temperature, 1e-6)  # (N, t', V)
        out.append(part.gather(-1, tokens[:, t:t + chunk, None])[..., 0] - part.logsumexp(-1))  # (N, t')
    return torch.cat(out, dim=1)  # (N, T)


def completion_logprobs(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """log pi(token) of every completion token; each prompt and its images run once for its G completions.

    batch: the processor's output for B prompts; completions, completion_mask: (N, T) with N = B*G,
    prompt-major. Logits are divided by the sampling temperature, so that at the first pass these equal
    the log-probabilities the sampler drew the tokens with. Gradients (when enabled) reach every weight
    through the completions and through the shared prompt, vision tower included.
    Returns (N, T) float32; positions where completion_mask is 0 hold garbage that callers mask out.
    """
    logits = completion_logits(model, batch, completions, completion_mask)  # (N, T+1, V)
    return token_logprobs(logits[:, :-1], completions, temperature, chunk)  # (N, T)
