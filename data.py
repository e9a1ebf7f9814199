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
5. `PairStream`: a deterministic, resumable, rank-sharded stream of training pairs, which decodes each
   example's images and, with `skip_bad`, replaces an unreadable example by the next readable one.
6. `python data.py check SPEC [--images ROOT] [--workers N]`: decode every image of a dataset before a long
   run; list the records that cannot be used in a file that `--exclude` reads.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import math
import os
import random
import stat
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

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
# Images. A record's image is a path (`ImagePath`), a cell of a parquet file (`ParquetImage`), raw bytes or a
# PIL image; the first two know where they come from (`Source`), so that `load_image`, which reads and decodes
# every image, can say which dataset file, record and field named an image it cannot use.

MAX_IMAGE_PIXELS = 8192 * 8192  # refuse larger images: a decompression bomb guard (PIL's own warns only)
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor (smart_resize) refuses longer/shorter side ratios
MAX_IMAGE_BYTES = 64 * 2**20  # a file larger than this is refused before it is read into memory


class DataError(ValueError):
    """A dataset does not hold what its layout promises; the message names file, record and field.

    `problem` is a short name for what was wrong ("bad record", "missing", "not an image", "corrupt", ...), used
    to count problems (`python data.py check`).
    """

    def __init__(self, message: str, problem: str = "bad record"):
        super().__init__(message)
        self.problem = problem


class Source(NamedTuple):
    """Where an image comes from: the dataset file, the index of its record there, and the field naming it."""
    file: str
    record: int
    field: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: field '{self.field}'"


class ImagePath(str):
    """An image file's path: a plain str everywhere, which also remembers the record that named it."""

    def __new__(cls, path: str, source: Source):
        self = super().__new__(cls, path)
        self.source = source
        return self

    def __getnewargs__(self):  # pickling (worker processes) rebuilds it with its source
        return str(self), self.source


@dataclass(frozen=True, slots=True)  # slots: a million of them stay small
class ParquetImage:
    """An image stored in a parquet cell, read only when it is used: a loaded dataset holds no image bytes."""
    file: str
    row_group: int
    row: int  # within the row group
    column: str
    key: str | None  # "bytes" in an HF image struct {bytes, path}; None in a binary column
    source: Source

    def __str__(self) -> str:
        return f"(parquet cell: row group {self.row_group}, row {self.row})"


def _image_error(image, problem: str, what: str) -> DataError:
    source = getattr(image, "source", None)
    name = "" if isinstance(image, (bytes, bytearray)) else f" {image}"
    return DataError(f"{source}: image{name}: {what}" if source else f"image{name}: {what}", problem)


def _image_bytes(image) -> bytes:
    """The encoded bytes of a path, parquet cell or bytes; a missing, empty, oversized file or a directory raises."""
    if isinstance(image, ParquetImage):
        raw = _parquet_cell(image)
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    else:
        try:
            size = os.stat(image).st_size
        except FileNotFoundError:
            raise _image_error(image, "missing", "does not exist") from None
        if os.path.isdir(image):
            raise _image_error(image, "directory", "is a directory, not an image file")
        if size > MAX_IMAGE_BYTES:
            raise _image_error(image, "too large", f"{size} bytes, over MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}")
        with open(image, "rb") as f:
            raw = f.read(MAX_IMAGE_BYTES + 1)  # stops at the cap even if the file grew since stat
    if not raw:
        raise _image_error(image, "empty", "is empty (0 bytes)")
    if len(raw) > MAX_IMAGE_BYTES:
        raise _image_error(image, "too large", f"over MAX_IMAGE_BYTES={MAX_IMAGE_BYTES} bytes")
    return raw


