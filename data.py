"""Data: preference records, the published dataset layouts, the prompts, and model inputs.

Everything that turns files into what the model reads lives here:

1. `Pair` and `Group`, the two record types every other file speaks.
2. Loaders for the datasets of the paper (section 3.2, table 1), each read from its own published on-disk
   layout: ImageReward (train/test), HPDv2 (train), Rapidata human preferences (out-of-distribution
   evaluation) and Pick-a-Pic.
3. The prompts: the reasoner's question, the `<think>`/`<answer>` tags and the answer vocabulary, in one
   place (`PROMPT`), so a released checkpoint's format can be matched by editing a few strings.
4. `Processor`: chat messages + images -> the tensors `Qwen2_5_VLForConditionalGeneration` reads, using the
   checkpoint's own tokenizer and image processor.
5. `PairStream`: a deterministic, resumable, rank-sharded stream of training pairs.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from PIL import Image, ImageOps


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass
class Pair:
    """Two images for one prompt; `label` is the index (0 or 1) of the image people preferred."""
    prompt: str
    images: tuple  # (str | PIL.Image, str | PIL.Image)
    label: int
    votes: tuple[float, float] | None = None  # human votes for (image 0, image 1), where the dataset has them


@dataclass
class Group:
    """All images generated for one prompt; `ranking[i]` is image i's human rank, 1 is best, ties allowed."""
    prompt: str
    images: list  # list[str | PIL.Image]
    ranking: list[int]


@dataclass
class Rated:
    """One image and its target rating, 1 (worst) .. R (best): the absolute-score variant (section 5)."""
    prompt: str
    image: object  # str | PIL.Image | bytes
    rating: int


def swapped(pair: Pair) -> Pair:
    """The same pair shown in the other order; the label and votes follow the images."""
    votes = None if pair.votes is None else (pair.votes[1], pair.votes[0])
    return Pair(pair.prompt, (pair.images[1], pair.images[0]), 1 - pair.label, votes)


# ----------------------------------------------------------------------------------------------------------
# Images

MAX_IMAGE_PIXELS = 8192 * 8192  # refuse larger images: a decompression bomb guard (PIL's own warns only)


