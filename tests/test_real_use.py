"""Real use, as the README's "Real use" commands run it, on the real-layout checkpoint (tests/real_layout.py)
and on datasets written here in their published layouts: which pairs training and its held-out set see,
then train.py and evaluate.py launched the way users launch them (the reward-model use of evaluate.py through
its `main` in this process).
"""
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

import data
import launching
import train
from infra import trainer
from formats.records import Pair, Rated
from prompt import PROMPT, score_messages

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(200, 40, 40), (40, 160, 60), (50, 80, 220), (230, 200, 40), (120, 60, 160), (40, 170, 170),
           (240, 130, 30), (90, 90, 90), (250, 250, 250)]


def write_imagereward(root: Path, prompts: int, per_group: int = 9) -> Path:
    """ImageReward's test.json layout, each group's images listed best first (ranking 1..n): a rank-sorted file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(COLOURS[:per_group]):
        Image.new("RGB", (28, 28), c).save(root / "images" / f"{i}.png")
    records = [{"id": f"g{g}", "prompt": f"prompt {g}", "generations": [f"images/{i}.png" for i in range(per_group)],
                "ranking": list(range(1, per_group + 1))} for g in range(prompts)]
    (root / "test.json").write_text(json.dumps(records))
    return root / "test.json"


def test_heldout_pairs_are_a_seeded_sample_spread_over_prompts(tmp_path):
    """Not the first pairs of the file: 64 held-out pairs come from 32 prompts (2 each), in random order with
    labels near half and half, though the file lists every group's images best first."""
    path = write_imagereward(tmp_path, prompts=32)
    cfg = train.Config(mode="grpo", model="toy", eval_data=f"imagereward:{path}", eval_pairs=64, seed=0)
    heldout = trainer.heldout_examples(cfg)
    assert len(heldout) == 64
    per_prompt = [sum(p.prompt == f"prompt {g}" for p in heldout) for g in range(32)]
    assert per_prompt == [2] * 32
    labels = [p.label for p in heldout]
    assert 0.35 <= statistics.fmean(labels) <= 0.65
    assert [p.prompt for p in heldout[:32]] != [f"prompt {g}" for g in range(32)]  # prompts in a random order
    again = trainer.heldout_examples(cfg)
    assert [(p.prompt, p.images, p.label) for p in again] == [(p.prompt, p.images, p.label) for p in heldout]
    other = trainer.heldout_examples(train.Config(**{**cfg.__dict__, "seed": 1}))
    assert [(p.prompt, p.images) for p in other] != [(p.prompt, p.images) for p in heldout]


def test_training_pairs_come_in_random_orders(tmp_path):
    """Position bias: the file's order puts the better image first in every pair; training sees each pair in
    a seeded random order, the label following the images."""
    path = write_imagereward(tmp_path, prompts=8)
    cfg = train.Config(mode="grpo", model="toy", seed=0)
    pairs = trainer.load_examples(f"imagereward:{path}", "", cfg, train=True)
    plain = data.groups_to_pairs(data.load(f"imagereward:{path}"))
    assert statistics.fmean(p.label for p in plain) == 0.0  # what the file order alone would teach
    assert len(pairs) == len(plain) == 8 * 36
    assert 0.4 <= statistics.fmean(p.label for p in pairs) <= 0.6
    for p, q in zip(pairs, plain):  # the same pair, in one order or the other, the label following the images
        assert (p.images, p.label) in ((q.images, q.label), (q.images[::-1], 1 - q.label))


# ---------------------------------------------------------------- evaluate.py: processes, bad input, outputs


def run_script(args, nproc=1, timeout=900):
    """python SCRIPT ... (one process) or torchrun --standalone --nproc_per_node=N SCRIPT ... (gloo on CPU)."""
    cmd = launching.command(ROOT / args[0], args[1:], nproc)
    return launching.run(cmd, ROOT, launching.environment(), timeout=timeout)


