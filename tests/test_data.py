"""Tests for data.py: pairs from ranked groups, dataset specs, the toy dataset, and `ExampleStream` (disjoint
shards that cover the data, exact resume, both orders). Expected pairs and shards come from plain loops.

Run: .venv/bin/python -m pytest -q tests/test_data.py
"""
import json
import random

import numpy as np
import pytest

from toy import world as toy
from data import ExampleStream, groups_to_pairs, load
from formats.images import load_image
from formats.layouts import load_imagereward
from formats.records import Group, Pair


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
