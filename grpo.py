"""GRPO: turn the rewards of a group of rollouts into a loss.

Section 3.3 of the paper (Group Relative Policy Optimisation):

    eq. (1)  A_i = (r_i - mu) / (sigma + eps),  mu, sigma^2 = mean and population variance of the G rewards
    eq. (2)  L(theta) = E_i[ min(rho_i A_i, clip(rho_i, 1 +- eps) A_i) - lambda KL(pi_theta || pi_ref) ]

`group_advantages` is eq. (1), `grpo_loss` is the negative of eq. (2) (we minimise), `loss_mask` drops
truncated completions from the loss, `loss_counts` gives the token and completion counts that make the
loss exact across micro-batches and ranks. `completion_logprobs` gives the log-probabilities eq. (2) needs:
the policy's (train.py's update) and the reference model's (`reference_logprobs`), one forward over each prompt
and its completion, the LM head read a chunk of tokens at a time (the section at the end). Rows are ordered
prompt-major everywhere: rows b*G .. b*G+G-1 are the G rollouts of prompt b.

Shapes: B prompts, G rollouts per prompt, N = B*G rows, P prompt tokens, T completion tokens, V vocabulary.
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
   rollouts. old_logp is the first pass's own reading of the rollouts, detached (train.py's departure 2), and
   kept for every later pass: on the first pass rho = 1 exactly and the gradient is the plain policy gradient;
   later passes (num_iterations > 1) are where clipping acts.
7. Truncated completions. A completion cut at max_new_tokens has no final answer, so its reward punishes
   its length rather than its reasoning. `loss_mask(..., mask_truncated=True)` leaves such completions out
   of the loss (DAPO's overlong filtering); they still count in the group statistics of eq. (1).
8. Tempered log-probabilities. The rollouts are drawn from softmax(logits / temperature), so rho compares
   the tempered policies (TRL and verl do the same). The reference model's log-probabilities are taken at
   the same temperature, so the KL term is between the tempered policy and the tempered reference, not
   between the models as they are; at temperature 1 (the default) the two are the same. Tempering both keeps
   the penalty zero for a policy that has not moved, whatever the temperature.
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from models.processor import prompt_rows

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


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman 2020): exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp  # (N, T)
    return torch.exp(d) - d - 1  # (N, T), >= 0


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


def _divisor(given, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The caller's global count if given, else the local one; at least 1 so an empty batch gives 0, not NaN."""
    count = local if given is None else given
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


