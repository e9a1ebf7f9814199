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

Checkpoints load from safetensors only, from a local directory (nothing is fetched), without remote code. A
directory is checked before anything loads (`checkpoint_problem`, cheap: it reads config.json, the tokenizer's
files and each safetensors header, never the weights), so a broken download is refused with a message naming
the directory, the file and what is wrong; infra/cli.py runs the same check on the command line.
"""
from __future__ import annotations

import json
import re
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


class CheckpointError(OSError):
    """A checkpoint directory that cannot be loaded; the message names the directory, the file and the fault."""


def read_config(path: str | Path, name: str = "config.json") -> dict:
    """A checkpoint directory's config.json (or another of its JSON configs, `name`) as a dict, or a CheckpointError
    saying why it cannot be read."""
    file = Path(path) / name
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {name}") from None
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"{file}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def text_config(config: dict) -> dict:
    """The language model's part of a config.json: `text_config` where it is nested, else the config itself."""
    return {**config, **config.get("text_config", {})} if isinstance(config.get("text_config"), dict) else config


def context_length(path: str | Path) -> int | None:
    """The language model's context (max_position_embeddings) of a checkpoint directory, None if not given."""
    value = text_config(read_config(path)).get("max_position_embeddings")
    return value if isinstance(value, int) else None


# ----------------------------------------------------------------------------------------------------------
# Checking a directory before anything loads


def checkpoint_problem(path: str | Path, vision: bool = True, weights: bool = True) -> str | None:
    """What is wrong with a checkpoint directory, as "FILE: what" (or None): config.json parses and (with
    `vision`, for a reasoner or listener) names a family this code runs, with its nested sizes (vision_config;
    Qwen3-VL's text_config) and a preprocessor_config.json that parses; the tokenizer's files and chat template
    are there; with `weights`, every weight file the directory's index names exists and has a whole safetensors
    header, whose embedding, numbers of layers and vision blocks and vision width are those config.json gives (a
    config.json of another model over these weights).
    """
    try:
        config = read_config(path)
    except CheckpointError as e:
        return str(e).removeprefix(f"{path}: ").removeprefix(f"{Path(path)}/")
    model_type = config.get("model_type")
    if vision and model_type not in FAMILIES:
        return (f"config.json: model_type {model_type!r} is not one of the families this code runs "
                f"({', '.join(f'{f.model_type} ({f.name})' for f in FAMILIES.values())})")
    if not isinstance(model_type, str):
        return "config.json: no model_type (not a transformers config)"
    nested = {"vision_config": "the vision tower's sizes"} if vision else {}
    if model_type == QWEN3_VL.model_type:  # Qwen2.5-VL's text sizes are at the top level, Qwen3-VL's nested
        nested["text_config"] = "the language model's sizes"
    for name, what in nested.items():
        if not isinstance(config.get(name), dict):  # transformers would build a default-size one before the weights
            return (f"config.json: no {name} ({what}): transformers would build a default-size one, which these "
                    f"weights do not fit")
    if vision and not (Path(path) / "preprocessor_config.json").is_file():
        return "preprocessor_config.json is missing (the image processor's settings)"
    if vision:
        try:
            read_config(path, "preprocessor_config.json")
        except CheckpointError as e:
            return str(e).removeprefix(f"{Path(path)}/")
    return tokenizer_problem(path) or (weights_problem(path, config) if weights else None)


def tokenizer_problem(path: str | Path) -> str | None:
    """The tokenizer's files: tokenizer.json (or vocab.json and merges.txt) and a chat template."""
    d = Path(path)
    if not (d / "tokenizer.json").is_file() and not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        return "no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt)"
    if (d / "tokenizer.json").is_file() and not _whole_json_object(d / "tokenizer.json"):
        return "tokenizer.json is empty or cut short (it does not end its JSON object): an interrupted download"
    settings = None
    if (d / "tokenizer_config.json").is_file():
        try:
            settings = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"tokenizer_config.json: not JSON ({e}): a damaged or interrupted download"
    if not any((d / n).is_file() for n in ("chat_template.jinja", "chat_template.json")) and \
            not (isinstance(settings, dict) and settings.get("chat_template")):
        return ("no chat template (expected chat_template.jinja, chat_template.json or a 'chat_template' in "
                "tokenizer_config.json)")
    return None


