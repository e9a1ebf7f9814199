"""The trained reasoner as a reward model: load a checkpoint once, then score images for prompts.

A prompt's n images are scored against an anchor, as in section 5: the anchor (image 0 unless `anchor=`)
scores 0.5, every other image its probability of beating the anchor, p(b | C) = sigma(f(b | C) - f(a | C))
(eq. (4)), averaged over k reasoning rollouts (Mean@k). Higher is preferred. A score compares the images of
one prompt with each other, not with another prompt's images. This file is a thin shell over evaluate.py's
scoring (`compare_pairs`, `anchor_scores`) and gives the numbers of
`python evaluate.py --model CKPT --prompt P --images ...` for the same options and seed. `reward_fn` can also
score every pair of a prompt's images (each image's mean win rate).

    from reward_model import RewardModel
    rm = RewardModel.from_pretrained("runs/hpdv2/export_0001000", k=3)  # bf16 on the GPU, fp32 on the CPU
    rm.score("a red cube", ["a.png", "b.png", "c.png"])   # [0.5, 0.81, 0.23]: one score per image
    rm.rank("a red cube", ["a.png", "b.png", "c.png"])    # [1, 0, 2]: image indices, best first
    rm.compare("a red cube", "a.png", "b.png")            # .p_b, and the k .reasonings it was read after
    rm.score_batch([(prompt, images), ...])               # many prompts: batches filled across prompts
    reward_fn = rm.reward_fn()                            # a diffusion trainer's reward (docs/reward_fn.md):
    scores, info = reward_fn(images, prompts, metadata)   # (N, 3, H, W) images, N prompts -> (N,) scores

Images are paths, PIL images, encoded bytes or (3, H, W) tensors (floats in [0, 1] or uint8, what a diffusion
pipeline returns with output_type="pt"; a (G, 3, H, W) tensor is G images). The rollouts of a prompt's j-th
comparison are seeded by (seed, j): a prompt's scores depend on the prompt, its images and the options alone,
not on the other prompts of a batch, the batch size, the process or the restart that computes them.

Before any forward, every prompt and image (a `reward_fn` batch's too) is checked as a dataset's are, and
refused naming the prompt and the image: a prompt over `max_prompt_tokens` (1024), an image over the pixel or
aspect-ratio limits of an image file, a tensor of another shape or dtype, of no pixels, or holding a NaN or an
infinity (a broken VAE decode would otherwise be ranked). The options are checked as the command line checks
them, before the checkpoint loads (`check_options`).

The checkpoint is asked in the prompt format it was trained with (its prompt_format.json, prompt.py), unless
`prompt_format=` (`--prompt_format`) names another.

Batch scoring from the command line: a JSONL file of {"prompt": ..., "images": [paths]} in; out comes one line
per input line (blank lines aside), in input order: its fields plus "scores" and "ranking" (and, with
--reasonings, each comparison's k reasonings). Killed, the same command goes on where it stopped: lines already
written are kept, a partial last line is redone, and a rerun with other scoring options is refused (they are
kept in OUT.options.json). Under torchrun each process scores every N-th line and rank 0 writes them all:

    python reward_model.py --model CKPT --input prompts.jsonl --out scores.jsonl --k 3
    torchrun --nproc_per_node=8 reward_model.py --model CKPT --input prompts.jsonl --out scores.jsonl --k 3

Tests: .venv/bin/python -m pytest -q tests/test_reward_model.py; images/s: bench/reward_model.py.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import evaluate
from evaluate import Comparison, anchor_scores, compare_pairs
from fast.static_decode import DECODES, make_decoder
from formats.images import DataError, load_image
from formats.layouts import MAX_PROMPT_TOKENS, PromptLimit
from formats.records import Pair
from infra import checkpoint, cli
from infra.cli import fail, option
from infra.parallel import PRECISIONS, leave_group, log, setup_distributed
from models.prompt_format import checkpoint_format, read_format
from prompt import PROMPT, PromptFormat


# ----------------------------------------------------------------------------------------------------------
# The Python API


class RewardModel:
    """A reasoner held once, scoring the images of prompts against an anchor (eq. (4), Mean@k)."""

    def __init__(self, model, processor, k: int = 1, both_orders: bool = False, anchor: int = 0,
                 max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, decode: str = "reference", batch_size: int = 8, reuse_sampler_logits: bool = False,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS, prompt_format: PromptFormat | str = PROMPT):
        checked_options(k=k, both_orders=both_orders, anchor=anchor, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, decode=decode,
                        batch_size=batch_size, reuse_sampler_logits=reuse_sampler_logits,
                        max_prompt_tokens=max_prompt_tokens, prompt_format=prompt_format,
                        tokenizer=processor.tokenizer)  # the format's answers: one token each of this tokenizer
        self.model, self.processor = model.eval(), processor
        self.fmt = prompt_format if isinstance(prompt_format, PromptFormat) else \
            read_format(prompt_format) if prompt_format else PROMPT  # a file: read as from_pretrained reads it
        self.k, self.both_orders, self.anchor, self.seed, self.batch_size = k, both_orders, anchor, seed, batch_size
        self.prompt_limit = processor.prompt_limit(max_prompt_tokens)  # a longer prompt is refused before any forward
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             decoder=make_decoder(decode), reuse_sampler_logits=reuse_sampler_logits)

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype: torch.dtype | str | None = None, min_pixels: int = 0,
                        max_pixels: int = 0, prompt_format: str | PromptFormat = "", **options) -> RewardModel:
        """A reasoner checkpoint directory (safetensors weights; 'toy': the tiny random toy model) on `device`
        (default: the GPU if there is one, else the CPU) in `dtype` (default: bf16 on a GPU, fp32 on the CPU).
        `min_pixels`/`max_pixels` bound the image size (0: the checkpoint's); `prompt_format` (a JSON file or a
        PromptFormat) replaces the checkpoint's own prompt_format.json (models/prompt_format.py: `PROMPT` when it
        has none), with a warning when they differ; `options` are `__init__`'s. Every argument is checked before
        anything loads, as the command line checks it (`check_options`)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path={path!r}: expected a checkpoint directory (or 'toy')")
        names = list(inspect.signature(cls.__init__).parameters)[3:]  # __init__'s options, after model and processor
        if unknown := [name for name in options if name not in names]:
            raise TypeError(f"RewardModel.from_pretrained: unknown option {unknown[0]!r}: expected one of "
                            f"{', '.join(names)}")
        path, (device, dtype) = os.fspath(path), checked_device(device, dtype)
        if isinstance(prompt_format, os.PathLike):
            prompt_format = os.fspath(prompt_format)
        checked_options(path, min_pixels=min_pixels, max_pixels=max_pixels, prompt_format=prompt_format, **options)
        fmt = checkpoint_format(path, prompt_format)  # checked above: the file given, else the checkpoint's own
        model, processor = evaluate.load_reasoner(path, evaluate.Config(min_pixels=min_pixels, max_pixels=max_pixels),
                                                  device=device, dtype=dtype)
        return cls(model, processor, prompt_format=fmt, **options)

    def score(self, prompt: str, images: Sequence) -> list[float]:
        """One score per image: the anchor's 0.5, every other image's Mean@k probability of beating it."""
        return self.score_batch([(prompt, images)])[0]

    def rank(self, prompt: str, images: Sequence) -> list[int]:
        """The image indices, best first (ties keep their order)."""
        return best_first(self.score(prompt, images))

    @torch.no_grad()
    def compare(self, prompt: str, image_a, image_b) -> Comparison:
        """The two images shown as (a, b): `.p_b` is the Mean@k probability that b is preferred, `.reasonings`
        the k reasonings it was read after (evaluate.Comparison). Seeded as `score(prompt, [a, b])`'s comparison."""
        _, (a, b) = read_group((prompt, [image_a, image_b]), "compare", prompt_limit=self.prompt_limit)
        return compare_pairs(self.model, self.processor, [Pair(prompt, (a, b), 0)], keys=[(self.seed, 0)],
                             **self._options())[0]

    def score_batch(self, groups: Sequence[tuple[str, Sequence]], progress: bool = False) -> list[list[float]]:
        """`score` of each (prompt, images), computed together: each batch holds comparisons of several prompts."""
        return [anchor_scores(len(c) + 1, self.anchor, [r.p_b for r in c]) for c in self.compare_groups(groups, progress)]

    @torch.no_grad()
    def compare_groups(self, groups: Sequence[tuple[str, Sequence]], progress: bool = False,
                       mode: str = "anchor") -> list[list[Comparison]]:
        """Each (prompt, images)'s comparisons with their rollouts, the pairs (a, b) of `compared(n, anchor, mode)`:
        "anchor", the n - 1 pairs (anchor, image i), i != anchor in order; "pairs", every (image i, image j),
        i < j, shown in both orders (n (n - 1) comparisons, whatever `both_orders`).

        The comparisons of all prompts go through `compare_pairs` together, `batch_size` at a time, each seeded by
        (seed, its index within its prompt). Every prompt and list of images is checked first (`checked_group`), so a
        bad one stops the call before any forward; the images are read `4 * batch_size` prompts at a time, so a list
        of 10,000 prompts of image paths never holds more than that many prompts' images in memory.
        """
        chunk, out = 4 * self.batch_size, []
        anchor = self.anchor if mode == "anchor" else 0  # checked_group checks it is an index of every group
        groups = [checked_group(g, f"prompt {i}", anchor, self.prompt_limit)  # all before the first forward
                  for i, g in enumerate(groups)]
        with tqdm(total=len(groups), desc="score", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(groups), chunk):
                read = [(prompt, read_images(images, f"prompt {start + i}"))
                        for i, (prompt, images) in enumerate(groups[start:start + chunk])]
                pairs = [[Pair(prompt, (images[a], images[b]), 0) for a, b in compared(len(images), anchor, mode)]
                         for prompt, images in read]
                keys = [(self.seed, j) for ps in pairs for j in range(len(ps))]  # within its prompt: see the docstring
                results = iter(compare_pairs(self.model, self.processor, [p for ps in pairs for p in ps], keys=keys,
                                             **self._options(mode)))
                out += [[next(results) for _ in ps] for ps in pairs]
                bar.update(len(read))
        return out

    def _options(self, mode: str = "anchor") -> dict:
        return dict(k=self.k, both_orders=self.both_orders or mode == "pairs", batch_size=self.batch_size,
                    fmt=self.fmt, **self.sampling)

    def reward_fn(self, mode: str = "anchor", reasonings: bool = False):
        """`reward_fn(images, prompts, metadata=None) -> (scores, info)`: this model as the reward of a loop that
        trains an image generator (Flow-GRPO, DDPO; docs/reward_fn.md).

        `images`: N images, a (N, 3, H, W) tensor (floats in [0, 1], or uint8), a uint8 (N, H, W, 3) array or a
        list of PIL images (or paths); `prompts`: N strings, each prompt once per image generated from it;
        `metadata` is not read. The rows of a prompt form its group, in the order given; the groups' comparisons
        are batched together (`compare_groups`, as `score_batch`), with no autograd (`torch.inference_mode`).
        mode "anchor": the group's first image (the `anchor`-th) scores 0.5, every other its Mean@k probability
        of beating it, eq. (4); "pairs": each image's mean win rate against the others, from all G (G - 1)
        ordered comparisons. A group of one image scores 0.5. A score compares an image with its group only.
        Every row is checked before the first forward as `score`'s images and prompts are (`read_image`,
        `max_prompt_tokens`): a NaN pixel or a prompt too long is refused, naming the row.

        `scores`: (N,) float32 on the images' device (the CPU for an array or a list). `info`: "mode"; "groups",
        one per prompt in order: its "prompt", "rows", "scores" and "ranking" (its rows, best first), and with
        `reasonings` its "comparisons" ({"rows": (a, b), "p_b", the k "reasonings", and "reasonings_reversed"
        when shown in both orders}); "notes", one per group of one image.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")

        def reward_fn(images, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
            return self.group_rewards(images, prompts, mode, reasonings)

        return reward_fn

    def group_rewards(self, images, prompts: Sequence[str], mode: str, reasonings: bool) -> tuple[torch.Tensor, dict]:
        """What `reward_fn`'s callable returns: rows grouped by prompt, the groups' comparisons batched together.
        Every prompt (a lone image's too) and every image is checked before the first forward, as `score`'s are."""
        rows, device = image_rows(images)  # N images, not yet read
        groups = prompt_groups(prompts, len(rows), self.prompt_limit)  # [(prompt, its rows)], in order of appearance
        rows = [read_image(row, f"reward_fn: images[{i}]") for i, row in enumerate(rows)]  # RGB PIL images
        several = [(prompt, idx) for prompt, idx in groups if len(idx) > 1]
        with torch.inference_mode():
            results = iter(self.compare_groups([(prompt, [rows[i] for i in idx]) for prompt, idx in several],
                                               mode=mode))
        scores, info = [0.5] * len(rows), {"mode": mode, "groups": [], "notes": []}
        for prompt, idx in groups:
            comparisons = next(results) if len(idx) > 1 else []
            values = group_scores(len(idx), self.anchor, mode, [c.p_b for c in comparisons]) if comparisons else [0.5]
            for i, value in zip(idx, values):
                scores[i] = value
            group = {"prompt": prompt, "rows": idx, "scores": values, "ranking": [idx[i] for i in best_first(values)]}
            if reasonings:
                group["comparisons"] = [comparison_info(c, idx[a], idx[b]) for c, (a, b) in
                                        zip(comparisons, compared(len(idx), self.anchor, mode))]
            if not comparisons:
                info["notes"].append(f"row {idx[0]} is the only image of its prompt {prompt!r:.80}: it scores 0.5, "
                                     f"with nothing to compare it with")
            info["groups"].append(group)
        return torch.tensor(scores, dtype=torch.float32, device=device), info  # (N,) outside inference mode


def best_first(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# ----------------------------------------------------------------------------------------------------------
# Groups of a generator's batch: which images are compared, and their scores


MODES = ("anchor", "pairs")


def compared(n: int, anchor: int, mode: str) -> list[tuple[int, int]]:
    """The pairs (a, b) of n images compared, each giving p(b beats a): (anchor, i) for every i != anchor, in
    order (section 5's anchor scores); or, mode "pairs", every (i, j), i < j (itertools.combinations' order)."""
    if mode == "anchor":
        return [(anchor, i) for i in range(n) if i != anchor]
    return list(combinations(range(n), 2))


def group_scores(n: int, anchor: int, mode: str, p_b: Sequence[float]) -> list[float]:
    """n images' scores from the p(b) of their `compared` pairs: eq. (4)'s anchor scores, or each image's mean win
    rate, image j winning (i, j) with p_b and image i with 1 - p_b."""
    if mode == "anchor":
        return anchor_scores(n, anchor, p_b)
    wins = [0.0] * n
    for (i, j), p in zip(compared(n, anchor, mode), p_b):
        wins[i], wins[j] = wins[i] + 1.0 - p, wins[j] + p
    return [w / (n - 1) for w in wins]


def prompt_groups(prompts: Sequence[str], n: int, prompt_limit: PromptLimit | None = None
                  ) -> list[tuple[str, list[int]]]:
    """N prompts, one per image -> [(prompt, the rows that have it)], in order of first appearance; each prompt
    non-empty and within `prompt_limit`."""
    if isinstance(prompts, str) or len(prompts) != n:
        raise ValueError(f"reward_fn: {n} images need {n} prompts, one per image, got "
                         f"{'a string' if isinstance(prompts, str) else len(prompts)}")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"reward_fn: prompts[{i}] must be a non-empty string, got {prompt!r:.80}")
        groups.setdefault(prompt, []).append(i)
    for prompt, rows in groups.items():  # each prompt measured once, however many images it has
        if prompt_limit is not None and (problem := prompt_limit.problem(prompt)):
            raise DataError(f"reward_fn: prompts[{rows[0]}]: {problem}", "prompt too long")
    return list(groups.items())


def image_rows(images) -> tuple[list, torch.device]:
    """A generator's batch -> its N images, each as `read_image` reads it ((3, H, W) tensors, or the list's items),
    and the device its scores go to: a (N, 3, H, W) tensor's, or the CPU for a (N, H, W, 3) NumPy array or a list."""
    device = torch.device("cpu")
    if isinstance(images, numpy.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"reward_fn: an array of images must have shape (N, H, W, 3), got {images.shape}")
        images = torch.from_numpy(numpy.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    elif isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"reward_fn: a tensor of images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        device = images.device
    elif not isinstance(images, (list, tuple)):
        raise TypeError(f"reward_fn: expected the images as a (N, 3, H, W) tensor, a (N, H, W, 3) array or a list, "
                        f"got {_described(images)}")
    return list(images), device


def comparison_info(c: Comparison, a: int, b: int) -> dict:
    """One comparison of rows (a, b) as `reward_fn`'s info shows it: p(b beats a) and the reasonings read."""
    out = {"rows": (a, b), "p_b": c.p_b, "reasonings": c.reasonings}
    if c.reversed is not None:
        out["reasonings_reversed"] = c.reversed.reasonings
    return out


def read_group(group, where: str, anchor: int = 0, prompt_limit: PromptLimit | None = None
               ) -> tuple[str, list[Image.Image]]:
    """(prompt, images) -> (prompt, its images decoded as RGB PIL images), checked before any forward: the prompt
    and the list as `checked_group` checks them, each image as `read_image` does. Errors name `where` and the
    image's index (and its path, for a path)."""
    prompt, images = checked_group(group, where, anchor, prompt_limit)
    return prompt, read_images(images, where)


def read_images(images: list, where: str) -> list[Image.Image]:
    return [read_image(image, f"{where}: image {j}") for j, image in enumerate(images)]


def checked_group(group, where: str, anchor: int = 0, prompt_limit: PromptLimit | None = None) -> tuple[str, list]:
    """(prompt, images) checked without decoding anything: a non-empty prompt within `prompt_limit`, the images
    a list (or a (G, 3, H, W) tensor) of at least two, `anchor` one of them. Cheap: run on every prompt of a batch
    before the first forward."""
    try:
        prompt, images = group
    except (TypeError, ValueError):
        raise TypeError(f"{where}: expected a (prompt, images) pair, got {str(group)[:80]}") from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string, got {prompt!r:.80}")
    if prompt_limit is not None and (problem := prompt_limit.problem(prompt)):
        raise DataError(f"{where}: {problem}", "prompt too long")
    if not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.dim() == 4):
        one = isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, torch.Tensor))
        raise TypeError(f"{where}: expected the images as a list (of paths, PIL images, bytes or (3, H, W) tensors) "
                        f"or a (G, 3, H, W) tensor, got {_described(images)}" + (": one image? pass a list of them"
                                                                                 if one else ""))
    images = list(images)  # a (G, 3, H, W) tensor becomes G images
    if len(images) < 2:
        raise ValueError(f"{where}: {len(images)} image(s): scoring compares at least two")
    if anchor >= len(images):
        raise ValueError(f"{where}: anchor {anchor} is not an index into its {len(images)} images")
    return prompt, images


