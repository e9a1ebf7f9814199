"""The toy world's language, judge, cold starts and OOD split (toy/world.py), and the demo's summary (toy/demo.py).

The judge is checked on reasonings written by hand; the cold start's SFT targets against the images they
are about (read from the pixels); the demo end to end on tiny sizes, for every field of summary.json.
"""
import dataclasses
import json
import random
import socket

import pytest
import torch

from toy import world as toy
from formats.records import Pair
from prompt import PROMPT

RED_BLUE = ("red", "blue")  # the true colours of image 0 and image 1 in the hand-written cases below


@pytest.mark.parametrize("reasoning, supports", [
    ("The first image is blue. The other image is not.", 0),
    ("The second image is blue. The other image is not.", 1),
    ("  The second image is red.  The other image is not. ", 1),  # read on its own terms, spaces aside
    ("The first image is blue.", None),  # the other image unmentioned
    ("The first image is blue. The second image is not.", None),  # not the toy language
    ("The second image is blue. The first image is blue. The other image is not.", None),  # both
    ("The first image is purple. The other image is not.", None),  # not a colour of the toy world
    ("The first image is blue. The other image is not. So 1.", None),  # anything else
    ("The third image is blue. The other image is not.", None),
    (PROMPT.no_thinking, None),
    ("", None),
])
def test_judge_reads_what_a_reasoning_supports(reasoning, supports):
    assert toy.supports(reasoning) == supports
    verdict = toy.judge("a blue circle", reasoning, answer=supports, true_colours=RED_BLUE)
    assert verdict["supports"] == supports and not verdict["contradiction"]


def test_judge_contradiction_and_faithfulness():
    grounded = "The second image is blue. The other image is not."  # true of (red, blue) for "a blue circle"
    wrong = "The first image is blue. The other image is not."
    judge = lambda reasoning, answer, prompt="a blue circle": toy.judge(prompt, reasoning, answer, RED_BLUE)
    assert judge(grounded, 1) == {"supports": 1, "contradiction": False, "faithful": True}
    assert judge(grounded, 0) == {"supports": 1, "contradiction": True, "faithful": True}  # says 2, answers 1
    # the right answer against an unfaithful reasoning: the paper's failure mode (figure 1)
    assert judge(wrong, 1) == {"supports": 0, "contradiction": True, "faithful": False}
    assert judge(wrong, 0) == {"supports": 0, "contradiction": False, "faithful": False}
    assert judge(grounded, None)["contradiction"] is False  # no readable answer: nothing to contradict
    assert judge(None, 1) == {"supports": None, "contradiction": False, "faithful": False}  # malformed completion
    unreadable = "The first image is blue."
    assert judge(unreadable, 0) == {"supports": None, "contradiction": False, "faithful": False}
    # faithfulness covers the colour the prompt names: true of the images, but about the wrong colour
    red = "The first image is red. The other image is not."
    assert judge(red, 0, prompt="a red square")["faithful"] and not judge(red, 0)["faithful"]
    assert toy.describe("blue", 1) == grounded and toy.read_description(grounded) == ("blue", 1)


def test_colour_of_reads_every_drawn_colour_vivid_and_faded(tmp_path):
    rng = random.Random(0)
    for colour in toy.COLOURS:
        for shape in toy.SHAPES:
            for faded in (False, True):
                image = toy.draw(colour, shape, rng, faded=faded)
                assert toy.colour_of(image) == colour
                path = tmp_path / f"{colour}_{shape}_{faded}.png"
                image.save(path)
                assert toy.colour_of(str(path)) == colour


