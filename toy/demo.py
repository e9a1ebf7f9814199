"""The toy world end to end: the paper's listener effect, measured on a CPU in minutes.

    torchrun --nproc_per_node=2 train.py          # the default: train.py --mode=demo runs `run` below

Four trainings on the toy task (world.py), then one table on the same held-out pairs:

1. the listener (SFT): learns to read, not to see. Each training pair is shown twice, with a reasoning arguing
   for each image and the answer it argues for ("The second image is blue. The other image is not." -> 2), so
   that only reading the reasoning explains the answer. It never learns which image people prefer.
2. the reasoner's start, "cold start (SFT)": learns to write the toy language and to see, from captions of the
   same pairs ("Which of the two images above is green?" -> "The first image is green.", and the same question
   answered "1" at the answer slot). Its targets' answers are drawn at random, and after its 100 steps its
   answer does not yet follow its reasoning: the paper's GRPO reasoner answers as well without its reasoning
   as with it (table 5).
3. GRPO: format + accuracy rewards (the paper's baseline, w_list = 0), from the reasoner's start, which is also
   the KL reference of eq. (2). The listener is loaded and scored on the held-out curve, not rewarded.
4. GRPO + listener: eq. (5), the listener's p_corr on each reasoning with its answer removed; all else equal.
Both GRPO stages sample at temperature 0.5 and use eq. (1) without its division by the group's standard
deviation (docs/toy.md says what happened otherwise).

The paper has one instruct model in both roles: it reads (the listener) and its GRPO reasoner comes to answer
apart from its reasoning. A tiny model trained for a minute has one property or the other, not both, so the
toy trains two (train.py's departure 6). Two preconditions are measured and printed on every run: with a
reasoning written in (the true one about each pair, and a false one arguing for the other image), the
reasoner's start answers as it says at most 60% of the times (it does not read: ignoring the reasoning scores
50%) and the listener at least 95% (it reads). A run that misses one says so under its table.

The table (also `summary.json`) holds, per stage, on greedy held-out rollouts:
  accuracy             the answer names the preferred image
  contradiction        the reasoning argues for one image, the answer names the other (world.judge; table 4)
  faithfulness         what the reasoning says about the prompt and the images is true (world.judge)
  listener agreement   the listener, reading the reasoning without the answer, picks the image the answer names
                       (figure 2 bins accuracy by how far the two disagree)
  no-thinking accuracy the answer after "I have finished thinking." in place of the reasoning (table 5)
  OOD accuracy         accuracy on pairs where "pick the vivid image" fails and the prompts name colour-shape
                       combinations training never showed (world.ood_pair; the paper's Rapidata evaluation)
A PNG plots held-out accuracy, contradiction rate, faithfulness and the listener's p_correct against step for
both GRPO stages, one panel each.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
from formats.records import Pair
from listener import Listener, answer_probs
from models import families
from models.processor import Processor
from prompt import PROMPT
from report.heldout import greedy_verdicts
from report.tables import panels_plot
from toy import world

STAGES = ("cold start (SFT)", "GRPO", "GRPO + listener")  # the table's rows: the reasoner's start, then GRPO
LISTENER = "listener (SFT)"  # trained too, not a row: it reads the rows' reasoning
COLUMNS = {"accuracy": "accuracy", "contradiction_rate": "contradiction", "faithfulness": "faithful",
           "listener_agreement": "listener agrees", "no_thinking_accuracy": "no-thinking acc.",
           "ood_accuracy": "OOD acc."}
CURVE = {"accuracy": "accuracy", "contradiction_rate": "contradiction rate", "faithfulness": "faithfulness",
         "listener_p_correct": "listener p_correct"}  # the learning curve's panels
START_READS_AT_MOST, LISTENER_READS_AT_LEAST = 0.60, 0.95  # the two preconditions


@dataclasses.dataclass
class Settings:
    """The demo's sizes: the command line's --seed, --out_dir and --steps (the GRPO stages' length) apply, the
    other train.Config fields do not."""
    listener_steps: int = 100  # reading forms at 60-80 steps, seed by seed (docs/toy.md)
    start_steps: int = 100  # the reasoner's start: the language and the captions are learnt by then
    captions: int = 1  # caption examples per SFT pair of the reasoner's start (train.caption_batches) ...
    answer_captions: int = 1  # ... and the same asked in the answer format: its answer slot learns to see
    grpo_steps: int = 130  # the listener stage's contradictions reach 0 by step 60-105, seed by seed
    decode: str = "static"  # the GRPO stages' rollouts: fast/static_decode.py, tested equal to the reference
    shared_prompt: bool = True  # the GRPO updates: fast/shared_prompt.py, tested equal to the reference
    temperature: float = 0.5  # of the GRPO rollouts (docs/toy.md: at 1.0 both stages stayed at chance)
    scale_advantages: bool = False  # eq. (1) without the std (docs/toy.md: with it the listener stage left the language)
    global_pairs: int = 16  # pairs per step over all ranks (GRPO: 8 pairs in both orders)
    group_size: int = 8  # G
    lr: float = 5e-4
    beta: float = 0.04
    max_new_tokens: int = 32
    eval_every: int = 15  # held-out points on the learning curve (each costs about a second and a half)
    eval_pairs: int = 256  # held-out pairs scored


def stage_configs(cfg, s: Settings) -> dict:
    """The four trainings' train.Config, made from the command line's `cfg`: name -> config.

    Global batches are fixed, so 1 and 2 processes train alike. GRPO shows every pair in both orders in the
    same batch, so that no preference for a position can earn reward (data.ExampleStream). Both GRPO stages
    start from the reasoner's start's final export and read the listener's.
    """
    ranks, root = dist.get_world_size(), Path(cfg.out_dir)
    common = dict(model="toy", train_data="toy", eval_data="toy", max_new_tokens=s.max_new_tokens,
                  eval_pairs=s.eval_pairs, save_every=10**9, pairs_per_rank=s.global_pairs // ranks,
                  micro_pairs=s.global_pairs // ranks)
    sft = dict(common, mode="sft", sft_reasoning="toy", lr=2e-3, warmup_steps=10, eval_every=0, eval_pairs=0)
    listener = dataclasses.replace(cfg, **sft, sft_answers="both", sft_captions=0, steps=s.listener_steps,
                                   out_dir=str(root / "listener"))
    start = dataclasses.replace(cfg, **sft, sft_answers="random", sft_captions=s.captions,
                                sft_answer_captions=s.answer_captions, steps=s.start_steps,
                                out_dir=str(root / "cold_start"))
    grpo = dict(common, mode="grpo", model=str(final_export(start)), listener=str(final_export(listener)),
                steps=s.grpo_steps, group_size=s.group_size, decode=s.decode, shared_prompt=s.shared_prompt,
                temperature=s.temperature, scale_advantages=s.scale_advantages, both_orders=True, lr=s.lr,
                beta=s.beta, warmup_steps=1, eval_every=s.eval_every)
    return {LISTENER: listener, STAGES[0]: start,
            STAGES[1]: dataclasses.replace(cfg, **grpo, w_list=0.0, out_dir=str(root / "grpo")),
            STAGES[2]: dataclasses.replace(cfg, **grpo, w_list=0.5, out_dir=str(root / "grpo_listener"))}


def final_export(cfg) -> Path:
    """Where train.train writes a run's final export: out_dir/export_{steps}."""
    return Path(cfg.out_dir) / f"export_{cfg.steps:07d}"


def run(cfg, train_stage, s: Settings = Settings()) -> dict:
    """Train the four stages with `train_stage` (train.train), evaluate them, print the table, write
    summary.json, learning_curve.png and its numbers (learning_curve.json) under cfg.out_dir. Returns the summary."""
    start, first = time.time(), dist.get_rank() == 0
    if cfg.steps != type(cfg).steps:  # given on the command line (its default is for real training)
        s = dataclasses.replace(s, grpo_steps=cfg.steps)  # --steps=N: each GRPO stage runs N steps
    if first:
        print(f"the toy world, four trainings: {dataclasses.asdict(s)}", flush=True)
        world.dataset(toy_data_root(cfg))  # written once, read by every stage
    dist.barrier()
    configs = stage_configs(cfg, s)
    trained = {name: train_stage(config) for name, config in configs.items()}
    summary = [None]
    if first:  # the tiny models are scored in this process, while the others wait
        print("\nevaluating each stage on the held-out pairs (greedy rollouts)...", flush=True)
        summary[0] = evaluate_stages({name: trained[name]["final"] for name in configs}, cfg, s)
        summary[0]["seconds"] = time.time() - start
        out = Path(cfg.out_dir)
        print(table(summary[0]), flush=True)
        (out / "summary.json").write_text(json.dumps(summary[0], indent=1))
        curves = {name: curve(Path(configs[name].out_dir), trained[name]) for name in STAGES[1:]}
        (out / "learning_curve.json").write_text(json.dumps(curves, indent=1))
        plot(out / "learning_curve.png", curves)
        print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'} in {summary[0]['seconds']:.0f} s",
              flush=True)
    dist.broadcast_object_list(summary, src=0)
    return summary[0]


