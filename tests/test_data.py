"""Tests for the data path (layouts.py, images.py, data.py, prompt.py's Processor): each published layout
written out in small files here, read back and checked.

Images are real PNG files written with PIL, each one a solid colour, so the test can tell which image a
loader put where by opening it. Expected records, pairs and shards are computed by plain loops in the tests.

Run: .venv/bin/python -m pytest -q tests/test_data.py
"""
import io
import json
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

import toy
from data import ExampleStream, groups_to_pairs, load
from images import DataError, load_image
from layouts import load_hpdv2, load_imagereward, load_pickapic, load_rapidata, subsample
from prompt import PROMPT, Group, Pair, Processor, PromptFormat, listener_prefix, reasoner_messages

RED, GREEN, BLUE, WHITE = (220, 40, 40), (40, 180, 60), (50, 80, 220), (255, 255, 255)


# ---------------------------------------------------------------- helpers


def png_bytes(colour, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_png(root, name, colour) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(colour))
    return name


def colour_of(image):
    return load_image(image).getpixel((0, 0))


def write_json(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def write_parquet(path, rows) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


# ---------------------------------------------------------------- ImageReward


def test_imagereward_json(tmp_path):
    names = [write_png(tmp_path, f"part-000001/images/0001/{j}.png", c) for j, c in enumerate((RED, GREEN, BLUE))]
    other = [write_png(tmp_path, f"part-000002/images/0002/{j}.png", c) for j, c in enumerate((BLUE, RED))]
    records = [{"id": "000001-0001", "prompt": "a red cat", "generations": names, "ranking": [1, 3, 2]},
               {"id": "000002-0002", "prompt": "a blue dog", "generations": other, "ranking": [1, 2]}]
    report = {}
    groups = load_imagereward(write_json(tmp_path / "test.json", records), report=report)  # root: the file's dir
    assert [g.prompt for g in groups] == ["a red cat", "a blue dog"]
    assert [g.ranking for g in groups] == [[1, 3, 2], [1, 2]]
    assert groups[0].images == [os.path.join(str(tmp_path), n) for n in names]
    assert [colour_of(im) for im in groups[0].images] == [RED, GREEN, BLUE]
    assert report == {"records": 2, "groups": 2, "ties": 0, "skipped": 0}


def test_imagereward_parquet_groups_by_prompt_id(tmp_path):
    colours = [RED, GREEN, BLUE, WHITE, RED, GREEN]
    # rows of two prompts, interleaved; "p9" is seen first, so its group comes first
    ids, ranks = ["p9", "p1", "p9", "p1", "p9", "p5"], [2, 1, 1, 2, 3, 1]
    rows = [{"prompt_id": pid, "prompt": f"prompt {pid}", "image_path": write_png(tmp_path, f"images/train/{k}.png", c),
             "rank": r, "overall_rating": 5} for k, (pid, r, c) in enumerate(zip(ids, ranks, colours))]
    first = write_parquet(tmp_path / "metadata-train.parquet", rows[:4])
    second = write_parquet(tmp_path / "metadata-train-2.parquet", rows[4:])
    groups = load_imagereward([first, second], image_root=str(tmp_path))
    expected = {}  # plain grouping, first-seen order
    for row, colour in zip(rows, colours):
        expected.setdefault(row["prompt_id"], []).append((row["rank"], colour))
    assert [g.prompt for g in groups] == [f"prompt {pid}" for pid in expected]
    for g, members in zip(groups, expected.values()):
        assert g.ranking == [r for r, _ in members]
        assert [colour_of(im) for im in g.images] == [c for _, c in members]
    assert load_imagereward(first, image_root=str(tmp_path))[0].ranking == [2, 1]  # one file, as a string


# ---------------------------------------------------------------- HPDv2


def hpd_train_records(root, n):
    records = []
    for i in range(n):
        a, b = write_png(root, f"train/{i}_a.png", RED), write_png(root, f"train/{i}_b.png", GREEN)
        records.append({"prompt": f"prompt {i}", "file_path": [a, b], "human_preference": [i % 2, 1 - i % 2],
                        "user_hash": "x"})
    return records


def test_hpdv2_train_and_test(tmp_path):
    pairs = load_hpdv2(write_json(tmp_path / "train.json", hpd_train_records(tmp_path, 4)))
    assert [p.prompt for p in pairs] == [f"prompt {i}" for i in range(4)]
    for i, p in enumerate(pairs):  # human_preference [0, 1] -> image 1 preferred; [1, 0] -> image 0
        assert p.label == (0 if i % 2 else 1)
        assert [colour_of(im) for im in p.images] == [RED, GREEN]
        assert p.votes is None
    names = [write_png(tmp_path, f"test/{j}.png", c) for j, c in enumerate((RED, GREEN, BLUE))]
    groups = load_hpdv2(write_json(tmp_path / "test.json", [{"prompt": "p", "image_path": names, "rank": [2, 0, 1]}]))
    assert isinstance(groups[0], Group) and groups[0].ranking == [2, 0, 1]
    assert [colour_of(im) for im in groups[0].images] == [RED, GREEN, BLUE]


def test_hpdv2_rejects_mixed_layouts(tmp_path):
    records = hpd_train_records(tmp_path, 2)
    records.append({"prompt": "p", "image_path": records[0]["file_path"], "rank": [1, 2]})
    path = write_json(tmp_path / "train.json", records)
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=r"train\.json: record 2: field 'image_path'.*mixes"):
            load_hpdv2(path, skip_bad=skip_bad)


