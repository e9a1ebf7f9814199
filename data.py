"""Data: a dataset on disk -> the examples training and evaluation use.

1. `load("KIND:PATH")`: a dataset in one of its published layouts (formats/layouts.py) -> `Pair`s or `Group`s
   (formats/records.py), with a fixed random subset and excluded records left out.
2. What is done with loaded records: `groups_to_pairs`, `random_orders`, `spread_sample` (the held-out set),
   `to_rated` (the absolute-score variant), `anchor_pairs` and `dataset_pairs` (the comparisons evaluation runs:
   each group's n - 1 pairs against its anchor, section 5), `drop_unreadable`.
3. `ExampleStream`: a deterministic, resumable, rank-sharded stream of training batches (of Pairs, or of Rated
   records), which decodes each example's images and, with `skip_bad`, replaces an unreadable example by the next
   readable one.
4. `python data.py check SPEC [--images ROOT] [--workers N] [--tokenizer MODEL_DIR]`: decode every image of a
   dataset before a long run, measure each prompt with the run's tokenizer; list the records that cannot be
   used in a file that `--exclude` reads.

Where this departs from the paper:
1. An anchor comparison shows the anchor first, (anchor, image i) (`anchor_pairs`); the paper does not say in
   which order. Every comparison of a group then carries the same position bias; evaluate.py's --both-orders
   shows each pair both ways and removes it (train.py shows training pairs in random orders: its departure 7).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Iterable, Sequence

from formats.images import DataError, check_images, expand_paths, load_image
from formats.layouts import (MAX_PROMPT_TOKENS, PromptLimit, load_hpdv2, load_imagereward, load_pickapic,
                             load_rapidata, read_exclude, subsample)
from formats.records import Group, Pair, Rated, swapped


# ----------------------------------------------------------------------------------------------------------
# Loading


DATASETS = ("imagereward", "hpdv2", "rapidata", "pickapic")


def load(spec: str, image_root=None, fraction: float = 1.0, seed: int = 0, exclude=None, **kw) -> list:
    """A dataset named on the command line, "KIND:PATH[,PATH...]" -> list[Pair] or list[Group].

    KIND is imagereward (test.json, or ImageRewardDB parquet files), hpdv2 (train.json or test.json),
    rapidata or pickapic (parquet files; a directory stands for its *.parquet files). Pick-a-Pic stores its
    images in the parquet files and ignores `image_root`. `fraction`/`seed` keep a fixed random subset
    (`subsample`): of HPDv2's records, before they are checked; of the pairs or groups of the other layouts.
    `exclude` is a set of (file, record) or the path of the file `python data.py check` writes; entries that
    leave nothing out of this dataset (another dataset's files, records it does not have) are counted on stderr.
    `kw` goes to the loader (skip_bad, report, prompt_limit).
    """
    kind, sep, rest = spec.partition(":")
    paths = [p for p in rest.split(",") if p]
    if not sep or kind not in DATASETS or not paths:
        raise ValueError(f"dataset spec {spec!r}: expected KIND:PATH[,PATH...] with KIND one of {DATASETS}")
    if isinstance(exclude, (str, os.PathLike)):
        exclude = read_exclude(exclude) if str(exclude) else None
    kw["exclude"] = exclude
    if kw.get("report") is None:
        kw["report"] = {}  # read below for the excluded count
    if kind == "hpdv2":
        if len(paths) != 1:
            raise ValueError(f"dataset spec {spec!r}: hpdv2 reads one JSON file, got {len(paths)} paths")
        records = load_hpdv2(paths[0], image_root, fraction=fraction, seed=seed, **kw)
        _report_exclude(spec, exclude, paths, kw["report"].get("excluded", 0), fraction < 1)
        return records
    if kind == "imagereward":
        records = load_imagereward(paths[0] if len(paths) == 1 else paths, image_root, **kw)
    elif kind == "rapidata":
        records = load_rapidata(paths, image_root, **kw)
    else:
        records = load_pickapic(paths, **kw)
    _report_exclude(spec, exclude, expand_paths(paths), kw["report"].get("excluded", 0), False)
    keep = subsample(len(records), fraction, seed)
    if len(keep) < len(records):
        print(f"data: {spec}: kept {len(keep)} of {len(records)} (fraction {fraction}, seed {seed})", file=sys.stderr)
    return [records[i] for i in keep]


def exclude_summary(exclude, files: Sequence[str], excluded: int, subset: bool) -> str | None:
    """What an `exclude` set did to a dataset made of `files`, when some entries left nothing out; else None.

    An entry naming another dataset's file, or a record its file does not have, excludes nothing: a list
    written for another dataset (or an older version of this one) would otherwise be silently ignored.
    """
    if not exclude:
        return None
    real = {os.path.realpath(f) for f in files}
    others = sorted({f for f, _ in exclude if f not in real})
    matching = sum(f in real for f, _ in exclude)
    if matching == len(exclude) and excluded == matching:
        return None
    text = f"{matching} of {len(exclude)} exclude entries match this dataset"
    if others:
        text += f"; the others name {len(others)} other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    if excluded < matching:
        where = "records its files do not have" + (" or records outside the --fraction subset" if subset else "")
        text += f"; {matching - excluded} of the matching ones name {where}"
    return text + f": {excluded} records left out"


def _report_exclude(spec: str, exclude, files: Sequence[str], excluded: int, subset: bool) -> None:
    summary = exclude_summary(exclude, files, excluded, subset)
    if summary:
        print(f"data: {spec}: {summary}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Records -> examples


def groups_to_pairs(groups: Iterable[Group], report: dict | None = None) -> list[Pair]:
    """Every pair (i < j) of images of each group whose ranks differ; the label is the better-ranked one.

    Images keep their order within the group (image i first), so the label is 0 exactly when image i
    has the lower (better) rank. Tied images make no pair: they are counted ("tied_pairs" in `report`) and
    their number goes to stderr.
    """
    pairs, ties = [], 0
    for g in groups:
        for i in range(len(g.images)):
            for j in range(i + 1, len(g.images)):
                if g.ranking[i] != g.ranking[j]:
                    pairs.append(Pair(g.prompt, (g.images[i], g.images[j]), label=int(g.ranking[j] < g.ranking[i])))
                else:
                    ties += 1
    if report is not None:
        report.update(pairs=len(pairs), tied_pairs=ties)
    if ties:
        print(f"data: groups -> {len(pairs)} pairs; left out {ties} tied image pairs (a tie is not a preference)",
              file=sys.stderr)
    return pairs


def random_orders(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """Each pair shown in a seeded random order (swapped with probability 1/2; the label follows the images).

    Files list images in an order that often carries the answer (`groups_to_pairs` puts image i before
    image j, and ranked files are often sorted), and a model rewarded on such pairs can learn to name a
    position. Shuffling the order within each pair takes that signal away; train.py does it by default.
    """
    rng = random.Random(seed)
    return [swapped(p) if rng.random() < 0.5 else p for p in pairs]


def spread_sample(examples: Sequence, n: int, seed: int) -> list:
    """A seeded sample of `n` examples spread over prompts: one per prompt in a random order of prompts, then a
    second per prompt, and so on. Used for the held-out set, which must not be the first prompts of a file."""
    rng = random.Random(seed)
    by_prompt: dict[str, list] = {}
    for e in examples:
        by_prompt.setdefault(e.prompt, []).append(e)
    queues = list(by_prompt.values())
    rng.shuffle(queues)
    for q in queues:
        rng.shuffle(q)
    out = []
    while len(out) < n and any(queues):
        out += [q.pop() for q in queues if q][:n - len(out)]
    return out


def to_rated(records: Sequence, num_ratings: int) -> list[Rated]:
    """Groups or pairs -> single images with ratings on the 1..R scale, for the absolute-score variant.

    A group's human ranks map linearly onto the scale (its best rank -> R, its worst -> 1; a group whose
    images all tie gets the middle); in a pair the preferred image gets R and the other 1. (ImageRewardDB also
    publishes per-image ratings; ranks are what every layout read here has.)
    """
    out = []
    for r in records:
        if isinstance(r, Pair):
            out += [Rated(r.prompt, im, num_ratings if i == r.label else 1) for i, im in enumerate(r.images)]
            continue
        best, worst = min(r.ranking), max(r.ranking)
        for im, rank in zip(r.images, r.ranking):
            x = 0.5 if best == worst else (worst - rank) / (worst - best)  # 1 for the best rank, 0 for the worst
            out.append(Rated(r.prompt, im, 1 + round(x * (num_ratings - 1))))
    return out


def anchor_pairs(prompt: str, images: Sequence, anchor: int, ranking: Sequence[int] | None = None) -> list[Pair]:
    """The n - 1 pairs (anchor, image_i), i != anchor, the anchor always first (departure 1 at the top); label 1
    when people ranked image i above the anchor."""
    if not 0 <= anchor < len(images):
        raise ValueError(f"anchor {anchor} is not an index into {len(images)} images")
    return [Pair(prompt, (images[anchor], images[i]), int(ranking is not None and ranking[i] < ranking[anchor]))
            for i in range(len(images)) if i != anchor]


@dataclasses.dataclass
class DatasetPairs:
    """The comparisons a dataset asks for: its pairs, or each group's anchor pairs (`evaluate.dataset_accuracy` turns
    their p(b) back into the dataset's accuracy)."""
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
        raise ValueError(f"--anchor={anchor} is not allowed: expected -1 (a seeded anchor per prompt) or an index below "
                         f"{len(records[smallest].images)}: group {smallest} ({records[smallest].prompt[:40]!r}) has "
                         f"{len(records[smallest].images)} images")
    rng = random.Random(seed)
    anchors = [anchor if anchor >= 0 else rng.randrange(len(g.images)) for g in records]
    compared, labelled = [], []
    for group, a in zip(records, anchors):
        others = [i for i in range(len(group.images)) if i != a]
        labelled += [len(compared) + n for n, i in enumerate(others) if group.ranking[i] != group.ranking[a]]
        compared += anchor_pairs(group.prompt, group.images, a, group.ranking)
    return DatasetPairs(compared, labelled, records, anchors)