def toy_data_root(cfg) -> Path:
    """Where the toy data lives: in the demo's directory, beside the stages' (where each stage's
    `--train_data=toy` looks for it: infra/trainer.py)."""
    return Path(cfg.out_dir) / "toy_data"


# ----------------------------------------------------------------------------------------------------------
# Held-out evaluation of the trained stages


def heldout_pairs(root: Path, seed: int, n: int | None = None, split: str = "imagereward") -> list[Pair]:
    """The held-out pairs of a split of the toy data at `root`, in seeded random orders: "imagereward" (in
    distribution: the same selection train.py scores during training) or "ood"; n pairs spread over prompts
    (all if None)."""
    pairs = data.groups_to_pairs(data.load(f"imagereward:{root / split / 'test.json'}", str(root / split)))
    pairs = data.random_orders(pairs, seed)
    return data.spread_sample(pairs, len(pairs) if n is None else n, seed)


def load(path: str):
    return families.load(path, torch.float32).eval().requires_grad_(False)


def reading_accuracy(reader, pairs: list[Pair]) -> float:
    """How often `reader` (its `.scores(pairs, reasonings)` -> (P, 2, 2), as `listener.Listener`'s) favours the
    image a reasoning argues for, over two reasonings about each pair (`world.describe`): the true one and a false
    one arguing for the other image. A model that reads scores 100%. One that ignores the reasoning scores 50%,
    whatever it sees in the images: it agrees with one of the two reasonings and not the other. (With the true
    reasoning alone, a model that sees the preferred image without reading would pass for a reader.)"""
    named = [world.prompt_colour(p.prompt) for p in pairs]
    shown = [[world.colour_of(im) for im in p.images].index(c) for p, c in zip(pairs, named)]  # truly that colour
    reasonings = [[world.describe(c, k), world.describe(c, 1 - k)] for c, k in zip(named, shown)]  # true, false
    argued = torch.tensor([[k, 1 - k] for k in shown])  # (P, 2) the image each reasoning argues for
    favoured = reader.scores(pairs, reasonings).argmax(-1).cpu()  # (P, 2)
    return (favoured == argued).float().mean().item()


