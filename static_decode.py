"""The fast decode: a static KV cache and a decode step of fixed shapes, optionally compiled (gpt-fast).

`sample.sample(..., decoder=StaticDecoder())` runs its decode steps here instead of through `sample.extend`
(the eager reference, whose `DynamicCache` grows by `torch.cat` at every step). The prompt is still prefilled
once per prompt by `sample.prefill`; `StaticDecoder.start` copies that cache to the G rows of each prompt, and
each call feeds one token per row. tests/test_sample.py checks that both decodes give the same rollouts;
bench/sample.py measures them side by side.

Legend: B prompts, G rollouts per prompt, N = B*G rows, T prompt tokens, S cache columns, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sample import Prefix


class StaticDecoder:
    """Decode steps over a KV cache allocated once, written in place, so every step has the same shapes.

    The eager decode (`extend` with one token) grows a `DynamicCache` by `torch.cat` and rebuilds the attention
    masks at every step. Here each layer's keys and values are one (N, Hkv, S, D) tensor of S = prompt +
    max_new_tokens columns (rounded up to `block`, so that a new prompt length rarely means a new shape): the
    prompt's keys and values fill columns 0..T-1 once, step t writes column T+t in place, and the attention
    mask is an (N, S) boolean, one column switched on per step. `decode_step` is the text model written out
    for this one case (one token per row, a static cache), in plain torch over the model's own modules.

    Run eagerly (the default), a step attends to the columns written so far, a view of the cache: nothing is
    copied and no empty column is read. Compiled (`compile=True`: `torch.compile`, CUDA graphs on GPU), it
    attends to all S columns, the mask switching off the empty ones, so that every step has the same shapes
    and the step is compiled once per (N, S).

    The step runs on plain modules: the policy's own text model and lm_head, or, when the policy is sharded by
    FSDP2 (whose hooks would run on every module at every step) or `dtype` differs, an unsharded copy refreshed
    from the gathered weights at every `sample` call, i.e. once per rollout phase, after the optimiser step.
    The same object serves every call: the compiled step, the copy and the cache buffers are kept.
    """

    def __init__(self, compile: bool = False, dtype: torch.dtype | None = None, block: int = 256):
        self.compile, self.dtype, self.block = compile, dtype, block
        self.text = self.lm_head = None  # the modules the step runs
        self.keys: list[Tensor] = []  # per layer (N, Hkv, S, D)
        self.values: list[Tensor] = []  # per layer (N, Hkv, S, D)
        self.step = decode_step
        if compile:  # CUDA graphs on GPU: one replay per step instead of ~1,300 kernel launches
            self.step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if torch.cuda.is_available() else None)

    def load(self, model) -> None:
        """Point the step at `model`'s text weights (call inside `gathered`): its own modules, or a plain copy."""
        from torch.distributed.fsdp import FSDPModule
        text, head = model.model.language_model, model.lm_head
        if any(kind != "full_attention" for kind in text.config.layer_types):
            raise ValueError(f"StaticDecoder: config.text_config.layer_types = {text.config.layer_types}: "
                             "decode_step implements full attention only")
        dtype = self.dtype or head.weight.dtype
        if not any(isinstance(m, FSDPModule) for m in model.modules()) and head.weight.dtype == dtype:
            self.text, self.lm_head = text, head
            return
        if self.text is None or self.text is text:
            self.text, self.lm_head = plain_copy(text, dtype), plain_copy(head, dtype)
        for plain, source in ((self.text, text), (self.lm_head, head)):
            tensors = dict(source.named_parameters()) | dict(source.named_buffers())
            for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
                t.copy_(tensors[name])

    def start(self, prefix: Prefix, G: int, max_new_tokens: int) -> Tensor:
        """Copy the B prompts' cache to G rows each (columns 0..T-1); return the first logits (N, V)."""
        (B, T), H = prefix.attention_mask.shape, self.text.config.num_key_value_heads
        N, S = B * G, -(-(T + max_new_tokens) // self.block) * self.block
        D = self.text.config.hidden_size // self.text.config.num_attention_heads
        weight = self.lm_head.weight
        if not self.keys or self.mask.shape != (N, S) or self.mask.device != weight.device:
            empty = lambda: torch.zeros(N, H, S, D, dtype=weight.dtype, device=weight.device)  # (N, Hkv, S, D)
            self.keys = [empty() for _ in self.text.layers]
            self.values = [empty() for _ in self.text.layers]
            self.mask = torch.zeros(N, S, dtype=torch.bool, device=weight.device)  # (N, S) columns attended
            for t in self.keys + self.values:  # CUDA graphs may then write them in place (as StaticCache does)
                torch._dynamo.mark_static_address(t)
        for keys, values, layer in zip(self.keys, self.values, prefix.cache.layers):
            for static, prompt in ((keys, layer.keys), (values, layer.values)):  # (B, Hkv, T, D)
                static.view(B, G, H, S, D)[:, :, :, :T].copy_(prompt[:, None])  # row b*G+g <- prompt b
        self.mask.zero_()
        self.mask[:, :T] = prefix.attention_mask.bool().repeat_interleave(G, dim=0)  # (N, T) left padding off
        self.column = T
        self.column_index = torch.tensor([T], device=weight.device)  # (1,) the same, on the device
        self.next_position = prefix.next_position.repeat_interleave(G, dim=0)  # (N,)
        self.rope_deltas = prefix.rope_deltas.repeat_interleave(G, dim=0)  # (N, 1)
        return prefix.logits.repeat_interleave(G, dim=0)  # (N, V)

    def __call__(self, token: Tensor, live: Tensor) -> Tensor:
        """Feed one token per row (N,) at the next column; rows not `live` are written but never attended to
        and do not advance. Returns the next-token logits (N, V)."""
        S = self.mask.shape[1]
        if self.column >= S:
            raise ValueError(f"StaticDecoder: the cache holds {S} columns; start() sized it")
        self.mask[:, self.column] = live  # outside the step: the column index changes every step
        keys, values, mask = self.keys, self.values, self.mask  # compiled: all S columns, fixed shapes
        if not self.compile:  # eager: the columns written so far, views of the cache
            end = self.column + 1
            keys, values, mask = [k[:, :, :end] for k in keys], [v[:, :, :end] for v in values], mask[:, :end]
        if self.compile and self.mask.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
        position = (self.next_position[:, None] + self.rope_deltas)[:, 0]  # (N,) text position + rope delta
        logits = self.step(self.text, self.lm_head, keys, values, token.contiguous(), position, self.column_index,
                           mask)  # (N, V) a column of `tokens` has its stride: copy
        self.next_position = self.next_position + live  # (N,)
        self.column += 1
        self.column_index += 1  # in place, on the device: a tensor, so the compiled step is not recompiled
        return logits


def decode_step(text, lm_head, keys: list[Tensor], values: list[Tensor], token: Tensor, position: Tensor,
                column: Tensor, mask: Tensor) -> Tensor:
    """One token per row through Qwen2.5-VL's text model on a static cache: (N,) -> next-token logits (N, V).

    The text model's forward written out for this case, on its own modules (so the same weights and the same
    RMSNorm and MLP code): `keys`, `values` per layer (N, Hkv, S', D), views of the cache; the new key and
    value go to `column` (1,); `mask` (N, S') marks the columns each row attends to, `column` included.
    `position` (N,) is the token's mRoPE position, text position + rope delta: a text token has the same
    position on mRoPE's three axes, so its rotation is plain RoPE at that position (the three axes' sections
    of the frequencies, put back together, are the frequencies). Grouped-query attention without copying the
    cache: the R = Hq / Hkv query heads that share a key/value head become R query rows of that head.
    """
    config, N = text.config, token.shape[0]
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    R, D = Hq // Hkv, config.hidden_size // Hq
    rope = text.rotary_emb
    angles = position[:, None].float() * rope.inv_freq.float()  # (N, D/2) RoPE: position * frequency
    angles = torch.cat([angles, angles], dim=-1)  # (N, D) the rotate-half layout
    x = text.embed_tokens(token)  # (N, C)
    cos = (angles.cos() * rope.attention_scaling).to(x.dtype)[:, None, None]  # (N, 1, 1, D)
    sin = (angles.sin() * rope.attention_scaling).to(x.dtype)[:, None, None]  # (N, 1, 1, D)
    rotate = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sin
    attend = mask[:, None, None, :]  # (N, 1, 1, S') the same for every head
    for layer, k_cache, v_cache in zip(text.layers, keys, values):
        attn = layer.self_attn
        h = layer.input_layernorm(x)  # (N, C) RMSNorm
        q = rotate(attn.q_proj(h).view(N, Hkv, R, D))  # (N, Hkv, R, D) query head j = (j // R, j % R)
        k = rotate(attn.k_proj(h).view(N, Hkv, 1, D))  # (N, Hkv, 1, D)
        k_cache.index_copy_(2, column, k)  # in place: the cache's column `column`
        v_cache.index_copy_(2, column, attn.v_proj(h).view(N, Hkv, 1, D))
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=attend, scale=attn.scaling)  # (N, Hkv, R, D)
        x = x + attn.o_proj(o.reshape(N, Hq * D))  # (N, C)
        x = x + layer.mlp(layer.post_attention_layernorm(x))  # (N, C)
    return lm_head(text.norm(x))  # (N, V)


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
