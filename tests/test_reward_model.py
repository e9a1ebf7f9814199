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
