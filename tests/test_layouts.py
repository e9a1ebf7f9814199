"""Tests for formats/layouts.py: each dataset's published layout (ImageReward, HPDv2, Rapidata, Pick-a-Pic), written out
in small files here, read back and checked, and bad records refused with the file, record and field named.

Images are real PNG files (tests/pictures.py), each one a solid colour, so the test can tell which image a
loader put where by opening it. Expected records and pairs are computed by plain loops in the tests.

Run: .venv/bin/python -m pytest -q tests/test_layouts.py
"""
import json
import os
import re
import sys

import pytest

from data import load
from formats.images import DataError
from formats.layouts import load_hpdv2, load_imagereward, load_pickapic, load_rapidata, read_exclude, subsample
from pictures import BLUE, GREEN, RED, WHITE, colour_of, png_bytes, write_png
from formats.records import Group


# ---------------------------------------------------------------- helpers


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
    from report.metrics import binarized, confident
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


# ---------------------------------------------------------------- duplicates, files that are not what they claim


def test_imagereward_duplicated_id_is_refused_naming_both_records(tmp_path):
    """A test.json whose records 0 and 2 share an `id` (a record pasted twice): refused, naming both; with skip_bad
    the later one is left out and counted, so its pairs are not counted twice."""
    names = [write_png(tmp_path, f"{j}.png", c) for j, c in enumerate((RED, GREEN, BLUE))]
    records = [{"id": "000001", "prompt": "a red cat", "generations": names[:2], "ranking": [1, 2]},
               {"id": "000002", "prompt": "a blue dog", "generations": names[1:], "ranking": [2, 1]},
               {"id": "000001", "prompt": "a red cat", "generations": names[:2], "ranking": [1, 2]}]
    path = write_json(tmp_path / "test.json", records)
    with pytest.raises(DataError) as err:
        load_imagereward(path)
    assert str(err.value).startswith(f"{path}: record 2: field 'id': expected an id no other record has (record 0 "
                                     f"has it too"), str(err.value)
    assert err.value.field == "id" and err.value.problem == "duplicate"
    report = {}
    groups = load_imagereward(path, skip_bad=True, report=report)
    assert [g.prompt for g in groups] == ["a red cat", "a blue dog"] and report["skipped"] == 1


def test_imagerewarddb_duplicated_row_is_refused(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "x", "image_path": write_png(tmp_path, "0.png", RED), "rank": 1},
            {"prompt_id": "a", "prompt": "x", "image_path": write_png(tmp_path, "1.png", GREEN), "rank": 2},
            {"prompt_id": "a", "prompt": "x", "image_path": "0.png", "rank": 1}]
    path = write_parquet(tmp_path / "metadata-test.parquet", rows)
    with pytest.raises(DataError, match=r"metadata-test\.parquet: record 2: field 'image_path': expected an image not "
                                        r"already in prompt_id 'a''s group \(row 0 of .*metadata-test\.parquet"):
        load_imagereward(path)
    assert [g.ranking for g in load_imagereward(path, skip_bad=True)] == [[1, 2]]


@pytest.mark.parametrize("kind", ["pickapic", "rapidata"])
def test_a_file_that_is_not_parquet_is_named(tmp_path, kind):
    """Of two files given, the one that is not parquet (a JSON file renamed, a truncated download) is named."""
    rows = [{"caption": "c", "prompt": "c", "jpg_0": png_bytes(RED), "jpg_1": png_bytes(GREEN), "label_0": 1,
             "image1": png_bytes(RED), "image2": png_bytes(GREEN), "votes_image1": 2, "votes_image2": 1}]
    good = write_parquet(tmp_path / "good.parquet", rows)
    renamed = tmp_path / "bad.parquet"
    renamed.write_text('[{"caption": "not parquet"}]')
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(open(good, "rb").read()[:100])
    for bad in (renamed, truncated):
        with pytest.raises(DataError, match=f"^{bad}: not a parquet file .*the file starts with") as err:
            load(f"{kind}:{good},{bad}")
        assert err.value.problem == "not parquet"


@pytest.mark.parametrize("case", ["missing", "a folder", "nested too deep", "not UTF-8"])
def test_a_json_file_that_cannot_be_read_is_named(tmp_path, case):
    """A dataset's JSON file that is missing, a folder, nested 100,000 deep (Python's parser stops at about 1,000
    levels with a RecursionError naming no file) or not UTF-8: a DataError naming the file, from every JSON
    layout and from the file `--exclude` reads."""
    path = tmp_path / "test.json"
    if case == "a folder":
        path.mkdir()
    elif case == "nested too deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "not UTF-8":
        path.write_bytes(b'[{"prompt": "caf\xe9"}]')
    words = {"missing": "cannot be read as a JSON file (FileNotFoundError", "a folder": "(IsADirectoryError",
             "nested too deep": "JSON nested too deep to read", "not UTF-8": "not UTF-8 text: byte 16"}[case]
    for spec in (f"imagereward:{path}", f"hpdv2:{path}"):
        with pytest.raises(DataError, match=f"^{path}: .*" + re.escape(words)):
            load(spec)
    with pytest.raises(DataError, match=f"^{path}: "):
        load(f"hpdv2:{write_json(tmp_path / 'train.json', [])}", exclude=str(path))


def test_an_exclude_line_that_is_not_an_entry_is_named(tmp_path):
    path = tmp_path / "bad_records.jsonl"
    for line, words in ((b'{"file": "caf\xe9", "record": 1}', "UnicodeDecodeError"), (b"[" * 5000, "RecursionError"),
                        (b'{"file": "a.json"}', "KeyError")):
        path.write_bytes(b'{"file": "a.json", "record": 0}\n' + line + b"\n")
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: line 2: expected .*{words}"):
            read_exclude(path)


def test_a_parquet_spec_that_matches_no_file_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty'}: no parquet files there"):
        load(f"rapidata:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match=f"^{tmp_path}/\\*\\.parquet: matches no file"):
        load(f"pickapic:{tmp_path}/*.parquet")
