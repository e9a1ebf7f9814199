"""What an evaluation is given: evaluate.py's options, the checkpoints and records they name, and the comparisons
the records ask for.

`Config` holds every option of `evaluate.py` (cli.py reads them from the command line and checks them before
anything loads). `load_reasoner` and `load_judge` read local checkpoints with safetensors weights ('toy': tiny
random models, nothing downloaded); `load_records` reads --data (data.load) or writes a toy test set. A group
of n images is compared as the n - 1 pairs (anchor, image_i) of section 5 (`anchor_pairs`); `dataset_pairs`
turns a whole dataset into the comparisons to run, and `confident_or_labelled` picks those of tables 4-5.

Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py tests/test_cli.py
"""
from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import cli
import data
from cli import fail, option
from metrics import confident, make_toy_judge
from prompt import Group, Pair, Processor
from static_decode import DECODES, make_decoder


# ----------------------------------------------------------------------------------------------------------
# Options, checkpoints and records


@dataclass
class Config:
    """Every option of `evaluate.py`: `--name=value` or `--name value` (dashes or underscores), `--help` lists them."""
    model: str = option("toy", "reasoner checkpoint (a local Qwen2.5-VL directory with safetensors weights); the "
                               "untrained instruct model gives the zero-shot row of table 3; 'toy' builds the tiny "
                               "random model and, without --data, toy data")
    data: str = option("", "imagereward:JSON | hpdv2:JSON | rapidata:P1,P2 | pickapic:P (see data.load)")
    images: list = option([], "image root of --data; with --prompt, the image files to score")
    prompt: str = option("", "score --images for this prompt and print the best one (reward-model use)")
    out: str = option("runs/eval", "folder for results.json, results.md, rollouts.jsonl and the figures")
    k: int = option(1, "reasoning rollouts per comparison (Mean@k, majority vote)", min=1)
    both_orders: bool = option(False, "also compare (b, a) and average with 1 - p: removes position bias")
    no_thinking: bool = option(False, "also run the table 5 ablation: the reasoning replaced by a fixed sentence")
    listener: str = option("", "frozen listener checkpoint for figure 2 ('toy': a second random toy model)")
    judge: str = option("", "causal LM judging contradictions for table 4 ('toy': a tiny random Qwen2)")
    limit: int = option(0, "evaluate the first N records of --data (0: all)", min=0)
    skip_bad: bool = option(False, "leave out bad records and unreadable images, counted in results.json")
    exclude: str = option("", "records to leave out: the file `python data.py check` writes")
    anchor: int = option(-1, "anchor image index per prompt; -1 draws one per prompt from --seed", min=-1)
    max_new_tokens: int = option(512, "reasoning length cap", min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts (0: greedy)", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    decode: str = option("reference", "how rollouts are decoded: reference, static or compiled (as train.py's --decode)",
                         choices=DECODES)
    batch_size: int = option(8, "pairs per batch (each gives k rollouts)", min=1)
    judge_batch_size: int = option(8, "judge prompts per batch", min=1)
    min_pixels: int = option(0, "image processor min_pixels (0: the checkpoint's)", min=0)
    max_pixels: int = option(0, "image processor max_pixels (0: the checkpoint's); bounds the image tokens", min=0)
    min_votes: int = option(20, "tables 4 and 5: pairs with at least this many votes ...", min=0)
    confident_top: int = option(5139, "... and, of those, the most confident N (the paper's 5139; 0: all)", min=0)
    toy_prompts: int = option(6, "prompts in the toy test set written when --model toy has no --data", min=1)
    seed: int = option(0, "seed of the anchors and of the sampler", min=0)
    scoring: str = option("pairwise", "pairwise: each image against an anchor, eq. (4); absolute: each image rated "
                                      "alone, its expected rating, eq. (3) (checkpoints of train.py --mode=score; "
                                      "table 3's abs-score row)", choices=("pairwise", "absolute"))

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        for name in ("model", "listener", "judge"):
            if getattr(self, name) not in ("", "toy"):
                cli.check_checkpoint(name, getattr(self, name))
        if self.prompt:
            if len(self.images) < 2:
                fail("images", self.images, "at least two image files to compare with --prompt")
            for path in self.images:
                if not Path(path).is_file():
                    fail("images", self.images, f"image files that exist ({path} does not)")
            if self.anchor >= len(self.images):
                fail("anchor", self.anchor, f"-1 or an index below the {len(self.images)} --images")
            return
        if self.data:
            cli.check_dataset("data", self.data)
        elif self.model != "toy":
            fail("data", self.data, "a dataset with a real --model (e.g. --data imagereward:test.json), or --prompt")
        if len(self.images) > 1:
            fail("images", self.images, "one image root with --data (several files only with --prompt)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            fail("min_pixels", self.min_pixels, f"at most --max_pixels={self.max_pixels}")


def device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


@functools.lru_cache(maxsize=1)
def toy_processor():
    """The toy processor, built once per process (training its tokenizer takes a second or two)."""
    import toy
    return toy.make_processor()


def load_reasoner(path: str, cfg: Config, seed: int = 0):
    """A Qwen2.5-VL checkpoint (reasoner or listener) and its processor; 'toy' builds a random toy model."""
    device, dtype = device_and_dtype()
    if path == "toy":
        import toy
        processor = toy_processor()
        return toy.make_model(processor.tokenizer, seed=seed).to(device), processor
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               local_files_only=True).to(device).eval()
    return model, Processor.from_pretrained(path, cfg.min_pixels or None, cfg.max_pixels or None)


def load_judge(path: str):
    """(model, tokenizer) of any causal LM with a chat template; 'toy' gives `make_toy_judge`."""
    device, dtype = device_and_dtype()
    if path == "toy":
        tokenizer = toy_processor().tokenizer
        return make_toy_judge(tokenizer).to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_records(cfg: Config, scratch: str) -> tuple[str, list, int]:
    """(spec, records, unreadable images left out) of --data; with --model toy and no --data, a toy ImageReward
    test set under `scratch`. With --skip_bad every image is decoded first, and a pair with an unreadable image
    (or that image of a group) is left out."""
    spec, root = cfg.data, (cfg.images[0] if cfg.images else None)
    if not spec:
        if cfg.model != "toy":
            raise ValueError("--data is required with a real --model (e.g. --data imagereward:test.json)")
        import toy
        paths = toy.write_dataset(scratch, n_train=0, n_test=cfg.toy_prompts, seed=cfg.seed)
        spec, root = f"imagereward:{paths['test']}", str(paths["test_images"])
    records = list(data.load(spec, root, skip_bad=cfg.skip_bad, exclude=cfg.exclude))
    records = records[:cfg.limit] if cfg.limit else records
    return (spec, *data.drop_unreadable(records)) if cfg.skip_bad else (spec, records, 0)


def sampling_args(cfg: Config) -> dict:
    """The sampling arguments of `compare_pairs`, with a seeded generator on the model's device."""
    device = device_and_dtype()[0]
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                batch_size=cfg.batch_size, generator=torch.Generator(device).manual_seed(cfg.seed),
                decoder=make_decoder(cfg.decode, device))