def rollouts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def test_evaluate_two_processes_equal_one(tmp_path):
    """torchrun x2 splits the comparisons; with per-pair seeds every rollout, probability and metric equals the
    one-process run's, whatever the batch size."""
    common = ["evaluate.py", "--k=2", "--both-orders", "--max-new-tokens=8", "--toy-prompts=3"]
    one = run_script(common + [f"--out={tmp_path / 'one'}", "--batch-size=4"])
    two = run_script(common + [f"--out={tmp_path / 'two'}", "--batch-size=3"], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = rollouts(tmp_path / "one"), rollouts(tmp_path / "two")
    # 3 prompts of 3 to 5 images, one comparison against the anchor for each other image
    assert len(a) == len(b) and 3 * 2 <= len(a) <= 3 * 4
    for x, y in zip(a, b):
        assert x["texts"] == y["texts"] and x["reversed"]["texts"] == y["reversed"]["texts"]
        assert x["probs"] == pytest.approx(y["probs"], abs=1e-5)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert ra["accuracy"] == rb["accuracy"] and ra["comparisons"] == rb["comparisons"]


def test_evaluate_bad_groups_and_anchor(tmp_path, capsys):
    """One-image groups are left out and counted; --anchor beyond the smallest group is named; no NaN in JSON."""
    import evaluate
    records = [{"id": "a", "prompt": "one image", "generations": ["images/0.png"], "ranking": [1]},
               {"id": "b", "prompt": "three images", "generations": [f"images/{i}.png" for i in range(3)],
                "ranking": [1, 1, 1]}]  # all tied: no labelled pair, so the accuracies are undefined
    write_imagereward(tmp_path, prompts=1, per_group=3)
    (tmp_path / "test.json").write_text(json.dumps(records))
    argv = ["--data", f"imagereward:{tmp_path / 'test.json'}", "--images", str(tmp_path), "--max-new-tokens=2"]
    with pytest.raises(SystemExit, match="--anchor=3.*below 3.*three images"):
        evaluate.main(argv + ["--anchor=3"])
    evaluate.main(argv + ["--anchor=0", f"--out={tmp_path / 'out'}"])
    assert "1 of 2 groups have fewer than two images" in capsys.readouterr().err
    text = (tmp_path / "out" / "results.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert report["comparisons"] == 2 and report["accuracy"]["mean@1"]["accuracy"] is None


def test_rating_logits_equal_a_full_forward():
    """eq. (3)'s inputs: the rating logits read over a shared prefill equal those of one plain forward pass over
    the rating prompt + `<think>reasoning</think>\\n<answer>` for each reasoning."""
    import torch
    import evaluate
    from toy import world as toy
    processor = toy.make_processor()
    model = toy.make_model(processor.tokenizer, seed=0)
    record = Rated("a red circle", Image.new("RGB", (56, 56), (200, 40, 40)), 0)
    reasonings = ["it is red", "a circle, and red too"]
    logits = evaluate.rating_logits(model, processor, [record], [reasonings])  # (1, 2, R)
    ids = [processor.tokenizer.convert_tokens_to_ids(r) for r in PROMPT.ratings]
    for g, reasoning in enumerate(reasonings):
        batch = processor([score_messages(record.prompt)], [[record.image]],
                          suffixes=[PROMPT.answer_prefix(reasoning)])
        with torch.no_grad():
            full = model(**batch).logits[0, -1, ids]  # (R,)
        assert torch.allclose(logits[0, g], full, atol=1e-4)


def test_absolute_scores_rank_groups_by_expected_rating(tmp_path):
    """evaluate.py --scoring absolute: results.json's accuracy equals the pairwise accuracy of the expected
    ratings in ratings.jsonl, counted here by hand over each group's pairs (ranking 1..4: no ties)."""
    from itertools import combinations
    path = write_imagereward(tmp_path, prompts=2, per_group=4)
    run = run_script(["evaluate.py", "--scoring=absolute", "--k=2", "--max-new-tokens=6", f"--data=imagereward:{path}",
                      f"--out={tmp_path / 'out'}"])
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "ratings.jsonl").read_text().splitlines()]
    assert len(rows) == report["images"] == 8 and all(len(r["expected_ratings"]) == 2 for r in rows)
    for j in (1, 2):
        scores = [statistics.fmean(r["expected_ratings"][:j]) for r in rows]
        right = [scores[g * 4 + a] > scores[g * 4 + b] for g in range(2) for a, b in combinations(range(4), 2)]
        assert report["accuracy"][f"mean@{j}"]["accuracy"] == pytest.approx(statistics.fmean(right))
    assert "(abs score), Mean@2" in (tmp_path / "out" / "results.md").read_text()


# ---------------------------------------------------------------- the README's real-use commands, on the fixture


