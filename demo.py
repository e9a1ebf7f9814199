"""The toy world end to end: the paper's listener effect, measured on a CPU in minutes.

    torchrun --nproc_per_node=2 train.py          # the default: train.py --mode=demo runs `run` below

Three stages on the toy task (toy.py), each evaluated on the same held-out pairs:

1. cold start (SFT): learns the toy language and how to read it, not the preference. Its targets name an
   image at random ("The second image is blue. The other image is not.") and answer what that reasoning
   argues for; captions of the same pairs ("Which of the two images above is green?") teach it where colours
   are. It reads well (the listener below) and chooses at chance.
2. GRPO: format + accuracy rewards (the paper's baseline, w_list = 0), from the cold start.
3. GRPO + listener: eq. (5), the frozen cold start as the listener, from the same cold start.
Both GRPO stages sample at temperature 0.5 and use eq. (1) without its division by the group's standard
deviation; the README says what happened otherwise (chance for 250 steps; a listener stage that rewrote its
reasoning to please the listener).

The table (also `summary.json`) holds, per stage, on greedy held-out rollouts:
  accuracy             the answer names the preferred image
  contradiction        the reasoning argues for one image, the answer names the other (toy.judge; table 4)
  faithfulness         what the reasoning says about the prompt and the images is true (toy.judge)
  listener agreement   the listener, reading the reasoning without the answer, picks the image the answer names
                       (figure 2 bins accuracy by how far the two disagree)
  no-thinking accuracy the answer after "I have finished thinking." in place of the reasoning (table 5)
and once, the listener's reading accuracy: with a correct description written in as the reasoning, how often
the frozen cold start answers as it says (a listener that cannot read would make r_list noise).

The toy language is deliberately simple: the reasoning names the image it argues for. With a richer one, "The
first image is red. The second image is blue.", reading means binding each colour to its image, which the
tiny model had not learned after 400 SFT steps; the listener would then have been a coin.
A PNG plots held-out accuracy and contradiction rate against step for both GRPO stages.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import reward
import sample
import toy
from listener import answer_probs, reasoning_of
from prompt import PROMPT, Pair, Processor

STAGES = ("cold start (SFT)", "GRPO", "GRPO + listener")
COLUMNS = {"accuracy": "accuracy", "contradiction_rate": "contradiction", "faithfulness": "faithful",
           "listener_agreement": "listener agrees", "no_thinking_accuracy": "no-thinking acc."}


@dataclasses.dataclass
class Settings:
    """The demo's sizes: the command line's --seed, --out_dir and --steps (the GRPO stages' length) apply, the
    other train.Config fields do not."""
    sft_steps: int = 220  # reading (the answer copies the reasoning) forms at 150-180 steps, seed by seed
    captions: int = 1  # caption examples per SFT pair (train.caption_batches)
    grpo_steps: int = 150
    temperature: float = 0.5  # of the GRPO rollouts (README: at 1.0 both stages stayed at chance for 250 steps)
    scale_advantages: bool = False  # eq. (1) without the std (README: with it the listener stage left the language)
    global_pairs: int = 16  # pairs per step over all ranks (GRPO: 8 pairs in both orders)
    group_size: int = 8  # G
    lr: float = 5e-4
    beta: float = 0.04
    max_new_tokens: int = 32
    eval_every: int = 15  # held-out points on the learning curve (each costs about a second and a half)
    eval_pairs: int = 256  # held-out pairs scored
    n_train: int = 4000  # training pairs in the toy data set
    n_test: int = 128  # held-out prompts (3-5 images each)


def stage_configs(cfg, s: Settings) -> dict:
    """The three stages' train.Config, made from the command line's `cfg`: name -> config.

    Global batches are fixed, so 1 and 2 processes train alike. GRPO shows every pair in both orders in the
    same batch, so that no preference for a position can earn reward (data.ExampleStream).
    """
    world, root = dist.get_world_size(), Path(cfg.out_dir)
    common = dict(model="toy", train_data="toy", eval_data="toy", max_new_tokens=s.max_new_tokens,
                  eval_pairs=s.eval_pairs, save_every=10**9, pairs_per_rank=s.global_pairs // world,
                  micro_pairs=s.global_pairs // world)
    cold = dataclasses.replace(cfg, **common, mode="sft", sft_answers="random", sft_reasoning="toy",
                               sft_captions=s.captions, steps=s.sft_steps, lr=2e-3, warmup_steps=10, eval_every=0,
                               out_dir=str(root / "cold_start"))
    grpo = dict(common, mode="grpo", model=str(root / "cold_start"), steps=s.grpo_steps,  # run() sets the export
                group_size=s.group_size, temperature=s.temperature,
                scale_advantages=s.scale_advantages, both_orders=True, lr=s.lr, beta=s.beta, warmup_steps=1,
                eval_every=s.eval_every)
    return {STAGES[0]: cold,
            STAGES[1]: dataclasses.replace(cfg, **grpo, w_list=0.0, out_dir=str(root / "grpo")),
            STAGES[2]: dataclasses.replace(cfg, **grpo, w_list=0.5, out_dir=str(root / "grpo_listener"))}


def run(cfg, train_stage, s: Settings = Settings()) -> dict:
    """Train the three stages with `train_stage` (train.train), evaluate them, print the table, write
    summary.json, learning_curve.png and its numbers (learning_curve.json) under cfg.out_dir. Returns the summary."""
    start = time.time()
    if cfg.steps != type(cfg).steps:  # given on the command line (its default is for real training)
        s = dataclasses.replace(s, grpo_steps=cfg.steps)  # --steps=N: each GRPO stage runs N steps
    log(f"the toy world, three stages: {dataclasses.asdict(s)}")
    root = Path(cfg.out_dir).parent / "toy_data"  # where trainer.toy_data looks for it
    if dist.get_rank() == 0 and not (root / "imagereward" / "test.json").exists():
        toy.write_dataset(root, n_train=s.n_train, n_test=s.n_test, seed=0)
    dist.barrier()
    configs = stage_configs(cfg, s)
    trained = {STAGES[0]: train_stage(configs[STAGES[0]])}
    for name in STAGES[1:]:  # both from the cold start's final export
        configs[name] = dataclasses.replace(configs[name], model=trained[STAGES[0]]["final"])
        trained[name] = train_stage(configs[name])
    checkpoints = {name: trained[name]["final"] for name in STAGES}
    log("\nevaluating each stage on the held-out pairs (greedy rollouts)...")
    stages, reading = evaluate_stages(checkpoints, configs[STAGES[1]], s)
    summary = {"stages": stages, "listener_reading_accuracy": reading, "seconds": time.time() - start}
    if dist.get_rank() == 0:
        out = Path(cfg.out_dir)
        print(table(summary), flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        curves = {name: curve(Path(configs[name].out_dir), trained[name]) for name in STAGES[1:]}
        (out / "learning_curve.json").write_text(json.dumps(curves, indent=1))
        plot(out / "learning_curve.png", curves)
        print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'} in {summary['seconds']:.0f} s", flush=True)
    return summary


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Held-out evaluation: each rank scores its share of the pairs with full (unsharded) copies of the tiny models


def verdict(pair: Pair, text: str) -> dict:
    """toy.judge on one completion for `pair`: its answer (0, 1 or None) and the judge's verdicts."""
    reasoning, answer = reward.parse_completion(text)
    index = PROMPT.answers.index(answer) if answer is not None else None
    return {"answer": index, **toy.judge(pair.prompt, reasoning, index, tuple(map(toy.colour_of, pair.images)))}


def truth(pair: Pair) -> str:
    """The correct reasoning about `pair` in the toy language (what its images really show)."""
    named = toy.prompt_colour(pair.prompt)
    return toy.describe(named, [toy.colour_of(im) for im in pair.images].index(named))


def heldout_pairs(cfg) -> list[Pair]:
    """The held-out pairs every stage is scored on: the ones train.py scores during training (same selection)."""
    root = Path(cfg.out_dir).parent / "toy_data" / "imagereward"
    groups = data.load(f"imagereward:{root / 'test.json'}", str(root))
    pairs = data.random_orders(data.groups_to_pairs(groups), cfg.seed)
    return data.spread_sample(pairs, cfg.eval_pairs, cfg.seed)


def load(path: str):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


@torch.no_grad()
def evaluate_stages(checkpoints: dict, cfg, s: Settings, batch_pairs: int = 32) -> tuple[dict, float]:
    """Every column of the table for each stage, and the listener's reading accuracy (see the top of the file)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = heldout_pairs(cfg)[rank::world]
    processor = Processor.from_pretrained(checkpoints[STAGES[0]])
    listener = load(checkpoints[STAGES[0]])  # the frozen cold start, as in training
    labels = torch.tensor([p.label for p in pairs])  # (P,)
    true = [[truth(p)] for p in pairs]
    read = answer_probs(listener, processor, pairs, true)[:, 0].argmax(-1) == labels if pairs else labels.bool()
    reading = all_sum(torch.tensor([read.sum().item(), len(pairs)], dtype=torch.float64))
    stages = {}
    for name in STAGES:
        policy = load(checkpoints[name])
        counts = torch.zeros(6, dtype=torch.float64)  # right, contradiction, faithful, agree, no-thinking right, n
        for i in range(0, len(pairs), batch_pairs):
            counts += stage_counts(policy, listener, processor, pairs[i:i + batch_pairs], s.max_new_tokens)
        right, contradiction, faithful, agree, no_thinking, n = all_sum(counts).tolist()
        stages[name] = {"accuracy": right / n, "contradiction_rate": contradiction / n, "faithfulness": faithful / n,
                        "listener_agreement": agree / n, "no_thinking_accuracy": no_thinking / n}
    return stages, reading[0].item() / reading[1].item()


def stage_counts(policy, listener, processor, pairs: list[Pair], max_new_tokens: int) -> torch.Tensor:
    """(6,) counts over `pairs`: right, contradictions, faithful, listener agrees, right without thinking, pairs."""
    tok = processor.tokenizer
    rollouts = sample.sample(policy, processor.pairs(pairs), num_samples=1, max_new_tokens=max_new_tokens,
                             temperature=0.0, stop_token_ids=sample.end_of_turn_ids(tok), pad_token_id=tok.pad_token_id)
    texts = rollouts.texts(tok)
    verdicts = [verdict(p, t) for p, t in zip(pairs, texts)]
    labels = torch.tensor([p.label for p in pairs])  # (B,)
    answers = torch.tensor([-1 if v["answer"] is None else v["answer"] for v in verdicts])  # (B,)
    heard = answer_probs(listener, processor, pairs, [[reasoning_of(t)] for t in texts])[:, 0].argmax(-1)  # (B,)
    blind = answer_probs(policy, processor, pairs, [[PROMPT.no_thinking]] * len(pairs))[:, 0].argmax(-1)  # (B,)
    return torch.tensor([(answers == labels).sum().item(), sum(v["contradiction"] for v in verdicts),
                         sum(v["faithful"] for v in verdicts), (heard == answers).sum().item(),
                         (blind == labels).sum().item(), len(pairs)], dtype=torch.float64)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# The table, the learning curve


def table(summary: dict) -> str:
    """The stages as rows, the columns of COLUMNS, in percent; the listener's reading accuracy below."""
    head = f"{'stage':18s}" + "".join(f"{title:>18s}" for title in COLUMNS.values())
    rows = [f"{name:18s}" + "".join(f"{m[k]:18.1%}" for k in COLUMNS) for name, m in summary["stages"].items()]
    return "\n".join(["", "held-out toy pairs, greedy rollouts:", head, *rows,
                      f"listener (the frozen cold start) reading a correct description: {summary['listener_reading_accuracy']:.1%}"])


def curve(run_dir: Path, trained: dict) -> dict:
    """step -> {accuracy, contradiction_rate, faithfulness} on the held-out pairs: before, every eval_every
    steps, after."""
    keys = ("accuracy", "contradiction_rate", "faithfulness")
    points = {0: {k: trained["before"][k] for k in keys}}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "heldout_accuracy" in row:
            points[row["step"]] = {k: row[f"heldout_{k}"] for k in keys}
    points[max(row["step"] for row in rows)] = {k: trained["after"][k] for k in keys}
    return dict(sorted(points.items()))


def plot(path: Path, curves: dict) -> None:
    """Held-out accuracy, contradiction rate and faithfulness against step, three lines per GRPO stage."""
    from report import line_plot
    series = {}
    for name, points in curves.items():
        steps = list(points)
        for key, title in (("accuracy", "accuracy"), ("contradiction_rate", "contradiction"), ("faithfulness", "faithful")):
            series[f"{name}: {title}"] = (steps, [p[key] for p in points.values()])
    line_plot(path, "Toy world: held-out accuracy, contradiction rate and faithfulness", "GRPO step", "fraction", series)