def load_image(image) -> Image.Image:
    """A path, parquet cell, raw bytes or PIL image -> a fully decoded RGB PIL image, EXIF-rotated, size-checked.

    Every pixel is decoded here (`Image.load()`), so a truncated or corrupt file fails now, with a `DataError`
    naming the image's record, rather than somewhere inside the image processor. Palette, alpha, grayscale and
    16-bit images are converted to 8-bit RGB (alpha over white).
    """
    if isinstance(image, Image.Image):
        return _rgb(image)
    raw = _image_bytes(image)
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and (bad := _png_checksum_error(raw)):
        raise _image_error(image, "corrupt", bad)
    try:
        decoded = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise _image_error(image, "too many pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        raise _image_error(image, "not an image", f"not an image file (it starts with {raw[:20]!r})") from None
    except Exception as e:  # a known format with a broken header
        raise _image_error(image, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})") from None
    width, height = decoded.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _image_error(image, "too many pixels",
                           f"{width}x{height} pixels is over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise _image_error(image, "aspect ratio", f"{width}x{height} pixels: the aspect ratio is over "
                                                  f"MAX_ASPECT_RATIO={MAX_ASPECT_RATIO}")
    try:
        decoded.load()
        return _rgb(decoded)
    except Exception as e:  # truncated data, a bad checksum, a broken stream: PIL raises OSError, SyntaxError...
        raise _image_error(image, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})") from None


def _png_checksum_error(raw: bytes) -> str | None:
    """The first PNG chunk whose CRC-32 is wrong (PIL checks only the chunks before the image data), or None."""
    pos = 8  # after the signature; each chunk: length (4), type (4), data (length), CRC-32 of type + data (4)
    while pos + 12 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 4], "big")
        kind, end = raw[pos + 4:pos + 8], pos + 8 + length
        if end + 4 > len(raw):
            return f"PNG chunk {kind!r} at byte {pos} runs past the end of the file"
        if zlib.crc32(raw[pos + 4:end]) != int.from_bytes(raw[end:end + 4], "big"):
            return f"PNG chunk {kind!r} at byte {pos} fails its CRC-32 checksum"
        if kind == b"IEND":
            return None
        pos = end + 4
    return None


def _rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grayscale -> 8-bit
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decoded(example):
    """A Pair, Group or Rated record with its images decoded (PIL); raises DataError naming a bad image."""
    if isinstance(example, Rated):
        return dataclasses.replace(example, image=load_image(example.image))
    images = [load_image(im) for im in example.images]
    return dataclasses.replace(example, images=tuple(images) if isinstance(example, Pair) else images)


def images_of(example) -> list:
    return [example.image] if isinstance(example, Rated) else list(example.images)


# ----------------------------------------------------------------------------------------------------------
# Loaders: each published layout -> Pairs or Groups. Images stay lazy: a path (checked at load time to be a
# file inside the image root, so a missing file is reported here, with its record) or a reference to a parquet
# cell (`ParquetImage`: the bytes stay in the file); both are read and decoded by `load_image` only when the
# example is used, or by `python data.py check` before a run.
#
# Every loader takes `skip_bad`, `exclude` and `report`. Bad input (invalid JSON, a missing field or column, a
# wrong type, an empty prompt, a ranking whose length differs from the images, a missing image file) raises
# `DataError` naming the file, the record index and the field; with `skip_bad=True` the record is left out
# and counted instead. `exclude` is a set of (file, record index) to leave out unread (`read_exclude`: the
# file `python data.py check` writes). `report`, a dict if given, is filled with the counts: "records" read,
# "pairs" or "groups" returned, "ties" left out (a tie is not a preference), "skipped" bad records (and
# "first_error", the message of the first one; "bad", every one as (file, record, problem, message)),
# "excluded" records. Whenever anything was left out, one line saying what and how much goes to stderr:
# nothing is dropped silently.


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


@functools.lru_cache(maxsize=4096)
def _real(directory: str) -> str:
    return os.path.realpath(directory)