def test_hpdv2_fraction_is_a_fixed_random_subset(tmp_path):
    n = 50
    path = write_json(tmp_path / "train.json", hpd_train_records(tmp_path, n))
    full = [p.prompt for p in load_hpdv2(path)]
    for fraction in (0.16, 0.5, 0.33):
        a = [p.prompt for p in load_hpdv2(path, fraction=fraction, seed=3)]
        b = [p.prompt for p in load_hpdv2(path, fraction=fraction, seed=3)]
        c = [p.prompt for p in load_hpdv2(path, fraction=fraction, seed=4)]
        assert a == b and a != c
        assert len(a) == len(c) == round(fraction * n)
        assert a == [p for p in full if p in set(a)]  # a subset, in file order
        assert len(set(a)) == len(a)
    report = {}
    load_hpdv2(path, fraction=0.16, report=report)
    assert report["records"] == n and report["selected"] == report["pairs"] == 8
    assert subsample(n, 1.0, 0) == list(range(n))


# ---------------------------------------------------------------- Rapidata, Pick-a-Pic


VOTES = [(19, 2), (3, 18), (11, 11), (9, 13)]  # votes for (image1, image2) of 4 pairs; the third is a tie
# The newer convention's weighted shares of the same pairs (Rapidata weighs each vote by the voter's
# reliability, so a share is near, not equal to, the count's fraction) and the individual votes behind them.
SHARES = [(0.9127, 0.0873), (0.1391, 0.8609), (0.5, 0.5), (0.4236, 0.5764)]


def detailed_votes(v1, v2) -> str:
    """A `detailed_results_preference` cell: one JSON entry per vote, as Rapidata publishes it."""
    vote = lambda name, score: {"votedFor": name, "userDetails": {"country": "DE", "language": "en", "userScores":
                                                                 {"global": score}, "age": "25-34"}}
    return json.dumps([vote("a.png", 0.4 + 0.01 * i) for i in range(v1)] + [vote("b.png", 0.5) for _ in range(v2)])


def rapidata_table(convention, variant, tmp_path):
    rows = []
    for i, ((v1, v2), (s1, s2)) in enumerate(zip(VOTES, SHARES)):
        row = {"prompt": f"prompt {i}", "image1": rapidata_image(variant, RED, tmp_path, f"img/{i}_1.png"),
               "image2": rapidata_image(variant, BLUE, tmp_path, f"img/{i}_2.png"), "model1": "m1", "model2": "m2"}
        if convention == "counts":
            row.update(votes_image1=v1, votes_image2=v2)
        else:
            row.update(weighted_results_image1_preference=s1, weighted_results_image2_preference=s2,
                       detailed_results_preference=detailed_votes(v1, v2))
        rows.append(row)
    return rows


