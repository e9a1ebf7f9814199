"""Tests for evaluate.py and report/ (metrics, judge): metrics against hand counts, scoring against its
definition, the CLI end to end.

The metrics are checked on hand-made groups, pairs and votes whose answers are counted by hand in the
comments. Scoring runs the tiny random toy model: `score_group` is counted (prefill rows, pairs sampled), the
two-order average is checked for symmetry, the judge's verdicts are recomputed one unpadded forward at a time,
and every dataset layout is written to small files here, evaluated through `main`, and its reported accuracy
recomputed from the written rollouts with plain loops.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import io
import json
import math
import os
import random
from itertools import combinations

import pytest
import torch
from PIL import Image


import evaluate
from report import metrics
import sample
from toy import world as toy
from formats.records import Group, Pair
from prompt import PROMPT
from fast.static_decode import StaticDecoder
from test_sample import sharpened
from evaluate import Comparison, compare, compare_pairs, majority, mean_at, score_group, vote_share
from report.judge import contradiction_rate, judge_margins, judge_verdicts
from report.metrics import (accuracy_by_agreement, accuracy_by_bin, binarized, confident, expected_calibration_error,
                            pair_accuracy, pairwise_accuracy, score_distance)
from listener import Listener, answer_probs, reasoning_of

FAST = dict(max_new_tokens=6, batch_size=8)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    processor = evaluate.toy_processor()
    model = toy.make_model(processor.tokenizer)
    rng = random.Random(0)
    prompt, images, _ = toy.make_group(rng, n_images=4)
    return model, processor, prompt, images


# ---------------------------------------------------------------- metrics by hand


def test_pairwise_accuracy_micro_macro_by_hand():
    groups = [
        Group("A", list("abcd"), [1, 2, 2, 3]),  # (1, 2) human tie: 5 pairs, all ordered right -> 5/5
        Group("B", list("abc"), [2, 1, 3]),  # (0, 1) predicted tie, (0, 2), (1, 2) reversed -> 0/3
        Group("C", list("ab"), [1, 1]),  # only a human tie: no pair, not a prompt
        Group("D", list("ab"), [1, 2]),  # reversed -> 0/1
    ]
    scores = [[0.9, 0.5, 0.5, 0.1], [0.3, 0.3, 0.8], [0.2, 0.7], [0.2, 0.7]]
    result = pairwise_accuracy(groups, scores)
    assert result["pairs"] == 9 and result["prompts"] == 3
    assert result["micro"] == pytest.approx(5 / 9)  # (5 + 0 + 0) / (5 + 3 + 1)
    assert result["macro"] == pytest.approx((1 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="group 1"):
        pairwise_accuracy(groups[:2], [[0.1] * 4, [0.1] * 2])


def test_pair_accuracy_counts_half_as_wrong():
    pairs = [Pair("p", ("a", "b"), label) for label in (1, 0, 1, 0, 1)]
    assert pair_accuracy(pairs, [0.9, 0.2, 0.4, 0.6, 0.5]) == pytest.approx(2 / 5)  # right, right, wrong x3


VOTES = [(9, 1), (17, 3), (16, 4), (3, 13), (12, 4), (2, 14), (8, 0), (15, 0), (11, 9), (30, 0)]
# winner's share: .9 .85 .8 .8125 .75 .875 1 1 .55 1;  total: 10 20 20 16 16 16 8 15 20 30


def vote_pairs():
    return [Pair("p", ("a", "b"), int(v[1] > v[0]), v) for v in VOTES]


def test_binarized_selects_hand_counted_pairs():
    # share >= 0.8 and total > 15: (17,3) (16,4) (3,13) (2,14) (30,0); not (9,1) total 10, (12,4) share .75,
    # (8,0) total 8, (15,0) total 15 (not > 15), (11,9) share .55
    assert binarized(vote_pairs()) == [1, 2, 3, 5, 9]


def test_confident_subset_by_hand():
    # at least 20 votes: indices 1 (.85), 2 (.8), 8 (.55), 9 (1.0); most confident first
    assert confident(vote_pairs(), min_votes=20) == [9, 1, 2, 8]
    assert confident(vote_pairs(), min_votes=20, top=2) == [9, 1]


def test_accuracy_by_agreement_by_hand():
    pairs = vote_pairs()
    assert [p.label for p in pairs] == [0, 0, 0, 1, 0, 1, 0, 0, 0, 0]  # image 1 won (3,13) and (2,14)
    p = [0.2, 0.7, 0.1, 0.9, 0.5, 0.8, 0.6, 0.4, 0.3, 0.45]
    # right: 0 2 3 5 7 8 9; wrong: 1, 4 (0.5 is wrong), 6
    rows = accuracy_by_agreement(pairs, p, thresholds=(50, 80, 85, 100))
    # >= 50: all; >= 80: not 4 (.75), 8 (.55); >= 85: 0 1 5 6 7 9; 100: 6 7 9
    assert [r["pairs"] for r in rows] == [10, 8, 6, 3]
    assert [r["accuracy"] for r in rows] == pytest.approx([7 / 10, 6 / 8, 4 / 6, 2 / 3])


def test_ece_by_hand():
    probs, labels = [0.9, 0.8, 0.3, 0.55, 0.5], [1, 0, 0, 1, 1]
    # confidence .9 .8 .7 .55 .5; right 1 0 1 1 0 (0.5 is wrong)
    # 10 bins: {.9}: |1 - .9|, {.8}: |0 - .8|, {.7}: |1 - .7|, {.55, .5}: |.5 - .525| x 2
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.1 + 0.8 + 0.3 + 2 * 0.025) / 5)
    # 2 bins: all in [0.5, 1]: |3/5 - 3.45/5|
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(0.6 - 0.69))


def test_distance_bins_by_hand():
    reasoner = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    listener = torch.tensor([[0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    d = score_distance(reasoner, listener)
    assert d.tolist() == pytest.approx([0.0, math.sqrt(0.8 ** 2 * 2), math.sqrt(2)])
    bins = accuracy_by_bin(d.tolist(), [True, False, True], bins=2)  # [0, .707), [.707, 1.414]
    assert [b["n"] for b in bins] == [1, 2] and bins[1]["accuracy"] == 0.5


def test_mean_at_and_majority():
    assert mean_at([0.2, 0.6, 1.0], 2) == pytest.approx(0.4)
    assert vote_share([1, None, 0, 1]) == pytest.approx(2 / 3)  # unreadable answers do not vote
    assert majority([1, None, 0, 1]) == 1 and majority([0, 1]) is None and majority([None]) is None


# ---------------------------------------------------------------- scoring with the toy model


def test_score_group_makes_n_minus_1_comparisons(world, monkeypatch):
    model, processor, prompt, images = world
    prefill_rows, sampled, scored = [], [], []
    real_prefill, real_sample, real_probs = sample.prefill, evaluate.sample, evaluate.answer_probs

    def counting_prefill(model, batch):
        prefill_rows.append(batch["input_ids"].shape[0])
        return real_prefill(model, batch)

    def counting_sample(model, batch, **kw):
        sampled.append(batch["input_ids"].shape[0])
        return real_sample(model, batch, **kw)

    def recording_probs(model, processor, pairs, reasonings, fmt=PROMPT):
        out = real_probs(model, processor, pairs, reasonings, fmt=fmt)
        scored.append((list(pairs), [list(r) for r in reasonings], out))
        return out

    monkeypatch.setattr(sample, "prefill", counting_prefill)
    monkeypatch.setattr(evaluate, "sample", counting_sample)
    monkeypatch.setattr(evaluate, "answer_probs", recording_probs)
    n, anchor, k = len(images), 2, 2
    scores = score_group(model, processor, prompt, images, k=k, anchor=anchor, **FAST)

    assert sampled == [n - 1] and len(scored) == 1  # one batch of n - 1 comparisons, sampled and then scored
    assert sum(prefill_rows) == 2 * (n - 1)  # n - 1 prompts prefilled for sampling, n - 1 for reading answers
    pairs, reasonings, probs = scored[0]
    others = [i for i in range(n) if i != anchor]
    assert [p.images for p in pairs] == [(images[anchor], images[i]) for i in others]
    assert all(len(r) == k for r in reasonings)
    assert scores[anchor] == 0.5 and len(scores) == n
    for row, i in enumerate(others):  # image i scores its Mean@k probability of beating the anchor
        assert scores[i] == pytest.approx(sum(probs[row, g, 1].item() for g in range(k)) / k)


def test_compare_reads_each_rollouts_reasoning(world):
    model, processor, prompt, images = world
    result = compare(model, processor, prompt, images[0], images[1], k=3, seed=3, **FAST)
    assert len(result.texts) == len(result.probs) == len(result.answers) == 3
    pair = Pair(prompt, (images[0], images[1]), 0)
    for text, p in zip(result.texts, result.probs):  # each rollout on its own: eq. (4) given its reasoning
        alone = answer_probs(model, processor, [pair], [[reasoning_of(text)]])[0, 0]  # (2,)
        assert p == pytest.approx(alone[1].item(), abs=1e-5)
    assert result.p_b == pytest.approx(sum(result.probs) / 3)


@pytest.mark.parametrize("no_thinking", [False, True])
def test_both_orders_is_symmetric(world, no_thinking):
    model, processor, prompt, images = world
    kw = dict(k=1, both_orders=True, no_thinking=no_thinking, temperature=0.0, **FAST)  # greedy: deterministic
    ab = compare(model, processor, prompt, images[0], images[1], **kw)
    ba = compare(model, processor, prompt, images[1], images[0], **kw)
    assert ba.p_b == pytest.approx(1 - ab.p_b, abs=1e-5)
    assert ab.p_b == pytest.approx((ab.probs[0] + 1 - ab.reversed.probs[0]) / 2)
    assert ab.reversed.probs == pytest.approx(ba.probs, abs=1e-5)  # (b, a) is the same comparison either way


def test_no_thinking_reads_the_fixed_sentence(world, monkeypatch):
    model, processor, prompt, images = world
    monkeypatch.setattr(evaluate, "sample", lambda *a, **k: pytest.fail("no_thinking must not sample"))
    pairs = [Pair(prompt, (images[0], images[i]), 0) for i in (1, 2)]
    results = compare_pairs(model, processor, pairs, k=3, no_thinking=True)
    expected = answer_probs(model, processor, pairs, [["I have finished thinking."]] * 2)[:, 0, 1]  # (B,)
    assert [r.p_b for r in results] == pytest.approx(expected.tolist(), abs=1e-6)


def test_static_decode_gives_the_reference_comparisons(world):
    """--decode=static (rollouts on `StaticDecoder`'s static cache, each prompt's keys stored once) gives the
    comparisons of the reference decode: the same rollouts and the same p(b) read at their answer slots, over
    batches of two pairs and one. The model attends sharply (`sharpened`), so that a wrong position or a wrong
    cache column would change the numbers."""
    _, processor, prompt, images = world
    model = sharpened(toy.make_model(processor.tokenizer, seed=2))
    decoder = evaluate.sampling_args(evaluate.Config(decode="static"), "cpu")["decoder"]
    assert isinstance(decoder, StaticDecoder) and not decoder.compile
    assert evaluate.sampling_args(evaluate.Config(), "cpu")["decoder"] is None  # the default: the reference
    pairs = [Pair(prompt, (images[0], images[i]), 0) for i in (1, 2, 3)]
    run = lambda d: compare_pairs(model, processor, pairs, k=3, keys=[(0,), (1,), (2,)], decoder=d,
                                  max_new_tokens=12, batch_size=2)
    reference, static = run(None), run(decoder)
    assert len({t for r in reference for t in r.texts}) > 3, "identical rollouts would make this test weak"
    for r, s in zip(reference, static):
        assert s.texts == r.texts and s.answers == r.answers
        assert s.probs == pytest.approx(r.probs, abs=1e-5)


def test_disagreement_against_direct_listener_scores(world):
    model, processor, prompt, images = world
    p = evaluate.dataset_pairs([Group(prompt, images, [1, 2, 2, 1])], anchor=0, seed=0)  # labelled: images 1 and 2
    results = compare_pairs(model, processor, p.compared, k=2, seed=0, **FAST)
    same = evaluate.disagreement_metrics(Listener(model, processor), p, results, 2)  # the reasoner as its own listener
    assert same["bins"][0]["n"] == 4 and same["mean_distance"] < 1e-5
    other = toy.make_model(processor.tokenizer, seed=1)
    out = evaluate.disagreement_metrics(Listener(other, processor), p, results, 2)
    expected = []
    for i in p.labelled:  # ||(1 - q_l, q_l) - (1 - q_r, q_r)|| = sqrt(2) |q_l - q_r|, each rollout on its own
        for reasoning, q_r in zip(results[i].reasonings, results[i].probs):
            q_l = answer_probs(other, processor, [p.compared[i]], [[reasoning]])[0, 0, 1].item()
            expected.append(math.sqrt(2) * abs(q_l - q_r))
    assert p.labelled == [0, 1] and out["mean_distance"] == pytest.approx(sum(expected) / 4, abs=1e-5)


# ---------------------------------------------------------------- the contradiction judge


def test_contradiction_rate_against_plain_loop():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = evaluate.toy_processor().tokenizer
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3)
    judge = Qwen2ForCausalLM(config).eval()
    reasonings = ["The first image is red.", "", "The second image is blue. It is a circle. " * 3, "red",
                  "It is a square.", "The first image is green."]
    answers = ["1", "2", "2", "1", "2", "1"]
    system = ("You are an expert factual verifier. Determine whether the model's final answer contradicts its "
              "reasoning. Reply with the single word YES if it contradicts, otherwise NO. Answer only YES or NO.")
    yes, no = tokenizer.encode("YES")[0], tokenizer.encode("NO")[0]
    margins = []
    for r, a in zip(reasonings, answers):  # one unpadded forward per item
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Reasoning:\n{r.strip()}\n\nFinal answer: {a}"}]
        ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = judge(input_ids=ids).logits[0, -1]
        margins.append((logits[yes] - logits[no]).item())
    expected = [m > 0 for m in margins]
    assert True in expected and False in expected  # the check below can tell the items apart

    rows = []
    judge.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    assert contradiction_rate(judge, tokenizer, reasonings, answers, batch_size=1) == pytest.approx(
        sum(expected) / len(expected))
    assert rows == [1] * len(reasonings)  # called once per item
    rows.clear()
    assert judge_margins(judge, tokenizer, reasonings, answers, batch_size=4) == pytest.approx(margins, abs=1e-4)
    assert rows == [4, 2]  # left-padded batches
    assert judge_verdicts(judge, tokenizer, reasonings, answers, batch_size=4) == expected


def test_contradiction_metrics_judges_each_well_formed_rollout():
    good = [f"<think>{r}</think>\n<answer>{a}</answer>" for r, a in (("red", "1"), ("blue", "2"), ("x", "2"))]
    results = [Comparison(0.5, [0.5] * 2, [good[0], "no tags"], ["", ""], [0, None], 0),
               Comparison(0.5, [0.5] * 2, [good[1], good[2]], ["", ""], [1, 1], 1),
               Comparison(0.5, [0.5], [good[0]], [""], [0], 0)]
    cfg = evaluate.Config(judge="toy", judge_batch_size=2)
    out = evaluate.contradiction_metrics("toy", results, [0, 1], cfg)  # pair 2 is outside the subset
    assert out["judged"] == 3
    judge, tokenizer = evaluate.load_judge("toy")
    expected = contradiction_rate(judge, tokenizer, ["red", "blue", "x"], [
        "1 (the first image)", "2 (the second image)", "2 (the second image)"])
    assert out["rate"] == pytest.approx(expected)


# ---------------------------------------------------------------- end to end, every layout


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def toy_pairs(n, seed):
    """n toy prompts with two images each: (prompt, images, toy ranking)."""
    rng = random.Random(seed)
    return [toy.make_group(rng, n_images=2) for _ in range(n)]


def write_hpdv2_test(root):
    records = []
    rng = random.Random(1)
    for i, ranks in enumerate([[1, 2, 3], [2, 1, 1], [1, 1]]):  # the last is all tie: no pair
        prompt, images, _ = toy.make_group(rng, n_images=len(ranks))
        names = [f"test/{i}_{j}.png" for j in range(len(images))]
        for name, image in zip(names, images):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / name)
        records.append({"prompt": prompt, "image_path": names, "rank": ranks})
    (root / "test.json").write_text(json.dumps(records))
    return f"hpdv2:{root / 'test.json'}", [str(root)]


RAPIDATA_VOTES = [(17, 3), (2, 14), (12, 9), (9, 1), (25, 5), (4, 16)]  # all different: no tie


def write_rapidata(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = toy_pairs(len(RAPIDATA_VOTES), 2)
    table = pa.table({"prompt": [p for p, _, _ in rows], "image1": [png_bytes(im[0]) for _, im, _ in rows],
                      "image2": [png_bytes(im[1]) for _, im, _ in rows],
                      "votes_image1": [v[0] for v in RAPIDATA_VOTES], "votes_image2": [v[1] for v in RAPIDATA_VOTES]})
    pq.write_table(table, root / "rapidata.parquet")
    return f"rapidata:{root / 'rapidata.parquet'}", []


def write_pickapic(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = toy_pairs(4, 3)
    table = pa.table({"caption": [p for p, _, _ in rows], "jpg_0": [png_bytes(im[0]) for _, im, _ in rows],
                      "jpg_1": [png_bytes(im[1]) for _, im, _ in rows], "label_0": [1.0, 0.0, 0.5, 0.0]})
    pq.write_table(table, root / "pickapic.parquet")
    return f"pickapic:{root / 'pickapic.parquet'}", []


def rollout_rows(out):
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def check_group_accuracy(report, rows, groups, key_of, k):
    """Pairwise micro accuracy recomputed from rollouts.jsonl: rebuild each group's anchor scores, plain loops.

    `groups`: (image keys, ranking) per prompt in file order; `key_of(path)` maps a written path to its key.
    """
    for j in range(1, k + 1):
        right = total = start = 0
        for names, ranking in groups:
            n = len(names)
            block, start = rows[start:start + n - 1], start + n - 1
            anchors = {key_of(r["images"][0]) for r in block}
            assert len(anchors) == 1  # every comparison of a prompt is against the same anchor
            scores = [None] * n
            anchor = names.index(anchors.pop())
            scores[anchor] = 0.5
            for r in block:
                i = names.index(key_of(r["images"][1]))
                scores[i] = sum(r["probs"][:j]) / j
                assert r["labelled"] == (ranking[i] != ranking[anchor])  # people did not tie them
                assert r["label"] == int(ranking[i] < ranking[anchor])  # 1: the image beat the anchor
            for a, b in combinations(range(n), 2):
                if ranking[a] != ranking[b]:
                    total += 1
                    right += scores[a] != scores[b] and (scores[a] > scores[b]) == (ranking[a] < ranking[b])
        assert start == len(rows)
        assert report["accuracy"][f"mean@{j}"]["micro"] == pytest.approx(right / total)


def right_count(rows, j):
    return sum(sum(r["probs"][:j]) / j != 0.5 and (sum(r["probs"][:j]) / j > 0.5) == (r["label"] == 1) for r in rows)


def check_pair_accuracy(report, rows, k):
    for j in range(1, k + 1):
        assert report["accuracy"][f"mean@{j}"]["accuracy"] == pytest.approx(right_count(rows, j) / len(rows))


def check_files(out, figures):
    assert (out / "results.md").read_text().startswith("# ")
    for name in figures:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def imagereward_groups(tmp_path):
    """The toy ImageReward test set `--model toy` writes for itself (same seed), as (keys, ranking)."""
    paths = toy.write_dataset(tmp_path / "again", n_train=0, n_test=3, seed=0)
    records = json.loads(paths["test"].read_text())
    return [(r["generations"], r["ranking"]) for r in records], lambda p: p.split("/imagereward/", 1)[1]


def hpdv2_groups(tmp_path):
    records = json.loads((tmp_path / "test.json").read_text())
    return [(r["image_path"], r["rank"]) for r in records], lambda p: os.path.relpath(p, tmp_path)


@pytest.mark.parametrize("layout", ["imagereward", "hpdv2", "rapidata", "pickapic"])
def test_end_to_end(layout, tmp_path):
    k, out = 2, tmp_path / "out"
    argv = ["--k", str(k), "--max-new-tokens", "6", "--out", str(out)]
    if layout == "imagereward":  # --model toy without --data writes the toy ImageReward test set itself
        argv += ["--toy-prompts", "3", "--both-orders", "--listener", "toy"]
    else:
        writer = {"hpdv2": write_hpdv2_test, "rapidata": write_rapidata, "pickapic": write_pickapic}[layout]
        spec, images = writer(tmp_path)
        argv += ["--data", spec] + (["--images"] + images if images else [])
    if layout == "rapidata":
        argv += ["--no-thinking", "--judge", "toy", "--min-votes", "20"]
    evaluate.main(argv)
    report, rows = json.loads((out / "results.json").read_text()), rollout_rows(out)
    assert len(rows) == report["comparisons"] and all(len(r["probs"]) == k for r in rows)
    figures = ["figure4_rollouts.png"]
    if layout in ("imagereward", "hpdv2"):
        groups, key_of = (imagereward_groups if layout == "imagereward" else hpdv2_groups)(tmp_path)
        check_group_accuracy(report, rows, groups, key_of, k)
    else:
        check_pair_accuracy(report, rows, k)
    if layout == "imagereward":
        assert all("reversed" in r for r in rows)
        for r in rows:  # both orders: p(b) averaged with 1 - p(a) of the pair shown the other way round
            assert r["p_b"] == pytest.approx((sum(r["probs"]) / k + 1 - sum(r["reversed"]["probs"]) / k) / 2)
        assert sum(b["n"] for b in report["disagreement"]["bins"]) == k * sum(r["labelled"] for r in rows)
        figures.append("figure2_disagreement.png")
    if layout == "hpdv2":  # groups of 3, 3 and 2 images: 2 + 2 + 1 anchor comparisons; pairs 3 + 2 + 0
        assert report["comparisons"] == 5 and report["accuracy"]["mean@1"]["pairs"] == 5
    if layout == "pickapic":
        assert [r["label"] for r in rows] == [0, 1, 1]  # label_0 = 1, 0, (0.5 tie left out), 0
    if layout == "rapidata":
        assert [r["label"] for r in rows] == [int(v[1] > v[0]) for v in RAPIDATA_VOTES]
        # binarized by hand: (17,3) .85/20, (2,14) .875/16, (25,5) .83/30, (4,16) .8/20; not (12,9), (9,1)
        assert report["binarized"]["mean@1"]["pairs"] == 4
        assert [r["pairs"] for r in report["by_agreement"]["mean@2"]] == [
            sum(max(v) / sum(v) >= t / 100 for v in RAPIDATA_VOTES) for t in range(50, 101, 5)]
        confident_rows = [r for r in rows if sum(r["votes"]) >= 20]  # 17/3, 12/9, 25/5, 4/16
        table5 = report["no_thinking"]
        assert {v["pairs"] for v in table5.values()} == {4}
        assert table5["w/ thinking, Mean@1"]["accuracy"] == pytest.approx(right_count(confident_rows, 1) / 4)
        assert report["contradiction"]["judged"] == sum(a is not None for r in confident_rows for a in r["answers"])
        assert "## Table 5" in (out / "results.md").read_text()
        figures.append("figure3_agreement.png")
    check_files(out, figures)


def test_reward_model_cli(world, tmp_path, capsys):
    _, _, prompt, images = world
    paths = []
    for i, image in enumerate(images[:3]):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    evaluate.main(["--prompt", prompt, "--images", *paths, "--max-new-tokens", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [float(line.split()[0]) for line in lines[:3]]
    assert [line.split()[1] for line in lines[:3]] == paths and scores[0] == 0.5  # image 0 is the anchor
    assert lines[3] == f"best: {paths[max(range(3), key=scores.__getitem__)]}"