@torch.no_grad()
def evaluate_stages(checkpoints: dict, cfg, s: Settings, batch_pairs: int = 64) -> dict:
    """The summary: every column of the table for each stage, each stage's OOD accuracy by kind of pair, how
    well the listener and the reasoner's start read, and whether both preconditions hold."""
    root = toy_data_root(cfg)
    pairs, ood = heldout_pairs(root, cfg.seed, s.eval_pairs), heldout_pairs(root, cfg.seed, split="ood")
    processor = Processor.from_pretrained(checkpoints[LISTENER])
    listener = Listener(load(checkpoints[LISTENER]), processor)
    reading = {LISTENER: reading_accuracy(listener, pairs),
               STAGES[0]: reading_accuracy(Listener(load(checkpoints[STAGES[0]]), processor), pairs)}
    stages, ood_by_kind = {}, {}
    for name in STAGES:
        policy = load(checkpoints[name])
        seen, no_thinking = [], []
        for i in range(0, len(pairs), batch_pairs):
            chunk = pairs[i:i + batch_pairs]
            seen += greedy_verdicts(policy, processor, chunk, s.max_new_tokens, listener, world.verdict)
            without_reasoning = answer_probs(policy, processor, chunk, [[PROMPT.no_thinking]] * len(chunk))  # (B, 1, 2) table 5
            no_thinking += (without_reasoning[:, 0].argmax(-1) == torch.tensor([p.label for p in chunk])).tolist()
        ood_seen = [v for i in range(0, len(ood), batch_pairs)
                    for v in greedy_verdicts(policy, processor, ood[i:i + batch_pairs], s.max_new_tokens)]
        mean = lambda values: statistics.fmean(map(float, values))
        stages[name] = {"accuracy": mean(v["right"] for v in seen),
                        "contradiction_rate": mean(v["contradiction"] for v in seen),
                        "faithfulness": mean(v["faithful"] for v in seen),
                        "listener_agreement": mean(v["agrees"] for v in seen),
                        "no_thinking_accuracy": mean(no_thinking),
                        "ood_accuracy": mean(v["right"] for v in ood_seen)}
        ood_by_kind[name] = {kind: mean(v["right"] for p, v in zip(ood, ood_seen) if ood_kind(p) == kind)
                             for kind in world.OOD_KINDS}
    return {"stages": stages, "ood_accuracy_by_kind": ood_by_kind, "listener_reading_accuracy": reading[LISTENER],
            "reasoner_start_reading_accuracy": reading[STAGES[0]],
            "preconditions_met": reading[STAGES[0]] <= START_READS_AT_MOST and
                                 reading[LISTENER] >= LISTENER_READS_AT_LEAST}


