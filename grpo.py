"""GRPO: turn the rewards of a group of rollouts into a loss (section 3.3 of the paper).

    eq. (1)  A_i = (r_i - mu) / (sigma + eps),  mu, sigma^2 = mean and population variance of the G rewards
    eq. (2)  L(theta) = E_i[ min(rho_i A_i, clip(rho_i, 1 +- eps) A_i) - lambda KL(pi_theta || pi_ref) ]

`group_advantages` is eq. (1), `grpo_loss` the negative of eq. (2) (we minimise), `completion_logprobs` its
log-probabilities (the reference model's: `reference_logprobs`). Rows are prompt-major: rows b*G .. b*G+G-1 are
the G rollouts of prompt b. Shapes: B prompts, G rollouts per prompt, N = B*G rows, T completion tokens.
Tests: .venv/bin/python -m pytest -q tests/test_grpo.py

Where this departs from the paper's eq. (1)-(2), and why:
1. Per-token ratios rho_i,t, each clipped (GRPO, DeepSeekMath, Shao et al. 2024): eq. (2)'s ratio of whole
   completions, a product of hundreds of per-token ratios, almost never stays in [1-eps, 1+eps].
2. A group whose rewards are all equal gets advantages of exactly 0: there r_i - mu and sigma are rounding noise
   (~7e-9 for ten 0.1s in float32), which the division would turn into ~0.01. `scale=False` drops the division
   (Dr. GRPO, Liu et al. 2025: it over-weights prompts that are almost always, or almost never, solved).
3. The paper does not say how KL is estimated: each token adds beta * k3 (Schulman 2020: exp(d) - d - 1,
   d = ref - logp; beta is its lambda), as DeepSeekMath: never negative, low variance, no full distributions.
4. E_i averages each completion's tokens, then the completions (`loss_type="sequence"`, GRPO), which gives a long
   completion's tokens less weight; "token" divides the sum by the number of tokens (DAPO, Yu et al. 2025),
   "dr_grpo" by N * max_new_tokens (Dr. GRPO). The counts may be global (`loss_counts` over all micro-batches
   and ranks), so the summed micro-batch losses are exactly the batch's.
5. `clip_low`, `clip_high`: equal values are the paper's; a larger clip_high ("clip-higher", DAPO) lets unlikely
   tokens gain probability faster, which keeps the policy from collapsing to low entropy.
6. old_logp is the first pass's own reading, detached (train.py's departure 2), so rho = 1 on the first pass;
   later passes (num_iterations > 1; the paper does not say) are where clipping acts.
7. Truncated completions (no stop token by max_new_tokens) leave the loss with `mask_truncated=True` (DAPO's
   overlong filtering): their reward punishes length, not reasoning. They still count in eq. (1)'s group.
8. Log-probabilities are the tempered ones rollouts are drawn from, softmax(logits / temperature), for the policy
   and the reference (as TRL and verl): the KL of a policy that has not moved stays 0 at any temperature.
"""

import torch
from torch.utils.checkpoint import checkpoint

from infra.parallel import gathered
from models.internals import completion_hidden
from report.metrics import loss_metrics

LOSS_TYPES = ("sequence", "token", "dr_grpo")