def _image_file(root, relative: str, source, index, key: str) -> ImagePath:
    """An image path of a record, checked: relative, inside the image root (symlinks resolved), a file.

    The directories' real paths are cached, so a file costs two system calls (lstat, stat), not one per
    path component: a million images load in seconds.
    """
    where, root = Source(str(source), index, key), str(root or "")
    if os.path.isabs(relative):
        raise DataError(f"{where}: image path {relative!r} is absolute; image paths are relative to the image "
                        f"root ({root or '.'})", "outside root")
    path = os.path.join(root, relative)
    real = os.path.normpath(os.path.join(_real(os.path.dirname(path) or "."), os.path.basename(path)))
    if os.path.islink(real):
        real = os.path.realpath(real)
    real_root = _real(root or ".")
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise DataError(f"{where}: image {path} resolves to {real}, outside the image root {real_root}", "outside root")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise DataError(f"{where}: image file {path} does not exist", "missing") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{where}: image {path} is a directory, not an image file", "directory")
    if not stat.S_ISREG(mode):
        raise DataError(f"{where}: image {path} is not a regular file", "missing")
    return ImagePath(path, where)


def _image_value(value, root, source, index, key: str):
    """A parquet image cell, as `_parquet_rows` gives it -> a `ParquetImage` or a checked path."""
    if isinstance(value, ParquetImage):
        return value
    if isinstance(value, str) and value:
        return _image_file(root or "", value, source, index, key)
    raise _bad(source, index, key, "image bytes, an image struct {bytes, path} or a path", value)


def _read_json_list(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: byte {e.start} ({e.object[e.start:e.start + 1]!r}): {e.reason}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


@functools.lru_cache(maxsize=16)
def _parquet_file(path: str):
    return _pyarrow_parquet().ParquetFile(path)


@functools.lru_cache(maxsize=2)  # the two images of a pair often share a row group
def _row_group_column(path: str, row_group: int, column: str):
    """One column of one row group: the unit a parquet image is read in. HF's `datasets` writes image datasets
    in row groups of 100 rows; a file written as one huge row group reads its whole column per image."""
    return _parquet_file(path).read_row_group(row_group, columns=[column], use_threads=False).column(0)


def _parquet_cell(image: ParquetImage) -> bytes:
    value = _row_group_column(image.file, image.row_group, image.column)[image.row].as_py()
    value = value.get(image.key) if isinstance(value, dict) else value
    return value or b""


def _parquet_rows(path: str, columns: Sequence[str], image_columns: Sequence[str] = ()):
    """(index, row dict) for each row of a parquet file, `columns` only (each must exist), a row group at a time.

    No image bytes are read: a cell of an image column becomes a `ParquetImage` (a reference, read when the
    image is used) wherever the file can hold bytes there, else the path it holds, else its raw value (the
    record's parser reports it). Memory stays bounded by the other columns of one row group.
    """
    pf = _parquet_file(path)
    present = pf.schema_arrow.names
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {present}")
    largest = max((pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)), default=0)
    if image_columns and largest > 1000:
        print(f"data: {path}: row groups of up to {largest} rows: each image read reads its whole row group's column "
              f"(rewrite the file with row_group_size=100, as HF's datasets does, for fast random reads)",
              file=sys.stderr)
    index = 0
    for g in range(pf.num_row_groups):
        rows = pf.read_row_group(g, columns=[c for c in columns if c not in image_columns]).to_pylist()
        for c in image_columns:
            for n, cell in enumerate(_image_cells(pf, g, c)):
                rows[n][c] = cell if cell is not True else \
                    ParquetImage(path, g, n, c, "bytes" if pf.schema_arrow.field(c).type.num_fields else None,
                                 Source(path, index + n, c))
        for row in rows:
            yield index, row
            index += 1