def read_image(image, where: str) -> Image.Image:
    """A path, encoded bytes, PIL image or (3, H, W) tensor -> a decoded RGB PIL image, checked as an image file
    is (formats/images.py's `load_image`: size, aspect ratio); a tensor also as `tensor_image` checks it. A
    DataError names `where` (the prompt and the image's index) and what is wrong."""
    if not isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image, torch.Tensor)):
        raise TypeError(f"{where}: expected a path, PIL image, bytes or a (3, H, W) tensor, got {_described(image)}")
    try:
        return load_image(tensor_image(image) if isinstance(image, torch.Tensor) else image)
    except DataError as e:  # load_image names the path; this adds the prompt and the index
        raise DataError(f"{where}: {e}", e.problem) from None


def tensor_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) floats in [0, 1] or uint8 -> an RGB PIL image, rounded to 8 bits as a saved PNG would be. Refused,
    naming what is wrong: another shape or dtype, no pixels, a NaN or infinite value (a broken VAE decode), values
    outside [0, 1]: each would otherwise be scored as some other image."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise DataError(f"a tensor image must have shape (3, H, W), got {tuple(x.shape)}", "bad tensor")
    if not x.numel():
        raise DataError(f"a tensor image of shape {tuple(x.shape)} has no pixels", "bad tensor")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise DataError(f"a tensor image must be floats in [0, 1] or uint8, got {x.dtype}", "bad tensor")
    if x.dtype != torch.uint8:
        x = x.detach().float()
        finite = torch.isfinite(x)  # (3, H, W); NaN fails every comparison, so the range check below misses it
        if not finite.all():
            c, h, w = (~finite).nonzero()[0].tolist()
            raise DataError(f"a tensor image holds {int((~finite).sum())} non-finite values (NaN or infinity), the "
                            f"first at channel {c}, row {h}, column {w}", "bad tensor")
        if x.min() < 0 or x.max() > 1:  # e.g. a VAE's [-1, 1] output: clamping would silently change it
            raise DataError(f"a float tensor image must hold values in [0, 1], got [{x.min():.3g}, {x.max():.3g}] "
                            f"(for a [-1, 1] image pass (x + 1) / 2)", "bad tensor")
        x = (x * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())  # (H, W, 3)


