"""Bad data never kills a run: every broken record is named, skipped on request, counted.

Each broken case is written here as a file (a zero-byte file, an HTML page saved as .png, truncated PNG and
JPEG files, a PNG with a bad checksum, a parquet cell truncated after an intact header, an image over the
pixel limit, an aspect ratio over 200). Without `skip_bad` the error names the dataset file, the record, the
field and the image; with it, the stream replaces the example and counts it, every rank still serves full
batches, and a resumed stream (and a resumed 2-process training run) equals an uninterrupted one.

Run: .venv/bin/python -m pytest -q tests/test_bad_data.py
"""
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import launching
from toy import world as toy
from data import ExampleStream, groups_to_pairs, load
from formats.images import DataError, ParquetImage, load_image
from formats.layouts import load_hpdv2, load_imagereward, load_rapidata, subsample
from formats.records import Group, Pair
from prompt import PROMPT

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the broken files


def noise(size=(32, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width, height) -> bytes:
    """A PNG whose header (with valid checksums) claims width x height: what a decompression bomb looks like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def bad_crc_png() -> bytes:
    raw = bytearray(encoded(noise()))
    at = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[at - 4:at])[0]
    raw[at + 4 + length] ^= 0xFF  # only the checksum is wrong: PIL alone decodes this without a word
    return bytes(raw)


BROKEN = {  # name -> (bytes of the file, the problem it is reported as, words the message holds)
    "zero-byte": (b"", "empty", "0 bytes"),
    "html as png": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image", "<!DOCTYPE html"),
    "truncated png": (encoded(noise())[:300], "corrupt", "IDAT"),
    "truncated jpeg": (encoded(noise(), "JPEG")[:400], "corrupt", "runcated"),  # PIL: "Truncated", "truncated"
    "bad png crc": (bad_crc_png(), "corrupt", "CRC-32"),
    "over the pixel limit": (png_header_only(9000, 9000), "too many pixels", "MAX_IMAGE_PIXELS"),
    "aspect ratio over 200": (encoded(noise((402, 2))), "aspect ratio", "MAX_ASPECT_RATIO"),
}


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def hpd_dataset(root: Path, n: int, broken: dict[int, bytes]) -> Path:
    """An HPDv2 train.json of n pairs; pair i's second image is the file `broken[i]` where given."""
    records = []
    for i in range(n):
        names = [f"train/{i}_a.png", f"train/{i}_b.png"]
        write(root / names[0], encoded(noise(seed=2 * i)))
        write(root / names[1], broken.get(i, encoded(noise(seed=2 * i + 1))))
        records.append({"prompt": f"prompt {i}", "file_path": names, "human_preference": [1, 0]})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- named at the decode site


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_image_is_named_where_it_is_decoded(tmp_path, case):
    raw, problem, words = BROKEN[case]
    path = hpd_dataset(tmp_path, 4, {2: raw})
    pairs = load_hpdv2(path)  # the loader checks that the file is there; decoding is the stream's job
    stream = ExampleStream(pairs, 4, decode=True)
    with pytest.raises(DataError) as err:
        next(stream)
    image = os.path.join(str(tmp_path), "train/2_b.png")
    assert str(err.value).startswith(f"{path}: record 2: field 'file_path': image {image}: "), str(err.value)
    assert words in str(err.value) and err.value.problem == problem
    with pytest.raises(DataError, match="record 2: field 'file_path'"):
        load_image(pairs[2].images[1])


def test_rapidata_cell_truncated_after_an_intact_header(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    whole = encoded(noise((64, 64)))
    rows = [{"prompt": f"p{i}", "image1": {"bytes": whole[:200] if i == 1 else whole, "path": f"{i}.png"},
             "image2": {"bytes": whole, "path": "x.png"}, "votes_image1": 3, "votes_image2": 1} for i in range(3)]
    path = str(tmp_path / "rapidata.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    Image.open(io.BytesIO(whole[:200])).size  # the header is intact: it opens, and only decoding fails
    pairs = load_rapidata(path)
    assert isinstance(pairs[1].images[0], ParquetImage)  # nothing read yet
    with pytest.raises(DataError, match=r"rapidata\.parquet: record 1: field 'image1': image \(parquet cell.*corrupt|"
                                        r"rapidata\.parquet: record 1: field 'image1': image \(parquet cell.*IDAT"):
        load_image(pairs[1].images[0])
    assert load_image(pairs[0].images[0]).size == (64, 64)


def test_read_size_cap_and_directory(tmp_path, monkeypatch):
    write(tmp_path / "big.png", encoded(noise((64, 64))))
    monkeypatch.setattr("formats.images.MAX_IMAGE_BYTES", 1000)
    with pytest.raises(DataError, match=r"big\.png: \d+ bytes, over MAX_IMAGE_BYTES=1000") as err:
        load_image(str(tmp_path / "big.png"))
    assert err.value.problem == "too large"
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_image(str(tmp_path / "dir.png"))


# ---------------------------------------------------------------- skipped on request, counted, in step, resumable


def served(stream, steps):
    return [[p.prompt for p in next(stream)] for _ in range(steps)]


def test_stream_replaces_unreadable_examples_on_every_rank_alike(tmp_path):
    broken = {i: BROKEN[name][0] for i, name in zip((1, 4, 5, 9), BROKEN)}
    pairs = load_hpdv2(hpd_dataset(tmp_path, 12, broken))
    world, per_rank, steps = 2, 2, 9  # 3 steps per epoch: three epochs
    ranks = [ExampleStream(pairs, per_rank, rank=r, world_size=world, seed=3, decode=True, skip_bad=True)
             for r in range(world)]
    batches = [[next(s) for _ in range(steps)] for s in ranks]
    for r in range(world):
        assert all(len(b) == per_rank for b in batches[r])  # same number of forwards on every rank
        for b in batches[r]:
            assert all(isinstance(im, Image.Image) for p in b for im in p.images)  # decoded, so readable
            assert not {p.prompt for p in b} & {f"prompt {i}" for i in broken}
    # by hand: each slot takes the first readable example at slot, slot + 4, slot + 8, ... of the epoch order
    expected, replaced = [[] for _ in range(world)], [0] * world
    for step in range(steps):
        epoch, index = divmod(step, 3)
        order = list(range(12))
        import random
        random.Random(3 + epoch).shuffle(order)
        for r in range(world):
            row = []
            for j in range(per_rank):
                slot = index * 4 + r * per_rank + j
                k = next(k for k in range(4) if order[(slot + 4 * k) % 12] not in broken)
                row.append(f"prompt {order[(slot + 4 * k) % 12]}")
                replaced[r] += k > 0
            expected[r].append(row)
    assert [[[p.prompt for p in b] for b in batches[r]] for r in range(world)] == expected
    assert [s.replaced for s in ranks] == replaced and sum(replaced) >= len(broken)

    again = ExampleStream(pairs, per_rank, rank=1, world_size=world, seed=3, decode=True, skip_bad=True)
    served(again, 4)
    resumed = ExampleStream(pairs, per_rank, rank=1, world_size=world, seed=3, decode=True, skip_bad=True)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert served(resumed, 5) == expected[1][4:] and resumed.replaced == replaced[1]


def test_stream_with_nothing_readable_says_so(tmp_path):
    pairs = load_hpdv2(hpd_dataset(tmp_path, 4, {i: b"" for i in range(4)}))
    with pytest.raises(DataError, match="no readable example"):
        next(ExampleStream(pairs, 2, decode=True, skip_bad=True))


def test_drop_unreadable_keeps_the_rest_of_a_group(tmp_path):
    good = [str(write(tmp_path / f"{i}.png", encoded(noise(seed=i)))) for i in range(3)]
    bad = str(write(tmp_path / "bad.png", b"<html>"))
    records = [Group("g", [good[0], bad, good[1], good[2]], [1, 2, 3, 4]), Pair("p", (good[0], bad), 0),
               Pair("q", (good[1], good[2]), 1), Group("h", [bad, good[0]], [1, 2])]
    kept, unreadable = data.drop_unreadable(records)
    assert unreadable == 3
    assert [(type(r).__name__, r.prompt) for r in kept] == [("Group", "g"), ("Pair", "q")]
    assert kept[0].images == [good[0], good[1], good[2]] and kept[0].ranking == [1, 3, 4]


# ---------------------------------------------------------------- python data.py check


def test_check_lists_every_bad_record_and_exclude_leaves_them_out(tmp_path):
    broken = {i: BROKEN[name][0] for i, name in enumerate(BROKEN)}  # records 0..6, one case each
    path = hpd_dataset(tmp_path, 10, broken)
    records = json.loads(path.read_text())
    records[8]["human_preference"] = [1, 1]  # a bad record: found by the loader, not by decoding
    path.write_text(json.dumps(records))
    out = tmp_path / "bad.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), "check", f"hpdv2:{path}", "--workers", "2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(e["record"] for e in entries) == [0, 1, 2, 3, 4, 5, 6, 8]
    by_record = {e["record"]: e for e in entries}
    for i, (_, problem, words) in enumerate(BROKEN.values()):
        assert by_record[i]["problem"] == problem and words in by_record[i]["error"]
        assert by_record[i]["field"] == "file_path" and by_record[i]["file"] == str(path)
    assert by_record[8]["problem"] == "bad record" and "human_preference" in by_record[8]["error"]
    assert by_record[8]["field"] == "human_preference"  # a record error names its field too, not only image errors
    counts = {problem: sum(e["problem"] == problem for e in entries) for problem in {e["problem"] for e in entries}}
    for problem, n in counts.items():
        assert f"  {problem:16s} {n}" in run.stdout.splitlines()
    assert f"hpdv2:{path}: 10 records, 18 images decoded in" in run.stdout and "images/s, 2 workers" in run.stdout
    report = {}
    kept = load(f"hpdv2:{path}", exclude=str(out), report=report)
    assert sorted(p.prompt for p in kept) == ["prompt 7", "prompt 9"]
    stream = ExampleStream(kept, 2, decode=True)  # without skip_bad: everything left is readable
    assert len(next(stream)) == 2


def imagereward_with_bad_records(root: Path) -> Path:
    """An ImageReward test.json of 6 records; 1: a prompt of 60,001 tokens, 2: a NUL byte in an image path,
    3: no prompt, 4: the id of record 0 again; 0 and 5 are good."""
    names = [f"{i}.png" for i in range(2)]
    for i, n in enumerate(names):
        write(root / n, encoded(noise(seed=i)))
    good = {"prompt": "a red circle", "generations": names, "ranking": [1, 2]}
    records = [{**good, "id": "r0"}, {**good, "id": "r1", "prompt": "a red circle " * 20000},
               {**good, "id": "r2", "generations": ["0.png", "1\x00.png"]}, {"id": "r3", **{k: v for k, v in good.items()
                                                                                        if k != "prompt"}},
               {**good, "id": "r0"}, {**good, "id": "r5", "prompt": "a blue square"}]
    path = root / "test.json"
    path.write_text(json.dumps(records))
    return path


def test_check_fills_in_the_field_of_every_bad_record(tmp_path):
    """`python data.py check --tokenizer toy`: each bad record's line names its field and problem (the long prompt
    in tokens of the run's tokenizer, the NUL byte, the missing prompt, the duplicated id); --exclude of that
    list leaves exactly those out."""
    path = imagereward_with_bad_records(tmp_path)
    out = tmp_path / "bad.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), "check", f"imagereward:{path}", "--workers", "1",
                          "--out", str(out), "--tokenizer", "toy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    entries = {e["record"]: e for e in map(json.loads, out.read_text().splitlines())}
    assert {r: (e["field"], e["problem"]) for r, e in entries.items()} == {
        1: ("prompt", "prompt too long"), 2: ("generations", "bad path"), 3: ("prompt", "bad record"),
        4: ("id", "duplicate")}
    assert entries[1]["error"].startswith(f"{path}: record 1: field 'prompt': expected a prompt of at most 1024 "
                                          f"tokens (--max_prompt_tokens), got 60001 tokens")
    assert "holds a NUL byte" in entries[2]["error"] and "record 0 has it too" in entries[4]["error"]
    assert all(e["file"] == str(path) for e in entries.values())
    assert [g.prompt for g in load(f"imagereward:{path}", exclude=str(out))] == ["a red circle", "a blue square"]


def test_check_without_a_tokenizer_says_what_it_could_not_count(tmp_path):
    path = imagereward_with_bad_records(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), "check", f"imagereward:{path}", "--workers", "1",
                          "--out", str(tmp_path / "bad.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert (f"1 prompts are longer than 1024 bytes, so may be over --max_prompt_tokens=1024 tokens (the longest: "
            f"{path}: record 1, 260000 bytes); pass --tokenizer") in run.stdout, run.stdout


@pytest.mark.parametrize("case", ["out a folder", "out the dataset", "workers 0", "images a file", "spec a folder",
                                  "tokenizer missing", "tokenizer without its files"])
def test_check_refuses_its_arguments_before_reading_anything(tmp_path, capsys, monkeypatch, case):
    """Each argument that would fail late (--out a folder: after decoding every image) or pass what it should not
    (--workers 0; a --tokenizer folder without tokenizer files gave an empty vocabulary and "no problems found") is
    refused first, in one line naming the argument: nothing is loaded or decoded."""
    path = hpd_dataset(tmp_path, 3, {})
    monkeypatch.setattr(data, "check", lambda *a, **k: pytest.fail("the dataset was read"))
    (tmp_path / "folder").mkdir()
    argv, words = {
        "out a folder": (["--out", str(tmp_path / "folder")], f"--out='{tmp_path / 'folder'}' is not allowed: expected "
                                                               f"a file to write ({tmp_path / 'folder'} is a folder)"),
        "out the dataset": (["--out", str(path)], "a file other than the dataset's own"),
        "workers 0": (["--workers", "0"], "--workers=0 is not allowed: expected a number >= 1"),
        "images a file": (["--images", str(path)], "the image root of the dataset, a folder"),
        "spec a folder": ([], f"SPEC 'hpdv2:{tmp_path / 'folder'}' is not allowed: expected a JSON file for hpdv2"),
        "tokenizer missing": (["--tokenizer", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: does not exist"),
        "tokenizer without its files": (["--tokenizer", str(tmp_path / "folder")],
                                        f"{tmp_path / 'folder'}: no tokenizer files"),
    }[case]
    spec = f"hpdv2:{tmp_path / 'folder'}" if case == "spec a folder" else f"hpdv2:{path}"
    with pytest.raises(SystemExit) as stop:
        data.main(["check", spec, "--out", str(tmp_path / "bad.jsonl"), *argv])
    assert stop.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()


def test_check_fails_a_dataset_with_no_usable_record(tmp_path, capsys):
    """A Pick-a-Pic parquet of 0 rows, an ImageReward test.json of [] and one whose every record is bad: nothing to
    train on, so the check fails (status 1) instead of "no problems found"; a file that is not its layout at all
    stops it with one line (status 2), not a traceback."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    empty = tmp_path / "pick.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
                             "jpg_1": pa.array([], pa.binary()), "label_0": pa.array([], pa.float64())}), empty)
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "all_bad.json").write_text(json.dumps([{"generations": ["a.png", "b.png"], "ranking": [1, 2]}] * 2))
    for spec, read in ((f"pickapic:{empty}", 0), (f"imagereward:{tmp_path / 'empty.json'}", 0),
                       (f"imagereward:{tmp_path / 'all_bad.json'}", 2)):
        assert data.main(["check", spec, "--workers", "1", "--out", str(tmp_path / "bad.jsonl")]) == 1
        out = capsys.readouterr().out
        assert f"no usable records: of {read} records read" in out and "no problems found" not in out, out
    (tmp_path / "bad.json").write_text("[1, 2")
    assert data.main(["check", f"hpdv2:{tmp_path / 'bad.json'}", "--out", str(tmp_path / "bad.jsonl")]) == 2
    assert f"python data.py check: error: {tmp_path / 'bad.json'}: invalid JSON" in capsys.readouterr().err


def test_an_empty_training_set_says_why(tmp_path):
    """No training example: the message names what left none, --fraction (0.0001 of 12 records keeps none, where it
    said only "no training examples"), or the ties and bad records; held-out data is called held-out; too few
    examples for one global batch names train.py's options."""
    import train
    from infra.trainer import load_examples
    out = toy.write_dataset(tmp_path, n_train=12, n_test=3, seed=0)
    cfg = train.Config(mode="sft", fraction=0.0001)
    with pytest.raises(DataError, match=re.escape(f"no training examples in hpdv2:{out['train']}: --fraction=0.0001 "
                                                  f"keeps none of its 12 records (raise --fraction)")):
        load_examples(f"hpdv2:{out['train']}", str(out["train_images"]), cfg, train=True)
    test = json.loads(Path(out["test"]).read_text())
    Path(out["test"]).write_text(json.dumps([dict(r, ranking=[1] * len(r["ranking"])) for r in test]))
    with pytest.raises(DataError, match=re.escape(f"no held-out examples in imagereward:{out['test']}: its 3 groups "
                                                  f"have no two images of different ranks")):
        load_examples(f"imagereward:{out['test']}", str(out["test_images"]), cfg, train=False)
    with pytest.raises(DataError, match=r"12 examples cannot fill one global batch of batch_size=8 x world_size=2 "
                                        r"\(train.py: --pairs_per_rank x processes\)"):
        ExampleStream(list(range(12)), 8, world_size=2)


def test_a_long_prompt_is_refused_or_skipped_as_the_data_loads(tmp_path, capsys):
    path = imagereward_with_bad_records(tmp_path)
    records = json.loads(path.read_text())
    path.write_text(json.dumps([records[i] for i in (0, 1, 5)]))
    limit = toy.make_processor().prompt_limit(1024)
    with pytest.raises(DataError, match=r"test\.json: record 1: field 'prompt': expected a prompt of at most 1024 tokens "
                                        r"\(--max_prompt_tokens\), got 60001 tokens \('a red circle a red"):
        load(f"imagereward:{path}", prompt_limit=limit)
    report = {}
    kept = load(f"imagereward:{path}", prompt_limit=limit, skip_bad=True, report=report)
    assert [g.prompt for g in kept] == ["a red circle", "a blue square"] and report["skipped"] == 1
    assert "1 bad records" in capsys.readouterr().err
    assert len(load(f"imagereward:{path}", prompt_limit=toy.make_processor().prompt_limit(60001))) == 3


def test_a_nul_byte_in_an_image_path_names_the_record(tmp_path):
    path = hpd_dataset(tmp_path, 3, {})
    records = json.loads(path.read_text())
    records[1]["file_path"][1] = "train/1\x00_b.png"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        load_hpdv2(path)
    assert str(err.value) == (f"{path}: record 1: field 'file_path': image path 'train/1\\x00_b.png' holds a NUL "
                              f"byte"), str(err.value)
    report = {}
    assert [p.prompt for p in load_hpdv2(path, skip_bad=True, report=report)] == ["prompt 0", "prompt 2"]
    assert report["skipped"] == 1 and report["bad"][0][:4] == (str(path), 1, "file_path", "bad path")
    with pytest.raises(DataError, match="the path holds a NUL byte"):  # a path that did not come through a loader
        load_image(str(tmp_path / "a\x00.png"))


def test_exclude_entries_of_another_dataset_are_reported(tmp_path, capsys):
    """An --exclude list written for another file leaves nothing out: the loader says how many entries match."""
    path = hpd_dataset(tmp_path / "a", 4, {})
    other = hpd_dataset(tmp_path / "b", 4, {})
    capsys.readouterr()
    assert len(load(f"hpdv2:{path}", exclude={(os.path.realpath(other), i) for i in range(3)})) == 4
    err = capsys.readouterr().err
    assert f"data: hpdv2:{path}: 0 of 3 exclude entries match this dataset; the others name 1 other files " \
           f"({os.path.realpath(other)}): 0 records left out" in err, err
    mixed = {(os.path.realpath(path), 1), (os.path.realpath(path), 9), (os.path.realpath(other), 0)}
    assert [p.prompt for p in load(f"hpdv2:{path}", exclude=mixed)] == ["prompt 0", "prompt 2", "prompt 3"]
    err = capsys.readouterr().err
    assert "2 of 3 exclude entries match this dataset" in err and \
        "1 of the matching ones name records its files do not have: 1 records left out" in err, err
    load(f"hpdv2:{path}", exclude={(os.path.realpath(path), 1)})
    assert "exclude entries" not in capsys.readouterr().err  # every entry used: only the loader's count


# ---------------------------------------------------------------- structural cases (items 3-6, 9)


def test_hpdv2_layout_is_not_decided_by_record_0(tmp_path):
    path = hpd_dataset(tmp_path, 3, {})
    records = json.loads(path.read_text())
    path.write_text(json.dumps([["not", "a", "record"]] + records))
    with pytest.raises(DataError, match=r"train\.json: record 0: field 'prompt': expected a record"):
        load_hpdv2(path)
    report = {}
    assert [p.prompt for p in load_hpdv2(path, skip_bad=True, report=report)] == ["prompt 0", "prompt 1", "prompt 2"]
    assert report["skipped"] == 1
    path.write_text(json.dumps([{"prompt": "x"}] + records))  # record 0 has neither layout's fields
    assert len(load_hpdv2(path, skip_bad=True)) == 3


def test_imagerewarddb_same_prompt_id_different_prompt_within_one_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    names = [str(write(tmp_path / f"{i}.png", encoded(noise(seed=i))).name) for i in range(4)]
    rows = [{"prompt_id": "a", "prompt": "a cat", "image_path": names[0], "rank": 1},
            {"prompt_id": "b", "prompt": "a dog", "image_path": names[1], "rank": 1},
            {"prompt_id": "a", "prompt": "a car", "image_path": names[2], "rank": 2},
            {"prompt_id": "a", "prompt": "a cat", "image_path": names[3], "rank": 2}]
    path = str(tmp_path / "metadata-train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"metadata-train\.parquet: record 2: field 'prompt': expected the prompt of "
                                        r"prompt_id 'a' at .*metadata-train\.parquet: record 0, 'a cat', got 'a car'"):
        load_imagereward(path)
    groups = load_imagereward(path, skip_bad=True)
    assert [(g.prompt, g.ranking) for g in groups] == [("a cat", [1, 2]), ("a dog", [1])]


def test_fraction_for_every_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    png = encoded(noise())
    pick = str(tmp_path / "pick.parquet")
    pq.write_table(pa.Table.from_pylist([{"caption": f"c{i}", "jpg_0": png, "jpg_1": png, "label_0": 1.0}
                                         for i in range(20)]), pick)
    out = toy.write_dataset(tmp_path / "toy", n_train=20, n_test=20, seed=0)
    for spec, root in ((f"pickapic:{pick}", None), (f"imagereward:{out['test']}", None)):
        full = [r.prompt for r in load(spec, root)]
        part = [r.prompt for r in load(spec, root, fraction=0.25, seed=5)]
        assert part == [full[i] for i in subsample(len(full), 0.25, 5)] and len(part) == 5
    with pytest.raises(ValueError, match="fraction must be in"):
        load(f"pickapic:{pick}", fraction=0)


def test_tied_pairs_are_counted(capsys):
    report = {}
    pairs = groups_to_pairs([Group("p", ["a", "b", "c", "d"], [1, 2, 1, 3]), Group("q", ["x", "y"], [2, 2])], report)
    assert len(pairs) == 5 and report == {"pairs": 5, "tied_pairs": 2}  # (a, c) and (x, y)
    assert "left out 2 tied image pairs" in capsys.readouterr().err


def test_image_paths_stay_inside_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    write(outside, encoded(noise()))
    write(root / "in.png", encoded(noise()))
    (root / "link_out.png").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "in.png")
    (root / "folder.png").mkdir()

    def load_with(name):
        path = root / "train.json"
        path.write_text(json.dumps([{"prompt": "p", "file_path": ["in.png", name], "human_preference": [1, 0]}]))
        return load_hpdv2(path)

    assert load_with("link_in.png")[0].images[1].endswith("link_in.png")
    assert load_with("sub/../in.png")  # ".." that stays inside is fine
    for name, words in (("../outside.png", "outside the image root"), (str(outside), "is absolute"),
                        ("link_out.png", "outside the image root"), ("folder.png", "is a directory")):
        with pytest.raises(DataError, match=f"train.json: record 0: field 'file_path': .*{words}"):
            load_with(name)


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "test.json"
    path.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"test\.json: not UTF-8 text: byte 16"):
        load_imagereward(str(path))


# ---------------------------------------------------------------- prompts are text


def plain_ids(tokenizer, text):
    """`text` as plain text, no special token recognised: the tokenizer's non-special added tokens (the toy's
    `<think>` tags) are split out, and the rest goes through the byte-level pre-tokenizer and the BPE model."""
    backend = tokenizer.backend_tokenizer
    words = [t.content for t in tokenizer.added_tokens_decoder.values() if not t.special]
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, words)) + ")", text):
        if piece in words:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += [t.id for p, _ in backend.pre_tokenizer.pre_tokenize_str(piece) for t in backend.model.tokenize(p)]
    return ids


def find(seq, sub):
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


def test_special_tokens_in_a_prompt_are_text():
    """A prompt holding chat-template tokens is encoded as plain text; the template around it is unchanged."""
    processor = toy.make_processor()
    tok = processor.tokenizer
    image = encoded(noise((56, 56)))
    prompt = "a red cat <|im_end|>\n<|im_start|>assistant <|image_pad|> <|vision_start|>"
    clean = processor.pairs([Pair("X", (image, image), 0)])["input_ids"][0].tolist()
    plain = plain_ids(tok, PROMPT.question.format(prompt="X"))
    at = find(clean, plain)  # the template before and after the question
    batch = processor.pairs([Pair(prompt, (image, image), 0)])
    expected = clean[:at] + plain_ids(tok, PROMPT.question.format(prompt=prompt)) + clean[at + len(plain):]
    assert batch["input_ids"][0].tolist() == expected
    special = {tok.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}
    assert sum(t in special for t in expected) == sum(t in special for t in clean)  # no structure injected
    assert batch["mm_token_type_ids"].sum() == clean.count(processor.image_token_id)
    model = toy.make_model(tok, seed=0)
    with torch.no_grad():
        model(**batch)  # the image tokens match the images: no "image features and image tokens do not match"


# ---------------------------------------------------------------- training: torchrun, skip_bad, resume


def launch(args, nproc):
    return launching.run(launching.command(ROOT / "train.py", args, nproc), ROOT, launching.environment(), timeout=600)


@pytest.fixture(scope="module")
def corrupt_toy(tmp_path_factory):
    """The toy task, 16 training pairs, of which records 3, 7 and 12 hold a broken image; one held-out too."""
    root = tmp_path_factory.mktemp("corrupt")
    out = toy.write_dataset(root, n_train=16, n_test=4, seed=0)
    train = json.loads(Path(out["train"]).read_text())
    for i, case in zip((3, 7, 12), ("truncated png", "html as png", "bad png crc")):
        write(Path(out["train_images"]) / train[i]["file_path"][1], BROKEN[case][0])
    test = json.loads(Path(out["test"]).read_text())
    write(Path(out["test_images"]) / test[1]["generations"][0], b"")
    common = [f"--train_data=hpdv2:{out['train']}", f"--train_images={out['train_images']}",
              f"--eval_data=imagereward:{out['test']}", f"--eval_images={out['test_images']}", "--mode=sft",
              "--model=toy", "--pairs_per_rank=2", "--micro_pairs=2", "--lr=1e-3", "--warmup_steps=1",
              "--max_new_tokens=4", "--eval_pairs=8", "--eval_every=0"]
    return root, out, common


def test_training_without_skip_bad_names_the_broken_image(corrupt_toy):
    root, out, common = corrupt_toy
    run = launch([*common, "--steps=8", f"--out_dir={root / 'fails'}", "--eval_data=toy"], nproc=1)
    assert run.returncode != 0
    images = json.loads(Path(out["train"]).read_text())
    named = [f"{out['train']}: record {i}: field 'file_path': image {os.path.join(str(out['train_images']), images[i]['file_path'][1])}"
             for i in (3, 7, 12)]
    assert any(n in run.stderr for n in named), run.stderr[-3000:]


def test_two_processes_skip_bad_finish_count_and_resume_exactly(corrupt_toy):
    """2 ranks, --skip_bad: six steps straight == the same run resumed from its step-3 checkpoint for three more
    (same losses, counts, weights): the data stream's position and its count of replaced examples are restored."""
    root, _, common = corrupt_toy
    straight, resumed = root / "straight", root / "resumed"
    run = launch([*common, "--skip_bad=true", f"--out_dir={straight}", "--steps=6", "--save_every=3"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    resumed.mkdir()
    shutil.copytree(straight / "step_0000003", resumed / "step_0000003")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")  # the resumed run drops rows 4-6 and redoes them
    run = launch([*common, "--skip_bad=true", f"--out_dir={resumed}", "--steps=6", "--save_every=3"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "resumed from" in run.stdout and "step 3" in run.stdout
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    # 4 steps per epoch of 16 pairs: epoch 0 meets all three broken pairs, epoch 1 meets them again
    assert rows[3]["replaced_examples"] == 3 and rows[-1]["replaced_examples"] >= 3
    assert f"unreadable examples replaced: {int(rows[-1]['replaced_examples'])}" in run.stdout
    assert [(r["loss"], r["replaced_examples"]) for r in rows] == [(r["loss"], r["replaced_examples"]) for r in again]
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["skipped"] == 0 for r in again), again  # the weights moved
    from safetensors.torch import load_file
    a, b = (load_file(sorted(d.glob("export_*"))[-1] / "model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_skip_bad_leaves_out_the_unreadable_image_and_counts_it(tmp_path):
    """evaluate.py: without --skip_bad the broken image is named; with it, its comparisons are left out, counted."""
    import evaluate
    out = toy.write_dataset(tmp_path / "toy", n_train=0, n_test=3, seed=0)
    test = json.loads(Path(out["test"]).read_text())
    write(Path(out["test_images"]) / test[1]["generations"][2], BROKEN["truncated jpeg"][0])
    argv = ["--data", f"imagereward:{out['test']}", "--images", str(out["test_images"]), "--max-new-tokens", "4",
            "--anchor", "0", "--out", str(tmp_path / "eval")]
    image = os.path.join(str(out["test_images"]), test[1]["generations"][2])
    with pytest.raises(SystemExit, match=f"^evaluate.py: error: {re.escape(str(out['test']))}: record 1: field "
                                         f"'generations': image {re.escape(image)}: cannot be decoded"):
        evaluate.main(argv)
    evaluate.main(argv + ["--skip_bad"])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    sizes = [len(r["generations"]) for r in test]
    assert report["unreadable_images"] == 1 and report["records"] == 3
    assert report["comparisons"] == sum(sizes) - 3 - 1  # n - 1 anchor comparisons per group, one image fewer


def test_training_refuses_a_long_prompt_before_loading_anything_and_skips_it_with_skip_bad(corrupt_toy):
    """A training record whose prompt is "a red circle " 20,000 times (60,001 tokens; the toy's context is 4,096):
    without --skip_bad the run stops as the data loads, naming the record; with it, the record is left out and
    counted, and the run trains."""
    root, out, common = corrupt_toy
    train = json.loads(Path(out["train"]).read_text())
    train[5]["prompt"] = "a red circle " * 20000
    long_json = root / "long_prompt.json"
    long_json.write_text(json.dumps(train))
    args = [a for a in common if not a.startswith("--train_data")] + [f"--train_data=hpdv2:{long_json}", "--steps=1",
                                                                      "--save_every=1"]
    refused = launch([*args, f"--out_dir={root / 'long_refused'}"], nproc=1)
    assert refused.returncode != 0
    assert (f"{long_json}: record 5: field 'prompt': expected a prompt of at most 1024 tokens (--max_prompt_tokens), "
            f"got 60001 tokens") in refused.stderr, refused.stderr[-3000:]
    assert not (root / "long_refused" / "metrics.jsonl").exists()  # stopped as the data loaded, before step 1
    skipped = launch([*args, "--skip_bad=true", f"--out_dir={root / 'long_skipped'}"], nproc=1)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"data: {long_json}: 16 records (16 selected) -> 15 pairs; left out 0 ties and 1 bad records" in skipped.stderr, \
        skipped.stderr[-3000:]
