"""The command line of train.py and evaluate.py: one dataclass of options -> one argparse parser.

Every field of the dataclass is an option, declared with `option(default, help, ...)`. Both scripts read
the same spellings:

    --max_new_tokens=64   --max_new_tokens 64   --max-new-tokens=64   --max-new-tokens 64
    --both_orders         --both_orders=true    (booleans: true/false, 1/0, yes/no; nothing else)
    --images a.png b.png  (list options take one or more values)

`--help` lists every option with its default and one line of help. Values are checked here, before anything
heavy loads: a bad value stops the script with a message naming the option, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import math
import os
from dataclasses import field
from pathlib import Path
from typing import Sequence

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class OptionError(ValueError):
    """A bad command-line value; the message names the option, the value and what is allowed."""


def option(default, help: str, choices: Sequence | None = None, min: float | None = None,
           above: float | None = None, max: float | None = None, below: float | None = None):
    """A dataclass field that is a command-line option: its default, one line of help and its allowed values
    (`choices`, or a range: `min` <= value, `above` < value, value <= `max`, value < `below`)."""
    meta = {"help": help, "choices": choices, "min": min, "above": above, "max": max, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def boolean(text: str) -> bool:
    """Strict booleans: true/false, 1/0, yes/no (any case)."""
    if str(text).lower() in TRUE:
        return True
    if str(text).lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected one of true/false, 1/0, yes/no; got {text!r}")


def flags(name: str) -> list[str]:
    """`max_new_tokens` -> ["--max_new_tokens", "--max-new-tokens"] (one spelling when there is no underscore)."""
    return list(dict.fromkeys(["--" + name, "--" + name.replace("_", "-")]))


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, each option's default after its help."""


def parser(cls, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass `cls`."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Formatter, allow_abbrev=False,
                                usage="%(prog)s [--name=value | --name value ...]  (--help lists every option)")
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        meta = f.metadata
        text = meta.get("help") or " "
        if meta.get("choices"):
            text += f" ({' | '.join(map(str, meta['choices']))})"
        if isinstance(default, bool):
            p.add_argument(*flags(f.name), dest=f.name, type=boolean, nargs="?", const=True, default=default,
                           metavar="BOOL", help=text)
        elif isinstance(default, list):
            p.add_argument(*flags(f.name), dest=f.name, nargs="+", default=default, help=text)
        else:
            p.add_argument(*flags(f.name), dest=f.name, type=type(default), default=default,
                           metavar=type(default).__name__.upper(), help=text)
    return p


def check(cfg) -> None:
    """Each field against its declared choices and range; NaN is never allowed."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            fail(f.name, value, f"one of {', '.join(map(str, meta['choices']))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            fail(f.name, value, "a finite number")
        if meta.get("min") is not None and value < meta["min"]:
            fail(f.name, value, f"a number >= {meta['min']}")
        if meta.get("above") is not None and value <= meta["above"]:
            fail(f.name, value, f"a number > {meta['above']}")
        if meta.get("max") is not None and value > meta["max"]:
            fail(f.name, value, f"a number <= {meta['max']}")
        if meta.get("below") is not None and value >= meta["below"]:
            fail(f.name, value, f"a number < {meta['below']}")


def fail(name: str, value, allowed: str):
    raise OptionError(f"--{name}={value!r} is not allowed: expected {allowed}")


def parse(cls, argv: Sequence[str] | None, description: str = ""):
    """argv -> a checked instance of `cls` (its `validate()` too, when it has one); exits with a message on
    a bad option, like argparse itself."""
    p = parser(cls, description)
    cfg = cls(**vars(p.parse_args(argv)))
    try:
        check(cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except OptionError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return cfg


def check_checkpoint(name: str, path: str, vision: bool = True) -> None:
    """A local checkpoint directory that loads, or an OptionError naming the file and what is wrong with it (no
    network; models/families.py's `checkpoint_problem`: config.json, tokenizer, safetensors headers). `vision`:
    a reasoner or listener of a family this code runs; else (the judge) any causal LM."""
    from models.families import checkpoint_problem
    directory = Path(path)
    if not (directory / "config.json").is_file():
        fail(name, path, "a local checkpoint directory with config.json (download Hub models first, e.g. "
             "`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR`)")
    if problem := checkpoint_problem(directory, vision):
        fail(name, path, f"a checkpoint directory that loads; in it, {problem}")


def check_context(name: str, path: str, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """--max_prompt_tokens plus --max_new_tokens within the model's context (max_position_embeddings): a longer
    sequence would run past the positions the model was trained on (the images' tokens come on top)."""
    from models.families import context_length
    context = context_length(path)
    if context is not None and max_prompt_tokens + max_new_tokens > context:
        fail("max_prompt_tokens", max_prompt_tokens, f"at most {context - max_new_tokens}: --{name}'s context is "
             f"{context} tokens (max_position_embeddings), and --max_new_tokens={max_new_tokens} come after it")


def check_dataset(name: str, spec: str) -> None:
    """KIND:PATH[,PATH...] with a known KIND and paths that exist."""
    from data import DATASETS
    kind, _, rest = spec.partition(":")
    paths = [p for p in rest.split(",") if p]
    if kind not in DATASETS or not paths:
        fail(name, spec, f"KIND:PATH[,PATH...] with KIND one of {', '.join(DATASETS)}")
    for p in paths:
        if not (os.path.exists(p) or (glob.has_magic(p) and glob.glob(p))):
            fail(name, spec, f"paths that exist ({p} does not)")


def check_prompt_format(name: str, path: str, checkpoints: dict[str, str]) -> None:
    """Each checkpoint's own prompt_format.json and the --prompt_format file read as a `prompt.PromptFormat`
    (strictly: `prompt.read_format`), and the given format's answers and ratings are one token each of every
    checkpoint's tokenizer, as one next-token distribution reads them (`listener.answer_token_ids`).
    `checkpoints`: option name -> checkpoint directory ('toy': the toy tokenizer; '': no checkpoint)."""
    from listener import answer_token_ids
    from prompt import FORMAT_FILE, FormatError, read_format
    for option_name, checkpoint in checkpoints.items():
        own = Path(checkpoint) / FORMAT_FILE
        if checkpoint not in ("", "toy") and own.is_file():
            try:
                read_format(own)
            except FormatError as e:
                fail(option_name, checkpoint, f"a checkpoint whose {FORMAT_FILE} reads as a prompt format ({e})")
    if not path:
        return
    try:
        fmt = read_format(path)
    except FormatError as e:
        fail(name, path, f"a JSON file of prompt.PromptFormat's fields ({e})")
    for option_name, checkpoint in checkpoints.items():
        for words in (fmt.answers, fmt.ratings) if checkpoint else ():
            try:
                answer_token_ids(_tokenizer(checkpoint), fmt, words)
            except ValueError as e:
                fail(name, path, f"answers and ratings that are one token each of --{option_name}'s tokenizer "
                                 f"({checkpoint}): {e}")


@functools.lru_cache(maxsize=4)
def _tokenizer(checkpoint: str):
    """A checkpoint's tokenizer alone, without its weights; 'toy' the toy world's."""
    if checkpoint == "toy":
        from toy import world
        return world.make_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
