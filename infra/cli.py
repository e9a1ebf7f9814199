"""The command line of train.py and evaluate.py: one dataclass of options -> one argparse parser.

Every field of the dataclass is an option, declared with `option(default, help, ...)`. Both scripts read
the same spellings:

    --max_new_tokens=64   --max_new_tokens 64   --max-new-tokens=64   --max-new-tokens 64
    --both_orders         --both_orders=true    (booleans: true/false, 1/0, yes/no; nothing else)
    --images a.png b.png  (list options take one or more values)

`--help` lists every option with its default and one line of help. Values are checked here, before anything
heavy loads: a bad value stops the script with a message naming the option, the value and what is allowed. So
are the paths a script will write (`check_output`): a run never finds out at its end that it cannot save.
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
    """A bad command-line value; the message names the option, the value and what is allowed (also kept apart:
    `name`, `value`, `allowed`, for the Python APIs that take the same options as keyword arguments)."""

    def __init__(self, message: str, name: str | None = None, value=None, allowed: str | None = None):
        super().__init__(message)
        self.name, self.value, self.allowed = name, value, allowed


def option(default, help: str, choices: Sequence | None = None, min: float | None = None,
           above: float | None = None, max: float | None = None, below: float | None = None, blank: bool = True):
    """A dataclass field that is a command-line option: its default, one line of help and its allowed values
    (`choices`, or a range: `min` <= value, `above` < value, value <= `max`, value < `below`). `blank=False`: a
    string option that, when given, must not be empty (`--out_dir=""` would write into the current folder)."""
    meta = {"help": help, "choices": choices, "min": min, "above": above, "max": max, "below": below, "blank": blank}
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


def check(cfg, given: Sequence[str] = ()) -> None:
    """Each field against its declared type, choices and range (NaN is never allowed); a `blank=False` field
    given (named in `given`, or other than its default) as an empty string."""
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), _default(f)
        if problem := value_problem(value, f.metadata, default):
            fail(f.name, value, problem)
        if f.metadata.get("blank") is False and not str(value).strip() and (f.name in given or value != default):
            fail(f.name, value, f"a non-empty value, or no --{f.name} at all" +
                 (f" (its default is {default!r})" if default else ""))


def value_problem(value, meta, default) -> str | None:
    """What an option's value should have been, by its default's type and its declared choices and range; None
    when it is allowed. (On the command line argparse has given it the right type already.)"""
    kind = type(default)
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
        return "true or false" if kind is bool else f"a{'n' if kind is int else ''} {kind.__name__}, not a bool"
    if not isinstance(value, (int, float) if kind is float else kind):
        return f"a{'n' if kind is int else ''} {kind.__name__}, got {type(value).__name__}"
    if meta.get("choices") and value not in meta["choices"]:
        return f"one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    for bound, holds, words in (("min", lambda b: value >= b, ">="), ("above", lambda b: value > b, ">"),
                                ("max", lambda b: value <= b, "<="), ("below", lambda b: value < b, "<")):
        if meta.get(bound) is not None and not holds(meta[bound]):
            return f"a number {words} {meta[bound]}"
    return None


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def fail(name: str, value, allowed: str):
    raise OptionError(f"--{name}={value!r} is not allowed: expected {allowed}", name, value, allowed)


def parse(cls, argv: Sequence[str] | None, description: str = ""):
    """argv -> a checked instance of `cls` (its `validate()` too, when it has one); exits with a message on
    a bad option, like argparse itself."""
    p = parser(cls, description)
    unset = object()  # argparse leaves what the namespace holds already: the options never named stay `unset`
    parsed = vars(p.parse_args(argv, argparse.Namespace(**{f.name: unset for f in dataclasses.fields(cls)})))
    given = [name for name, value in parsed.items() if value is not unset]
    cfg = cls(**{name: value for name, value in parsed.items() if value is not unset})
    try:
        check(cfg, given)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except OptionError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return cfg


def check_checkpoint(name: str, path: str, vision: bool = True, weights: bool = True) -> None:
    """A local checkpoint directory that loads, or an OptionError naming the file and what is wrong with it (no
    network; models/families.py's `checkpoint_problem`: config.json, tokenizer, safetensors headers). `vision`:
    a reasoner or listener of a family this code runs; else (the judge) any causal LM. `weights=False`: all but
    the weights (a rehearsal reads config.json, the tokenizer and the image processor's config)."""
    from models.families import checkpoint_problem
    directory = Path(path)
    if not (directory / "config.json").is_file():
        fail(name, path, "a local checkpoint directory with config.json (download Hub models first, e.g. "
             "`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR`)")
    if problem := checkpoint_problem(directory, vision, weights):
        fail(name, path, f"a checkpoint directory that loads; in it, {problem}" if weights else
             f"a checkpoint directory, weights optional (`huggingface-cli download REPO --exclude '*.safetensors' "
             f"--local-dir DIR` fetches the rest); in it, {problem}")


def check_models(checkpoints: dict[str, str], min_pixels: int, max_pixels: int, max_prompt_tokens: int,
                 max_new_tokens: int, weights: bool = True) -> None:
    """The checkpoints train.py, evaluate.py and reward_model.py read (option name -> directory; '' and 'toy' are
    not checkpoints), as all three check them: each one loads (`check_checkpoint`; the judge may be any causal LM),
    its context holds a prompt and its completion (`check_context`), and --min_pixels/--max_pixels (0: the
    checkpoint's own) can bound a reasoner's or listener's images (models/processor.py's `pixel_bounds_problem`)."""
    from models.processor import pixel_bounds_problem
    if min_pixels and max_pixels and min_pixels > max_pixels:
        fail("min_pixels", min_pixels, f"at most --max_pixels={max_pixels}")
    for name, path in checkpoints.items():
        if path in ("", "toy"):
            continue
        check_checkpoint(name, path, vision=name != "judge", weights=weights)
        check_context(name, path, max_prompt_tokens, max_new_tokens)
        if name != "judge" and (problem := pixel_bounds_problem(path, min_pixels or None, max_pixels or None)):
            fail("max_pixels", max_pixels, f"--min_pixels too: {problem}")


def check_context(name: str, path: str, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """--max_prompt_tokens plus --max_new_tokens within the model's context (max_position_embeddings): a longer
    sequence would run past the positions the model was trained on (the images' tokens come on top)."""
    from models.families import context_length
    context = context_length(path)
    if context is not None and max_prompt_tokens + max_new_tokens > context:
        fail("max_prompt_tokens", max_prompt_tokens, f"at most {context - max_new_tokens}: --{name}'s context is "
             f"{context} tokens (max_position_embeddings), and --max_new_tokens={max_new_tokens} come after it")


def check_dataset(name: str, spec: str) -> None:
    """KIND:PATH[,PATH...] with a known KIND and paths that exist: a JSON file for hpdv2 and the imagereward
    test.json, parquet files (or folders of them, or patterns) for the others."""
    from data import DATASETS
    kind, _, rest = spec.partition(":")
    paths = [p for p in rest.split(",") if p]
    if kind not in DATASETS or not paths:
        fail(name, spec, f"KIND:PATH[,PATH...] with KIND one of {', '.join(DATASETS)}")
    for p in paths:
        if not (os.path.exists(p) or (glob.has_magic(p) and glob.glob(p))):
            fail(name, spec, f"paths that exist ({p} does not)")
        json_file = kind == "hpdv2" or kind == "imagereward" and not p.endswith(".parquet")
        if json_file and not os.path.isfile(p):
            fail(name, spec, f"a JSON file for {kind} ({p} is {'a folder' if os.path.isdir(p) else 'not a file'})")
        if not json_file and os.path.isdir(p) and not glob.glob(os.path.join(glob.escape(p), "*.parquet")):
            fail(name, spec, f"parquet files, or folders holding them ({p} is a folder with no *.parquet file)")


def check_folder(name: str, path: str, what: str) -> None:
    """An input folder (an image root) that exists."""
    if path and not os.path.isdir(path):
        fail(name, path, f"{what}, a folder ({path} {'is a file' if os.path.exists(path) else 'does not exist'})")


def check_output(name: str, path: str, folder: bool, writes: Sequence[str] = ()) -> None:
    """A path the script will write, checked before anything loads, so that no run finds out at its end that it
    cannot: a folder (`folder`; made if missing, with the files `writes` inside it) or a file, that is not the
    other kind, under folders that exist or can be made, the nearest existing one writable by this process."""
    target = Path(os.path.abspath(path))
    if folder and target.exists() and not target.is_dir():
        fail(name, path, f"a folder to write into ({path} is a file)")
    if not folder and target.is_dir():
        fail(name, path, f"a file to write ({path} is a folder)")
    for inside in writes:
        if (target / inside).is_dir():
            fail(name, path, f"a folder where {inside} can be written ({target / inside} is a folder)")
    existing = target if folder else target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail(name, path, f"a path under folders ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(name, path, f"a path this process can write to ({existing} is read-only for it)")


def check_prompt_format(name: str, path, checkpoints: dict[str, str], tokenizer=None) -> None:
    """Each checkpoint's own prompt_format.json and the --prompt_format file read as a `prompt.PromptFormat`
    (strictly: `models.prompt_format.read_format`; a Python API may give the PromptFormat itself), and the given format's
    answers and ratings are one token each of every checkpoint's tokenizer (and of `tokenizer`, a loaded model's),
    as one next-token distribution reads them (`models.processor.answer_token_ids`).
    `checkpoints`: option name -> checkpoint directory ('toy': the toy tokenizer; '': no checkpoint)."""
    from models.processor import answer_token_ids
    from models.prompt_format import FORMAT_FILE, FormatError, read_format
    from prompt import PromptFormat
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
        fmt = path if isinstance(path, PromptFormat) else read_format(path)
    except FormatError as e:
        fail(name, path, f"a JSON file of prompt.PromptFormat's fields ({e})")
    tokenizers = {f"--{option_name}'s tokenizer ({checkpoint})": checkpoint
                  for option_name, checkpoint in checkpoints.items() if checkpoint}
    if tokenizer is not None:
        tokenizers["the model's tokenizer"] = tokenizer
    for whose, tok in tokenizers.items():
        for words in (fmt.answers, fmt.ratings):
            try:
                answer_token_ids(_tokenizer(tok) if isinstance(tok, str) else tok, fmt, words)
            except ValueError as e:
                fail(name, path, f"answers and ratings that are one token each of {whose}: {e}")


@functools.lru_cache(maxsize=4)
def _tokenizer(checkpoint: str):
    """A checkpoint's tokenizer alone, without its weights; 'toy' the toy world's."""
    if checkpoint == "toy":
        from toy import world
        return world.make_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