def _image_cells(pf, group: int, column: str) -> list:
    """Per row of a row group: True where an image column holds bytes, else the path or the raw value there.

    A binary column is taken to hold bytes in every row (an empty or null cell fails when it is decoded);
    an HF image struct {bytes, path} is read for its paths only, and for its bytes only where the file's
    statistics say some are null.
    """
    import pyarrow as pa
    kind, rows = pf.schema_arrow.field(column).type, pf.metadata.row_group(group).num_rows
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [True] * rows
    if not pa.types.is_struct(kind):
        return pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    names = [kind.field(i).name for i in range(kind.num_fields)]
    paths = pf.read_row_group(group, columns=[f"{column}.path"]).column(0).to_pylist() if "path" in names else [{}] * rows
    paths = [p.get("path") if p else None for p in paths]
    if "bytes" not in names:
        return [p or {} for p in paths]
    meta = pf.metadata.row_group(group)
    stats = next(meta.column(i).statistics for i in range(meta.num_columns)
                 if meta.column(i).path_in_schema == f"{column}.bytes")
    if stats is not None and stats.has_null_count and stats.null_count == 0:
        return [True] * rows
    blobs = pf.read_row_group(group, columns=[f"{column}.bytes"]).column(0).to_pylist()
    return [True if b and b.get("bytes") else (p or {}) for b, p in zip(blobs, paths)]


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


def _parse_records(source, indexed_records, parse, skip_bad: bool, counts: dict, exclude=None) -> list:
    """Apply `parse(index, record)` to each; it returns an item, or None for a tie. Counts ties and skips.

    Records whose (file, index) is in `exclude` are left out unread and counted.
    """
    out, file = [], os.path.realpath(str(source))
    for index, record in indexed_records:
        counts["records"] += 1
        if exclude and (file, index) in exclude:
            counts["excluded"] = counts.get("excluded", 0) + 1
            continue
        try:
            item = parse(index, record)
        except DataError as e:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            counts.setdefault("first_error", str(e))
            counts.setdefault("bad", []).append((str(source), index, e.problem, str(e)))
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
    if counts["ties"] or counts["skipped"] or counts.get("excluded"):
        first = f" (first bad record: {counts['first_error']})" if counts["skipped"] else ""
        read = f"{counts['records']} records" + (f" ({counts['selected']} selected)" if "selected" in counts else "")
        excluded = f", {counts['excluded']} excluded records" if counts.get("excluded") else ""
        print(f"data: {source}: {read} -> {len(items)} {kind}; left out {counts['ties']} "
              f"ties and {counts['skipped']} bad records{excluded}{first}", file=sys.stderr)
    return items


def _counts() -> dict:
    return {"records": 0, "ties": 0, "skipped": 0}