def test_cold_start_targets_describe_at_random_and_answer_what_they_say(tmp_path):
    """The SFT targets (train.sft_targets with the toy cold start): every one well formed, about the prompt's
    colour, supporting exactly the image it answers. They do not look at the images: about half answer the
    preferred image, and a target is faithful exactly when its (random) answer happens to be right."""
    import data
    import train
    paths = toy.write_dataset(tmp_path, n_train=400, n_test=1, seed=3)
    pairs = data.load(f"hpdv2:{paths['train']}", str(paths["train_images"]))
    cfg = train.Config(sft_answers="random", sft_reasoning="toy")
    tokenizer = toy.make_tokenizer()
    tokens, mask = train.sft_targets(tokenizer, pairs, cfg, step=0, device="cpu")
    right = 0
    for pair, row, m in zip(pairs, tokens, mask):
        text = tokenizer.decode(row[m])
        assert text.endswith(tokenizer.eos_token)
        reasoning, answer = __import__("reward").parse_completion(text[:-len(tokenizer.eos_token)])
        index = PROMPT.answers.index(answer)
        verdict = toy.judge(pair.prompt, reasoning, index, tuple(map(toy.colour_of, pair.images)))
        assert toy.read_description(reasoning)[0] == toy.prompt_colour(pair.prompt)
        assert verdict["supports"] == index and not verdict["contradiction"]
        assert verdict["faithful"] == (index == pair.label)
        right += index == pair.label
    assert 0.4 < right / len(pairs) < 0.6
    # a different step draws other answers and descriptions
    again, _ = train.sft_targets(tokenizer, pairs, cfg, step=1, device="cpu")
    assert not torch.equal(tokens, again)


def test_captions_say_where_a_colour_is_not_which_image_is_preferred(tmp_path):
    """The cold start's perception task (train.caption_batches): one caption per pair, asking where one of its
    two colours is. The answer is true of the pixels, and it is about the preferred image only half the time."""
    import data
    import train
    paths = toy.write_dataset(tmp_path, n_train=40, n_test=1, seed=4)
    pairs = data.load(f"hpdv2:{paths['train']}", str(paths["train_images"]))

    class State:  # what caption_batches reads from a Trainer
        cfg = train.Config(micro_pairs=4)  # caption micro-batches of 16
        processor = toy.make_processor()
        device = torch.device("cpu")
        fmt = PROMPT

    batches = train.caption_batches(State, pairs, step=0)
    assert [tokens.shape[0] for _, tokens, _ in batches] == [16, 16, 8]
    tok = State.processor.tokenizer
    texts = [tok.decode(row[m]) for _, tokens, mask in batches for row, m in zip(tokens, mask)]
    questions = [tok.decode(batch["input_ids"][i]) for batch, _, _ in batches for i in range(batch["input_ids"].shape[0])]
    preferred = 0
    for pair, text, question in zip(pairs, texts, questions):
        assert text.endswith(tok.eos_token)
        words = text[:-len(tok.eos_token)].split()  # The first|second image is COLOUR.
        image, colour = toy.ORDINALS.index(words[1]), words[-1].rstrip(".")
        assert toy.colour_of(pair.images[image]) == colour != toy.colour_of(pair.images[1 - image])
        assert toy.CAPTION_QUESTION.format(colour=colour) in question
        preferred += image == pair.label
    assert 10 <= preferred <= 30
    for batch, tokens, _ in batches:
        assert batch["image_grid_thw"].shape[0] == 2 * tokens.shape[0]  # both images of each pair


class HandMadeReader:
    """A stand-in for listener.Listener's `scores(pairs, reasonings)` -> (P, G, 2): `favour(pair, reasoning)` is
    the image it puts probability 0.9 on."""

    def __init__(self, favour):
        self.favour = favour

    def scores(self, pairs, reasonings):
        out = torch.full((len(pairs), len(reasonings[0]), 2), 0.1)
        for b, (pair, texts) in enumerate(zip(pairs, reasonings)):
            for g, text in enumerate(texts):
                out[b, g, self.favour(pair, text)] = 0.9
        return out


def test_reading_precondition_tells_reading_from_seeing(tmp_path):
    """demo.reading_accuracy on hand-made readers of 40 toy pairs: one that answers what the reasoning says scores
    100%; one that ignores it scores 50%, whether it answers one position or knows the preferred image from the
    images (the last one answers a true reasoning right every time: the true reasoning alone would call it a
    reader)."""
    from toy import demo
    toy.write_dataset(tmp_path, n_train=0, n_test=12, seed=3)
    pairs = demo.heldout_pairs(tmp_path, seed=0, n=40)
    assert len(pairs) == 40 and 0 < sum(p.label for p in pairs) < 40  # both positions preferred
    copies = HandMadeReader(lambda pair, text: toy.read_description(text)[1])  # the image the text argues for
    first = HandMadeReader(lambda pair, text: 0)
    sees = HandMadeReader(lambda pair, text: pair.label)  # knows the preferred image, whatever the text says
    assert demo.reading_accuracy(copies, pairs) == 1.0
    assert demo.reading_accuracy(first, pairs) == 0.5
    assert demo.reading_accuracy(sees, pairs) == 0.5