def drop_unreadable(records: Sequence, workers: int = 0) -> tuple[list, int]:
    """Records with every image decoded once; a Pair or Rated with a bad image is left out, a Group loses the bad
    image (and is left out below two images). Returns (records, images found bad); each bad one goes to stderr.
    """
    images = [im for r in records for im in images_of(r)]
    problems = dict(check_images(images, workers))  # position in `images` -> DataError
    out, k = [], 0
    for r in records:
        bad = [problems.get(k + n) for n in range(len(images_of(r)))]
        k += len(bad)
        for e in filter(None, bad):
            print(f"data: left out an unreadable image: {e}", file=sys.stderr)
        if isinstance(r, Group) and any(bad):
            kept = [n for n, e in enumerate(bad) if e is None]
            if len(kept) >= 2:
                out.append(Group(r.prompt, [r.images[n] for n in kept], [r.ranking[n] for n in kept]))
        elif not any(bad):
            out.append(r)
    return out, len(problems)


def decoded(example):
    """A Pair, Group or Rated record with its images decoded (PIL); raises DataError naming a bad image."""
    if isinstance(example, Rated):
        return dataclasses.replace(example, image=load_image(example.image))
    images = [load_image(im) for im in example.images]
    return dataclasses.replace(example, images=tuple(images) if isinstance(example, Pair) else images)