def read_exclude(path) -> set[tuple[str, int]]:
    """The records `python data.py check` found bad (a JSON line per record) -> {(file, record index)}."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            try:
                entry = json.loads(line)
                out.add((os.path.realpath(entry["file"]), int(entry["record"])))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {n + 1}: expected {{\"file\": ..., \"record\": ...}}: {e}") from None
    return out


def load_imagereward(path, image_root=None, skip_bad: bool = False, report: dict | None = None,
                     exclude=None) -> list[Group]:
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
        groups = _imagereward_parquet(files, root, skip_bad, counts, exclude)
        return _finish(", ".join(files), counts, "groups", groups, report)
    path = str(path)
    root = image_root if image_root is not None else os.path.dirname(path)

    def parse(i, record):
        prompt = _prompt(record, "prompt", path, i)
        names = _str_list(record, "generations", path, i)
        ranking = _rank_list(record, "ranking", path, i, len(names))
        return Group(prompt, [_image_file(root, n, path, i, "generations") for n in names], ranking)

    groups = _parse_records(path, enumerate(_read_json_list(path)), parse, skip_bad, counts, exclude)
    return _finish(path, counts, "groups", groups, report)


def _imagereward_parquet(files: list[str], root, skip_bad: bool, counts: dict, exclude=None) -> list[Group]:
    groups: dict = {}  # prompt_id -> Group, in first-seen order (dicts keep insertion order)
    first: dict = {}  # prompt_id -> (file, row, prompt) of the first row holding it, across files and within one
    for file in files:
        def parse(i, row, file=file):
            prompt = _prompt(row, "prompt", file, i)
            prompt_id = _get(row, "prompt_id", file, i)
            rank = _int(_get(row, "rank", file, i))
            if rank is None or rank < 0:
                raise _bad(file, i, "rank", "a non-negative integer rank", row["rank"])
            seen_file, seen_row, seen_prompt = first.get(prompt_id, (file, i, prompt))
            if seen_prompt != prompt:
                raise _bad(file, i, "prompt", f"the prompt of prompt_id {prompt_id!r} at {seen_file}: record "
                                              f"{seen_row}, {_short(seen_prompt)}", prompt)
            name = _get(row, "image_path", file, i)
            if not isinstance(name, str) or not name:
                raise _bad(file, i, "image_path", "a non-empty string", name)
            image = _image_file(root, name, file, i, "image_path")
            first.setdefault(prompt_id, (file, i, prompt))
            return prompt_id, prompt, image, rank

        rows = _parquet_rows(file, ["prompt_id", "prompt", "image_path", "rank"])
        for prompt_id, prompt, image, rank in _parse_records(file, rows, parse, skip_bad, counts, exclude):
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
    """"train" or "test": the layout whose key ('file_path' or 'image_path') the records hold.

    Every record is looked at, so a malformed record (record 0 included) does not decide the layout: it is
    reported (or skipped) by the parser. A file holding records of both layouts is rejected.
    """
    first = {}  # layout -> index of the first record holding its key
    for i, record in enumerate(records):
        for layout, keys in (("train", HPD_TRAIN_KEYS), ("test", HPD_TEST_KEYS)):
            if isinstance(record, dict) and keys[0] in record:
                first.setdefault(layout, i)
        if len(first) == 2:
            (a, i_a), (b, i_b) = sorted(first.items(), key=lambda kv: kv[1])
            key = (HPD_TRAIN_KEYS if b == "train" else HPD_TEST_KEYS)[0]
            raise DataError(f"{path}: record {i_b}: field '{key}' belongs to the other HPDv2 layout; record {i_a} "
                            f"is a {a}.json record: the file mixes the train and test layouts")
    if not first:
        raise DataError(f"{path}: no record has the fields {HPD_TRAIN_KEYS} (train.json) or {HPD_TEST_KEYS} "
                        f"(test.json)")
    return next(iter(first))


def load_hpdv2(path, image_root=None, fraction: float = 1.0, seed: int = 0, skip_bad: bool = False,
               report: dict | None = None, exclude=None) -> list:
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
    items = _parse_records(path, ((i, records[i]) for i in keep), parse, skip_bad, counts, exclude)
    counts["records"] = len(records)
    return _finish(path, counts, "pairs" if layout == "train" else "groups", items, report)


RAPIDATA_COUNTS = ("votes_image1", "votes_image2")  # the older convention: numbers of votes
RAPIDATA_SHARES = ("weighted_results_image1_preference", "weighted_results_image2_preference")  # vote shares
RAPIDATA_DETAILS = ("detailed_results_preference", "detailed_results")  # the individual votes, one entry each


def _votes(value, source, index, key) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _bad(source, index, key, "a non-negative number of votes", value)
    return float(value)


def _shares(row, source, index) -> tuple[float, float]:
    """The two vote shares of the newer convention: numbers in [0, 1] that sum to 1 (or 0: no votes)."""
    shares = tuple(_votes(_get(row, k, source, index), source, index, k) for k in RAPIDATA_SHARES)
    if max(shares) > 1 or not (abs(sum(shares) - 1) < 1e-3 or sum(shares) == 0):
        raise _bad(source, index, "/".join(RAPIDATA_SHARES), "vote shares in [0, 1] summing to 1 (counts go in "
                   "votes_image1/votes_image2)", shares)
    return shares


def _vote_total(cell, source, index, key) -> int:
    """The number of individual votes in a detail cell: a JSON list (or a list) with one entry per vote."""
    if isinstance(cell, (str, bytes)):
        try:
            cell = json.loads(cell)
        except ValueError:
            raise _bad(source, index, key, "a JSON list of individual votes", cell) from None
    if not isinstance(cell, list):
        raise _bad(source, index, key, "a list of individual votes", cell)
    return len(cell)


def load_rapidata(parquet_paths, image_root=None, skip_bad: bool = False, report: dict | None = None,
                  exclude=None) -> list[Pair]:
    """Rapidata human preference parquet files -> list[Pair] with `votes`; ties (equal votes) left out.

    Columns: `prompt`, `image1`, `image2` and the votes in one of the two published conventions, which differ
    in meaning, not only in name:
    - `votes_image1`/`votes_image2`: numbers of votes; `votes` are these counts.
    - `weighted_results_image1_preference`/`..._image2_preference`: vote *shares* (weighted by each voter's
      reliability; they sum to 1), with the individual votes listed in `detailed_results_preference` (or
      `detailed_results`). `votes` are the shares times the number of individual votes, so the winner's share
      and the total number of votes (the binarized and confident subsets of evaluate.py) mean what they mean
      with counts. Without a detail column the total is unknown: `votes` is None, never a share read as a count.
    An image cell is raw bytes, an HF image struct `{"bytes", "path"}`, or a path (relative to `image_root`
    if given). The label is the image with more votes (the larger share).
    """
    files = _expand(parquet_paths)
    counts, pairs = _counts(), []
    for file in files:
        names = _parquet_file(file).schema_arrow.names
        shares = all(k in names for k in RAPIDATA_SHARES) and not all(k in names for k in RAPIDATA_COUNTS)
        if not shares and not all(k in names for k in RAPIDATA_COUNTS):
            raise DataError(f"{file}: expected vote columns {'/'.join(RAPIDATA_COUNTS)} or "
                            f"{'/'.join(RAPIDATA_SHARES)}; the file has {names}")
        detail = next((k for k in RAPIDATA_DETAILS if k in names), None) if shares else None
        if shares and detail is None:
            print(f"{file}: vote shares without a {' or '.join(RAPIDATA_DETAILS)} column: the number of votes is "
                  f"unknown, so the binarized and confident subsets cannot be formed", file=sys.stderr)

        def parse(i, row, file=file, shares=shares, detail=detail):
            prompt = _prompt(row, "prompt", file, i)
            if shares:
                v = _shares(row, file, i)
                total = _vote_total(_get(row, detail, file, i), file, i, detail) if detail else None
                votes = None if total is None else (v[0] * total, v[1] * total)
            else:
                v = votes = tuple(_votes(_get(row, k, file, i), file, i, k) for k in RAPIDATA_COUNTS)
            images = tuple(_image_value(_get(row, k, file, i), image_root, file, i, k) for k in ("image1", "image2"))
            if v[0] == v[1]:
                return None  # a tie says nothing about which image people prefer
            return Pair(prompt, images, label=int(v[1] > v[0]), votes=votes)

        columns = ["prompt", "image1", "image2", *(RAPIDATA_SHARES if shares else RAPIDATA_COUNTS)]
        rows = _parquet_rows(file, columns + ([detail] if detail else []), image_columns=("image1", "image2"))
        pairs += _parse_records(file, rows, parse, skip_bad, counts, exclude)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


def load_pickapic(parquet_paths, skip_bad: bool = False, report: dict | None = None, exclude=None) -> list[Pair]:
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

        rows = _parquet_rows(file, ["caption", "jpg_0", "jpg_1", "label_0"], image_columns=("jpg_0", "jpg_1"))
        pairs += _parse_records(file, rows, parse, skip_bad, counts, exclude)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


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


DATASETS = ("imagereward", "hpdv2", "rapidata", "pickapic")


def load(spec: str, image_root=None, fraction: float = 1.0, seed: int = 0, exclude=None, **kw) -> list:
    """A dataset named on the command line, "KIND:PATH[,PATH...]" -> list[Pair] or list[Group].

    KIND is imagereward (test.json, or ImageRewardDB parquet files), hpdv2 (train.json or test.json),
    rapidata or pickapic (parquet files; a directory stands for its *.parquet files). Pick-a-Pic stores its
    images in the parquet files and ignores `image_root`. `fraction`/`seed` keep a fixed random subset
    (`subsample`): of HPDv2's records, before they are checked; of the pairs or groups of the other layouts.
    `exclude` is a set of (file, record) or the path of the file `python data.py check` writes. `kw` goes to
    the loader (skip_bad, report).
    """
    kind, sep, rest = spec.partition(":")
    paths = [p for p in rest.split(",") if p]
    if not sep or kind not in DATASETS or not paths:
        raise ValueError(f"dataset spec {spec!r}: expected KIND:PATH[,PATH...] with KIND one of {DATASETS}")
    if isinstance(exclude, (str, os.PathLike)):
        exclude = read_exclude(exclude) if str(exclude) else None
    kw["exclude"] = exclude
    if kind == "hpdv2":
        if len(paths) != 1:
            raise ValueError(f"dataset spec {spec!r}: hpdv2 reads one JSON file, got {len(paths)} paths")
        return load_hpdv2(paths[0], image_root, fraction=fraction, seed=seed, **kw)
    if kind == "imagereward":
        records = load_imagereward(paths[0] if len(paths) == 1 else paths, image_root, **kw)
    elif kind == "rapidata":
        records = load_rapidata(paths, image_root, **kw)
    else:
        records = load_pickapic(paths, **kw)
    keep = subsample(len(records), fraction, seed)
    if len(keep) < len(records):
        print(f"data: {spec}: kept {len(keep)} of {len(records)} (fraction {fraction}, seed {seed})", file=sys.stderr)
    return [records[i] for i in keep]


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
        tokens_per_image = iter((grid.prod(-1) // self.merge**2).tolist() if grid is not None else [])
        rows = [self._encode(msgs, len(row_images), suffix, add_generation_prompt, tokens_per_image)
                for msgs, row_images, suffix in zip(messages, images, suffixes)]
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        if grid is not None:
            batch["pixel_values"], batch["image_grid_thw"] = vision["pixel_values"], grid
        return batch

    TEXT_MARK = "\ue000"  # a private-use character: where a text of the conversation sits in the template

    def _encode(self, messages: list[dict], n_images: int, suffix: str, add_generation_prompt: bool,
                tokens_per_image) -> list[int]:
        """One conversation -> token ids: the chat template with special tokens, each text as plain text.

        The texts of the messages (the dataset's prompt among them) are tokenized with special tokens split,
        so a prompt holding "<|im_end|>" or "<|image_pad|>" is read as those characters, never as chat
        structure or an image slot. Each `<|image_pad|>` of the template becomes one token per merged patch.
        """
        texts: list[str] = []

        def mark(text: str) -> str:
            texts.append(text)
            return f"{self.TEXT_MARK}{len(texts) - 1}{self.TEXT_MARK}"

        marked = [{**m, "content": mark(m["content"]) if isinstance(m["content"], str) else
                   [{**c, "text": mark(c["text"])} if c.get("type") == "text" else c for c in m["content"]]}
                  for m in messages]
        template = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
        pieces = (template + suffix).split(self.TEXT_MARK)  # template, text number, template, ..., template
        slots = sum(p.count(self.image_pad) for p in pieces[0::2])
        if slots != n_images:
            raise ValueError(f"conversation has {slots} image slots but {n_images} images")
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2:
                ids += self.tokenizer(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
                continue
            parts = piece.split(self.image_pad)
            for k, part in enumerate(parts):  # one <|image_pad|> per merged patch, as the vision tower emits them
                text = part if k == len(parts) - 1 else part + self.image_pad * next(tokens_per_image)
                ids += self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return ids

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

    `decode=True` serves examples with their images decoded (`decoded`): a bad image raises `DataError` naming
    its file, record, field and path, here, before any forward pass. With `skip_bad=True` too, an example
    whose image cannot be read is replaced by the next readable one from this rank's own share of the epoch
    order (the same slot of the following global batches), counted in `replaced` and reported on stderr. The
    replacement depends only on the epoch order and the files, so every rank serves exactly `batch_size`
    examples per step (FSDP2 needs the same number of forwards on every rank) and a resumed stream serves
    what the uninterrupted one would have.

    `state_dict()` is {"epoch", "index", "replaced"} (the next global batch of that epoch, and the count so far);
    `load_state_dict` resumes at exactly that batch. Every rank must be built with the same pairs,
    batch_size, world_size and seed.
    """

    def __init__(self, pairs: Sequence[Pair], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 both_orders: bool = False, decode: bool = False, skip_bad: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if both_orders and batch_size % 2:
            raise ValueError(f"both_orders needs an even batch_size (each pair is shown in both orders), got {batch_size}")
        self.examples = list(pairs)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.decode, self.skip_bad = decode, skip_bad
        self.views = 2 if both_orders else 1  # batch entries made from each pair
        self.global_batch = batch_size * world_size // self.views  # pairs per global batch
        self.steps_per_epoch = len(self.examples) // self.global_batch
        if batch_size < 1 or self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.examples)} examples cannot fill one global batch of batch_size={batch_size}"
                             f" x world_size={world_size}")
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

    def __next__(self) -> list[Pair]:
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
# Checking a dataset before a run: python data.py check SPEC [--images ROOT] [--workers N] [--out FILE]