def _check_shapes(logp, old_logp, ref_logp, advantages, mask):
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)} like logp, got {tuple(x.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected shape ({logp.shape[0]},), got {tuple(advantages.shape)}")


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


# ---------------------------------------------------------------------------------------------------------
# eq. (2)'s log-probabilities: one forward over prompt + completion
#
# The policy's and the reference model's log-probability of every completion token. Each of the N rows is its
# prompt (images included) followed by its completion, in one forward pass: simple and plainly right, and G
# times the prompt's work. fast/shared_prompt.py reads each prompt once for its G completions instead, with the
# same numbers and gradients (tests/test_grpo.py): it is the other `hidden` function of `completion_logprobs`.
#
# The LM head's output over a batch, (N, T, V) with V = 152,064, is the largest tensor of the update: 10 rollouts
# of 512 tokens give 3.1 GB of fp32 logits, 4.7 GB with their bf16 copy, and a backward pass would keep them.
# So the forward stops at the final hidden states (N, T, C), C = 3,584, and the head and the log-softmax run a
# chunk of tokens at a time (`token_logprobs`), each chunk recomputed in the backward pass instead of kept.


def completion_logprobs(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, hidden=None) -> torch.Tensor:
    """log pi(token) of every completion token (N, T) float32, at the sampling temperature (departure 8).

    batch: the processor's output for B left-padded prompts; completions, completion_mask: (N, T) with N = B*G,
    prompt-major. `hidden`: how the final hidden states are computed, `completion_hidden` (one forward per row,
    the default) or fast/shared_prompt.py's. Gradients (when enabled) reach every weight, the vision tower's
    included. Positions where completion_mask is 0 hold garbage that callers mask out.
    """
    states = (hidden or completion_hidden)(model, batch, completions, completion_mask)  # (N, T+1, C)
    return token_logprobs(model.lm_head, states[:, :-1], completions, temperature)  # (N, T)


@torch.no_grad()
def reference_logprobs(model, micro, completions: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                       hidden=None) -> torch.Tensor:
    """The reference model's log-probs of N completions (N, T), for eq. (2)'s KL term: `completion_logprobs` a
    micro-batch at a time, no gradient. `micro`: [(processor batch of some prompts, the slice of their rows)]."""
    return torch.cat([completion_logprobs(model, mb, completions[rows], completion_mask[rows], temperature, hidden)
                      for mb, rows in micro])  # (N, T)


def token_logprobs(head, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024) -> torch.Tensor:
    """log_softmax(head(hidden) / temperature) at `tokens`: (N, T, C), (N, T) -> (N, T) float32.

    `chunk` tokens at a time go through the LM head and the fp32 log-softmax, so the (N, T, V) logits never exist
    at once. With autograd each chunk is recomputed in the backward pass (`torch.utils.checkpoint`) instead of
    keeping its logits: the pass keeps the (N, T, C) hidden states and (N, T) log-probs, a few MB, where the logits
    would be GB (Liger's fused linear cross-entropy and verl's chunked log-probs do the same).
    """
    N, T = tokens.shape
    states, ids = hidden.reshape(N * T, -1), tokens.reshape(N * T)  # (N*T, C), (N*T,)
    recompute = torch.is_grad_enabled() and states.requires_grad
    out = []
    for i in range(0, N * T, chunk):
        args = (head, states[i:i + chunk], ids[i:i + chunk], temperature)
        out.append(checkpoint(chunk_logprobs, *args, use_reentrant=False) if recompute else chunk_logprobs(*args))
    return torch.cat(out).view(N, T)  # (N, T)


def chunk_logprobs(head, states: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, C) hidden states, (n,) tokens -> (n,) log_softmax(logits / temperature) at the tokens, in float32."""
    logits = head(states).float() / max(temperature, 1e-6)  # (n, V)
    return logits.gather(-1, ids[:, None])[:, 0] - logits.logsumexp(-1)  # (n,)


def completion_hidden(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states before and after each completion token: (N, T+1, C), index t predicts token t.

    batch: the processor's output for B left-padded prompts; completions, completion_mask: (N, T) with N = B*G,
    prompt-major. Index 0 is the last prompt position, index t > 0 follows completion token t-1. One forward over
    each row's prompt and completion.
    """
    (N, T), B = completions.shape, batch["input_ids"].shape[0]
    if N % B:
        raise ValueError(f"completion_hidden: {N} completions do not split into {B} prompts")
    rows = prompt_rows(batch, [b for b in range(B) for _ in range(N // B)])  # each prompt G times, images too
    input_ids = torch.cat([rows["input_ids"], completions], dim=1)  # (N, P+T)
    attention_mask = torch.cat([rows["attention_mask"], completion_mask.to(rows["attention_mask"].dtype)], dim=1)
    mm_types = torch.cat([rows["mm_token_type_ids"], torch.zeros_like(completions, dtype=rows["mm_token_type_ids"].dtype)], 1)
    position_ids, _ = model.model.get_rope_index(input_ids, mm_types, rows.get("image_grid_thw"),
                                                 attention_mask=attention_mask)  # (3, N, P+T) mRoPE
    with final_hidden(model) as states:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              pixel_values=rows.get("pixel_values"), image_grid_thw=rows.get("image_grid_thw"),
              mm_token_type_ids=mm_types, use_cache=False, logits_to_keep=1)
    return states[0][:, -(T + 1):]  # (N, T+1, C)


@contextlib.contextmanager
def final_hidden(model):
    """Collect the final hidden states (the last norm's output, what the LM head reads), (rows, S, C), of each
    forward of `model` run inside; pass `logits_to_keep=1` so that the model's own LM head reads one position."""
    states = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: states.append(out))
    try:
        yield states
    finally:
        hook.remove()