def rapidata_image(variant, colour, tmp_path, name):
    if variant == "bytes":
        return png_bytes(colour)
    if variant == "struct":
        return {"bytes": png_bytes(colour), "path": name}
    if variant == "struct_path":
        return {"bytes": None, "path": write_png(tmp_path, name, colour)}
    return write_png(tmp_path, name, colour)  # "path"


@pytest.mark.parametrize("convention", ["counts", "shares"])
@pytest.mark.parametrize("variant", ["bytes", "struct", "struct_path", "path"])
def test_rapidata(tmp_path, convention, variant):
    """Both published conventions give the same pairs, and votes whose winner's share and total mean the same."""
    rows = rapidata_table(convention, variant, tmp_path)
    half = (write_parquet(tmp_path / "train_0001.parquet", rows[:2]),
            write_parquet(tmp_path / "train_0002.parquet", rows[2:]))
    report = {}
    pairs = load_rapidata(list(half), image_root=str(tmp_path), report=report)
    expected = [("prompt 0", 0), ("prompt 1", 1), ("prompt 3", 1)]  # from VOTES, by hand; prompt 2 is a tie
    assert [(p.prompt, p.label) for p in pairs] == expected
    if convention == "counts":
        assert [p.votes for p in pairs] == [(19, 2), (3, 18), (9, 13)]
    else:  # shares times the number of individual votes: 21, 21, 22
        for p, (s1, s2), n in zip(pairs, (SHARES[0], SHARES[1], SHARES[3]), (21, 21, 22)):
            assert p.votes == pytest.approx((s1 * n, s2 * n))
    assert all([colour_of(im) for im in p.images] == [RED, BLUE] for p in pairs)
    assert report == {"records": 4, "pairs": 3, "ties": 1, "skipped": 0}
    again = load(f"rapidata:{half[0]},{half[1]}", image_root=str(tmp_path))
    assert [(p.prompt, p.label) for p in again] == expected
    from metrics import binarized, confident
    assert binarized(pairs) == [0, 1]  # winner >= 80% and > 15 votes: 19/2 and 3/18 (or .91 and .86 of 21)
    assert confident(pairs, min_votes=20) == [0, 1, 2]


def test_rapidata_shares_without_individual_votes(tmp_path, capsys):
    """Shares alone do not say how many people voted: the votes are unknown (None), never a share read as a count."""
    rows = rapidata_table("shares", "bytes", tmp_path)
    for r in rows:
        del r["detailed_results_preference"]
    pairs = load_rapidata(write_parquet(tmp_path / "s.parquet", rows))
    assert [p.label for p in pairs] == [0, 1, 1] and all(p.votes is None for p in pairs)
    assert "the number of votes is unknown" in capsys.readouterr().err


def test_rapidata_counts_in_share_columns_are_refused(tmp_path):
    rows = rapidata_table("shares", "bytes", tmp_path)
    rows[1].update(weighted_results_image1_preference=3.0, weighted_results_image2_preference=18.0)
    with pytest.raises(DataError, match=r"s\.parquet: record 1: field 'weighted_results_image1_preference/.*shares"):
        load_rapidata(write_parquet(tmp_path / "s.parquet", rows))


def test_rapidata_needs_vote_columns(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [{"prompt": "p", "image1": b"a", "image2": b"b", "votes": 1}])
    with pytest.raises(DataError, match=r"x\.parquet: expected vote columns votes_image1/votes_image2 or weighted"):
        load_rapidata(path)