def _described(value) -> str:
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
    return f"{type(value).__name__}{shape} {str(value)[:60]!r}" if isinstance(value, (str, os.PathLike)) else \
        f"{type(value).__name__}{shape}"


def checked_options(path: str | None = None, tokenizer=None, **options) -> None:
    """`check_options` for the Python API: a ValueError in its own words ("temperature=nan: expected ...")."""
    try:
        check_options(path, tokenizer, **options)
    except cli.OptionError as e:
        raise ValueError(f"{e.name}={e.value!r:.200}: expected {e.allowed}" if e.name else str(e)) from None


def checked_device(device, dtype) -> tuple:
    """`from_pretrained`'s device and dtype, checked before anything loads; a dtype may be named ("bfloat16")."""
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected a torch device, e.g. 'cuda', 'cuda:1' or 'cpu'") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: this process sees no CUDA device")
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dtype is not None and not isinstance(named, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: expected a torch dtype, or the name of one (float32, bfloat16, float16)")
    return device, named


# ----------------------------------------------------------------------------------------------------------
# Batch scoring of a JSONL file: options, input, resuming, the loop


@dataclass
class Config:
    """Every option of `reward_model.py`: `--name=value` or `--name value` (dashes or underscores)."""
    input: str = option("", "JSONL file, one {\"prompt\": ..., \"images\": [paths]} per line (other fields are "
                            "copied to the output)", blank=False)
    out: str = option("", "JSONL file written, one line per input line in order: its fields, \"scores\" and "
                          "\"ranking\" (best first); an existing one is resumed", blank=False)
    model: str = option("toy", "reasoner checkpoint (a local directory with safetensors weights); 'toy' builds the "
                               "tiny random toy model", blank=False)
    image_root: str = option("", "folder that relative image paths are under ('' = the current directory)")
    k: int = option(1, "reasoning rollouts per comparison (Mean@k)", min=1)
    both_orders: bool = option(False, "also compare (b, a) and average with 1 - p: removes position bias")
    anchor: int = option(0, "index of the anchor image in every line: it scores 0.5, the others p(beats it)", min=0)
    max_new_tokens: int = option(512, "reasoning length cap", min=1)
    max_prompt_tokens: int = option(MAX_PROMPT_TOKENS, "the longest prompt read, in tokens: a longer line is refused "
                                    "before the model loads, naming it (with --skip_bad: its \"error\")", min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts (0: greedy)", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    seed: int = option(0, "seed of the sampler: comparison j of every line is seeded by (seed, j)", min=0)
    decode: str = option("reference", "how rollouts are decoded: reference, static or compiled (fast/static_decode.py)",
                         choices=DECODES)
    reuse_sampler_logits: bool = option(False, "read p(b) from the sampler's logits where they are the second pass's "
                                               "(fast/answer_logits.py)")
    batch_size: int = option(8, "comparisons per batch, filled across lines; each process writes every "
                                "batch_size lines it scores", min=1)
    min_pixels: int = option(0, "image processor min_pixels (0: the checkpoint's)", min=0)
    max_pixels: int = option(0, "image processor max_pixels (0: the checkpoint's); bounds the image tokens", min=0)
    precision: str = option("auto", "bf16 or fp32 weights and compute; auto: bf16 on a GPU, fp32 on the CPU",
                            choices=PRECISIONS)
    reasonings: bool = option(False, "also write each comparison's k reasonings (\"reasonings\", the anchor's null)")
    skip_bad: bool = option(False, "a line whose images cannot be read gets \"error\" and null scores instead of "
                                   "stopping the run")
    prompt_format: str = option("", "JSON file of prompt.PromptFormat's fields to ask --model in; '' = its "
                                    "prompt_format.json (what train.py trained it with), else prompt.PROMPT")

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        if not Path(self.input).is_file():
            fail("input", self.input, "a JSONL file of {\"prompt\": ..., \"images\": [...]} lines")
        if not self.out or Path(self.out).resolve() == Path(self.input).resolve():
            fail("out", self.out, "the JSONL file to write the scores to (not --input)")
        cli.check_output("out", self.out, folder=False)
        cli.check_output("out", self.out + ".options.json", folder=False)  # the scoring options, kept beside it
        cli.check_folder("image_root", self.image_root, "the folder relative image paths are under")
        check_options(self.model, **{k: getattr(self, k) for k in SCORING + ("min_pixels", "max_pixels",
                                                                             "prompt_format")})


SCORING = ("k", "both_orders", "anchor", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "decode",
           "batch_size", "reuse_sampler_logits", "max_prompt_tokens")  # RewardModel's options
SAME_SCORES = ("input", "out", "decode", "batch_size", "reuse_sampler_logits", "skip_bad",
               "max_prompt_tokens")  # may change on resume


def check_options(path: str | None = None, tokenizer=None, **options) -> None:
    """RewardModel's options (and the pixel bounds) checked in one place, for the command line and the Python API
    alike: each by the type, range and choices `Config` declares for it, the pixel bounds together, and with a
    checkpoint `path` (not 'toy') the checkpoint itself, its context (--max_prompt_tokens + --max_new_tokens)
    and its own pixel bounds. The prompt format (a JSON file, or from the API a PromptFormat) is read as the
    command line reads it (`cli.check_prompt_format`): its answers one token each of `path`'s tokenizer, or of
    `tokenizer` for a model already loaded (`path` None). Raises cli.OptionError naming the option; reads no
    weights."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in options.items():
        if name == "prompt_format" and isinstance(value, PromptFormat):
            continue  # the API's form of --prompt_format: checked with the tokenizer below
        if name in fields and (problem := cli.value_problem(value, fields[name].metadata, fields[name].default)):
            fail(name, value, problem)
    given = {f.name: f.default for f in fields.values()} | options
    cli.check_models({"model": path or ""}, given["min_pixels"], given["max_pixels"], given["max_prompt_tokens"],
                     given["max_new_tokens"])
    cli.check_prompt_format("prompt_format", given["prompt_format"], {"model": path} if path else {}, tokenizer)


def read_records(path: str, anchor: int, prompt_limit: PromptLimit | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line of the input, checked before the model loads; with a
    `prompt_limit`, a prompt over it is refused too."""
    records = []
    for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {n}: not UTF-8 text (byte {e.start}): {raw[:80]!r}") from None
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's parser goes
            raise DataError(f"{path}: line {n}: not JSON (or nested too deep): {line[:80]!r}") from None
        images = record.get("images") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DataError(f"{path}: line {n}: expected an object with a non-empty string \"prompt\"")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images) or len(images) <= max(anchor, 1):
            raise DataError(f"{path}: line {n}: \"images\" must be a list of at least {max(anchor + 1, 2)} image "
                            f"paths (--anchor={anchor}), got {str(images)[:80]}")
        if prompt_limit is not None and (problem := prompt_limit.problem(record["prompt"])):
            raise DataError(f"{path}: line {n}: {problem}", "prompt too long")
        records.append((n, record))
    return records


def resume(cfg: Config, records: list) -> int:
    """How many lines of --out an earlier run wrote (rank 0 reads, every rank learns it); 0 for a new --out.

    A partial last line (a kill mid-write) is dropped, to be redone. The lines kept must score these records
    with these options (out + ".options.json" holds them): anything else stops the run before the model loads.
    """
    answer = [None, 0]  # (error, lines done)
    if dist.get_rank() == 0:
        try:
            answer[1] = lines_done(Path(cfg.out), records, cfg)
        except DataError as e:
            answer[0] = str(e)
    dist.broadcast_object_list(answer, src=0)
    if answer[0]:
        raise DataError(answer[0])
    return answer[1]


def lines_done(out: Path, records: list, cfg: Config) -> int:
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAME_SCORES}
    sidecar = out.with_name(out.name + ".options.json")
    if not out.exists() or not out.stat().st_size:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_synced(sidecar, json.dumps(options, indent=1).encode())
        out.write_text("")
        return 0
    if not sidecar.exists():
        raise DataError(f"{out} exists but {sidecar} does not: it was not written by reward_model.py; move it or "
                        f"pick another --out")
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{sidecar}: unreadable ({type(e).__name__}: {str(e)[:80]}): it holds the options {out} was "
                        f"scored with; move both away, or pick another --out") from None
    if not isinstance(saved, dict):
        raise DataError(f"{sidecar}: expected the JSON object of the options {out} was scored with; move both away, "
                        f"or pick another --out")
    saved = {k: saved.get(k, getattr(Config, k)) for k in options}  # an option newer than the file: its default
    diffs = [f"--{k}: {saved[k]!r} -> {v!r}" for k, v in options.items() if saved[k] != v]
    if diffs:
        raise DataError(f"{out} was scored with other options; going on would mix two scorings:\n  " +
                        "\n  ".join(diffs) + "\nrerun with its options, or pick another --out")
    complete, _, partial = out.read_bytes().rpartition(b"\n")  # every line we write ends in "\n"
    if partial:
        log(f"warning: {out}: dropping a partial last line ({partial[:60]!r}): it is scored again")
        checkpoint.write_synced(out, complete + b"\n" if complete else b"")
    rows = complete.split(b"\n") if complete else []
    if len(rows) > len(records):
        raise DataError(f"{out} has {len(rows)} lines, more than the {len(records)} of {cfg.input}: another input's "
                        f"scores? pick another --out")
    for i, (row, (n, record)) in enumerate(zip(rows, records)):
        try:
            written = json.loads(row)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise DataError(f"{out}: line {i + 1} is not JSON: {row[:80]!r}") from None
        if not isinstance(written, dict):
            raise DataError(f"{out}: line {i + 1} is not a line of scores (a JSON object): {row[:80]!r}")
        if written.get("prompt") != record["prompt"] or written.get("images") != record["images"]:
            raise DataError(f"{out}: line {i + 1} scores {written.get('prompt')!r:.60}, but line {n} of {cfg.input} "
                            f"is {record['prompt']!r:.60}: another input's scores? pick another --out")
    return len(rows)


