"""Sampling: G rollouts per prompt from the policy, with a KV cache: prefill, expand, decode, choose.

GRPO (section 3.3 of the paper) needs G completions of every prompt and each sampled token's log-probability.
`model.generate(num_return_sequences=G)` would run every prompt and its images G times; `sample` instead runs,
as nanochat's engine and gpt-fast's generate do,
1. `prefill`: the vision tower and the B prompts once, filling a KV cache (every layer's keys and values);
2. `expand`: the cache copied to each prompt's G rollouts (rows b*G .. b*G+G-1 are prompt b);
3. decode: all N = B*G rows advance one token per step together (`extend`), finished rows emit pad; the only
   host sync is an "all finished?" check every few steps;
4. `choose`: each row's next token from its logits, and the log-probability it was drawn with.
Steps 2-3 are the seam for speed: `decoder=` takes any object with `start` and `step`, as `CopiedCache` has;
fast/static_decode.py is the other (tests/test_sample.py: the same rollouts; greedy ones are `model.generate`'s).

Positions are passed explicitly. Qwen-VL's rotary positions (mRoPE) give a text token one number on all three axes:
its text position (the real tokens before it) plus its prompt's rope delta (how much less than their token count
the prompt's images advanced it: `get_rope_index`). Left padding makes them differ by row, and the model's own
cached `rope_deltas` are the last call's. `prefill`, `expand` and `extend` also serve the listener.
Shapes: B prompts, G rollouts per prompt, N = B*G rows, P prompt tokens, T new tokens, V vocabulary.
Tests: .venv/bin/python -m pytest -q tests/test_sample.py     Benchmark: .venv/bin/python bench/sample.py
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from models.internals import generation_eos_ids, layer_masks, model_device

VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# ----------------------------------------------------------------------------------------------------------
# The rollout loop


@torch.no_grad()
def sample(model, batch: dict, num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None, decoder=None,
           check_every: int = 8) -> Rollouts:
    """Sample `num_samples` (G) completions of each prompt in `batch` (a processor batch of B prompts).

    A completion ends with the first of `stop_token_ids` (`models.processor.end_of_turn_ids` in training and
    evaluation; the generation config's when None; `[]` never stops), then its row holds `pad_token_id` (pass the
    tokenizer's: real Qwen configs have none). Vision tokens are never sampled: an emitted <|image_pad|> would
    break the next forward. `generator` (on the model's device) makes sampling reproducible; a list of B, one per
    prompt, makes each prompt's rollouts independent of its batch. `decoder`: steps 2-3 (`CopiedCache` when None).
    "All finished?" is asked every `check_every` steps, so up to `check_every - 1` all-pad steps may end a batch.
    Under FSDP2 call it inside `infra.parallel.gathered(model)`, so the weights are gathered once, not every step.
    """
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    device = model_device(model)
    state = prefill(model, batch)  # 1. B rows
    decoder = CopiedCache() if decoder is None else decoder
    logits = decoder.start(model, state, num_samples, max_new_tokens)  # 2. (N, V)
    N, V = logits.shape
    pad = model.config.get_text_config().pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("sample: the model config has no pad_token_id; pass pad_token_id (the tokenizer's)")
    stop_ids = torch.tensor(generation_eos_ids(model) if stop_token_ids is None else list(stop_token_ids),
                            dtype=torch.long, device=device)
    vision = [i for i in (getattr(model.config, k, None) for k in VISION_TOKEN_KEYS) if i is not None and i < V]
    bias = torch.zeros(V, device=device).index_fill_(0, torch.tensor(vision, dtype=torch.long, device=device),
                                                       float("-inf"))  # (V,) never a vision token
    tokens = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=device)  # (N, T)
    logprobs = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)  # (N, T)
    mask = torch.zeros((N, max_new_tokens), dtype=torch.bool, device=device)  # (N, T)
    stopped = torch.zeros(N, dtype=torch.bool, device=device)  # (N,) emitted its stop token: finished
    steps = 0
    for t in range(max_new_tokens):
        token, logp = choose(logits, bias, temperature, top_k, top_p, generator)  # 4. (N,), (N,)
        live = ~stopped  # (N,) rows still writing; their token is part of the completion
        tokens[:, t] = torch.where(live, token, pad)
        logprobs[:, t] = torch.where(live, logp, 0.0)
        mask[:, t] = live
        hit = live & torch.isin(token, stop_ids)  # (N,) the stop token is the completion's last token
        stopped |= hit
        steps = t + 1
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(stopped.all())):
            break
        logits = decoder.step(tokens[:, t], live)  # 3. one decode step: (N,) -> (N, V)
    return Rollouts(tokens[:, :steps], logprobs[:, :steps], mask[:, :steps], stopped)


@dataclass
class Rollouts:
    """G completions of each of B prompts, prompt-major: rows b*G .. b*G+G-1 belong to prompt b."""
    tokens: Tensor  # (N, T) completion ids; pad after the stop token
    logprobs: Tensor  # (N, T) float32 log_softmax(logits / temperature) at each sampled token, 0 on padding
    mask: Tensor  # (N, T) bool: the completion's tokens, stop token included, padding excluded
    stopped: Tensor  # (N,) bool: emitted a stop token (else cut at max_new_tokens)

    def texts(self, tokenizer) -> list[str]:
        """Each completion's text up to, not including, its stop token. Special tokens inside a completion stay
        visible: a stray <|im_start|> must fail the format check, not vanish from the text."""
        lengths = self.mask.sum(-1) - self.stopped.long()  # (N,) tokens before the stop token
        return [tokenizer.decode(row[:n], skip_special_tokens=False)
                for row, n in zip(self.tokens.tolist(), lengths.tolist())]


def seeded_generators(device, keys: Sequence[tuple]) -> list[torch.Generator]:
    """One generator per prompt, seeded by its key (a tuple of ints, such as (seed, step, index)): a prompt's
    rollouts then depend on its key alone, not on the batch, the process or the restart that draws them."""
    return [torch.Generator(device).manual_seed(hash(tuple(key)) % 2**62) for key in keys]


# ----------------------------------------------------------------------------------------------------------
# Choosing the next token


def choose(logits: Tensor, bias: Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor]:
    """Pick one token per row; return (token (N,), its log-prob (N,)). Temperature 0 is greedy.

    The log-prob is log_softmax(logits / temperature) at the token (the unscaled logits' when greedy), taken before
    the vision tokens, top-k and top-p are removed: what a training forward computes for it (to 1e-6 in fp32).
    Truncating (top_k > 0, top_p < 1) makes rollouts slightly off-policy, as in every sampler that truncates.
    """
    logits = logits.float()  # (N, V)
    scaled = logits / temperature if temperature > 0 else logits  # (N, V)
    logp_all = scaled.log_softmax(-1)  # (N, V) the policy's distribution
    allowed = scaled + bias  # (N, V) never a vision token
    if temperature > 0:
        probs = filter_top_k_top_p(allowed, top_k, top_p).softmax(-1)  # (N, V)
        # argmax(p / q) with q ~ Exp(1) is a sample from p, without the host sync of torch.multinomial
        # (gpt-fast); q is kept away from 0 so a zero-probability token can never win.
        q = exponential_noise(probs, generator).clamp_(min=torch.finfo(probs.dtype).tiny)  # (N, V)
        token = (probs / q).argmax(-1)  # (N,)
    else:
        token = allowed.argmax(-1)  # (N,)
    return token, logp_all.gather(-1, token[:, None])[:, 0]  # (N,), (N,)


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """-inf at every logit outside the top-k (ties with the k-th kept) or outside the top-p nucleus (the fewest most
    likely tokens whose probability reaches top_p, at least one). (N, V) -> (N, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)  # (N, V)
        mass_before = probs.cumsum(-1) - probs  # (N, V) probability of the more likely tokens
        drop_sorted = mass_before >= top_p  # (N, V) the nucleus is already full without them
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (N, V) back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def exponential_noise(like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Exp(1) noise shaped like `like` (N, V). With one generator per prompt, each prompt's G rows draw from
    their own generator: a prompt's rollouts then do not depend on which other prompts share the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    rows = like.shape[0] // len(generator)  # G rows per prompt
    return torch.cat([torch.empty_like(like[:rows]).exponential_(1.0, generator=g) for g in generator])


# ----------------------------------------------------------------------------------------------------------
# The KV cache: prefill, expand, extend


@dataclass
class DecodeState:
    """Rows on a KV cache, as they grow: the cache and what is needed to feed them more tokens."""
    cache: DynamicCache
    attention_mask: Tensor  # (N, S) 1 for the real tokens of the S cached: prompt padding and extension padding are 0
    next_position: Tensor  # (N,) text position of the next token = number of real tokens so far
    rope_deltas: Tensor  # (N, 1) mRoPE position of a text token = its text position + delta
    logits: Tensor  # (N, V) next-token logits after each row's last real token


def prefill(model, batch: dict, cache: DynamicCache | None = None) -> DecodeState:
    """Run the vision tower and the left-padded prompts once; return their cache and next-token logits.
    `batch`: a `models.processor.Processor` batch of B prompts; `cache`: where the keys and values go (a fresh
    `DynamicCache` when None; fast/shared_prompt.py passes its own)."""
    device = model_device(model)
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, P), (B, P)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prefill: batch['attention_mask'] must be left-padded (last column all ones)")
    position_ids, rope_deltas = model.model.get_rope_index(
        input_ids, batch["mm_token_type_ids"], batch.get("image_grid_thw"), attention_mask=attention_mask,
    )  # (3, B, P), (B, 1)
    cache = DynamicCache(config=model.config) if cache is None else cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"), logits_to_keep=1)
    return DecodeState(cache=out.past_key_values, attention_mask=attention_mask,
                       next_position=attention_mask.sum(-1),  # (B,)
                       rope_deltas=rope_deltas.to(device), logits=out.logits[:, -1])  # (B, 1), (B, V)


def expand(state: DecodeState, G: int) -> DecodeState:
    """Each row repeated G times (rows b*G .. b*G+G-1 copy row b), the KV cache copied, not recomputed."""
    repeat = lambda t: t.repeat_interleave(G, dim=0)  # (B, ...) -> (N, ...)
    cache = DynamicCache([(repeat(layer.keys), repeat(layer.values)) for layer in state.cache.layers])
    return DecodeState(cache=cache, attention_mask=repeat(state.attention_mask),  # (N, S)
                       next_position=repeat(state.next_position), rope_deltas=repeat(state.rope_deltas),
                       logits=repeat(state.logits))  # (N,), (N, 1), (N, V)


def extend(model, state: DecodeState, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0) -> Tensor:
    """Feed (N, T) more tokens on top of the cache; return their logits (N, T, V), or with `logits_to_keep=k` the
    last k positions' (N, k, V), enough for left-padded continuations. `attention_mask` (N, T) marks the real tokens;
    others (padding, anywhere) are cached, never attended to, and do not advance the text position. `state` is
    updated in place, its logits those after each row's last real token (kept for a row with none)."""
    mask = attention_mask.to(state.attention_mask)  # (N, T)
    T = mask.shape[1]
    text_position = state.next_position[:, None] + mask.cumsum(-1) - 1  # (N, T) real tokens count up
    position_ids = (text_position + state.rope_deltas).unsqueeze(0).expand(3, -1, -1)  # (3, N, T) mRoPE
    full_mask = torch.cat([state.attention_mask, mask], dim=-1)  # (N, S + T)
    out = model(input_ids=input_ids, attention_mask=layer_masks(model, state.cache, full_mask, T),
                position_ids=position_ids, past_key_values=state.cache, use_cache=True,
                logits_to_keep=logits_to_keep)
    logits = out.logits  # (N, T or k, V)
    last = T - 1 - mask.flip(-1).argmax(-1)  # (N,) index of the last real token (0 when there is none)
    first_kept = T - logits.shape[1]
    if logits_to_keep and bool((mask.any(-1) & (last < first_kept)).any()):  # checked only when asked for
        raise ValueError(f"extend: a row's last real token is outside the last {logits_to_keep} positions")
    last_logits = logits[torch.arange(logits.shape[0], device=logits.device), (last - first_kept).clamp(min=0)]
    has_real = mask.any(-1, keepdim=True)  # (N, 1)
    state.cache = out.past_key_values
    state.attention_mask = full_mask
    state.next_position = state.next_position + mask.sum(-1)  # (N,)
    state.logits = torch.where(has_real, last_logits, state.logits)  # (N, V)
    return logits


class CopiedCache:
    """The reference decode, steps 2-3: each prompt's cache copied to its G rows (`expand`), then one `extend`
    of one token per row per step on the growing cache. `sample`'s default; any decoder has these two methods."""

    def start(self, model, state: DecodeState, G: int, max_new_tokens: int) -> Tensor:
        """Take the B prompts' cache; return the logits of each of the N rows' first token (N, V)."""
        self.model, self.state = model, expand(state, G)
        return self.state.logits

    def step(self, token: Tensor, live: Tensor) -> Tensor:
        """Feed one token per row (N,); rows not `live` are cached but never attended to. Returns (N, V)."""
        extend(self.model, self.state, token[:, None], live[:, None])  # (N, 1) -> (N, 1, V)
        return self.state.logits
