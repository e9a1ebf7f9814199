"""What the method files need from transformers' internals, each in one place: a model's device, its generation
config's stop ids, the attention masks its decoder layers read (sample.py's `extend`, fast/shared_prompt.py), its
final hidden states (`final_hidden`) and the forward of eq. (2)'s log-probabilities (`completion_hidden`).
Tests: .venv/bin/python -m pytest -q tests/test_sample.py tests/test_grpo.py
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import DynamicCache

from models.processor import prompt_rows


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def generation_eos_ids(model) -> list[int]:
    """`sample`'s stop ids when none are given: the eos ids of the model's generation config (for Qwen2.5-VL
    Instruct: <|im_end|>, <|endoftext|>), which transformers fills from the model's config."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def layer_masks(model, cache: DynamicCache, full_mask: Tensor, T: int):
    """The attention mask the decoder layers read, for T queries on top of `cache`, given the 2D padding mask
    `full_mask` (N, S + T): (N, 1, T, S + T) for sdpa and eager attention (a dict by layer type when a config
    has sliding-window layers, which released Qwen2.5-VL and Qwen3-VL configs do not).

    The same builder the model would call, with one difference: `allow_is_causal_skip=False`. Otherwise it
    checks `full_mask.all()` on the host at every forward to see if it may drop the mask, which would make
    every decode step wait for the GPU. (flash-attention takes the 2D mask and still checks.) The model takes a
    4D mask as it is.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    text = model.model.language_model
    shape_only = torch.empty((full_mask.shape[0], T, 0), dtype=text.dtype, device=full_mask.device)  # (N, T, 0)
    kwargs = dict(config=text.config, inputs_embeds=shape_only, attention_mask=full_mask, past_key_values=cache,
                  allow_is_causal_skip=False)
    full = create_causal_mask(**kwargs)  # (N, 1, T, S + T)
    if "sliding_attention" not in (getattr(text.config, "layer_types", None) or ()):
        return full
    return {"full_attention": full, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


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


def completion_hidden(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states (N, T+1, C) at the last prompt position and after each completion token (index t
    predicts token t), from one forward over each row's prompt (images included) and completion: the default
    `hidden` of grpo.py's `completion_logprobs` (fast/shared_prompt.py's reads each prompt once). `batch`: the
    processor's output for B left-padded prompts; completions, completion_mask: (N, T), N = B*G, prompt-major."""
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