def _whole_json_object(file: Path) -> bool:
    """Whether a file starts with '{' and ends with '}' (whitespace aside): a cut-off download does not. Reading
    both ends only: Qwen's tokenizer.json is 11 MB, seconds to parse, and from_pretrained parses it anyway."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(64).lstrip()
        f.seek(max(0, size - 64))
        tail = f.read().rstrip()
    return head.startswith(b"{") and tail.endswith(b"}")


def weight_files(path: str | Path) -> list[Path] | str:
    """The safetensors files from_pretrained reads: those the index names, else model.safetensors; or a problem."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            return f"{index.name}: expected {{\"weight_map\": {{tensor: file}}}} ({type(e).__name__}: {e})"
        missing = [n for n in names if not (d / n).is_file()]
        return f"{missing[0]} is missing ({index.name} names it)" if missing else [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        return "no *.safetensors weights (pickled .bin weights are not loaded)"
    return "no *.safetensors weights (expected model.safetensors or model.safetensors.index.json)"


def safetensors_header(file: Path) -> dict | str:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}), read without the weights; or what is
    wrong. The format: 8 bytes of little-endian header length, the JSON header, then the tensors' bytes."""
    size = file.stat().st_size
    if size < 8:
        return f"{file.name} has {size} bytes, too few for a safetensors header (an empty or interrupted download)"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 1 << 30:
            return f"{file.name}: its header claims {n} bytes, but the file has {size}: truncated, or not safetensors"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return f"{file.name}: its header is not JSON: damaged, or not a safetensors file"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        return f"{file.name}: its header does not describe tensors: damaged, or not a safetensors file"
    if 8 + n + end != size:
        return (f"{file.name} has {size} bytes, its header describes {8 + n + end}: "
                + ("truncated (an interrupted download or copy)" if size < 8 + n + end else "bytes past its tensors"))
    return header


def weights_problem(path: str | Path, config: dict) -> str | None:
    """Every weight file whole, and the sizes config.json gives those of the weights: the embedding's shape, the
    number of decoder layers, and (for a vision model) the vision tower's depth and width."""
    files = weight_files(path)
    if isinstance(files, str):
        return files
    text = text_config(config)
    expected = [text.get("vocab_size"), text.get("hidden_size")]
    shapes = {}
    for file in files:
        header = safetensors_header(file)
        if isinstance(header, str):
            return header
        for name, tensor in header.items():
            if name.endswith("embed_tokens.weight") and None not in expected and tensor.get("shape") != expected:
                return (f"{file.name}: {name} has shape {tensor.get('shape')}, but config.json gives vocab_size x "
                        f"hidden_size = {expected}: config.json belongs to another model")
            shapes[name] = tensor.get("shape") if isinstance(tensor, dict) else None
    return sizes_problem(shapes, text, config.get("vision_config"))


def sizes_problem(shapes: dict, text: dict, vision) -> str | None:
    """config.json's numbers of layers and vision blocks, and vision width, against the weights' names and shapes."""
    def count(pattern: str) -> int:
        return len({m.group(1) for name in shapes if (m := re.search(pattern, name))})

    layers = count(r"^(?!.*visual\.).*\blayers\.(\d+)\.")
    checks = [("num_hidden_layers", text.get("num_hidden_layers"), layers, "{} decoder layers")]
    if isinstance(vision, dict):
        patch = next((shape for name, shape in shapes.items() if name.endswith("visual.patch_embed.proj.weight")), None)
        checks += [("vision_config's depth", vision.get("depth"), count(r"\bvisual\.blocks\.(\d+)\."),
                    "{} vision blocks"),
                   ("vision_config's hidden_size", vision.get("hidden_size"), patch[0] if patch else None,
                    "a visual.patch_embed {} wide")]
    for field, given, found, what in checks:
        if found and given != found:
            return (f"config.json: {field} is {given!r}, but the weights hold {what.format(found)}: config.json "
                    f"belongs to another model")
    return None


def model_class(family: Family):
    import transformers
    return getattr(transformers, family.model_class)


def blocks(model) -> tuple[list, list]:
    """(the vision tower's blocks, the language model's decoder layers): FSDP2's and activation checkpointing's units."""
    return list(model.model.visual.blocks), list(model.model.language_model.layers)


def load(path: str | Path, dtype: torch.dtype, meta: bool = False, weights: bool = True):
    """The model of a local checkpoint directory, its weights read from safetensors, in `dtype`, on the CPU.

    `meta=True` builds the structure only, on the meta device, reading config.json alone: a process that will
    receive its weights from another (FSDP2's broadcast from rank 0) never reads the checkpoint's files, and a
    rehearsal (`weights=False`, infra/rehearsal.py) needs no weights in the directory at all.
    """
    if problem := checkpoint_problem(path, weights=weights):
        raise CheckpointError(f"{path}: {problem}")
    cls = model_class(family_of(path))
    try:
        if meta:
            from transformers import AutoConfig
            with torch.device("meta"):
                return cls._from_config(AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype,
                                        attn_implementation="sdpa")
        return cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                                   local_files_only=True)
    except Exception as e:  # what the check above cannot see (e.g. a deeper layer of another size)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "ignore_mismatched_sizes" in first:  # transformers logs the mismatches, then raises this
            raise CheckpointError(f"{path}: the weights do not have the shapes config.json gives (config.json of "
                                  f"another model?): transformers' list of each mismatch is above") from e
        raise CheckpointError(f"{path}: the checkpoint does not load ({type(e).__name__}: {first})") from e