def distance_from_background(image) -> int:
    """How far the shape's most common colour lies from the background's (the corner pixel), channel by channel:
    written here from the pixels, apart from world.py's own reader."""
    from PIL import Image
    with Image.open(str(image)) as opened:
        image = opened.convert("RGB")
    background = image.getpixel((0, 0))
    _, rgb = max((n, c) for n, c in image.getcolors(image.width * image.height) if c != background)
    return max(abs(a - b) for a, b in zip(rgb, background))


def test_ood_pairs_break_the_vividness_shortcut(tmp_path):
    """The files the demo reads, judged from their pixels: in training the preferred image is always the vivid
    one (shape far from the background) and the other faded (close to it), so "pick the vivid one" is always
    right; in the OOD split it is never right: half the pairs draw both vivid, half the preferred one faded and
    the other vivid. The preferred image shows the prompt's colour in both, and every OOD prompt names a
    colour-shape combination no training prompt names."""
    from toy import demo
    import data
    toy.write_dataset(tmp_path, n_train=60, n_test=2, n_ood=16, seed=0)
    train = data.load(f"hpdv2:{tmp_path / 'hpdv2/train.json'}", str(tmp_path / "hpdv2"))
    ood = demo.heldout_pairs(tmp_path, seed=0, split="ood")
    assert len(train) == 60 and len(ood) == 16
    vivid = lambda image: distance_from_background(image) > 60
    for pair in train:
        preferred, other = pair.images[pair.label], pair.images[1 - pair.label]
        assert vivid(preferred) and not vivid(other)
        assert toy.colour_of(preferred) == toy.prompt_colour(pair.prompt) != toy.colour_of(other)
    kinds = []
    for pair in ood:
        preferred, other = pair.images[pair.label], pair.images[1 - pair.label]
        assert vivid(other) and toy.colour_of(preferred) == toy.prompt_colour(pair.prompt) != toy.colour_of(other)
        kinds.append("both vivid" if vivid(preferred) else "faded match")
        assert kinds[-1] == demo.ood_kind(pair)
    assert kinds.count("both vivid") == kinds.count("faded match") == 8
    combination = lambda prompt: tuple(prompt.split()[1:])
    assert {combination(p.prompt) for p in ood} <= set(toy.HELD_OUT)
    assert not {combination(p.prompt) for p in train} & set(toy.HELD_OUT)


