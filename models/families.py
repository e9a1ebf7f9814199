"""What differs between the model families, named one by one, and loading a checkpoint of either.

The method files are written once for every family: the processor renders the tokenizer's own chat template
and expands each `<|image_pad|>` as the image processor's grid says; the sampler's positions come from the
model's own `get_rope_index`; the loss, the listener and the rewards read token ids from the tokenizer. What
remains is listed in `Family` and nowhere else.

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


QWEN2_5_VL = Family("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
FAMILIES = {f.model_type: f for f in (QWEN2_5_VL,)}


def family_of(config) -> Family:
    """The family of a model, a config, or a checkpoint directory (its config.json's model_type)."""
    if isinstance(config, (str, Path)):
        model_type = read_config(config).get("model_type")
    else:
        model_type = getattr(getattr(config, "config", config), "model_type", None)
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