# eq. (1): group-normalised advantage
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each group of `group_size` consecutive rows; (N,) -> (N,).
    Population std (divide by G); scale=False gives r_i - mean; an all-equal group gives exactly 0 (departure 2)."""
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

    logp, old_logp, ref_logp: (N, T) log-probabilities of the sampled tokens under the policy, pi_old and the
    reference model (ref_logp may be None when beta == 0); advantages (N,); mask (N, T), 1 on the tokens in the
    loss, stop token included. num_tokens / num_sequences: global counts (`loss_counts`), None for this batch's.
    Gradient flows only through logp; positions where mask == 0 get exactly zero.
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
    return loss, loss_metrics(ratio, adv, kl, keep, clip_low, clip_high)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman 2020): exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp  # (N, T)
    return torch.exp(d) - d - 1  # (N, T), >= 0


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, num_tokens=None,
              num_sequences=None, max_new_tokens=None) -> torch.Tensor:
    """Reduce a (N, T) per-token loss to a scalar as `loss_type` says (departure 4). `num_tokens`, `num_sequences`:
    global counts, this batch's when None; at least 1, so that an empty batch gives 0, not NaN."""
    tokens, sequences = loss_counts(mask)  # this batch's
    count = lambda given, local: torch.as_tensor(local if given is None else given, dtype=per_token.dtype,
                                                 device=per_token.device).clamp(min=1)
    w = mask.to(per_token.dtype)  # (N, T)
    if loss_type == "sequence":  # mean over each completion's tokens, then over completions (GRPO)
        per_seq = (per_token * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # (N,)
        return per_seq.sum() / count(num_sequences, sequences)
    if loss_type == "token":  # mean over all tokens of the batch (DAPO)
        return (per_token * w).sum() / count(num_tokens, tokens)
    if loss_type == "dr_grpo":  # sum over tokens / (N * max_new_tokens) (Dr. GRPO)
        if max_new_tokens is None:
            raise ValueError("loss_type='dr_grpo' needs max_new_tokens")
        return (per_token * w).sum() / (count(num_sequences, sequences) * max_new_tokens)
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


def _check_shapes(logp, old_logp, ref_logp, advantages, mask):
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)} like logp, got {tuple(x.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected shape ({logp.shape[0]},), got {tuple(advantages.shape)}")


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """Zero the rows of truncated completions when mask_truncated (DAPO overlong filtering); (N, T) -> (N, T)."""
    if truncated.shape != completion_mask.shape[:1]:
        raise ValueError(f"truncated: expected shape ({completion_mask.shape[0]},), got {tuple(truncated.shape)}")
    if not mask_truncated:
        return completion_mask
    keep = ~truncated.bool()  # (N,)
    return completion_mask * keep[:, None].to(completion_mask.dtype)  # (N, T)


def loss_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of loss tokens, number of completions with at least one loss token) of a (N, T) mask: summed over
    micro-batches and ranks, `grpo_loss`'s `num_tokens` and `num_sequences`."""
    per_row = mask.bool().sum(dim=1)  # (N,)
    return per_row.sum(), (per_row > 0).sum()


# ---------------------------------------------------------------------------------------------------------
# eq. (2)'s log-probabilities: one forward over each row's prompt and completion (fast/shared_prompt.py reads each
# prompt once instead of G times: another `hidden`), stopped at the final hidden states; `token_logprobs` runs the
# LM head a chunk at a time, as its (N, T, V) output would be the update's largest tensor (3.1 GB in fp32 at G=10).


def completion_logprobs(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, hidden=None) -> torch.Tensor:
    """log pi(token) of every completion token (N, T) float32, at the sampling temperature (departure 8).

    batch: the processor's output for B left-padded prompts; completions, completion_mask: (N, T), N = B*G.
    `hidden` computes the final hidden states (`completion_hidden` when None). Gradients, when enabled, reach
    every weight, the vision tower's included; where completion_mask is 0 the values are garbage, masked later.
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

    `chunk` tokens at a time, so the (N, T, V) logits never exist at once; with autograd each chunk is recomputed
    in the backward (`torch.utils.checkpoint`), not kept (as Liger's fused linear cross-entropy and verl do).
    A frozen model's head is an FSDP2 unit of its own: it is gathered once for all the chunks, whose number
    depends on this rank's T, since a gather at each chunk is a collective the other ranks would not join.
    """
    N, T = tokens.shape
    states, ids = hidden.reshape(N * T, -1), tokens.reshape(N * T)  # (N*T, C), (N*T,)
    recompute = torch.is_grad_enabled() and states.requires_grad
    out = []
    with gathered(head):
        for i in range(0, N * T, chunk):
            args = (head, states[i:i + chunk], ids[i:i + chunk], temperature)
            out.append(checkpoint(chunk_logprobs, *args, use_reentrant=False) if recompute else chunk_logprobs(*args))
    return torch.cat(out).view(N, T)  # (N, T)


def chunk_logprobs(head, states: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, C) hidden states, (n,) tokens -> (n,) log_softmax(logits / temperature) at the tokens, in float32."""
    logits = head(states).float() / max(temperature, 1e-6)  # (n, V)
    return logits.gather(-1, ids[:, None])[:, 0] - logits.logsumexp(-1)  # (n,)