def ood_kind(pair: Pair) -> str:
    """Which kind of `world.ood_pair` a pair is, read from its pixels: is the preferred image drawn faded?"""
    return world.OOD_KINDS[1] if world.is_faded(pair.images[pair.label]) else world.OOD_KINDS[0]


# ----------------------------------------------------------------------------------------------------------
# The table, the learning curve


def table(summary: dict) -> str:
    """The stages as rows, the columns of COLUMNS, in percent; the two reading preconditions below."""
    head = f"{'stage':18s}" + "".join(f"{title:>17s}" for title in COLUMNS.values())
    rows = [f"{name:18s}" + "".join(f"{m[k]:17.1%}" for k in COLUMNS) for name, m in summary["stages"].items()]
    start, listener = summary["reasoner_start_reading_accuracy"], summary["listener_reading_accuracy"]
    check = lambda ok: "met" if ok else "MISSED"
    lines = ["", "held-out toy pairs, greedy rollouts:", head, *rows,
             f"reading a true or false reasoning: the reasoner's start {start:.1%} (precondition: at most "
             f"{START_READS_AT_MOST:.0%}, {check(start <= START_READS_AT_MOST)}), the listener {listener:.1%} "
             f"(at least {LISTENER_READS_AT_LEAST:.0%}, {check(listener >= LISTENER_READS_AT_LEAST)})"]
    if not summary["preconditions_met"]:
        lines.append("A precondition was missed: this run cannot show what the listener does (a start that reads "
                     "keeps its answers on its reasoning without help; a listener that does not read rewards noise).")
    return "\n".join(lines)


def curve(run_dir: Path, trained: dict) -> dict:
    """step -> {accuracy, contradiction_rate, faithfulness, listener_p_correct} on the held-out pairs: before,
    every eval_every steps, after."""
    points = {0: {k: trained["before"].get(k) for k in CURVE}}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "heldout_accuracy" in row:
            points[row["step"]] = {k: row.get(f"heldout_{k}") for k in CURVE}
    points[max(row["step"] for row in rows)] = {k: trained["after"].get(k) for k in CURVE}
    return dict(sorted(points.items()))


def plot(path: Path, curves: dict) -> None:
    """One panel per measure of CURVE, both GRPO stages in each."""
    panels = {title: {name: (list(points), [p[key] for p in points.values()]) for name, points in curves.items()}
              for key, title in CURVE.items()}
    panels_plot(path, "Toy world: the two GRPO stages on the held-out pairs", "GRPO step", panels)