def score_lines(rm: RewardModel, cfg: Config, records: list, mine: list[int]) -> list[tuple[int, dict]]:
    """(index, output row) of the records `mine`, their comparisons batched together (`compare_groups`)."""
    read, rows = [], {}
    for i in mine:
        n, record = records[i]
        paths = [os.path.join(cfg.image_root, p) for p in record["images"]]  # an absolute path stays as it is
        try:
            read.append((i, read_group((record["prompt"], paths), f"{cfg.input}: line {n}", rm.anchor,
                                       rm.prompt_limit)))
        except DataError as e:
            if not cfg.skip_bad:
                raise
            rows[i] = {**record, "scores": None, "ranking": None, "error": str(e)}
    for (i, _), comparisons in zip(read, rm.compare_groups([group for _, group in read])):
        rows[i] = output_row(records[i][1], comparisons, rm.anchor, cfg.reasonings)
    return sorted(rows.items())


def output_row(record: dict, comparisons: list[Comparison], anchor: int, reasonings: bool) -> dict:
    """An input record plus its scores, its ranking and (when asked) each comparison's reasonings, as shown."""
    scores = anchor_scores(len(comparisons) + 1, anchor, [c.p_b for c in comparisons])
    row = {**record, "scores": scores, "ranking": best_first(scores)}
    if reasonings:
        row["reasonings"] = [c.reasonings for c in comparisons]
        row["reasonings"].insert(anchor, None)
        if comparisons[0].reversed is not None:  # --both_orders: the reasonings of (image i, anchor)
            row["reasonings_reversed"] = [c.reversed.reasonings for c in comparisons]
            row["reasonings_reversed"].insert(anchor, None)
    return row