def load_image(image) -> Image.Image:
    """A path, raw bytes or PIL image -> an RGB PIL image, EXIF-rotated, size-checked.

    Palette, alpha, grayscale and 16-bit images are converted to 8-bit RGB (alpha over white).
    """
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {image.width}x{image.height} pixels is over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grayscale -> 8-bit
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Loaders: each published layout -> Pairs or Groups. Images stay lazy: a path (checked to exist at load time,
# so a missing file is reported here, with its record) or the raw bytes stored in a parquet file; both are
# opened by `load_image` only when a batch is encoded.
#
# Every loader takes `skip_bad` and `report`. Bad input (invalid JSON, a missing field or column, a wrong
# type, an empty prompt, a ranking whose length differs from the images, a missing image file) raises
# `DataError` naming the file, the record index and the field; with `skip_bad=True` the record is left out
# and counted instead. `report`, a dict if given, is filled with the counts: "records" read, "pairs" or
# "groups" returned, "ties" left out (a tie is not a preference), "skipped" bad records (and "first_error",
# the message of the first one). Whenever anything was left out, one line saying what and how much goes to
# stderr: nothing is dropped silently.


class DataError(ValueError):
    """A dataset file does not hold what its layout promises; the message names file, record and field."""


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bad(source, index, field_name: str, expected: str, got=None) -> DataError:
    got_text = "" if got is None else f", got {_short(got)}"
    return DataError(f"{source}: record {index}: field '{field_name}': expected {expected}{got_text}")


def _get(record, key: str, source, index):
    if not isinstance(record, dict):
        raise _bad(source, index, key, "a record (an object with named fields)", type(record).__name__)
    if record.get(key) is None:
        raise DataError(f"{source}: record {index}: field '{key}' is missing")
    return record[key]


def _prompt(record, key: str, source, index) -> str:
    prompt = _get(record, key, source, index)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(source, index, key, "a non-empty string", prompt)
    return prompt


def _str_list(record, key: str, source, index, length: int | None = None) -> list[str]:
    values = _get(record, key, source, index)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise _bad(source, index, key, "a non-empty list of non-empty strings", values)
    if length is not None and len(values) != length:
        raise _bad(source, index, key, f"{length} entries", f"{len(values)}")
    return values


def _int(value) -> int | None:
    """`value` as an int if it is an integer number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _rank_list(record, key: str, source, index, length: int) -> list[int]:
    values = _get(record, key, source, index)
    ranks = [_int(v) for v in values] if isinstance(values, list) else [None]
    if any(r is None or r < 0 for r in ranks):
        raise _bad(source, index, key, "a list of non-negative integer ranks", values)
    if len(ranks) != length:
        raise _bad(source, index, key, f"one rank per image ({length})", f"{len(ranks)} ranks")
    return ranks


def _image_file(root, relative: str, source, index, key: str) -> str:
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise DataError(f"{source}: record {index}: field '{key}': image file {path} does not exist")
    return path


def _image_value(value, root, source, index, key: str):
    """A parquet image cell -> raw bytes or a checked path: bytes, an HF image struct, or a path string."""
    if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        try:
            with Image.open(io.BytesIO(value)):  # reads the header only: is it an image at all?
                pass
        except Exception:
            raise _bad(source, index, key, "the bytes of an image file", value) from None
        return bytes(value)
    if isinstance(value, str) and value:
        return _image_file(root or "", value, source, index, key)
    raise _bad(source, index, key, "image bytes, an image struct {bytes, path} or a path", value)


def _read_json_list(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _parquet_columns(path) -> list[str]:
    return _pyarrow_parquet().read_schema(path).names


def _read_parquet(path, columns: Sequence[str] | None = None) -> list[dict]:
    """A parquet file -> its rows as dicts (only `columns`, if given; each must exist)."""
    pq = _pyarrow_parquet()
    present = pq.read_schema(path).names
    missing = [c for c in (columns or []) if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {present}")
    return pq.read_table(path, columns=list(columns) if columns else None).to_pylist()


def _expand(paths) -> list[str]:
    """One path or many; a directory stands for its *.parquet files, a pattern for its matches (sorted)."""
    import glob
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = str(p)
        if os.path.isdir(p):
            matches = sorted(glob.glob(os.path.join(p, "*.parquet")))
        elif glob.has_magic(p):
            matches = sorted(glob.glob(p))
        else:
            matches = [p]
        if not matches:
            raise FileNotFoundError(f"no parquet files at {p}")
        out += matches
    return out


def _parse_records(source, indexed_records, parse, skip_bad: bool, counts: dict) -> list:
    """Apply `parse(index, record)` to each; it returns an item, or None for a tie. Counts ties and skips."""
    out = []
    for index, record in indexed_records:
        counts["records"] += 1
        try:
            item = parse(index, record)
        except DataError as e:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            counts.setdefault("first_error", str(e))
            continue
        if item is None:
            counts["ties"] += 1
        else:
            out.append(item)
    return out


def _finish(source, counts: dict, kind: str, items: list, report: dict | None) -> list:
    counts[kind] = len(items)
    if report is not None:
        report.update(counts)
    if counts["ties"] or counts["skipped"]:
        first = f" (first bad record: {counts['first_error']})" if counts["skipped"] else ""
        read = f"{counts['records']} records" + (f" ({counts['selected']} selected)" if "selected" in counts else "")
        print(f"data: {source}: {read} -> {len(items)} {kind}; left out {counts['ties']} "
              f"ties and {counts['skipped']} bad records{first}", file=sys.stderr)
    return items


def _counts() -> dict:
    return {"records": 0, "ties": 0, "skipped": 0}


def load_imagereward(path, image_root=None, skip_bad: bool = False, report: dict | None = None) -> list[Group]:
    """ImageReward -> one Group per prompt, its images in file order with their human ranks (1 is best).

    Two layouts. The repository's `data/test.json`: a JSON list of `{"id", "prompt", "generations": [image
    paths], "ranking": [ranks]}`. ImageRewardDB's `metadata-{split}.parquet` (`path` ends with .parquet; one
    file or a list): one row per image with `prompt_id, prompt, image_path, rank`, grouped by `prompt_id` in
    first-seen order. Image paths are relative to `image_root` (default: the directory of the first file).
    """
    counts = _counts()
    if not isinstance(path, (str, os.PathLike)) or str(path).endswith(".parquet"):
        files = _expand(path)
        root = image_root if image_root is not None else os.path.dirname(files[0])
        groups = _imagereward_parquet(files, root, skip_bad, counts)
        return _finish(", ".join(files), counts, "groups", groups, report)
    path = str(path)
    root = image_root if image_root is not None else os.path.dirname(path)

    def parse(i, record):
        prompt = _prompt(record, "prompt", path, i)
        names = _str_list(record, "generations", path, i)
        ranking = _rank_list(record, "ranking", path, i, len(names))
        return Group(prompt, [_image_file(root, n, path, i, "generations") for n in names], ranking)

    groups = _parse_records(path, enumerate(_read_json_list(path)), parse, skip_bad, counts)
    return _finish(path, counts, "groups", groups, report)


def _imagereward_parquet(files: list[str], root, skip_bad: bool, counts: dict) -> list[Group]:
    groups: dict = {}  # prompt_id -> Group, in first-seen order (dicts keep insertion order)
    for file in files:
        def parse(i, row, file=file):
            prompt = _prompt(row, "prompt", file, i)
            prompt_id = _get(row, "prompt_id", file, i)
            rank = _int(_get(row, "rank", file, i))
            if rank is None or rank < 0:
                raise _bad(file, i, "rank", "a non-negative integer rank", row["rank"])
            if prompt_id in groups and groups[prompt_id].prompt != prompt:
                expected = f"the prompt of prompt_id {prompt_id!r}, {groups[prompt_id].prompt!r}"
                raise _bad(file, i, "prompt", expected, prompt)
            name = _get(row, "image_path", file, i)
            if not isinstance(name, str) or not name:
                raise _bad(file, i, "image_path", "a non-empty string", name)
            return prompt_id, prompt, _image_file(root, name, file, i, "image_path"), rank

        rows = _read_parquet(file, ["prompt_id", "prompt", "image_path", "rank"])
        for prompt_id, prompt, image, rank in _parse_records(file, enumerate(rows), parse, skip_bad, counts):
            group = groups.setdefault(prompt_id, Group(prompt, [], []))
            group.images.append(image)
            group.ranking.append(rank)
    return list(groups.values())


def subsample(n: int, fraction: float, seed: int) -> list[int]:
    """round(fraction * n) of the indices 0..n-1, chosen by `random.Random(seed)`, in increasing order.

    Depends only on (n, fraction, seed): the same subset on every run and machine (section 5 trains on a
    random 16% of HPDv2).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), round(fraction * n)))


HPD_TRAIN_KEYS, HPD_TEST_KEYS = ("file_path", "human_preference"), ("image_path", "rank")


def _hpdv2_layout(path, records: list) -> str:
    """"train" or "test", from the keys of the first record; a file holding both kinds is rejected."""
    first = records[0] if records and isinstance(records[0], dict) else {}
    if all(k in first for k in HPD_TRAIN_KEYS):
        layout, other = "train", HPD_TEST_KEYS
    elif all(k in first for k in HPD_TEST_KEYS):
        layout, other = "test", HPD_TRAIN_KEYS
    else:
        raise DataError(f"{path}: record 0: expected fields {HPD_TRAIN_KEYS} (train.json) or {HPD_TEST_KEYS} "
                        f"(test.json), got {sorted(first)}")
    for i, record in enumerate(records):
        if isinstance(record, dict) and other[0] in record:
            raise DataError(f"{path}: record {i}: field '{other[0]}' belongs to the other HPDv2 layout; record 0 "
                            f"is a {layout}.json record: the file mixes the train and test layouts")
    return layout


def load_hpdv2(path, image_root=None, fraction: float = 1.0, seed: int = 0, skip_bad: bool = False,
               report: dict | None = None) -> list:
    """HPDv2 -> list[Pair] from `train.json`, list[Group] from `test.json` (told apart by the record keys).

    train.json: `{"prompt", "file_path": [a, b], "human_preference": [1, 0]}`, the 1 marking the preferred
    image. test.json: `{"prompt", "image_path": [...], "rank": [...]}`, lower rank preferred. Paths are
    relative to `image_root` (default: the JSON file's directory). `fraction`/`seed` keep a fixed random
    subset of the records (`subsample`), chosen before validation, so only the kept records are checked.
    """
    path = str(path)
    root = image_root if image_root is not None else os.path.dirname(path)
    records = _read_json_list(path)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    layout = _hpdv2_layout(path, records)
    counts = _counts()
    keep = subsample(len(records), fraction, seed)
    counts["selected"] = len(keep)

    def parse_train(i, record):
        prompt = _prompt(record, "prompt", path, i)
        names = _str_list(record, "file_path", path, i, length=2)
        preference = _get(record, "human_preference", path, i)
        marks = [_int(v) for v in preference] if isinstance(preference, list) else [None]
        if None in marks or sorted(marks) != [0, 1]:
            raise _bad(path, i, "human_preference", "exactly one 1 and one 0, e.g. [1, 0]", preference)
        images = tuple(_image_file(root, n, path, i, "file_path") for n in names)
        return Pair(prompt, images, label=marks.index(1))

    def parse_test(i, record):
        prompt = _prompt(record, "prompt", path, i)
        names = _str_list(record, "image_path", path, i)
        ranking = _rank_list(record, "rank", path, i, len(names))
        return Group(prompt, [_image_file(root, n, path, i, "image_path") for n in names], ranking)

    parse = parse_train if layout == "train" else parse_test
    items = _parse_records(path, ((i, records[i]) for i in keep), parse, skip_bad, counts)
    counts["records"] = len(records)
    return _finish(path, counts, "pairs" if layout == "train" else "groups", items, report)


RAPIDATA_VOTE_COLUMNS = (("votes_image1", "votes_image2"),
                         ("weighted_results_image1_preference", "weighted_results_image2_preference"))


def _votes(value, source, index, key) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _bad(source, index, key, "a non-negative number of votes", value)
    return float(value)


def load_rapidata(parquet_paths, image_root=None, skip_bad: bool = False, report: dict | None = None) -> list[Pair]:
    """Rapidata human preference parquet files -> list[Pair] with `votes`; ties (equal votes) left out.

    Columns: `prompt`, `image1`, `image2` and the votes, as `votes_image1`/`votes_image2` or as
    `weighted_results_image1_preference`/`weighted_results_image2_preference` (both published). An image cell
    is raw bytes, an HF image struct `{"bytes", "path"}`, or a path (relative to `image_root` if given).
    The label is the image with more votes.
    """
    files = _expand(parquet_paths)
    counts, pairs = _counts(), []
    for file in files:
        names = _parquet_columns(file)
        v1, v2 = next((c for c in RAPIDATA_VOTE_COLUMNS if all(k in names for k in c)), (None, None))
        if v1 is None:
            raise DataError(f"{file}: expected vote columns {' or '.join('/'.join(c) for c in RAPIDATA_VOTE_COLUMNS)}; "
                            f"the file has {names}")

        def parse(i, row, file=file, v1=v1, v2=v2):
            prompt = _prompt(row, "prompt", file, i)
            votes = (_votes(_get(row, v1, file, i), file, i, v1), _votes(_get(row, v2, file, i), file, i, v2))
            images = tuple(_image_value(_get(row, k, file, i), image_root, file, i, k) for k in ("image1", "image2"))
            if votes[0] == votes[1]:
                return None  # a tie says nothing about which image people prefer
            return Pair(prompt, images, label=int(votes[1] > votes[0]), votes=votes)

        rows = _read_parquet(file, ["prompt", "image1", "image2", v1, v2])
        pairs += _parse_records(file, enumerate(rows), parse, skip_bad, counts)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


def load_pickapic(parquet_paths, skip_bad: bool = False, report: dict | None = None) -> list[Pair]:
    """Pick-a-Pic parquet files -> list[Pair]; ties (label_0 = 0.5) left out.

    Columns `caption`, `jpg_0`, `jpg_1` (image bytes) and `label_0`: 1 when image 0 was preferred, 0 when
    image 1 was, 0.5 for a tie.
    """
    files = _expand(parquet_paths)
    counts, pairs = _counts(), []
    for file in files:
        def parse(i, row, file=file):
            prompt = _prompt(row, "caption", file, i)
            images = tuple(_image_value(_get(row, k, file, i), None, file, i, k) for k in ("jpg_0", "jpg_1"))
            label_0 = _get(row, "label_0", file, i)
            if isinstance(label_0, bool) or label_0 not in (0, 0.5, 1):
                raise _bad(file, i, "label_0", "0, 0.5 or 1", label_0)
            return None if label_0 == 0.5 else Pair(prompt, images, label=0 if label_0 == 1 else 1)

        rows = _read_parquet(file, ["caption", "jpg_0", "jpg_1", "label_0"])
        pairs += _parse_records(file, enumerate(rows), parse, skip_bad, counts)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


def groups_to_pairs(groups: Iterable[Group]) -> list[Pair]:
    """Every pair (i < j) of images of each group whose ranks differ; the label is the better-ranked one.

    Images keep their order within the group (image i first), so the label is 0 exactly when image i
    has the lower (better) rank. Tied images make no pair.
    """
    pairs = []
    for g in groups:
        for i in range(len(g.images)):
            for j in range(i + 1, len(g.images)):
                if g.ranking[i] != g.ranking[j]:
                    pairs.append(Pair(g.prompt, (g.images[i], g.images[j]), label=int(g.ranking[j] < g.ranking[i])))
    return pairs


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


DATASETS = ("imagereward", "hpdv2", "rapidata", "pickapic")


def load(spec: str, image_root=None, **kw) -> list:
    """A dataset named on the command line, "KIND:PATH[,PATH...]" -> list[Pair] or list[Group].

    KIND is imagereward (test.json, or ImageRewardDB parquet files), hpdv2 (train.json or test.json),
    rapidata or pickapic (parquet files; a directory stands for its *.parquet files). Pick-a-Pic stores its
    images in the parquet files and ignores `image_root`. `kw` goes to the loader (skip_bad, fraction, ...).
    """
    kind, sep, rest = spec.partition(":")
    paths = [p for p in rest.split(",") if p]
    if not sep or kind not in DATASETS or not paths:
        raise ValueError(f"dataset spec {spec!r}: expected KIND:PATH[,PATH...] with KIND one of {DATASETS}")
    if kind == "imagereward":
        return load_imagereward(paths[0] if len(paths) == 1 else paths, image_root, **kw)
    if kind == "hpdv2":
        if len(paths) != 1:
            raise ValueError(f"dataset spec {spec!r}: hpdv2 reads one JSON file, got {len(paths)} paths")
        return load_hpdv2(paths[0], image_root, **kw)
    if kind == "rapidata":
        return load_rapidata(paths, image_root, **kw)
    return load_pickapic(paths, **kw)


# ----------------------------------------------------------------------------------------------------------
# Prompts: the one place the wording, the tags and the answer vocabulary are defined.


@dataclass(frozen=True)
class PromptFormat:
    question: str = (
        "Prompt: {prompt}\n"
        "Which of the two images above would people prefer for this prompt? Consider how well each image "
        "matches the prompt and its visual quality. Think it through inside <think> </think>, then give your "
        "answer inside <answer> </answer>: 1 for the first image or 2 for the second."
    )
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    between: str = "\n"  # what goes between </think> and <answer> in a well-formed completion
    answers: tuple[str, str] = ("1", "2")  # the answer naming image 0, image 1
    # The absolute-score variant (section 5, eq. (3)): one image, a rating from `ratings`.
    score_question: str = (
        "Prompt: {prompt}\n"
        "Rate how much people would like the image above for this prompt, from 1 (worst) to 5 (best). Think it "
        "through inside <think> </think>, then give the rating inside <answer> </answer>."
    )
    ratings: tuple[str, ...] = ("1", "2", "3", "4", "5")
    no_thinking: str = "I have finished thinking."  # the "no thinking" ablation (table 5)

    def completion(self, reasoning: str, answer: str) -> str:
        """A well-formed completion: `<think>reasoning</think>\\n<answer>answer</answer>`."""
        return self.answer_prefix(reasoning) + answer + self.answer_close

    def answer_prefix(self, reasoning: str) -> str:
        """Everything a completion holds before its answer token: what the listener reads."""
        return f"{self.think_open}{reasoning}{self.think_close}{self.between}{self.answer_open}"


PROMPT = PromptFormat()


def reasoner_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the reasoner: image A, image B, then the question about `prompt`."""
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": fmt.question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def score_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the absolute-score variant: one image, then the rating question."""
    content = [{"type": "image"}, {"type": "text", "text": fmt.score_question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def listener_prefix(reasoning: str, fmt: PromptFormat = PROMPT) -> str:
    """The listener's assistant turn: the reasoner's reasoning, its answer removed, up to the answer slot.

    The listener reads the reasoner's messages followed by this text and we read its next-token logits over
    `fmt.answers` (section 4.3). It never sees the reasoner's answer: only `reasoning` goes in.
    """
    return fmt.answer_prefix(reasoning)


# ----------------------------------------------------------------------------------------------------------
# Model inputs


class Processor:
    """Chat messages + images -> the tensors `Qwen2_5_VLForConditionalGeneration` reads.

    It does what `Qwen2_5_VLProcessor` does for images, with the checkpoint's own tokenizer (chat template)
    and image processor: render the chat template, expand each `<|image_pad|>` into one token per merged
    patch, left-pad the batch, and mark image tokens in `mm_token_type_ids` (what `get_rope_index` reads).
    Written out here because `Qwen2_5_VLProcessor` also builds a video processor, which needs torchvision.
    `min_pixels`/`max_pixels` bound the image size, and so the number of image tokens, which dominate cost.
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_pad = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_pad)
        self.merge = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer
        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path, **kwargs))

    @classmethod
    def toy(cls):
        import toy
        return cls(toy.make_tokenizer(), toy.make_image_processor())

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def __call__(self, messages: Sequence[list[dict]], images: Sequence[Sequence], suffixes: Sequence[str] | None = None,
                 add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """Encode B conversations, each with its images in order, left-padded into one batch.

        `suffixes[b]` is text appended after the generation prompt (the start of the assistant's turn: the
        listener's reasoning prefix, or a supervised target). Returns `input_ids`, `attention_mask` (B, T),
        `mm_token_type_ids` (B, T), `pixel_values` (num_patches, C*t*p*p) and `image_grid_thw` (num_images, 3).
        """
        suffixes = suffixes if suffixes is not None else [""] * len(messages)
        flat_images = [load_image(im) for row in images for im in row]
        vision = self.image_processor(images=flat_images, return_tensors="pt") if flat_images else {}
        grid = vision.get("image_grid_thw")
        tokens_per_image = (grid.prod(-1) // self.merge**2).tolist() if grid is not None else []
        rows, k = [], 0
        for msgs, row_images, suffix in zip(messages, images, suffixes):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
            parts = (text + suffix).split(self.image_pad)
            if len(parts) - 1 != len(row_images):
                raise ValueError(f"conversation has {len(parts) - 1} image slots but {len(row_images)} images")
            text = parts[0]
            for part in parts[1:]:  # one <|image_pad|> per merged patch, as the vision tower emits them
                text += self.image_pad * tokens_per_image[k] + part
                k += 1
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        if grid is not None:
            batch["pixel_values"], batch["image_grid_thw"] = vision["pixel_values"], grid
        return batch

    def pairs(self, pairs: Sequence[Pair], fmt: PromptFormat | None = None, suffixes=None) -> dict[str, torch.Tensor]:
        """Encode the reasoner's prompt for each pair: its two images and the question about its prompt."""
        fmt = fmt or PROMPT
        return self([reasoner_messages(p.prompt, fmt) for p in pairs], [p.images for p in pairs], suffixes)

    def rated(self, records: Sequence[Rated], fmt: PromptFormat | None = None) -> dict[str, torch.Tensor]:
        """Encode the absolute-score prompt for each record: its one image and the rating question."""
        fmt = fmt or PROMPT
        return self([score_messages(r.prompt, fmt) for r in records], [[r.image] for r in records])

    def encode(self, records: Sequence) -> dict[str, torch.Tensor]:
        """Pairs -> the preference prompt, Rated records -> the rating prompt."""
        return self.rated(records) if records and isinstance(records[0], Rated) else self.pairs(records)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> left-padded `input_ids` and `attention_mask`, both (B, T)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        if r:
            input_ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------------------
# Streams


class PairStream:
    """An endless, deterministic, resumable stream of per-rank training batches (each a list[Pair]).

    Epoch e visits the examples in the order `random.Random(seed + e).shuffle` gives; each step takes the next
    global batch of `batch_size * world_size` examples and rank r keeps its slice [r*batch_size,
    (r+1)*batch_size), so the ranks see disjoint examples that together cover the global batch. The tail of
    an epoch that does not fill a whole global batch (len % (batch_size * world_size) examples) is dropped for
    that epoch only: the next epoch reshuffles, so no example is left out every epoch.

    `both_orders=True` shows each pair twice, as given and `swapped` (the label follows the images), side by side
    in the same batch (batch_size must be even): a batch then holds as many "first image" as "second image"
    answers, so whatever the model learns from it cannot be a preference for a position. An epoch still
    visits each pair once (in both orders).

    `state_dict()` is {"epoch", "index"} (the next global batch of that epoch); `load_state_dict` resumes at
    exactly that batch. Every rank must be built with the same pairs, batch_size, world_size and seed.
    """

    def __init__(self, pairs: Sequence[Pair], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 both_orders: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if both_orders and batch_size % 2:
            raise ValueError(f"both_orders needs an even batch_size (each pair is shown in both orders), got {batch_size}")
        self.examples = list(pairs)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.views = 2 if both_orders else 1  # batch entries made from each pair
        self.global_batch = batch_size * world_size // self.views  # pairs per global batch
        self.steps_per_epoch = len(self.examples) // self.global_batch
        if batch_size < 1 or self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.examples)} examples cannot fill one global batch of batch_size={batch_size}"
                             f" x world_size={world_size}")
        self.epoch, self.index = 0, 0
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

    def __next__(self) -> list[Pair]:
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.global_batch
        pairs = [self.examples[i] for i in self.order(self.epoch)[start:start + self.global_batch]]
        shown = [q for p in pairs for q in ((p, swapped(p)) if self.views == 2 else (p,))]  # the global batch
        self.index += 1
        return shown[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["index"] <= self.steps_per_epoch:
            raise ValueError(f"stream state index {state['index']} is outside [0, {self.steps_per_epoch}]")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