# ----------------------------------------------------------------------------------------------------------
# A dataset as comparisons: its pairs as they are, each group as n - 1 comparisons against its anchor


def anchor_pairs(prompt: str, images: Sequence, anchor: int, ranking: Sequence[int] | None = None) -> list[Pair]:
    """The n - 1 pairs (anchor, image_i), i != anchor; label 1 when people ranked image i above the anchor."""
    if not 0 <= anchor < len(images):
        raise ValueError(f"anchor {anchor} is not an index into {len(images)} images")
    return [Pair(prompt, (images[anchor], images[i]), int(ranking is not None and ranking[i] < ranking[anchor]))
            for i in range(len(images)) if i != anchor]


@dataclass
class DatasetPairs:
    """The comparisons a dataset asks for: its pairs, or each group's anchor pairs (`evaluate.dataset_accuracy`
    turns their p(b) back into the dataset's accuracy)."""
    compared: list[Pair]  # the comparisons to run
    labelled: list[int]  # indices into `compared` that carry a human preference (no tie)
    groups: list[Group] | None = None  # group datasets: the groups, and each group's anchor
    anchors: list[int] | None = None


def dataset_pairs(records: list, anchor: int, seed: int) -> DatasetPairs:
    """Pairs are compared as they are; a group of n images becomes n - 1 comparisons against its anchor.

    Groups of fewer than two images have nothing to compare: they are left out, and counted on stderr. A fixed
    `anchor` must index into every group that is left.
    """
    if not records:
        raise ValueError("the dataset is empty")
    if isinstance(records[0], Pair):
        return DatasetPairs(records, list(range(len(records))))
    single = sum(len(g.images) < 2 for g in records)
    if single:
        print(f"{single} of {len(records)} groups have fewer than two images: nothing to compare, left out",
              file=sys.stderr)
        records = [g for g in records if len(g.images) >= 2]
        if not records:
            raise ValueError("no group of the dataset has two images to compare")
    smallest = min(range(len(records)), key=lambda i: len(records[i].images))
    if anchor >= len(records[smallest].images):
        fail("anchor", anchor, f"-1 (a seeded anchor per prompt) or an index below {len(records[smallest].images)}: "
             f"group {smallest} ({records[smallest].prompt[:40]!r}) has {len(records[smallest].images)} images")
    rng = random.Random(seed)
    anchors = [anchor if anchor >= 0 else rng.randrange(len(g.images)) for g in records]
    compared, labelled = [], []
    for group, a in zip(records, anchors):
        others = [i for i in range(len(group.images)) if i != a]
        labelled += [len(compared) + n for n, i in enumerate(others) if group.ranking[i] != group.ranking[a]]
        compared += anchor_pairs(group.prompt, group.images, a, group.ranking)
    return DatasetPairs(compared, labelled, records, anchors)


def confident_or_labelled(dataset: DatasetPairs, min_votes: int, top: int) -> list[int]:
    """The comparisons of tables 4-5: the most confident pairs with enough votes when the data has votes, else
    every labelled one."""
    if all(dataset.compared[i].votes is not None for i in dataset.labelled) and dataset.groups is None \
            and dataset.labelled:
        return confident(dataset.compared, min_votes, top or None)
    return dataset.labelled