def test_pickapic(tmp_path, capsys):
    labels = [1, 0, 0.5, 1.0, 0]
    rows = [{"caption": f"c{i}", "jpg_0": png_bytes(RED), "jpg_1": png_bytes(GREEN), "label_0": l, "label_1": 1 - l,
             "has_label": True} for i, l in enumerate(labels)]
    path = write_parquet(tmp_path / "train-0001.parquet", rows)
    report = {}
    pairs = load_pickapic([path], report=report)
    assert [(p.prompt, p.label) for p in pairs] == [("c0", 0), ("c1", 1), ("c3", 0), ("c4", 1)]  # c2 is a tie
    assert all([colour_of(im) for im in p.images] == [RED, GREEN] for p in pairs)
    assert report == {"records": 5, "pairs": 4, "ties": 1, "skipped": 0}
    assert "train-0001.parquet" in capsys.readouterr().err  # the tie is reported, not dropped silently
    assert [p.prompt for p in load(f"pickapic:{path}")] == [p.prompt for p in pairs]


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="reading parquet needs pyarrow: pip install pyarrow"):
        load_pickapic(str(tmp_path / "train.parquet"))


# ---------------------------------------------------------------- groups_to_pairs, load


def test_groups_to_pairs_by_hand():
    group = Group("p", ["a", "b", "c", "d"], [1, 2, 1, 3])
    # (a,b): a better -> 0; (a,c) tie; (a,d) -> 0; (b,c): c better -> 1; (b,d) -> 0; (c,d) -> 0
    expected = [(("a", "b"), 0), (("a", "d"), 0), (("b", "c"), 1), (("b", "d"), 0), (("c", "d"), 0)]
    pairs = groups_to_pairs([group, Group("q", ["x", "y"], [2, 2])])
    assert [(p.images, p.label) for p in pairs] == expected
    assert all(p.prompt == "p" for p in pairs)


def test_load_spec_errors():
    for spec in ("hpdv2", "nope:x.json", "hpdv2:", "hpdv2:a.json,b.json"):
        with pytest.raises(ValueError, match="dataset spec"):
            load(spec)


def test_toy_dataset_loads(tmp_path):
    out = toy.write_dataset(tmp_path, n_train=6, n_test=3, seed=1)
    pairs = load("hpdv2:" + str(out["train"]))
    groups = load_imagereward(out["test"], out["test_images"])
    assert len(pairs) == 6 and len(groups) == 3
    for p in pairs:  # the preferred image holds the colour the prompt names; the other does not
        named = np.array(toy.COLOURS[p.prompt.split()[1]])
        has = [(np.abs(np.asarray(load_image(im), dtype=int) - named).sum(-1) == 0).any() for im in p.images]
        assert has == [p.label == 0, p.label == 1]
    for g in groups:
        named = np.array(toy.COLOURS[g.prompt.split()[1]])
        has = [(np.abs(np.asarray(load_image(im), dtype=int) - named).sum(-1) == 0).any() for im in g.images]
        assert [r == 1 for r in g.ranking] == has


# ---------------------------------------------------------------- bad input


MISSING = object()


def imagereward_case(tmp_path, field, value):
    good = {"id": "0", "prompt": "good", "generations": [write_png(tmp_path, "g0.png", RED),
                                                         write_png(tmp_path, "g1.png", GREEN)], "ranking": [1, 2]}
    bad = {**good, "prompt": "bad", field: value}
    if value is MISSING:
        del bad[field]
    return lambda **kw: load_imagereward(write_json(tmp_path / "ir.json", [good, bad]), **kw), "ir.json"


def hpdv2_case(tmp_path, field, value):
    records = hpd_train_records(tmp_path, 2)
    records[1][field] = value
    return lambda **kw: load_hpdv2(write_json(tmp_path / "hpd.json", records), **kw), "hpd.json"


def parquet_case(loader, name, rows, field, value, **loader_kw):
    def run(tmp_path):
        rows[1][field] = value
        path = write_parquet(tmp_path / name, rows)
        return lambda **kw: loader(path, **loader_kw, **kw), name
    return run


def rapidata_rows():
    return [{"prompt": f"p{i}", "image1": png_bytes(RED), "image2": png_bytes(GREEN), "votes_image1": 3,
             "votes_image2": 1} for i in range(2)]


def rapidata_struct_rows():
    return [{**row, "image1": {"bytes": row["image1"], "path": "a.png"}} for row in rapidata_rows()]


def pickapic_rows():
    return [{"caption": f"p{i}", "jpg_0": png_bytes(RED), "jpg_1": png_bytes(GREEN), "label_0": 1.0} for i in range(2)]