def images_of(example) -> list:
    """The images of a Pair, Group or Rated record, in order."""
    return [example.image] if isinstance(example, Rated) else list(example.images)


# ----------------------------------------------------------------------------------------------------------
# The training stream


class ExampleStream:
    """An endless, deterministic, resumable stream of per-rank training batches of examples: Pairs, or Rated
    records (the absolute-score variant), as given.

    Epoch e visits the examples in the order `random.Random(seed + e).shuffle` gives; each step takes the next
    global batch of `batch_size * world_size` examples and rank r keeps its slice [r*batch_size,
    (r+1)*batch_size), so the ranks see disjoint examples that together cover the global batch. The tail of
    an epoch that does not fill a whole global batch (len % (batch_size * world_size) examples) is dropped for
    that epoch only: the next epoch reshuffles, so no example is left out every epoch.

    `both_orders=True` shows each pair twice, as given and `swapped` (the label follows the images), side by side
    in the same batch (batch_size must be even): a batch then holds as many "first image" as "second image"
    answers, so whatever the model learns from it cannot be a preference for a position. An epoch still
    visits each pair once (in both orders).

    `decode=True` serves examples with their images decoded (`decoded`): a bad image raises `DataError` naming
    its file, record, field and path, here, before any forward pass. With `skip_bad=True` too, an example
    whose image cannot be read is replaced by the next readable one from this rank's own share of the epoch
    order (the same slot of the following global batches), counted in `replaced` and reported on stderr. The
    replacement depends only on the epoch order and the files, so every rank serves exactly `batch_size`
    examples per step (FSDP2 needs the same number of forwards on every rank) and a resumed stream serves
    what the uninterrupted one would have.

    `state_dict()` is {"epoch", "index", "replaced"} (the next global batch of that epoch, and the count so far);
    `load_state_dict` resumes at exactly that batch. Every rank must be built with the same examples,
    batch_size, world_size and seed.
    """

    def __init__(self, examples: Sequence, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 both_orders: bool = False, decode: bool = False, skip_bad: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if both_orders and batch_size % 2:
            raise ValueError(f"both_orders needs an even batch_size (each pair is shown in both orders), got {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.decode, self.skip_bad = decode, skip_bad
        self.views = 2 if both_orders else 1  # batch entries made from each pair
        self.global_batch = batch_size * world_size // self.views  # pairs per global batch
        self.steps_per_epoch = len(self.examples) // self.global_batch
        if batch_size < 1 or self.steps_per_epoch == 0:
            raise DataError(f"{len(self.examples)} examples cannot fill one global batch of batch_size={batch_size}"
                            f" x world_size={world_size} (train.py: --pairs_per_rank x processes)")
        self.epoch, self.index, self.replaced = 0, 0, 0
        self.bad: set[int] = set()  # examples found unreadable (a cache: re-derived after a restart)
        self._order, self._order_epoch = None, None

    def order(self, epoch: int) -> list[int]:
        """The example indices of `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            self._order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> list:
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        per_rank = self.batch_size // self.views  # pairs of this rank: slots [first, first + per_rank) of the order
        first = self.index * self.global_batch + self.rank * per_rank
        pairs = [self._serve(first + j) for j in range(per_rank)]
        self.index += 1
        return [q for p in pairs for q in ((p, swapped(p)) if self.views == 2 else (p,))]

    def _serve(self, slot: int):
        """The example at `slot` of this epoch's order or, if it cannot be read, the next readable one."""
        order = self.order(self.epoch)
        if not self.decode:
            return self.examples[order[slot]]
        for k in range(self.steps_per_epoch + 1):  # the same slot of the next global batches, wrapping around
            i = order[(slot + k * self.global_batch) % len(order)]
            if i in self.bad:
                continue
            try:
                example = decoded(self.examples[i])
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad.add(i)
                print(f"data: rank {self.rank}: example {i} cannot be read, replaced by the next readable one: {e}",
                      file=sys.stderr)
                continue
            self.replaced += k > 0
            return example
        raise DataError(f"rank {self.rank}: no readable example in {self.steps_per_epoch + 1} tries from slot {slot} "
                        f"of epoch {self.epoch}; {len(self.bad)} examples found unreadable so far")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "replaced": self.replaced}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["index"] <= self.steps_per_epoch:
            raise ValueError(f"stream state index {state['index']} is outside [0, {self.steps_per_epoch}]")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.replaced = int(state.get("replaced", 0))


# ----------------------------------------------------------------------------------------------------------
# Checking a dataset before a run: python data.py check SPEC [--images ROOT] [--workers N] [--out FILE] [--tokenizer DIR]


def check(spec: str, images_root=None, workers: int = 1, out: str = "bad_records.jsonl",
          prompt_limit: PromptLimit | None = None, max_prompt_bytes: int = MAX_PROMPT_TOKENS) -> dict:
    """Load `spec` (bad records counted, not raised), decode every image, write the bad records to `out`.

    Each line of `out` is {"file", "record", "field", "problem", "error"}: what `--exclude=out` leaves out.
    Prompts are measured against `prompt_limit` (the run's tokenizer and --max_prompt_tokens); without one,
    the prompts longer than `max_prompt_bytes` UTF-8 bytes, which may be over that many tokens, are counted
    ("uncounted_prompts", with the longest) but not listed: only a tokenizer can tell.
    Returns the counts by problem, the records usable ("usable": none means nothing to train on), the number of
    images decoded and the time it took.
    """
    report: dict = {}
    records = load(spec, images_root, skip_bad=True, report=report, prompt_limit=prompt_limit)
    entries = [{"file": f, "record": i, "field": k, "problem": p, "error": m} for f, i, k, p, m in report.get("bad", [])]
    images = [im for r in records for im in images_of(r)]
    unique = list({id(im): im for im in images}.values())  # a group's image appears in many of its pairs
    t = time.time()
    for n, e in check_images(unique, workers, progress=True):
        source = getattr(unique[n], "source", None)
        entries.append({"file": source.file if source else None, "record": source.record if source else None,
                        "field": source.field if source else None, "problem": e.problem, "error": str(e)})
    seconds = time.time() - t
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    problems: dict[str, int] = {}
    for e in entries:
        problems[e["problem"]] = problems.get(e["problem"], 0) + 1
    long = [] if prompt_limit else long_prompts(records, max_prompt_bytes)
    return {"records": report.get("records", len(records)), "usable": len(records), "images": len(unique),
            "seconds": seconds, "problems": problems, "bad_records": len({(e["file"], e["record"]) for e in entries}),
            "uncounted_prompts": len(long), "longest_prompt": max(long, key=lambda x: x[1], default=None)}


def long_prompts(records: Sequence, max_bytes: int) -> list[tuple[str, int]]:
    """(where, UTF-8 bytes) of each record whose prompt is longer than `max_bytes` bytes; `where` names its file
    and record (its first image's source)."""
    out = []
    for r in records:
        size = len(r.prompt.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            source = getattr(images_of(r)[0], "source", None)
            out.append((f"{source.file}: record {source.record}" if source else repr(r.prompt[:40]), size))
    return out


def _tokenizer_limit(tokenizer: str, max_tokens: int) -> PromptLimit | None:
    """--tokenizer DIR (a checkpoint directory, the run's --model) or 'toy' -> the limit train.py applies."""
    if not tokenizer:
        return None
    from models.processor import prompt_tokens
    if tokenizer == "toy":
        from toy import world
        tok = world.make_tokenizer()
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return PromptLimit(max_tokens, lambda text: prompt_tokens(tok, text))


def check_arguments(args) -> None:
    """`python data.py check`'s arguments, before anything is read: an OptionError naming the one at fault."""
    from infra import cli
    from models.families import tokenizer_problem
    try:
        cli.check_dataset("spec", args.spec)
    except cli.OptionError as e:  # a positional argument: no --spec to name
        raise cli.OptionError(f"SPEC {args.spec!r} is not allowed: expected {e.allowed}") from None
    cli.check_folder("images", args.images, "the image root of the dataset")
    for name in ("workers", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            cli.fail(name, getattr(args, name), "a number >= 1")
    cli.check_output("out", args.out, folder=False)
    if os.path.realpath(args.out) in {os.path.realpath(p) for p in args.spec.partition(":")[2].split(",") if p}:
        cli.fail("out", args.out, "a file other than the dataset's own (it would be overwritten)")
    if args.tokenizer not in ("", "toy"):
        problem = tokenizer_problem(args.tokenizer) if os.path.isdir(args.tokenizer) else \
            "is a file" if os.path.exists(args.tokenizer) else "does not exist"
        if problem:
            cli.fail("tokenizer", args.tokenizer, f"the run's --model checkpoint directory, whose tokenizer counts the "
                     f"prompts' tokens (or toy); {args.tokenizer}: {problem}")


def main(argv: Sequence[str]) -> int:
    import argparse

    from infra.cli import OptionError
    parser = argparse.ArgumentParser(prog="python data.py check", description="Decode every image of a dataset "
                                     "and list the records that cannot be used, before a long run.")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("spec", help="KIND:PATH[,PATH...] as train.py's --train_data (see data.load)")
    parser.add_argument("--images", default=None, help="the image root of the dataset")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    parser.add_argument("--out", default="bad_records.jsonl", help="where the bad records are listed")
    parser.add_argument("--tokenizer", default="", help="the run's --model directory (or toy): its tokenizer counts "
                        "each prompt's tokens against --max_prompt_tokens")
    parser.add_argument("--max_prompt_tokens", type=int, default=MAX_PROMPT_TOKENS, help="as train.py's")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except OptionError as e:
        parser.error(str(e))
    limit = _tokenizer_limit(args.tokenizer, args.max_prompt_tokens)
    try:
        result = check(args.spec, args.images, args.workers, args.out, limit, args.max_prompt_tokens)
    except DataError as e:  # a file that cannot be read as its layout at all (bad records are listed, not raised)
        print(f"python data.py check: error: {e}", file=sys.stderr)
        return 2
    rate = result["images"] / max(result["seconds"], 1e-9)
    print(f"{args.spec}: {result['records']} records, {result['images']} images decoded in {result['seconds']:.1f} s "
          f"({rate:.0f} images/s, {args.workers} workers)")
    for problem, n in sorted(result["problems"].items(), key=lambda kv: -kv[1]):
        print(f"  {problem:16s} {n}")
    if result["uncounted_prompts"]:
        where, size = result["longest_prompt"]
        print(f"{result['uncounted_prompts']} prompts are longer than {args.max_prompt_tokens} bytes, so may be over "
              f"--max_prompt_tokens={args.max_prompt_tokens} tokens (the longest: {where}, {size} bytes); pass "
              f"--tokenizer=DIR (the run's --model) to count their tokens")
    if result["problems"]:
        print(f"wrote {result['bad_records']} bad records to {args.out}: train with --exclude={args.out} "
              f"(or --skip_bad=true)")
    if not result["usable"]:  # an empty file, or nothing but ties and bad records: training would stop at once
        print(f"no usable records: of {result['records']} records read, none is a preference to train or evaluate on")
        return 1
    if not result["problems"]:
        print("no problems found" + (" in what was checked" if result["uncounted_prompts"] else ""))
        return 1 if result["uncounted_prompts"] else 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