def test_demo_writes_every_summary_field(tmp_path, monkeypatch):
    """The demo on tiny sizes, in this process (a group of one): the table's every column for every stage,
    both reading preconditions and the time, all in [0, 1] (seconds > 0), and the learning curve PNG; the GRPO
    stages start from the reasoner's start's final export (also their KL reference) and read the listener's."""
    from toy import demo
    from infra import parallel
    import train
    from PIL import Image
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in zip(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"), ("0", "1", "0", "127.0.0.1", str(port))):
        monkeypatch.setenv(k, v)
    parallel.setup_distributed()
    cfg = train.Config(out_dir=str(tmp_path / "default"), steps=3)  # --steps: the GRPO stages' length
    sizes = demo.Settings(listener_steps=2, start_steps=2, captions=1, grpo_steps=2, global_pairs=4, group_size=2,
                          eval_every=1, eval_pairs=6)
    toy.write_dataset(demo.toy_data_root(cfg), n_train=16, n_test=3, n_ood=4, seed=0)  # tiny: found, not rewritten
    loaded = {}  # out_dir -> the weights each GRPO stage's Trainer holds once built
    from infra import trainer
    real_init = trainer.Trainer.__init__

    def init(self, cfg, *args, **kwargs):  # trainer.Trainer, noting what a GRPO stage loaded
        real_init(self, cfg, *args, **kwargs)
        if cfg.mode == "grpo":
            full = lambda m: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                              for k, v in m.state_dict().items()}
            loaded[cfg.out_dir] = {"policy": full(self.policy), "reference": full(self.reference),
                                   "listener": full(self.listener.model)}
    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    summary = demo.run(cfg, train.train, sizes)
    assert json.loads((tmp_path / "default" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary) == {"stages", "ood_accuracy_by_kind", "listener_reading_accuracy",
                            "reasoner_start_reading_accuracy", "preconditions_met", "seconds"}
    assert list(summary["ood_accuracy_by_kind"]) == list(demo.STAGES)
    for name, by_kind in summary["ood_accuracy_by_kind"].items():
        assert set(by_kind) == set(toy.OOD_KINDS) and all(0.0 <= v <= 1.0 for v in by_kind.values()), name
        assert abs(sum(by_kind.values()) / 2 - summary["stages"][name]["ood_accuracy"]) < 1e-9  # half of each kind
    assert list(summary["stages"]) == list(demo.STAGES)
    for name, row in summary["stages"].items():
        assert set(row) == {"accuracy", "contradiction_rate", "faithfulness", "listener_agreement",
                            "no_thinking_accuracy", "ood_accuracy"}, name
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in row.values()), (name, row)
    for key in ("listener_reading_accuracy", "reasoner_start_reading_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["preconditions_met"] == (summary["reasoner_start_reading_accuracy"] <= 0.6 and
                                            summary["listener_reading_accuracy"] >= 0.95)
    assert summary["seconds"] > 0
    with Image.open(tmp_path / "default" / "learning_curve.png") as image:
        assert image.format == "PNG"
    rows = [json.loads(line) for line in (tmp_path / "default" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("heldout_contradiction_rate", "heldout_faithfulness", "heldout_listener_p_correct"):
        assert key in rows[0], key  # the baseline scores the listener too (not rewarded)
    assert max(row["step"] for row in rows) == 3  # --steps=3, not the 2 of `sizes`
    curves = json.loads((tmp_path / "default" / "learning_curve.json").read_text())
    assert list(curves) == list(demo.STAGES[1:])
    for name, points in curves.items():  # before, each held-out evaluation (every step here), after
        assert list(points) == ["0", "1", "2", "3"], name
        assert all(set(p) == set(demo.CURVE) for p in points.values()), name
    grpo_eval = next(row for row in rows if row["step"] == 1)
    assert curves["GRPO"]["1"]["faithfulness"] == grpo_eval["heldout_faithfulness"]
    assert curves["GRPO"]["1"]["listener_p_correct"] == grpo_eval["heldout_listener_p_correct"]
    # The comparison is fair: the two GRPO stages differ in the listener's weight and where they write, nothing
    # else, and both sample and normalise as the demo's settings say.
    configs = demo.stage_configs(cfg, sizes)
    grpo, listened = (dataclasses.asdict(configs[name]) for name in demo.STAGES[1:])
    assert {k for k in grpo if grpo[k] != listened[k]} == {"w_list", "out_dir"}
    assert (grpo["w_list"], listened["w_list"]) == (0.0, 0.5)
    assert (grpo["temperature"], grpo["scale_advantages"]) == (sizes.temperature, sizes.scale_advantages)
    # Both GRPO stages loaded the reasoner's start as policy and KL reference, and the listener's final export:
    # the two SFT runs' own final weights, read back from their safetensors files.
    from safetensors.torch import load_file
    start = load_file(demo.final_export(configs[demo.STAGES[0]]) / "model.safetensors")
    listener = load_file(demo.final_export(configs[demo.LISTENER]) / "model.safetensors")
    assert not all(torch.equal(start[k], listener[k]) for k in start)
    for name in demo.STAGES[1:]:
        models = loaded[configs[name].out_dir]
        for role, weights in (("policy", start), ("reference", start), ("listener", listener)):
            state = models[role]
            assert set(state) == set(weights), (name, role)
            assert all(torch.equal(state[k], weights[k]) for k in weights), (name, role)


def test_toy_world_help_prints_help_and_writes_nothing(tmp_path):
    """`python -m toy.world --help` (and -h) prints its usage; it never writes a dataset into a folder named --help."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for flag in ("--help", "-h"):
        run = subprocess.run([sys.executable, "-m", "toy.world", flag], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, run.stderr
        assert "usage: python -m toy.world" in run.stdout and "out_dir" in run.stdout
        assert list(tmp_path.iterdir()) == []
    run = subprocess.run([sys.executable, "-m", "toy.world"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "the following arguments are required: out_dir" in run.stderr