def _check_one(image) -> tuple[str, str] | None:
    try:
        load_image(image)
    except DataError as e:
        return e.problem, str(e)
    return None


def _forget_open_files() -> None:  # a worker process opens its own parquet files
    _parquet_file.cache_clear()
    _row_group_column.cache_clear()


def check_images(images: Sequence, workers: int = 0, progress: bool = False) -> list[tuple[int, DataError]]:
    """Decode every image (in `workers` processes; 0 or 1: in this one) -> [(position, DataError)] of the bad ones."""
    from tqdm import tqdm
    if workers > 1 and len(images) > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers, initializer=_forget_open_files) as pool:
            results = list(tqdm(pool.imap(_check_one, images, chunksize=32), total=len(images), disable=not progress,
                                desc="decode"))
    else:
        results = [_check_one(im) for im in tqdm(images, disable=not progress, desc="decode")]
    return [(n, DataError(message, problem)) for n, r in enumerate(results) if r is not None for problem, message in [r]]


def check(spec: str, images_root=None, workers: int = 1, out: str = "bad_records.jsonl") -> dict:
    """Load `spec` (bad records counted, not raised), decode every image, write the bad records to `out`.

    Each line of `out` is {"file", "record", "field", "problem", "error"}: what `--exclude=out` leaves out.
    Returns the counts by problem, the number of images decoded and the time it took.
    """
    report: dict = {}
    records = load(spec, images_root, skip_bad=True, report=report)
    entries = [{"file": f, "record": i, "field": None, "problem": p, "error": m} for f, i, p, m in report.get("bad", [])]
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
    return {"records": report.get("records", len(records)), "images": len(unique), "seconds": seconds,
            "problems": problems, "bad_records": len({(e["file"], e["record"]) for e in entries})}


def main(argv: Sequence[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python data.py check", description="Decode every image of a dataset "
                                     "and list the records that cannot be used, before a long run.")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("spec", help="KIND:PATH[,PATH...] as train.py's --train_data (see data.load)")
    parser.add_argument("--images", default=None, help="the image root of the dataset")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    parser.add_argument("--out", default="bad_records.jsonl", help="where the bad records are listed")
    args = parser.parse_args(argv)
    result = check(args.spec, args.images, args.workers, args.out)
    rate = result["images"] / max(result["seconds"], 1e-9)
    print(f"{args.spec}: {result['records']} records, {result['images']} images decoded in {result['seconds']:.1f} s "
          f"({rate:.0f} images/s, {args.workers} workers)")
    for problem, n in sorted(result["problems"].items(), key=lambda kv: -kv[1]):
        print(f"  {problem:16s} {n}")
    if not result["problems"]:
        print("no problems found")
        return 0
    print(f"wrote {result['bad_records']} bad records to {args.out}: train with --exclude={args.out} "
          f"(or --skip_bad=true)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