def exported(out_dir: Path) -> Path:
    """The newest from_pretrained directory a run wrote (config.json next to safetensors weights)."""
    dirs = [c.parent for c in out_dir.rglob("config.json") if any(c.parent.glob("*.safetensors"))]
    assert dirs, f"no checkpoint under {out_dir}"
    return sorted(dirs)[-1]


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    return write_imagereward(tmp_path_factory.mktemp("real_data"), prompts=4, per_group=3)


def ranks_images(capsys, model_args: list[str], real_data: Path) -> None:
    """`evaluate.py MODEL_ARGS --prompt "a red fox" --images 0.png 1.png 2.png` (the reward-model use; in this
    process, through the command line's own `main`): a score per image and the best one."""
    import evaluate
    images = [str(real_data.parent / "images" / f"{i}.png") for i in range(3)]
    capsys.readouterr()
    evaluate.main([*model_args, "--prompt", "a red fox", "--images", *images, "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert "best: " in out and len([ln for ln in out.splitlines() if ln[:1].isdigit()]) == 3, out


TINY_REAL = ["--max_pixels=3136", "--max_new_tokens=8", "--group_size=2", "--pairs_per_rank=1", "--steps=2",
             "--eval_pairs=2", "--eval_every=0", "--lr=1e-4", "--warmup_steps=1"]


def test_grpo_with_listener_on_two_processes_then_evaluate(real_checkpoint, real_data, tmp_path, capsys):
    """README: torchrun train.py --mode=grpo on a published-layout checkpoint (no pad id in its config), with the
    listener, 2 processes, 2 steps; then evaluate.py on the checkpoint it saved, on a dataset and as a reward
    model (--prompt ... --images)."""
    out = tmp_path / "grpo"
    run = run_script(["train.py", "--mode=grpo", f"--model={real_checkpoint}", f"--train_data=imagereward:{real_data}",
                      f"--eval_data=imagereward:{real_data}", *TINY_REAL, f"--out_dir={out}"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("listener_p_correct" in r for r in rows)
    checkpoint = exported(out)
    run = run_script(["evaluate.py", "--model", str(checkpoint), "--data", f"imagereward:{real_data}",
                      "--max-pixels", "3136", "--max-new-tokens", "8", "--k", "2", "--both-orders",
                      "--out", str(tmp_path / "eval")])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["comparisons"] == 4 * 2 and "mean@2 both orders" in report["accuracy"]
    ranks_images(capsys, ["--model", str(checkpoint), "--max-pixels", "3136"], real_data)


def test_score_mode_then_absolute_evaluation(real_checkpoint, real_data, tmp_path):
    """README: train.py --mode=score (section 5) on the published-layout checkpoint, then evaluate.py
    --scoring absolute on what it saved: table 3's abs-score row."""
    out = tmp_path / "score"
    run = run_script(["train.py", "--mode=score", f"--model={real_checkpoint}", f"--train_data=imagereward:{real_data}",
                      *TINY_REAL, f"--out_dir={out}"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run = run_script(["evaluate.py", "--model", str(exported(out)), "--scoring", "absolute", "--data",
                      f"imagereward:{real_data}", "--max-pixels", "3136", "--max-new-tokens", "8",
                      "--out", str(tmp_path / "eval")])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["scoring"] == "absolute" and report["images"] == 12 and report["accuracy"]["mean@1"]["pairs"] == 12


# ---------------------------------------------------------------- Qwen3-VL, from the same commands

QWEN3_PIXELS = ["--min_pixels=1024", "--max_pixels=4096"]  # the published min_pixels is 65,536: both bounds given
TINY_QWEN3 = [a for a in TINY_REAL if not a.startswith("--max_pixels")] + QWEN3_PIXELS


def test_qwen3_grpo_two_processes_equal_one_then_evaluate(qwen3_checkpoint, real_data, tmp_path, capsys):
    """README's Qwen3-VL command on a Qwen3-VL-8B-Instruct-like checkpoint (nested config, no pad id, DeepStack):
    torchrun x2 GRPO with the listener and the fast paths, 2 steps, equals the 1-process run on the reference
    paths (losses to 1e-5; the bf16 exports to one bf16 step); its export loads with from_pretrained as a
    Qwen3-VL; evaluate.py runs on it, on a dataset and as a reward model."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration
    common = ["train.py", "--mode=grpo", f"--model={qwen3_checkpoint}", f"--train_data=imagereward:{real_data}",
              f"--eval_data=imagereward:{real_data}", *TINY_QWEN3, "--pairs_per_rank=1"]
    fast = ["--decode=static", "--shared_prompt=true", "--listener_from_reference=true", "--activation_checkpointing=true"]
    two = run_script(common + fast + [f"--out_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = run_script(common + ["--pairs_per_rank=2", "--micro_pairs=1", f"--out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2] and all("listener_p_correct" in r for r in rows["two"])
    assert [r["loss"] for r in rows["one"]] == pytest.approx([r["loss"] for r in rows["two"]], abs=1e-5)
    checkpoint = exported(tmp_path / "two")
    a, b = (load_file(exported(tmp_path / n) / "model.safetensors") for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-6, rtol=2 ** -7, msg=k)  # a bf16 step
    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint)
    assert model.config.architectures == ["Qwen3VLForConditionalGeneration"] and a["lm_head.weight"].dtype == torch.bfloat16
    run = run_script(["evaluate.py", "--model", str(checkpoint), "--data", f"imagereward:{real_data}", *QWEN3_PIXELS,
                      "--max-new-tokens", "8", "--k", "2", "--both-orders", "--out", str(tmp_path / "eval")])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["comparisons"] == 4 * 2 and "mean@2 both orders" in report["accuracy"]
    ranks_images(capsys, ["--model", str(checkpoint), *QWEN3_PIXELS], real_data)


# ---------------------------------------------------------------- p(b) without a second prefill


def test_sampler_logits_give_p_b_without_a_second_pass():
    """fast/answer_logits.py: the sampler keeps the answer tokens' logits at each step (`WatchAnswers`); at the
    answer slot of a completion that reads like the second pass's input, p(b) from them equals `answer_probs`
    (the second pass)."""
    import torch
    import sample
    from fast.answer_logits import WatchAnswers, sampled_p_b
    from toy import world as toy
    from listener import answer_probs
    from models.processor import answer_token_ids
    processor = toy.make_processor()
    model = toy.make_model(processor.tokenizer, seed=0)
    tok = processor.tokenizer
    pairs = [Pair(f"a {c} square", (Image.new("RGB", (56, 56), (200, 40, 40)),
                                         Image.new("RGB", (56, 56), (40, 40, 200))), 0) for c in ("red", "blue")]
    batch = processor.pairs(pairs)
    ids = answer_token_ids(tok)
    decoder = WatchAnswers(ids)
    rollouts = sample.sample(model, batch, num_samples=2, max_new_tokens=6, temperature=1.0, decoder=decoder,
                             pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    # (1) what the sampler kept at step 0 is a full forward's next-token logits after each prompt
    with torch.no_grad():
        first = model(**batch).logits[:, -1, ids].repeat_interleave(2, 0)  # (4, 2)
    assert decoder.watched().shape == (4, rollouts.tokens.shape[1], 2)
    assert torch.allclose(decoder.watched()[:, 0], first, atol=1e-4)
    # (2) hand-written well-formed completions: their answer-slot logits, read as the sampler reads them
    texts = [PROMPT.completion(r, "1") for r in ("it is red", "blue, I think", "red", "both squares")]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    tokens = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    enc = processor.pairs([p for p in pairs for _ in range(2)], suffixes=[tok.decode(r[:-1]) for r in rows])
    with torch.no_grad():
        logits = model(**enc).logits  # (4, T_prompt + T, V), left-padded: completions end at the right
    watched = torch.zeros((4, width, 2))
    for i, r in enumerate(rows):  # logits before completion token t = position (end - len(r) + 1 + t - 1)
        n = len(r) - 1
        watched[i, :n] = logits[i, -n - 1:-1][:, ids]
    fake = sample.Rollouts(tokens, torch.zeros(4, width), mask, torch.ones(4, dtype=torch.bool))
    p_b = sampled_p_b(processor, pairs, [t.split("<answer>")[0] + "<answer>1</answer>" for t in texts], fake,
                      watched, PROMPT)
    reasonings = [["it is red", "blue, I think"], ["red", "both squares"]]
    second = answer_probs(model, processor, pairs, reasonings)[..., 1]
    assert not p_b.isnan().any()
    assert torch.allclose(p_b, second, atol=1e-4)
