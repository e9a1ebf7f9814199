"""What differs between the model families, named one by one, and loading a checkpoint of either.

The method files are written once for every family. What the two families do differently, and where each
difference is taken care of:

| difference                     | Qwen2.5-VL                         | Qwen3-VL                            | handled by                 |
| ------------------------------ | ---------------------------------- | ----------------------------------- | -------------------------- |
| model class                    | Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration     | `Family.model_class`       |
| text attention                 | q/k/v bias                         | no bias; RMSNorm of each query and  | `Family.head_norm` (the    |
|                                |                                    | key head before RoPE                | static decode step)        |
| rotary positions               | mRoPE, one frequency band per axis | interleaved mRoPE                   | the model's get_rope_index |
|                                | (t, h, w)                          |                                     | (the same signature); a    |
|                                |                                    |                                     | text token's rotation is   |
|                                |                                    |                                     | 1-D RoPE in both           |
| vision tower                   | 14-pixel patches, window attention | 16-pixel patches, learned position  | the model and the image    |
|                                |                                    | embeddings, DeepStack features      | processor (prefill only:   |
|                                |                                    | added to the first decoder layers   | a decode step never sees   |
|                                |                                    | at the image positions              | an image)                  |
| chat template                  | a default system turn              | no default system turn              | the tokenizer's template   |
| `<think>`, `</think>`          | plain text (several tokens)        | added tokens 151667, 151668         | ids read from the tokenizer|
| FSDP2 blocks                   | model.visual.blocks, model.language_model.layers (both)  | `blocks`                   |

Checkpoints load from safetensors only, from a local directory (nothing is fetched), without remote code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's "model_type"
    model_class: str  # the transformers class of the whole model (vision tower + language model + LM head)
    head_norm: bool  # the text attention normalises each query and key head (RMSNorm) before RoPE


QWEN2_5_VL = Family("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", head_norm=False)
QWEN3_VL = Family("Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration", head_norm=True)
FAMILIES = {f.model_type: f for f in (QWEN2_5_VL, QWEN3_VL)}


def family_of(config) -> Family:
    """The family of a model, a config (the whole model's or its text model's), or a checkpoint directory."""
    if isinstance(config, (str, Path)):
        model_type = read_config(config).get("model_type")
    else:
        model_type = getattr(getattr(config, "config", config), "model_type", None)
    model_type = model_type.removesuffix("_text") if isinstance(model_type, str) else model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not one of the families this code runs: "
                         f"{', '.join(f'{f.model_type} ({f.name})' for f in FAMILIES.values())}")
    return FAMILIES[model_type]


def read_config(path: str | Path) -> dict:
    """A checkpoint directory's config.json as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


def model_class(family: Family):
    import transformers
    return getattr(transformers, family.model_class)


def blocks(model) -> tuple[list, list]:
    """(the vision tower's blocks, the language model's decoder layers): FSDP2's and activation checkpointing's units."""
    return list(model.model.visual.blocks), list(model.model.language_model.layers)


def load(path: str | Path, dtype: torch.dtype, meta: bool = False):
    """The model of a local checkpoint directory, its weights read from safetensors, in `dtype`, on the CPU.

    `meta=True` builds the structure only, on the meta device, reading config.json alone: a process that will
    receive its weights from another (FSDP2's broadcast from rank 0) never reads the checkpoint's files.
    """
    cls = model_class(family_of(path))
    if meta:
        from transformers import AutoConfig
        with torch.device("meta"):
            return cls._from_config(AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype,
                                    attn_implementation="sdpa")
    return cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                               local_files_only=True)