def imagerewarddb_case(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "x", "image_path": write_png(tmp_path, "i0.png", RED), "rank": 1},
            {"prompt_id": "a", "prompt": "x", "image_path": "missing.png", "rank": 2}]
    path = write_parquet(tmp_path / "metadata-test.parquet", rows)
    return lambda **kw: load_imagereward(path, **kw), "metadata-test.parquet"


BAD_CASES = {  # name -> (make(tmp_path) -> (load, file name), field named in the error)
    "missing image file": (lambda t: imagereward_case(t, "generations", ["g0.png", "nowhere.png"]), "generations"),
    "missing field": (lambda t: imagereward_case(t, "prompt", MISSING), "prompt"),
    "wrong type": (lambda t: imagereward_case(t, "ranking", "1,2"), "ranking"),
    "ranking length": (lambda t: imagereward_case(t, "ranking", [1, 2, 3]), "ranking"),
    "empty prompt": (lambda t: imagereward_case(t, "prompt", "  "), "prompt"),
    "hpdv2 preference": (lambda t: hpdv2_case(t, "human_preference", [1, 1]), "human_preference"),
    "hpdv2 two images": (lambda t: hpdv2_case(t, "file_path", ["train/0_a.png"]), "file_path"),
    "hpdv2 missing image": (lambda t: hpdv2_case(t, "file_path", ["train/0_a.png", "gone.png"]), "file_path"),
    "rapidata votes": (parquet_case(load_rapidata, "r.parquet", rapidata_rows(), "votes_image2", -1.0), "votes_image2"),
    "rapidata image": (parquet_case(load_rapidata, "r.parquet", rapidata_struct_rows(), "image1",
                                    {"bytes": None, "path": "missing.png"}), "image1"),
    "pickapic label": (parquet_case(load_pickapic, "pp.parquet", pickapic_rows(), "label_0", 0.3), "label_0"),
    "pickapic caption": (parquet_case(load_pickapic, "pp.parquet", pickapic_rows(), "caption", ""), "caption"),
    "imagerewarddb image": (imagerewarddb_case, "image_path"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_names_file_record_and_field(tmp_path, capsys, case):
    make, field = BAD_CASES[case]
    run, name = make(tmp_path)
    with pytest.raises(DataError) as err:
        run()
    assert name in str(err.value) and "record 1" in str(err.value) and f"'{field}'" in str(err.value)
    report = {}
    kept = run(skip_bad=True, report=report)
    assert len(kept) == 1 and report["skipped"] == 1 and report["records"] == 2
    warning = capsys.readouterr().err
    assert name in warning and "1 bad records" in warning and "record 1" in warning


def test_invalid_json(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('[{"prompt": "a",\n "generations": [}]')
    with pytest.raises(DataError, match=r"test\.json: invalid JSON at line 2"):
        load_imagereward(str(path))


# ---------------------------------------------------------------- load_image


def roundtrip(image, fmt="PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def over_white(rgb, alpha):
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in rgb)


def test_load_image_modes():
    palette = Image.new("P", (2, 1))
    palette.putpalette(list(RED) + list(BLUE) + [0] * 762)
    palette.putdata([0, 1])
    out = load_image(roundtrip(palette))
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(2)] == [RED, BLUE]

    palette.info["transparency"] = 1  # index 1 fully transparent -> white
    out = load_image(roundtrip(palette, transparency=1))
    assert [out.getpixel((x, 0)) for x in range(2)] == [RED, WHITE]

    rgba = Image.new("RGBA", (1, 1), RED + (100,))
    got = load_image(roundtrip(rgba)).getpixel((0, 0))
    assert all(abs(g - e) <= 1 for g, e in zip(got, over_white(RED, 100)))

    la = Image.new("LA", (1, 1), (60, 200))
    got = load_image(roundtrip(la)).getpixel((0, 0))
    assert all(abs(g - e) <= 1 for g, e in zip(got, over_white((60, 60, 60), 200)))

    gray = load_image(roundtrip(Image.new("L", (1, 1), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)

    values = np.array([[0, 255, 4000, 65535]], dtype=np.uint16)
    deep = Image.fromarray(values)
    assert deep.mode == "I;16"
    for source in (deep, roundtrip(deep)):
        out = np.asarray(load_image(source))
        assert out.shape == (1, 4, 3) and (out[..., 0] == out[..., 2]).all()
        assert np.abs(out[0, :, 0].astype(int) - values[0] // 256).max() <= 1


def test_load_image_exif_rotation(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 2 rows, 4 columns
    pixels[0, 0] = RED
    pixels[1, 3] = BLUE
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation 6: shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = np.asarray(load_image(str(path)))
    assert out.shape == (4, 2, 3)
    assert (out == np.rot90(pixels, k=-1)).all()  # numpy's clockwise rotation, independent of PIL
    assert tuple(out[0, 1]) == RED  # the stored top-left is now top-right


def test_decompression_bomb_guard(monkeypatch):
    monkeypatch.setattr("images.MAX_IMAGE_PIXELS", 63)
    with pytest.raises(ValueError, match="8x8 pixels is over MAX_IMAGE_PIXELS=63"):
        load_image(png_bytes(RED))
    monkeypatch.setattr("images.MAX_IMAGE_PIXELS", 64)
    assert load_image(png_bytes(RED)).size == (8, 8)


# ---------------------------------------------------------------- ExampleStream


def numbered_pairs(n):
    return [Pair(f"p{i}", (f"a{i}", f"b{i}"), label=i % 2) for i in range(n)]


def test_pair_stream_shards_are_disjoint_and_cover():
    pairs, batch, world, seed = numbered_pairs(10), 2, 2, 7
    ranks = [ExampleStream(pairs, batch, rank=r, world_size=world, seed=seed) for r in range(world)]
    assert ranks[0].steps_per_epoch == 2  # 10 // 4; the last 2 of each epoch's order are dropped
    for epoch in range(3):
        order = list(range(10))
        random.Random(seed + epoch).shuffle(order)
        served = []
        for step in range(2):
            shards = [[p.prompt for p in next(s)] for s in ranks]
            assert not set(shards[0]) & set(shards[1])
            assert shards[0] + shards[1] == [f"p{i}" for i in order[4 * step:4 * step + 4]]
            served += shards[0] + shards[1]
        assert served == [f"p{i}" for i in order[:8]]


def test_pair_stream_exact_resume():
    pairs = numbered_pairs(11)
    reference = ExampleStream(pairs, 3, rank=1, world_size=2, seed=1)
    uninterrupted = [[p.prompt for p in next(reference)] for _ in range(9)]
    first = ExampleStream(pairs, 3, rank=1, world_size=2, seed=1)
    for _ in range(4):  # 11 // (3 * 2) = 1 step per epoch: this stops at the end of epoch 3
        next(first)
    state = first.state_dict()
    resumed = ExampleStream(pairs, 3, rank=1, world_size=2, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it would be saved in a checkpoint
    assert [[p.prompt for p in next(resumed)] for _ in range(5)] == uninterrupted[4:]
    mid = ExampleStream(numbered_pairs(40), 4, seed=2)
    straight = [[p.prompt for p in next(mid)] for _ in range(7)]
    again = ExampleStream(numbered_pairs(40), 4, seed=2)
    [next(again) for _ in range(3)]
    copy = ExampleStream(numbered_pairs(40), 4, seed=2)
    copy.load_state_dict(again.state_dict())  # mid-epoch: epoch 0, index 3 of 10
    assert again.state_dict() == {"epoch": 0, "index": 3, "replaced": 0}
    assert [[p.prompt for p in next(copy)] for _ in range(4)] == straight[3:]


def test_pair_stream_both_orders():
    """Each pair appears in both orders, side by side in the same rank's batch; an epoch covers every pair."""
    pairs = numbered_pairs(6)
    streams = [ExampleStream(pairs, 2, rank=r, world_size=2, both_orders=True, seed=0) for r in range(2)]
    epoch = [p for _ in range(3) for s in streams for p in next(s)]  # 3 steps x 2 ranks x 2 = 12 = 6 pairs x 2
    assert sorted(p.prompt for p in epoch) == sorted([p.prompt for p in pairs] * 2)
    for i in range(0, len(epoch), 2):
        a, b = epoch[i], epoch[i + 1]
        original = next(p for p in pairs if p.prompt == a.prompt)
        assert b.prompt == a.prompt and a.images == b.images[::-1] and a.label == 1 - b.label
        for p in (a, b):  # the label follows the preferred image
            assert p.images[p.label] == original.images[original.label]
    with pytest.raises(ValueError, match="even batch_size"):
        ExampleStream(pairs, 3, both_orders=True)


def test_pair_stream_too_few_examples():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ExampleStream(numbered_pairs(3), 2, world_size=2)


# ---------------------------------------------------------------- prompts and model inputs


@pytest.mark.parametrize("fmt", [PROMPT, PromptFormat(answers=("LEFT_WINS", "RIGHT_WINS"))])
def test_listener_prefix_excludes_the_answer(fmt):
    from reward import parse_completion
    reasoning = " The first image shows a red cat; the second a blue one. "
    for answer in fmt.answers:
        completion = fmt.completion(reasoning, answer)
        parsed, parsed_answer = parse_completion(completion, fmt)
        assert (parsed, parsed_answer) == (reasoning, answer)
        text = listener_prefix(parsed, fmt)
        assert completion == text + answer + fmt.answer_close  # everything before the answer, nothing after
        assert text.endswith(fmt.answer_open) and fmt.answer_close not in text
        if fmt is not PROMPT:  # distinctive answers: neither appears anywhere in what the listener reads
            assert not any(a in text for a in fmt.answers)


def test_processor_image_tokens():
    processor = Processor(toy.make_tokenizer(), toy.make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112))
    sizes = {"A": (56, 56), "B": (112, 56), "C": (84, 112)}  # (width, height), multiples of 28: no resize
    images = {k: png_bytes(RED, size) for k, size in sizes.items()}
    tokens = {k: (w // 14) * (h // 14) // 4 for k, (w, h) in sizes.items()}  # patches of 14, 2x2 merge
    rows = [("A", "B"), ("C", "A")]
    batch = processor.pairs([Pair("a red circle", (images[a], images[b]), 0) for a, b in rows])
    grid = batch["image_grid_thw"]
    assert (grid.prod(-1) // 4).tolist() == [tokens[k] for row in rows for k in row]
    ids, mm = batch["input_ids"], batch["mm_token_type_ids"]
    image_id = processor.image_token_id
    start, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    for b, row in enumerate(rows):
        seq = ids[b][batch["attention_mask"][b].bool()].tolist()
        runs, k = [], 0
        while k < len(seq):  # each image: <|vision_start|> then a run of image tokens then <|vision_end|>
            if seq[k] == start:
                j = k + 1
                while seq[j] == image_id:
                    j += 1
                assert seq[j] == end
                runs.append(j - k - 1)
                k = j
            k += 1
        assert runs == [tokens[key] for key in row]
        assert seq.count(image_id) == sum(runs)
        assert mm[b].tolist() == [int(t == image_id) for t in ids[b].tolist()]
    assert mm.sum().item() == sum(tokens[k] for row in rows for k in row)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    messages = reasoner_messages("a red circle")
    assert [c["type"] for c in messages[0]["content"]] == ["image", "image", "text"]


def test_to_rated_maps_ranks_onto_the_rating_scale():
    """Best rank -> R, worst -> 1, linear between; all tied -> the middle; a pair's winner R, loser 1."""
    from data import to_rated
    from prompt import Rated
    group = Group("p", ["a", "b", "c", "d", "e"], [1, 2, 3, 5, 3])
    assert [r.rating for r in to_rated([group], 5)] == [5, 4, 3, 1, 3]  # x = 1, 0.75, 0.5, 0, 0.5
    assert [r.rating for r in to_rated([Group("q", ["a", "b"], [2, 2])], 5)] == [3, 3]
    pair = Pair("r", ("x", "y"), label=1)
    assert to_rated([pair], 5) == [Rated("r", "x", 1), Rated("r", "y", 5)]
