"""The published dataset layouts -> records: ImageReward, HPDv2, Rapidata and Pick-a-Pic (section 3.2, table 1).

Each loader reads one dataset in its own published on-disk layout and returns `Pair`s or `Group`s (records.py);
`data.load` picks the loader from a command-line spec. Images stay lazy: a path (checked here to be a file inside
the image root, so a missing file is reported with its record) or a reference to a parquet cell; both are read
and decoded by `images.load_image` only when the example is used, or by `python data.py check` before a run.

Every loader takes `skip_bad`, `exclude`, `report` and `prompt_limit`. Bad input (invalid JSON, a file that is
not parquet, a missing field or column, a wrong type, an empty prompt, a prompt over `prompt_limit`, a ranking
whose length differs from the images, a missing image file or a path the OS cannot name, a duplicated record)
raises `DataError` naming the file, the record index and the field; with `skip_bad=True` the record is left out
and counted instead. `exclude` is a set of (file, record index) to leave out unread (`read_exclude`: the file
`python data.py check` writes). `report`, a dict if given, is filled with the counts: "records" read, "pairs" or
"groups" returned, "ties" left out (a tie is not a preference), "skipped" bad records (and "first_error", the
message of the first one; "bad", every one as (file, record, field, problem, message)), "excluded" records.
Whenever anything was left out, one line saying what and how much goes to stderr: nothing is dropped silently.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from typing import Callable, NamedTuple

from formats.images import DataError, ParquetImage, expand_paths, image_file, parquet_file, parquet_rows
from formats.records import Group, Pair


def load_imagereward(path, image_root=None, skip_bad: bool = False, report: dict | None = None,
                     exclude=None, prompt_limit: PromptLimit | None = None) -> list[Group]:
    """ImageReward -> one Group per prompt, its images in file order with their human ranks (1 is best).

    Two layouts. The repository's `data/test.json`: a JSON list of `{"id", "prompt", "generations": [image
    paths], "ranking": [ranks]}`. ImageRewardDB's `metadata-{split}.parquet` (`path` ends with .parquet; one
    file or a list): one row per image with `prompt_id, prompt, image_path, rank`, grouped by `prompt_id` in
    first-seen order. Image paths are relative to `image_root` (default: the directory of the first file).

    Duplicates are refused, not counted twice: a test.json record whose `id` an earlier (good) record has, and
    an ImageRewardDB row repeating an earlier row's (prompt_id, image_path). The DataError names both records;
    with skip_bad the later one is left out and counted, and the first kept.
    """
    counts = _counts()
    if not isinstance(path, (str, os.PathLike)) or str(path).endswith(".parquet"):
        files = expand_paths(path)
        root = image_root if image_root is not None else os.path.dirname(files[0])
        groups = _imagereward_parquet(files, root, skip_bad, counts, exclude, prompt_limit)
        return _finish(", ".join(files), counts, "groups", groups, report)
    path = str(path)
    root = image_root if image_root is not None else os.path.dirname(path)
    ids: dict = {}  # id -> the index of the good record that has it

    def parse(i, record):
        prompt = _prompt(record, "prompt", path, i, prompt_limit)
        names = _str_list(record, "generations", path, i)
        ranking = _rank_list(record, "ranking", path, i, len(names))
        images = [image_file(root, n, path, i, "generations") for n in names]
        key = record.get("id")
        if key is not None:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise _bad(path, i, "id", "a string or an integer", key)
            if key in ids:
                raise _bad(path, i, "id", f"an id no other record has (record {ids[key]} has it too: a duplicated "
                           f"record would be counted twice)", key, "duplicate")
            ids[key] = i
        return Group(prompt, images, ranking)

    groups = _parse_records(path, enumerate(_read_json_list(path)), parse, skip_bad, counts, exclude)
    return _finish(path, counts, "groups", groups, report)


def _imagereward_parquet(files: list[str], root, skip_bad: bool, counts: dict, exclude=None,
                         prompt_limit: PromptLimit | None = None) -> list[Group]:
    groups: dict = {}  # prompt_id -> Group, in first-seen order (dicts keep insertion order)
    first: dict = {}  # prompt_id -> (file, row, prompt) of the first row holding it, across files and within one
    rows_of: dict = {}  # (prompt_id, image_path) -> (file, row) of the good row that holds it
    for file in files:
        def parse(i, row, file=file):
            prompt = _prompt(row, "prompt", file, i, prompt_limit)
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
            image = image_file(root, name, file, i, "image_path")
            if (prompt_id, name) in rows_of:
                seen_file, seen_row = rows_of[prompt_id, name]
                raise _bad(file, i, "image_path", f"an image not already in prompt_id {prompt_id!r}'s group (row "
                           f"{seen_row} of {seen_file} holds it: a duplicated row would be counted twice)", name,
                           "duplicate")
            first.setdefault(prompt_id, (file, i, prompt))
            rows_of[prompt_id, name] = (file, i)
            return prompt_id, prompt, image, rank

        rows = parquet_rows(file, ["prompt_id", "prompt", "image_path", "rank"])
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
               report: dict | None = None, exclude=None, prompt_limit: PromptLimit | None = None) -> list:
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
        prompt = _prompt(record, "prompt", path, i, prompt_limit)
        names = _str_list(record, "file_path", path, i, length=2)
        preference = _get(record, "human_preference", path, i)
        marks = [_int(v) for v in preference] if isinstance(preference, list) else [None]
        if None in marks or sorted(marks) != [0, 1]:
            raise _bad(path, i, "human_preference", "exactly one 1 and one 0, e.g. [1, 0]", preference)
        images = tuple(image_file(root, n, path, i, "file_path") for n in names)
        return Pair(prompt, images, label=marks.index(1))

    def parse_test(i, record):
        prompt = _prompt(record, "prompt", path, i, prompt_limit)
        names = _str_list(record, "image_path", path, i)
        ranking = _rank_list(record, "rank", path, i, len(names))
        return Group(prompt, [image_file(root, n, path, i, "image_path") for n in names], ranking)

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
        except (ValueError, RecursionError):
            raise _bad(source, index, key, "a JSON list of individual votes", cell) from None
    if not isinstance(cell, list):
        raise _bad(source, index, key, "a list of individual votes", cell)
    return len(cell)


def load_rapidata(parquet_paths, image_root=None, skip_bad: bool = False, report: dict | None = None,
                  exclude=None, prompt_limit: PromptLimit | None = None) -> list[Pair]:
    """Rapidata human preference parquet files -> list[Pair] with `votes`; ties (equal votes) left out.

    Columns: `prompt`, `image1`, `image2` and the votes in one of the two published conventions, which differ
    in meaning, not only in name:
    - `votes_image1`/`votes_image2`: numbers of votes; `votes` are these counts.
    - `weighted_results_image1_preference`/`..._image2_preference`: vote *shares* (weighted by each voter's
      reliability; they sum to 1), with the individual votes listed in `detailed_results_preference` (or
      `detailed_results`). `votes` are the shares times the number of individual votes, so the winner's share
      and the total number of votes (the binarized and confident subsets of metrics.py) mean what they mean
      with counts. Without a detail column the total is unknown: `votes` is None, never a share read as a count.
    An image cell is raw bytes, an HF image struct `{"bytes", "path"}`, or a path (relative to `image_root`
    if given). The label is the image with more votes (the larger share).
    """
    files = expand_paths(parquet_paths)
    counts, pairs = _counts(), []
    for file in files:
        names = parquet_file(file).schema_arrow.names
        shares = all(k in names for k in RAPIDATA_SHARES) and not all(k in names for k in RAPIDATA_COUNTS)
        if not shares and not all(k in names for k in RAPIDATA_COUNTS):
            raise DataError(f"{file}: expected vote columns {'/'.join(RAPIDATA_COUNTS)} or "
                            f"{'/'.join(RAPIDATA_SHARES)}; the file has {names}")
        detail = next((k for k in RAPIDATA_DETAILS if k in names), None) if shares else None
        if shares and detail is None:
            print(f"{file}: vote shares without a {' or '.join(RAPIDATA_DETAILS)} column: the number of votes is "
                  f"unknown, so the binarized and confident subsets cannot be formed", file=sys.stderr)

        def parse(i, row, file=file, shares=shares, detail=detail):
            prompt = _prompt(row, "prompt", file, i, prompt_limit)
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
        rows = parquet_rows(file, columns + ([detail] if detail else []), image_columns=("image1", "image2"))
        pairs += _parse_records(file, rows, parse, skip_bad, counts, exclude)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


def load_pickapic(parquet_paths, skip_bad: bool = False, report: dict | None = None, exclude=None,
                  prompt_limit: PromptLimit | None = None) -> list[Pair]:
    """Pick-a-Pic parquet files -> list[Pair]; ties (label_0 = 0.5) left out.

    Columns `caption`, `jpg_0`, `jpg_1` (image bytes) and `label_0`: 1 when image 0 was preferred, 0 when
    image 1 was, 0.5 for a tie.
    """
    files = expand_paths(parquet_paths)
    counts, pairs = _counts(), []
    for file in files:
        def parse(i, row, file=file):
            prompt = _prompt(row, "caption", file, i, prompt_limit)
            images = tuple(_image_value(_get(row, k, file, i), None, file, i, k) for k in ("jpg_0", "jpg_1"))
            label_0 = _get(row, "label_0", file, i)
            if isinstance(label_0, bool) or label_0 not in (0, 0.5, 1):
                raise _bad(file, i, "label_0", "0, 0.5 or 1", label_0)
            return None if label_0 == 0.5 else Pair(prompt, images, label=0 if label_0 == 1 else 1)

        rows = parquet_rows(file, ["caption", "jpg_0", "jpg_1", "label_0"], image_columns=("jpg_0", "jpg_1"))
        pairs += _parse_records(file, rows, parse, skip_bad, counts, exclude)
    return _finish(", ".join(files), counts, "pairs", pairs, report)


# ----------------------------------------------------------------------------------------------------------
# Reading a record's fields, checked; counting what is left out


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bad(source, index, field_name: str, expected: str, got=None, problem: str = "bad record") -> DataError:
    got_text = "" if got is None else f", got {_short(got)}"
    return DataError(f"{source}: record {index}: field '{field_name}': expected {expected}{got_text}", problem,
                     field_name)


def _get(record, key: str, source, index):
    if not isinstance(record, dict):
        raise _bad(source, index, key, "a record (an object with named fields)", type(record).__name__)
    if record.get(key) is None:
        raise DataError(f"{source}: record {index}: field '{key}' is missing", field=key)
    return record[key]


# The default of --max_prompt_tokens. Text-to-image prompts are short (the datasets read here hold prompts of
# tens of tokens; CLIP, which most of their generators read prompts with, stops at 77), and a prompt's tokens
# are held G times over in a GRPO step: a scraped record of 60,000 tokens would otherwise ask for tens of GB.
MAX_PROMPT_TOKENS = 1024


class PromptLimit(NamedTuple):
    """The longest prompt a run reads: `tokens` tokens, as `count(text)` counts them (the checkpoint's tokenizer:
    `prompt.Processor.prompt_limit`), `option` being where the limit was set.

    A record over it is refused like any bad record (skipped and counted with skip_bad): it is found when the
    dataset loads, before any image is decoded or any forward pass allocates memory for it. Counting is
    skipped for prompts of at most `tokens` UTF-8 bytes: no token of a byte-level BPE (Qwen's) is shorter than
    a byte, so those cannot be over.
    """
    tokens: int
    count: Callable[[str], int]
    option: str = "--max_prompt_tokens"
    unit: str = "tokens"

    def problem(self, prompt: str) -> str | None:
        """What is wrong with `prompt`'s length ("expected ..., got N tokens"), or None when it is within the limit."""
        if len(prompt.encode("utf-8", "surrogatepass")) <= self.tokens:
            return None
        n = self.count(prompt)
        if n <= self.tokens:
            return None
        return f"expected a prompt of at most {self.tokens} {self.unit} ({self.option}), got {n} {self.unit} " \
               f"({_short(prompt, 40)})"

    def check(self, prompt: str, source, index, key: str) -> None:
        if problem := self.problem(prompt):
            raise DataError(f"{source}: record {index}: field '{key}': {problem}", "prompt too long", key)


def _prompt(record, key: str, source, index, limit: PromptLimit | None = None) -> str:
    prompt = _get(record, key, source, index)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(source, index, key, "a non-empty string", prompt)
    if limit is not None:
        limit.check(prompt, source, index, key)
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


def _image_value(value, root, source, index, key: str):
    """A parquet image cell, as `parquet_rows` gives it -> a `ParquetImage` or a checked path."""
    if isinstance(value, ParquetImage):
        return value
    if isinstance(value, str) and value:
        return image_file(root or "", value, source, index, key)
    raise _bad(source, index, key, "image bytes, an image struct {bytes, path} or a path", value)


def _read_json_list(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: byte {e.start} ({e.object[e.start:e.start + 1]!r}): {e.reason}") from None
    except RecursionError:  # Python's parser recurses once per level: about 1,000 levels are enough to stop it
        raise DataError(f"{path}: JSON nested too deep to read (over {sys.getrecursionlimit()} levels): not a list "
                        f"of records") from None
    except OSError as e:  # missing, a folder, unreadable
        raise DataError(f"{path}: cannot be read as a JSON file ({type(e).__name__}: {e.strerror})",
                        "missing") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


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
            counts.setdefault("bad", []).append((str(source), index, e.field, e.problem, str(e)))
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
    try:
        lines = open(path, "rb").read().split(b"\n")
    except OSError as e:  # missing, a folder, unreadable
        raise DataError(f"{path}: cannot be read as the file `python data.py check` writes ({type(e).__name__}: "
                        f"{e.strerror})") from None
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out.add((os.path.realpath(entry["file"]), int(entry["record"])))
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise DataError(f"{path}: line {n + 1}: expected {{\"file\": ..., \"record\": ...}}: "
                            f"{type(e).__name__}: {str(e)[:80]}") from None
    return out
