"""A static KV cache, the prompt's keys and values shared by its G rollouts, and a decode step of fixed shapes,
optionally compiled (gpt-fast): steps 2-3 of sample.py, faster.

Seam: `sample.sample(..., decoder=StaticDecoder())` runs its decode steps here instead of through
`sample.CopiedCache` (the reference, which copies each prompt's cache to its G rows and grows it by `torch.cat`
at every step). Option: `--decode=static` (eager) or `--decode=compiled`, in train.py and evaluate.py
(`make_decoder`). The prompt is prefilled once by `sample.prefill`; here its keys and values stay one copy per
prompt, and each step feeds one token per row. tests/test_sample.py checks that both decodes give the same
rollouts; bench/sample.py measures them side by side.

Shapes: B prompts (B' >= B: the compiled step's bucket), G rollouts per prompt, N = B*G rows, P prompt tokens, P'
prompt columns (P rounded up), M completion columns, Hq query heads, Hkv key/value heads, R = Hq / Hkv, D head dim,
C hidden size, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models import families
from sample import DecodeState


class StaticDecoder:
    """Decode steps over a KV cache allocated once, written in place, so every step has the same shapes.

    Each layer's cache has two parts. The prompt's keys and values, (B, Hkv, P', D), are stored once per prompt
    (P' = P rounded up to `block`), not once per rollout: the G rollouts of a prompt all attend to the same
    prompt, so their G * R query rows read its keys in one matrix product (`shared_prompt_attention`). The
    completions' keys and values, (B, Hkv, G, M, D) with M = max_new_tokens rounded up to `block`, are written
    in place, column t at step t. Boolean masks mark what each row attends to: the prompt's real tokens (left
    padding and rounding off), and the completion columns written while the row was live.

    Run eagerly (the default), a step attends to the prompt's P columns and the completion columns written so
    far, views of the cache: nothing is copied and no empty column is read. Compiled (`compile=True`:
    `torch.compile`, CUDA graphs on GPU), it attends to all P' + M columns, the masks switching off the empty
    ones, so that every step has the same shapes.

    Buckets (compiled). A training run decodes 2 pairs x G=10 and its held-out scoring up to 64 pairs x 1, in
    turn; each new shape of the step is a compilation (and a CUDA graph recorded), and past dynamo's recompile
    limit (8 shapes) the step silently runs eagerly. So the compiled step's shapes come from a few buckets:
    the prompt columns P' and completion columns M are multiples of `block` (256: one bucket for every prompt
    up to 256 tokens), and the prompts B are rounded up to a power of two (`rows_bucket`: 2, 4, ..., 64); G is
    the caller's (a run has two: --group_size and the held-out batches' 1). The prompts added are padding: they
    attend to one column of the cache (a finite softmax), feed token 0 and their logits are dropped; they cost
    compute, never the real rows' results (attention and every matrix product are row by row). Each bucket keeps its
    own cache buffers (`caches`, keyed by the bucket), so switching back to a bucket reuses the compiled step
    and the very buffers its CUDA graph was recorded with; their memory stays allocated for the decoder's life
    (at the paper's shape, the held-out bucket of 64 x 1 x (768 + 512) columns is ~4.7 GB in bf16 beside the
    training bucket's ~0.7 GB). Run eagerly, shapes change at every step anyway: the decoder keeps one set of
    buffers, sized exactly (B rows), freed before a set for another shape is allocated.

    The step runs on the model's own modules (a policy sharded by FSDP2 inside `infra.parallel.gathered`, which
    holds its bf16 weights gathered: the step calls the blocks' submodules, never an FSDP2 unit, so no hook runs),
    unless `dtype` differs from theirs or the step is replayed as a CUDA graph. A CUDA graph reads its weights
    at the addresses it was recorded with, and a sharded policy's gathered weights are freed and reallocated
    between rollouts: then the step runs on a plain copy, refreshed from the gathered weights at every `sample`
    call (every rollout and every held-out batch), after which the policy's own gathered decoder layers are
    released for the rest of the decode. The same object serves every call: the compiled step, the copy and the
    cache buffers are kept.
    """

    def __init__(self, compile: bool = False, dtype: torch.dtype | None = None, block: int = 256):
        self.compile, self.dtype, self.block = compile, dtype, block
        self.text = self.lm_head = None  # the modules the step runs
        self.caches: dict[tuple, Cache] = {}  # bucket (B', G, P', M, dtype, device) -> its buffers; one when eager
        self.cache: Cache | None = None  # the current call's
        self.step_fn = decode_step
        if compile:  # CUDA graphs on GPU: one replay per step instead of a kernel launch per operation
            self.step_fn = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if torch.cuda.is_available() else None)

    def start(self, model, prefix: DecodeState, G: int, max_new_tokens: int) -> Tensor:
        """sample.py's seam: load `model`'s text weights, take the B prompts' cache; the first logits (N, V)."""
        self.load(model)
        return self.begin(prefix, G, max_new_tokens)

    def load(self, model) -> None:
        """Point the step at `model`'s text weights (under FSDP2, inside `infra.parallel.gathered`): its own
        modules, or a plain copy."""
        from torch.distributed.fsdp import FSDPModule
        text, head = model.model.language_model, model.lm_head
        self.head_norm = families.family_of(model).head_norm  # Qwen3-VL: RMSNorm of each query and key head
        if any(kind != "full_attention" for kind in getattr(text.config, "layer_types", None) or ()):
            raise ValueError(f"StaticDecoder: config.text_config.layer_types = {text.config.layer_types}: "
                             "decode_step implements full attention only")
        dtype = self.dtype or head.weight.dtype
        sharded = any(isinstance(m, FSDPModule) for m in model.modules())
        cuda_graphs = self.compile and head.weight.is_cuda
        if head.weight.dtype == dtype and not (cuda_graphs and sharded):
            self.text, self.lm_head = text, head
            return
        if self.text is None or self.text is text:
            self.text, self.lm_head = plain_copy(text, dtype), plain_copy(head, dtype)
        for plain, source in ((self.text, text), (self.lm_head, head)):
            tensors = {name.replace("_checkpoint_wrapped_module.", ""): t  # activation checkpointing's wrapper
                       for name, t in list(source.named_parameters()) + list(source.named_buffers())}
            for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
                t.copy_(tensors[name])
        for layer in text.layers:  # the copy holds them now: the gathered layers are freed until the next gather
            if isinstance(layer, FSDPModule):
                layer.reshard()

    def begin(self, prefix: DecodeState, G: int, max_new_tokens: int) -> Tensor:
        """Copy the B prompts' cache (columns 0..P-1 of the prompt part); return the first logits (N, V)."""
        (B, P), H = prefix.attention_mask.shape, self.text.config.num_key_value_heads
        rows = rows_bucket(B) if self.compile else B  # B' prompts, B of them real
        P_cols, M = (-(-n // self.block) * self.block for n in (P, max_new_tokens))  # P', M
        weight = self.lm_head.weight
        bucket = (rows, G, P_cols, M, weight.dtype, weight.device)
        if bucket not in self.caches:
            if not self.compile:  # eager: one set, freed before the new one exists
                self.caches.clear()
                self.cache = None
            self.caches[bucket] = allocate(len(self.text.layers), rows, H, G, P_cols, M, head_dim(self.text.config),
                                           weight.dtype, weight.device)
        self.cache = cache = self.caches[bucket]
        for layer, keys, values in zip(prefix.cache.layers, cache.prompt_keys, cache.prompt_values):
            keys[:B, :, :P].copy_(layer.keys)  # (B, Hkv, P, D) once per prompt, not per rollout
            values[:B, :, :P].copy_(layer.values)
        cache.prompt_mask.zero_()
        cache.prompt_mask[:B, :P] = prefix.attention_mask.bool()  # (B, P) left padding off
        cache.prompt_mask[B:, 0] = True  # padding prompts attend to one column: a finite softmax, never read
        cache.mask.zero_()
        self.P, self.column = P, 0
        self.column_index = torch.tensor([0], device=weight.device)  # (1,) the same, on the device
        self.next_position = prefix.next_position.repeat_interleave(G, dim=0)  # (N,)
        self.rope_deltas = prefix.rope_deltas.repeat_interleave(G, dim=0)  # (N, 1)
        return prefix.logits.repeat_interleave(G, dim=0)  # (N, V)

    def step(self, token: Tensor, live: Tensor) -> Tensor:
        """Feed one token per row (N,) at the next completion column; rows not `live` are written but never
        attended to and do not advance. Returns the next-token logits (N, V)."""
        cache, N = self.cache, token.shape[0]
        rows, G, M = cache.mask.shape  # B' >= B prompts
        if self.column >= M:
            raise ValueError(f"StaticDecoder: the cache holds {M} completion columns; begin() sized it")
        cache.mask[:N // G, :, self.column] = live.view(-1, G)  # outside the step: the column changes every step
        prompt = (cache.prompt_keys, cache.prompt_values, cache.prompt_mask)  # compiled: all columns, fixed shapes
        keys, values, mask = cache.keys, cache.values, cache.mask
        if not self.compile:  # eager: the prompt's columns and the columns written so far, views of the cache
            end, P = self.column + 1, self.P
            prompt = ([k[:, :, :P] for k in prompt[0]], [v[:, :, :P] for v in prompt[1]], prompt[2][:, :P])
            keys, values, mask = [k[..., :end, :] for k in keys], [v[..., :end, :] for v in values], mask[..., :end]
        if self.compile and cache.mask.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
        position = (self.next_position[:, None] + self.rope_deltas)[:, 0]  # (N,) text position + rope delta
        padding = rows * G - N  # rows of the padding prompts: token 0 at position 0
        logits = self.step_fn(self.text, self.lm_head, *prompt, keys, values, mask, F.pad(token, (0, padding)),
                              F.pad(position, (0, padding)), self.column_index, self.head_norm)  # (B'*G, V)
        self.next_position = self.next_position + live  # (N,)
        self.column += 1
        self.column_index += 1  # in place, on the device: a tensor, so the compiled step is not recompiled
        return logits[:N]  # (N, V) the padding rows' dropped


def rows_bucket(B: int) -> int:
    """The compiled step's prompts for a batch of B: the next power of two (a few shapes for every B up to 64)."""
    return 1 << (B - 1).bit_length()


@dataclass
class Cache:
    """One bucket's buffers: the prompts' and the completions' keys and values, and what each row attends to."""
    prompt_keys: list[Tensor]  # per layer (B', Hkv, P', D)
    prompt_values: list[Tensor]  # per layer (B', Hkv, P', D)
    keys: list[Tensor]  # per layer (B', Hkv, G, M, D) the completions'
    values: list[Tensor]  # per layer (B', Hkv, G, M, D)
    prompt_mask: Tensor  # (B', P') attended
    mask: Tensor  # (B', G, M) attended


def allocate(layers: int, rows: int, H: int, G: int, P_cols: int, M: int, D: int, dtype, device) -> Cache:
    """Zeroed buffers for `layers` layers, B' = `rows` prompts, marked as static addresses: CUDA graphs may then
    write them in place (as transformers' StaticCache does)."""
    empty = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
    cache = Cache(prompt_keys=[empty(rows, H, P_cols, D) for _ in range(layers)],  # (B', Hkv, P', D)
                  prompt_values=[empty(rows, H, P_cols, D) for _ in range(layers)],
                  keys=[empty(rows, H, G, M, D) for _ in range(layers)],  # (B', Hkv, G, M, D)
                  values=[empty(rows, H, G, M, D) for _ in range(layers)],
                  prompt_mask=torch.zeros(rows, P_cols, dtype=torch.bool, device=device),  # (B', P')
                  mask=torch.zeros(rows, G, M, dtype=torch.bool, device=device))  # (B', G, M)
    for t in cache.prompt_keys + cache.prompt_values + cache.keys + cache.values:
        torch._dynamo.mark_static_address(t)
    return cache


DECODES = ("reference", "static", "compiled")  # the choices of train.py's and evaluate.py's --decode


def make_decoder(decode: str, precision: str = "fp32") -> StaticDecoder | None:
    """What `--decode` asks for: None for the reference decode (`sample.CopiedCache`), else a `StaticDecoder`, run eagerly
    ("static") or compiled ("compiled"), in bf16 under bf16 precision (infra/parallel.py)."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "reference":
        return None
    return StaticDecoder(compile=decode == "compiled", dtype=torch.bfloat16 if precision == "bf16" else None)


def decode_step(text, lm_head, prompt_keys: list[Tensor], prompt_values: list[Tensor], prompt_mask: Tensor,
                keys: list[Tensor], values: list[Tensor], mask: Tensor, token: Tensor, position: Tensor,
                column: Tensor, head_norm: bool = False) -> Tensor:
    """One token per row through the text model on a static cache: (N,) -> next-token logits (N, V).

    The text model's forward written out for this case, on its own modules (so the same weights and the same
    RMSNorm and MLP code). Per layer: `prompt_keys`, `prompt_values` (B, Hkv, P', D) and `prompt_mask` (B, P'),
    the prompts' part of the cache; `keys`, `values` (B, Hkv, G, M', D) and `mask` (B, G, M'), the completions'
    part, whose column `column` (1,) the new key and value are written to (`mask` already marks it).
    `position` (N,) is the token's mRoPE position, text position + rope delta: a text token has the same
    position on mRoPE's three axes, so its rotation is plain RoPE at that position (the three axes' sections
    of the frequencies, put back together, are the frequencies). Grouped-query attention without copying the
    cache: the R = Hq / Hkv query heads that share a key/value head become R query rows of that head.
    `head_norm` (Qwen3-VL, models/families.py): each query and key head goes through its RMSNorm before RoPE.
    """
    config, N = text.config, token.shape[0]
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    R, D = Hq // Hkv, head_dim(config)
    B, G = mask.shape[:2]
    by_prompt = lambda t: t.view(B, G, Hkv, -1, D).transpose(1, 2)  # (N, Hkv, r, D) -> (B, Hkv, G, r, D) a view
    rope = text.rotary_emb
    angles = position[:, None].float() * rope.inv_freq.float()  # (N, D/2) RoPE: position * frequency
    angles = torch.cat([angles, angles], dim=-1)  # (N, D) the rotate-half layout
    x = text.embed_tokens(token)  # (N, C)
    cos = (angles.cos() * rope.attention_scaling).to(x.dtype)[:, None, None]  # (N, 1, 1, D)
    sin = (angles.sin() * rope.attention_scaling).to(x.dtype)[:, None, None]  # (N, 1, 1, D)
    rotate = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sin
    for layer, prompt_k, prompt_v, k_cache, v_cache in zip(text.layers, prompt_keys, prompt_values, keys, values):
        attn = layer.self_attn
        h = layer.input_layernorm(x)  # (N, C) RMSNorm
        q = attn.q_proj(h).view(N, Hkv, R, D)  # (N, Hkv, R, D) query head j = (j // R, j % R)
        k = attn.k_proj(h).view(N, Hkv, 1, D)  # (N, Hkv, 1, D)
        if head_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)  # over D, each head on its own
        q, k = rotate(q), rotate(k)
        k_cache.index_copy_(3, column, by_prompt(k))  # in place: the cache's column `column`
        v_cache.index_copy_(3, column, by_prompt(attn.v_proj(h).view(N, Hkv, 1, D)))
        o = shared_prompt_attention(by_prompt(q), prompt_k, prompt_v, prompt_mask, k_cache, v_cache, mask,
                                    attn.scaling)  # (B, Hkv, G, R, D)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(N, Hq * D))  # (N, C) rows b*G+g, heads (kv head, r)
        x = x + layer.mlp(layer.post_attention_layernorm(x))  # (N, C)
    return lm_head(text.norm(x))  # (N, V)


def shared_prompt_attention(q: Tensor, prompt_k: Tensor, prompt_v: Tensor, prompt_mask: Tensor, k: Tensor,
                            v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of one new token per row over its prompt and its own completion, the prompt stored once.

    q (B, Hkv, G, R, D): the R query heads of each key/value head, for the G rollouts of each prompt.
    prompt_k, prompt_v (B, Hkv, P, D), prompt_mask (B, P): the prompt, shared by its G rollouts.
    k, v (B, Hkv, G, M, D), mask (B, G, M): each rollout's own completion so far. Returns (B, Hkv, G, R, D).

    The same softmax as attending to the concatenation [prompt, completion] of each row, but the prompt's
    scores are one matrix product per (prompt, head) for all G * R query rows, reading the prompt's keys and
    values once instead of once per rollout: decode attention is bound by those reads, and a prompt (images
    included) is most of the cache. (Hydragen and FlashInfer's cascade attention split attention the same way.)
    The softmax runs in float32, as transformers' eager attention does.
    """
    B, H, G, R, D = q.shape
    P = prompt_k.shape[2]
    prompt_scores = (q.reshape(B, H, G * R, D) @ prompt_k.transpose(-1, -2)).view(B, H, G, R, P)  # (B, Hkv, G, R, P)
    own_scores = q @ k.transpose(-1, -2)  # (B, Hkv, G, R, M)
    scores = torch.cat([prompt_scores.masked_fill(~prompt_mask[:, None, None, None], float("-inf")),
                        own_scores.masked_fill(~mask[:, None, :, None], float("-inf"))], dim=-1)  # (B, Hkv, G, R, P+M)
    weights = (scores.float() * scale).softmax(-1).to(q.dtype)  # (B, Hkv, G, R, P+M)
    prompt_part = (weights[..., :P].reshape(B, H, G * R, P) @ prompt_v).view(B, H, G, R, D)
    return prompt_part + weights[..., P:] @ v  # (B, Hkv, G, R, D)


def head_dim(config) -> int:
    """The size of one attention head: the config's head_dim where it gives one, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plain_copy(module, dtype: torch.dtype):
    """An unsharded copy of `module`'s structure, without FSDP2's hooks: parameters in `dtype` (filled later),
    buffers (rotary frequencies) as the source keeps them."""
    device = next(module.parameters()).device
    with torch.device("meta"):
        if isinstance(module, torch.nn.Linear):
            copy = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        else:
            copy = type(module)(module.config)
    copy.to_empty(device=device).eval().requires_grad_(False)
    for p in copy.parameters():
        p.data = p.data.to(dtype)
    return copy