def score_file(cfg: Config) -> None:
    """Score every line of --input not yet in --out; rank 0 appends each `batch_size x world` lines, in order."""
    rank, world, device = setup_distributed()
    pixels = evaluate.Config(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    processor = evaluate.load_processor(cfg.model, pixels)  # the tokenizer only: from_pretrained reuses it
    limit = processor.prompt_limit(cfg.max_prompt_tokens)  # with --skip_bad, a long prompt's line gets its "error"
    records = read_records(cfg.input, cfg.anchor, None if cfg.skip_bad else limit)
    done = resume(cfg, records)
    rm = RewardModel.from_pretrained(cfg.model, dtype=evaluate.device_and_dtype(cfg.precision)[1],
                                     min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                     prompt_format=cfg.prompt_format, **{k: getattr(cfg, k) for k in SCORING})
    todo, per_write = list(range(done, len(records))), cfg.batch_size * world
    images = [len(record["images"]) for _, record in records]
    out = open(cfg.out, "a", encoding="utf-8") if rank == 0 else None
    with tqdm(total=sum(images), initial=sum(images[:done]), desc="score", unit="image", disable=rank != 0,
              dynamic_ncols=True) as bar:  # images/s and the time left
        for start in range(0, len(todo), per_write):
            chunk = todo[start:start + per_write]
            rows = score_lines(rm, cfg, records, chunk[rank::world])  # every world-th line of the chunk
            parts = [rows] if world == 1 else [None] * world
            if world > 1:
                dist.all_gather_object(parts, rows)
            if out is not None:
                out.write("".join(json.dumps(row) + "\n" for _, row in sorted(r for part in parts for r in part)))
                out.flush()
                os.fsync(out.fileno())  # a kill now loses no written line
            bar.update(sum(images[i] for i in chunk))
    if out is not None:
        out.close()
    log(f"wrote {cfg.out}: {len(records)} lines, {len(todo)} scored now ({done} were there)")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = cli.parse(Config, argv, __doc__)
    rank, _, _ = setup_distributed()
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=1), file=sys.stderr)
    try:
        score_file(cfg)
    except DataError as e:
        raise SystemExit(f"reward_model.py: error: {e}")
    leave_group()


if __name__ == "__main__":
    main()
