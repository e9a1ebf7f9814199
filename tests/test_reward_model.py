"""reward_model.py: the API gives `evaluate.py --prompt ... --images ...`'s scores for the same checkpoint and seed;
the batched call gives the per-prompt calls' scores, its batches holding comparisons of several prompts; bad
images are named; `reward_fn`, a generator's batch of rows grouped by prompt, gives score_batch's scores on those
groups, or each image's mean win rate over all its group's pairs; the JSONL batch mode resumes after a kill
without duplicating or losing a line, refuses to mix scorings, and 2 processes write what 1 writes.

Everything runs the tiny random toy model (a saved copy of it where a checkpoint directory is needed), with
rollouts of 6 tokens. Run: .venv/bin/python -m pytest -q tests/test_reward_model.py
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy
import pytest
import torch
from PIL import Image

import evaluate
import reward_model
from evaluate import compare_pairs
from formats.images import DataError
from formats.records import Pair
from infra import cli
from reward_model import RewardModel
from test_real_use import ROOT, run_script
from toy import world

OPTIONS = dict(k=2, both_orders=True, max_new_tokens=6, seed=3, batch_size=4)
FLAGS = ["--k=2", "--both_orders", "--max_new_tokens=6", "--seed=3", "--batch_size=4"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """The toy model and processor saved as a checkpoint directory (what train.py exports)."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("checkpoint")
    processor = evaluate.toy_processor()
    world.make_model(processor.tokenizer).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Five toy prompts of 2 to 4 images, the images saved as PNG files: [(prompt, [paths])]."""
    root, rng, out = tmp_path_factory.mktemp("images"), random.Random(0), []
    for g, n in enumerate([3, 2, 4, 3, 2]):
        prompt, images, _ = world.make_group(rng, n_images=n)
        paths = [str(root / f"{g}_{i}.png") for i in range(n)]
        for image, path in zip(images, paths):
            image.save(path)
        out.append((prompt, paths))
    return out


@pytest.fixture(scope="module")
def rm(checkpoint_dir):
    return RewardModel.from_pretrained(checkpoint_dir, **OPTIONS)


# ---------------------------------------------------------------- the API


def test_scores_equal_the_command_line(rm, checkpoint_dir, groups):
    """`score` on paths and on PIL images == `evaluate.py --model CKPT --prompt P --images ...` (rank_images,
    which `main` runs), exactly: the same comparisons, seeds and batches. Another seed gives other scores, so
    the equality is not one any seed would pass."""
    prompt, paths = groups[2]
    cfg = evaluate.parse_config(["--model", checkpoint_dir, "--prompt", prompt, "--images", *paths, *FLAGS])
    expected = evaluate.rank_images(cfg)
    assert rm.score(prompt, paths) == expected
    assert rm.score(prompt, [Image.open(p) for p in paths]) == expected
    assert rm.rank(prompt, paths) == sorted(range(len(paths)), key=lambda i: -expected[i])
    other = RewardModel(rm.model, rm.processor, **{**OPTIONS, "seed": 4})
    assert other.score(prompt, paths) != expected
    pair = rm.compare(prompt, paths[0], paths[1])  # seeded as the first comparison of score([a, b])
    assert pair.p_b == rm.score(prompt, paths[:2])[1] and len(pair.reasonings) == OPTIONS["k"]


def test_batched_equals_per_prompt(rm, groups, monkeypatch):
    """`score_batch` over five prompts == `score` prompt by prompt: the same rollouts (texts) and p(b) to 1e-5
    (left padding differs between batches). The sampler is called with full batches of 4 rows holding
    comparisons of several prompts: 9 comparisons shown in both orders are 18 rows, 5 batches, where prompt by
    prompt takes 6 sampler calls."""
    rows, sample = [], evaluate.sample

    def counting_sample(model, batch, **kwargs):
        rows.append(batch["input_ids"].shape[0])
        return sample(model, batch, **kwargs)

    monkeypatch.setattr(evaluate, "sample", counting_sample)
    batched = rm.compare_groups(groups)
    assert rows == [4, 4, 4, 4, 2]
    rows.clear()
    alone = [rm.compare_groups([g])[0] for g in groups]
    assert rows == [4, 2, 4, 2, 4, 2]
    for together, one in zip(batched, alone):
        assert [c.texts for c in together] == [c.texts for c in one]
        assert [c.reversed.texts for c in together] == [c.reversed.texts for c in one]
        assert [c.p_b for c in together] == pytest.approx([c.p_b for c in one], abs=1e-5)
    scores = rm.score_batch(groups)
    for together, one in zip(scores, [rm.score(*g) for g in groups]):
        assert together == pytest.approx(one, abs=1e-5)
    assert [s[0] for s in scores] == [0.5] * len(groups)  # the anchor


def test_tensor_images_score_as_the_saved_images(rm, groups):
    """A (G, 3, H, W) float tensor in [0, 1] (a diffusion pipeline's output) scores as its PNG files do."""
    prompt, paths = groups[0]
    pixels = torch.stack([torch.from_numpy(numpy.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) / 255
                          for p in paths])  # (G, 3, H, W)
    assert rm.score(prompt, pixels) == rm.score(prompt, paths)
    with pytest.raises(DataError, match=r"prompt 0: image 0: .*values in \[0, 1\]"):
        rm.score(prompt, pixels * 2 - 1)


def test_errors_name_the_prompt_and_the_image(rm, groups, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    batch = [groups[0], (groups[1][0], [groups[1][1][0], str(bad)])]
    with pytest.raises(DataError, match=r"prompt 1: image 1: image .*bad\.png: not an image file"):
        rm.score_batch(batch)
    with pytest.raises(DataError, match=r"prompt 0: image 0: .*missing\.png: does not exist"):
        rm.score(groups[0][0], [str(tmp_path / "missing.png"), groups[0][1][0]])
    with pytest.raises(TypeError, match="prompt 0: image 1: expected a path, PIL image, bytes"):
        rm.score(groups[0][0], [groups[0][1][0], 3])
    with pytest.raises(ValueError, match="prompt 0: 1 image"):
        rm.score(groups[0][0], groups[0][1][:1])


@pytest.mark.parametrize("options, words", [
    ({"temperature": float("nan")}, "temperature=nan: expected a finite number"),
    ({"top_p": 0}, "top_p=0: expected a number > 0.0"),
    ({"top_p": 1.5}, "top_p=1.5: expected a number <= 1.0"),
    ({"k": 0}, "k=0: expected a number >= 1"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens=0: expected a number >= 1"),
    ({"decode": "fast"}, "decode='fast': expected one of reference, static, compiled"),
    ({"min_pixels": 4000, "max_pixels": 3000}, "min_pixels=4000: expected at most --max_pixels=3000"),
    ({"k": True}, "k=True: expected an int, not a bool"),
    ({"max_new_tokens": 6.5}, "max_new_tokens=6.5: expected an int, got float"),
    ({"both_orders": "yes"}, "both_orders='yes': expected true or false"),
    ({"dtype": "bf16"}, "dtype='bf16': expected a torch dtype"),
    ({"device": "gpu"}, "device='gpu': expected a torch device"),
    ({"temprature": 0.5}, "unknown option 'temprature': expected one of k, both_orders"),
])
def test_the_api_checks_its_options_as_the_command_line_does_before_loading(checkpoint_dir, groups, tmp_path,
                                                                          monkeypatch, capsys, options, words):
    """from_pretrained refuses, before any weight loads, what the command line refuses, by the same declared checks
    (NaN, top_p=0, ...: the command line's message, option for option), and what only the API can get wrong (a bool
    for an int, a misspelt option, a dtype name)."""
    monkeypatch.setattr(evaluate, "load_reasoner", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        RewardModel.from_pretrained(checkpoint_dir, **options)
    name, _, allowed = words.partition(": expected ")
    if words.startswith(("temperature", "top_p", "k=0", "max_prompt", "decode", "min_pixels")):  # also a flag
        source = write_input(tmp_path / "in.jsonl", groups)
        with pytest.raises(SystemExit):
            cli.parse(reward_model.Config, ["--input", source, "--out", str(tmp_path / "out.jsonl"),
                                            "--model", checkpoint_dir, *(f"--{k}={v}" for k, v in options.items())])
        err = capsys.readouterr().err
        assert f"--{name.partition('=')[0]}=" in err and f" is not allowed: expected {allowed}" in err, err


def test_the_images_argument_is_checked_not_iterated(rm, groups, monkeypatch):
    """`score(prompt, None)` and `score(prompt, "a.png")` (a path is not a list: it iterated the path's characters)
    and a single (3, H, W) tensor are refused naming the prompt and what is expected; no forward runs."""
    monkeypatch.setattr(reward_model, "compare_pairs", lambda *a, **k: pytest.fail("a forward ran"))
    prompt, paths = groups[0]
    for images, words in ((None, "got NoneType"), (paths[0], f"got str {paths[0][:60]!r}: one image? pass a list"),
                          (torch.rand(3, 8, 8), "got Tensor of shape (3, 8, 8): one image?"), (7, "got int")):
        with pytest.raises(TypeError, match="prompt 0: expected the images as a list .*" + re.escape(words)):
            rm.score(prompt, images)
    with pytest.raises(TypeError, match=r"prompt 1: expected the images as a list"):
        rm.score_batch([groups[0], (prompt, None)])


@pytest.mark.parametrize("case", ["one NaN pixel", "all NaN", "an infinity", "no pixels", "int64", "aspect ratio",
                                  "PIL aspect ratio"])
def test_tensor_images_get_the_checks_files_get(rm, groups, monkeypatch, case):
    """A broken VAE output is refused, naming the prompt and the image, never scored: NaN (which passed the range
    check: every comparison with NaN is false, so one all-NaN image scored 0.513), infinity, a tensor of no pixels (a
    reduction error), another dtype, and a shape the image processor would refuse (a transformers error naming no
    image): the aspect-ratio limit files have, for tensors and PIL images alike."""
    monkeypatch.setattr(reward_model, "compare_pairs", lambda *a, **k: pytest.fail("a forward ran"))
    prompt, paths = groups[1]
    good = torch.rand(3, 56, 56)
    bad, words = {
        "one NaN pixel": (good.clone().index_put_((torch.tensor(1), torch.tensor(7), torch.tensor(9)),
                                                  torch.tensor(float("nan"))),
                          "holds 1 non-finite values (NaN or infinity), the first at channel 1, row 7, column 9"),
        "all NaN": (torch.full((3, 56, 56), float("nan")), "holds 9408 non-finite values"),
        "an infinity": (good.clone().index_fill_(2, torch.tensor([3]), float("inf")), "non-finite values"),
        "no pixels": (torch.rand(3, 0, 56), "a tensor image of shape (3, 0, 56) has no pixels"),
        "int64": ((good * 255).long(), "must be floats in [0, 1] or uint8, got torch.int64"),
        "aspect ratio": (torch.rand(3, 2, 500), "500x2 pixels: the aspect ratio is over MAX_ASPECT_RATIO"),
        "PIL aspect ratio": (Image.new("RGB", (3, 700)), "3x700 pixels: the aspect ratio is over MAX_ASPECT_RATIO"),
    }[case]
    with pytest.raises(DataError, match=r"prompt 0: image 1: .*" + re.escape(words)):
        rm.score(prompt, [paths[0], bad])


def test_a_prompt_over_the_limit_is_refused_before_any_forward(rm, groups, monkeypatch):
    """One limit, max_prompt_tokens (1024 by default, as evaluate.py --prompt), on every call that reads a prompt:
    a 9,001-token prompt (which the model's context would not hold) and a 1.3-million-character one (which ran for
    minutes) are refused in about a second, naming the prompt; in a batch, before any prompt is scored."""
    monkeypatch.setattr(reward_model, "compare_pairs", lambda *a, **k: pytest.fail("a forward ran"))
    (prompt, paths), long = groups[0], "a red circle " * 3000  # 9,001 tokens
    for call in (lambda: rm.score(long, paths), lambda: rm.compare(long, *paths[:2]),
                 lambda: rm.score_batch([groups[1], (long, paths)])):
        with pytest.raises(DataError, match=r"(prompt [01]|compare): expected a prompt of at most 1024 tokens "
                                            r"\(--max_prompt_tokens\), got 9001 tokens"):
            call()
    t = time.time()
    with pytest.raises(DataError, match="got 300001 tokens"):
        rm.score("a red circle " * 100_000, paths)
    assert time.time() - t < 30


# ---------------------------------------------------------------- the reward function of a generator's training loop


def batch_rows(groups, order):
    """The groups' images as one generator batch, rows in `order` (indices into the flat list of images):
    (prompts, (N, 3, H, W) floats in [0, 1], the image paths), all three in that row order."""
    flat = [(prompt, path) for prompt, paths in groups for path in paths]
    prompts, paths = [flat[i][0] for i in order], [flat[i][1] for i in order]
    pixels = torch.stack([torch.from_numpy(numpy.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) / 255
                          for p in paths])  # (N, 3, H, W)
    return prompts, pixels, paths


def by_prompt(prompts, items):
    """[(prompt, its items in row order)], prompts in order of first appearance: the grouping written plainly."""
    seen = []
    for p in prompts:
        if p not in seen:
            seen.append(p)
    return [(p, [item for q, item in zip(prompts, items) if q == p]) for p in seen]


def test_reward_fn_equals_score_batch_on_its_groups(rm, groups, monkeypatch):
    """The callable on the 14 images of five prompts (two alike: one group of 7), rows shuffled: each row's score
    is score_batch's on the groups made here by prompt in row order (the first row of each its anchor),
    exactly (the same batches). A uint8 (N, H, W, 3) array and a list of PIL images score the same; a prompt
    with one image scores 0.5 with a note; the comparisons run in inference mode, the scores come out a plain
    float32 tensor; the reasonings are those score_batch's comparisons read."""
    order = torch.randperm(14, generator=torch.Generator().manual_seed(0)).tolist()
    prompts, pixels, paths = batch_rows(groups, order)
    expected_groups = by_prompt(prompts, paths)
    assert len(expected_groups) == 4 and order != sorted(order)
    modes, sample = [], evaluate.sample

    def watching_sample(model, batch, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return sample(model, batch, **kwargs)

    monkeypatch.setattr(evaluate, "sample", watching_sample)
    scores, info = rm.reward_fn(reasonings=True)(images=pixels, prompts=prompts, metadata=[{}] * 14)
    assert modes and all(modes)
    monkeypatch.setattr(evaluate, "sample", sample)
    expected = dict(zip(paths, [None] * 14))
    for (prompt, group_paths), group_scores in zip(expected_groups, rm.score_batch(expected_groups)):
        expected.update(zip(group_paths, group_scores))
    assert scores.dtype == torch.float32 and scores.device == pixels.device and not scores.is_inference()
    assert torch.equal(scores, torch.tensor([expected[p] for p in paths], dtype=torch.float32))
    assert [g["prompt"] for g in info["groups"]] == [p for p, _ in expected_groups] and info["notes"] == []
    for group in info["groups"]:
        assert scores[group["rows"][0]] == 0.5 and {prompts[r] for r in group["rows"]} == {group["prompt"]}
        assert group["ranking"] == sorted(group["rows"], key=lambda r: -expected[paths[r]])
    compared = rm.compare_groups(expected_groups[:1])[0]
    assert [c["reasonings"] for c in info["groups"][0]["comparisons"]] == [c.reasonings for c in compared]
    assert [c["rows"] for c in info["groups"][0]["comparisons"]] == [(info["groups"][0]["rows"][0], r)
                                                                     for r in info["groups"][0]["rows"][1:]]
    array = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    assert torch.equal(rm.reward_fn()(array, prompts)[0], scores)
    (prompt, three), lone = groups[0], groups[1][1][0]
    alone, notes = rm.reward_fn()([Image.open(p) for p in three + [lone]], [prompt] * 3 + ["lone"])
    assert torch.equal(alone, torch.tensor(rm.score(prompt, three) + [0.5], dtype=torch.float32))
    assert notes["notes"] == ["row 3 is the only image of its prompt 'lone': it scores 0.5, with nothing to compare "
                              "it with"]
    with pytest.raises(ValueError, match="reward_fn: 14 images need 14 prompts, one per image, got 13"):
        rm.reward_fn()(pixels, prompts[:13])


def test_group_scores_by_hand():
    """Anchor scores (eq. (4)) and mean win rates, from p(b beats a) of the compared pairs, counted by hand."""
    from reward_model import compared, group_scores
    assert compared(3, 1, "anchor") == [(1, 0), (1, 2)] and compared(3, 1, "pairs") == [(0, 1), (0, 2), (1, 2)]
    assert group_scores(3, 1, "anchor", [0.2, 0.9]) == [0.2, 0.5, 0.9]
    # image 0 wins (0, 1) with 1 - 0.8 and (0, 2) with 1 - 0.4; image 1 wins (0, 1) with 0.8 and (1, 2) with 1 - 0.3
    assert group_scores(3, 0, "pairs", [0.8, 0.4, 0.3]) == pytest.approx([(0.2 + 0.6) / 2, (0.8 + 0.7) / 2,
                                                                          (0.4 + 0.3) / 2])


def test_reward_fn_pairs_mode_is_each_images_mean_win_rate(rm, groups, monkeypatch):
    """mode="pairs": G (G - 1) comparisons per prompt (the sampler's rows counted: 6 + 2 + 42 + 2 = 52 for groups
    of 3, 2, 7 and 2 images; k rollouts each), and each image's score its mean probability of beating each other
    image of its prompt, every pair recomputed here alone in both orders (to 1e-5: batches differ)."""
    prompts, pixels, paths = batch_rows(groups, list(range(14)))
    rows, sample = [], evaluate.sample

    def counting_sample(model, batch, **kwargs):
        rows.append(batch["input_ids"].shape[0])
        return sample(model, batch, **kwargs)

    monkeypatch.setattr(evaluate, "sample", counting_sample)
    scores, info = rm.reward_fn(mode="pairs")(pixels, prompts)
    assert sum(rows) == sum(len(g) * (len(g) - 1) for _, g in by_prompt(prompts, paths)) == 52
    monkeypatch.setattr(evaluate, "sample", sample)
    options = dict(k=rm.k, both_orders=True, **rm.sampling)
    for group in info["groups"]:
        images, beats = [Image.open(paths[r]) for r in group["rows"]], {}
        for n, (i, j) in enumerate((i, j) for i in range(len(images)) for j in range(i + 1, len(images))):
            p = compare_pairs(rm.model, rm.processor, [Pair(group["prompt"], (images[i], images[j]), 0)],
                              keys=[(rm.seed, n)], **options)[0].p_b  # image j beats image i
            beats[i, j], beats[j, i] = p, 1 - p
        G = len(images)
        win_rates = [sum(beats[j, i] for j in range(G) if j != i) / (G - 1) for i in range(G)]
        assert scores[group["rows"]].tolist() == pytest.approx(win_rates, abs=1e-5)


def test_reward_fn_checks_its_rows_as_score_does_before_any_forward(rm, groups, monkeypatch):
    """A generator's batch gets `score`'s checks, naming the row: a NaN pixel in one row of 14 (a broken VAE
    decode), an infinity in a float (N, H, W, 3) array, rows of no pixels, and a prompt over max_prompt_tokens,
    that of a lone image included (it is never compared, yet it is read); none of them reaches a forward."""
    monkeypatch.setattr(reward_model, "compare_pairs", lambda *a, **k: pytest.fail("a forward ran"))
    prompts, pixels, _ = batch_rows(groups, list(range(14)))
    broken = pixels.clone()
    broken[5, 2, 10, 11] = float("nan")
    with pytest.raises(DataError, match=r"reward_fn: images\[5\]: a tensor image holds 1 non-finite values \(NaN or "
                                        r"infinity\), the first at channel 2, row 10, column 11"):
        rm.reward_fn()(broken, prompts)
    array = pixels.permute(0, 2, 3, 1).numpy().copy()  # (N, H, W, 3) float32
    array[8, 3, 4, 0] = float("inf")
    with pytest.raises(DataError, match=r"reward_fn: images\[8\]: .* non-finite values"):
        rm.reward_fn(mode="pairs")(array, prompts)
    with pytest.raises(DataError, match=r"reward_fn: images\[0\]: a tensor image of shape \(3, 0, 56\) has no "
                                        r"pixels"):
        rm.reward_fn()(torch.rand(2, 3, 0, 56), prompts[:2])
    long = prompts[:13] + ["a red circle " * 3000]  # 9,001 tokens, the only prompt of row 13
    with pytest.raises(DataError, match=r"reward_fn: prompts\[13\]: expected a prompt of at most 1024 tokens "
                                        r"\(--max_prompt_tokens\), got 9001 tokens"):
        rm.reward_fn()(pixels, long)
    with pytest.raises(TypeError, match="reward_fn: expected the images as a .* got NoneType"):
        rm.reward_fn()(None, prompts)


def test_the_prompt_format_is_checked_with_the_other_options_before_loading(checkpoint_dir, rm, tmp_path,
                                                                            monkeypatch):
    """prompt_format, a file or a PromptFormat, goes through check_options with every other option: a file that
    does not read, or answers the checkpoint's tokenizer writes as several tokens, is refused by from_pretrained
    before any weight loads, and by RewardModel() itself against the tokenizer it is given."""
    from prompt import PromptFormat
    monkeypatch.setattr(evaluate, "load_reasoner", lambda *a, **k: pytest.fail("the model was loaded"))
    words = PromptFormat(answers=("first image", "B"))
    (tmp_path / "words.json").write_text(json.dumps({"answers": ["first image", "B"]}))
    (tmp_path / "cut.json").write_text('{"answers": ["A", ')
    for given in (words, str(tmp_path / "words.json"), tmp_path / "words.json"):
        with pytest.raises(ValueError, match=r"prompt_format=.*: expected answers and ratings that are one token each "
                                             r"of --model's tokenizer .*answer 'first image' is not exactly one token"):
            RewardModel.from_pretrained(checkpoint_dir, prompt_format=given)
    with pytest.raises(ValueError, match=r"prompt_format=.*cut.json': expected a JSON file of prompt.PromptFormat's "
                                         r"fields \(.*cut.json: not a readable JSON file"):
        RewardModel.from_pretrained(checkpoint_dir, prompt_format=str(tmp_path / "cut.json"))
    with pytest.raises(ValueError, match="prompt_format=7: expected a str, got int"):
        RewardModel.from_pretrained(checkpoint_dir, prompt_format=7)
    with pytest.raises(ValueError, match="one token each of the model's tokenizer: answer 'first image'"):
        RewardModel(rm.model, rm.processor, prompt_format=words)


# ---------------------------------------------------------------- the JSONL batch mode


def write_input(path, groups):
    path.write_text("".join(json.dumps({"id": f"g{i}", "prompt": p, "images": im}) + "\n" for i, (p, im) in enumerate(groups)))
    return str(path)


def rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def same_rows(a, b):
    """Equal in every field but the scores, which agree to 1e-5 (batches differ)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "scores"} == {k: v for k, v in y.items() if k != "scores"}
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)


@pytest.fixture(scope="module")
def scored(checkpoint_dir, groups, tmp_path_factory):
    """The five prompts scored in one uninterrupted run, with the reasonings: (input, output)."""
    root = tmp_path_factory.mktemp("jsonl")
    source, out = write_input(root / "in.jsonl", groups), str(root / "full.jsonl")
    reward_model.main(["--model", checkpoint_dir, "--input", source, "--out", out, "--reasonings", *FLAGS])
    return source, out


def test_jsonl_lines_are_the_api_scores(rm, scored, groups):
    """One line per input line, in order: its fields, the API's scores, the ranking, the reasonings as shown."""
    source, out = scored
    written = rows(out)
    assert [r["id"] for r in written] == [f"g{i}" for i in range(5)]
    for row, group in zip(written, groups):
        assert row["scores"] == pytest.approx(rm.score(*group), abs=1e-5)
        assert row["ranking"] == sorted(range(len(group[1])), key=lambda i: -row["scores"][i])
        compared = rm.compare_groups([group])[0]
        assert row["reasonings"] == [None] + [c.reasonings for c in compared]
        assert row["reasonings_reversed"] == [None] + [c.reversed.reasonings for c in compared]


def test_jsonl_resumes_after_a_kill(checkpoint_dir, groups, scored, tmp_path, capsys):
    """A run killed while writing line 3 (two lines whole, half of the third): the rerun keeps lines 1-2 as they
    are, drops the partial line and writes lines 3-5, which equal the uninterrupted run's, whatever the batch
    size, also from an options file older than --prompt_format; a rerun on a finished file changes nothing; other
    scoring options or another input are refused."""
    source, full = scored
    out = tmp_path / "out.jsonl"
    lines = open(full).read().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:len(lines[2]) // 2])
    options = json.loads(open(full + ".options.json").read())
    del options["prompt_format"]  # as written before the option existed: it resumes at its default
    open(str(out) + ".options.json", "w").write(json.dumps(options))
    args = ["--model", checkpoint_dir, "--input", source, "--out", str(out), "--reasonings", *FLAGS]
    reward_model.main(args + ["--batch_size=2"])  # the batch size is not a scoring option
    assert "dropping a partial last line" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith(lines[0] + lines[1])
    same_rows(rows(out), rows(full))
    reward_model.main(args)
    assert out.read_text() == text
    with pytest.raises(SystemExit, match="--k: 2 -> 3"):
        reward_model.main(args + ["--k=3"])
    other = write_input(tmp_path / "other.jsonl", [("another prompt", json.loads(lines[0])["images"])] + groups[1:])
    with pytest.raises(SystemExit, match="line 1 scores .* but line 1 of .*other.jsonl is 'another prompt'"):
        reward_model.main(["--model", checkpoint_dir, "--input", other, "--out", str(out), "--reasonings", *FLAGS])
    assert out.read_text() == text


def test_jsonl_bad_lines(checkpoint_dir, groups, tmp_path):
    """A bad record stops the run before the model loads, naming its line; an unreadable image stops it naming
    line and image, or with --skip_bad gives that line an error and null scores, the others their scores."""
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "p", "images": ["a.png"]}) + "\n")
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(SystemExit, match=r"in.jsonl: line 1: \"images\" must be a list of at least 2"):
        reward_model.main(["--input", str(source), "--out", out])
    source = write_input(tmp_path / "in.jsonl", [groups[1], (groups[0][0], [groups[0][1][0], str(bad)])])
    with pytest.raises(SystemExit, match=r"in.jsonl: line 2: image 1: image .*bad\.png: not an image file"):
        reward_model.main(["--model", checkpoint_dir, "--input", source, "--out", out, *FLAGS])
    assert rows(out) == []  # nothing of the failed write was written
    reward_model.main(["--model", checkpoint_dir, "--input", source, "--out", out, "--skip_bad", *FLAGS])
    first, second = rows(out)
    assert first["scores"] == pytest.approx(RewardModel.from_pretrained(checkpoint_dir, **OPTIONS).score(*groups[1]),
                                            abs=1e-5)
    assert second["scores"] is None and "line 2: image 1" in second["error"]


def test_jsonl_two_processes_write_what_one_writes(checkpoint_dir, scored, tmp_path):
    """torchrun x2: each process scores every other line of each write, rank 0 writes them all in input order;
    the file equals the one-process run's (texts, reasonings, rankings equal; scores to 1e-5)."""
    source, full = scored
    out = tmp_path / "two.jsonl"
    run = run_script(["reward_model.py", "--model", checkpoint_dir, "--input", source, "--out", str(out),
                      "--reasonings", *FLAGS[:-1], "--batch_size=2"], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    same_rows(rows(out), rows(full))


def test_jsonl_resumes_after_a_real_kill(rm, checkpoint_dir, groups, tmp_path):
    """SIGKILL a run as soon as it has written a line (it may be writing the next one): the rerun keeps the
    lines that were whole, and the file ends with all 12 lines in order, each with the API's scores."""
    many = [groups[i % len(groups)] for i in range(12)]
    source, out = write_input(tmp_path / "in.jsonl", many), tmp_path / "out.jsonl"
    args = ["--model", checkpoint_dir, "--input", source, "--out", str(out), *FLAGS[:-1], "--batch_size=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    run = subprocess.Popen([sys.executable, "reward_model.py", *args], cwd=ROOT,
                           env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while run.poll() is None and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    at_kill = out.read_text()
    whole = at_kill[:at_kill.rfind("\n") + 1]
    if at_kill.count("\n") == len(many):
        pytest.fail("the run finished before it was killed: nothing was tested")
    again = run_script(["reward_model.py", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text().startswith(whole)
    written = rows(out)
    assert [r["id"] for r in written] == [f"g{i}" for i in range(len(many))]
    for row, scores in zip(written, rm.score_batch(many)):
        assert row["scores"] == pytest.approx(scores, abs=1e-5)


def test_jsonl_lines_that_cannot_be_read_are_named_before_the_model_loads(checkpoint_dir, groups, tmp_path,
                                                                          monkeypatch):
    """A line that is not UTF-8 (a UnicodeDecodeError "position 530" named no line), JSON nested too deep (a
    RecursionError), or a prompt over --max_prompt_tokens: the run stops naming the file and the line before the
    model loads; an options file beside --out that cannot be read is named too."""
    monkeypatch.setattr(RewardModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    source, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    good = (json.dumps({"prompt": groups[0][0], "images": groups[0][1]}) + "\n").encode()
    for line, words in ((b'{"prompt": "caf\xe9", "images": ["a.png", "b.png"]}', "line 2: not UTF-8 text (byte 15)"),
                        (b"[" * 100_000, "line 2: not JSON (or nested too deep)"),
                        (json.dumps({"prompt": "a red circle " * 3000, "images": groups[0][1]}).encode(),
                         "line 2: expected a prompt of at most 1024 tokens (--max_prompt_tokens), got 9001 tokens")):
        source.write_bytes(good + line + b"\n")
        with pytest.raises(SystemExit, match=re.escape(f"reward_model.py: error: {source}: {words}")):
            reward_model.main(["--model", checkpoint_dir, "--input", str(source), "--out", out, *FLAGS])
    source.write_bytes(good)
    (tmp_path / "scores.jsonl").write_text("{}\n")
    (tmp_path / "scores.jsonl.options.json").write_text("[" * 100_000)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'scores.jsonl.options.json'}: unreadable "
                                                   f"(RecursionError")):
        reward_model.main(["--model", checkpoint_dir, "--input", str(source), "--out", str(tmp_path / "scores.jsonl")])


def test_jsonl_skip_bad_gives_a_long_prompt_its_error(checkpoint_dir, groups, tmp_path):
    """With --skip_bad a line whose prompt is over --max_prompt_tokens is written with its "error" and null scores,
    as a line with an unreadable image is; the other lines are scored."""
    source = write_input(tmp_path / "in.jsonl", [groups[1], ("a red circle " * 50, groups[0][1])])
    out = str(tmp_path / "out.jsonl")
    reward_model.main(["--model", checkpoint_dir, "--input", source, "--out", out, "--skip_bad",
                       "--max_prompt_tokens=100", *FLAGS])
    first, second = rows(out)
    assert first["scores"] is not None and second["scores"] is None
    assert "line 2: expected a prompt of at most 100 tokens (--max_prompt_tokens), got 151 tokens" in second["error"]
