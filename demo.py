"""The toy world end to end: the paper's listener effect, measured on a CPU in minutes.

    torchrun --nproc_per_node=2 train.py          # the default: train.py --mode=demo runs `run` below

Four trainings on the toy task (toy.py), then one table on the same held-out pairs:

1. the listener (SFT): learns to read, not to see. Each training pair is shown twice, with a reasoning arguing
   for each image and the answer it argues for ("The second image is blue. The other image is not." -> 2), so
   that only reading the reasoning explains the answer. It never learns which image people prefer.
2. the reasoner's start, "cold start (SFT)": learns to write the toy language, and where colours are (captions
   of the same pairs: "Which of the two images above is green?"). Its answers are drawn at random and apart
   from what its reasoning argues for, so its answer does not follow its reasoning: the paper's GRPO reasoner
   answers as well without its reasoning as with it (table 5).
3. GRPO: format + accuracy rewards (the paper's baseline, w_list = 0), from the reasoner's start, which is also
   the KL reference of eq. (2). The listener is loaded and scored on the held-out curve, not rewarded.
4. GRPO + listener: eq. (5), the listener's p_corr on each reasoning with its answer removed; all else equal.
Both GRPO stages sample at temperature 0.5 and use eq. (1) without its division by the group's standard
deviation (docs/toy.md says what happened otherwise).

The paper has one instruct model in both roles: it reads (the listener) and its GRPO reasoner comes to answer
apart from its reasoning. A tiny model trained for a minute has one property or the other, not both, so the
toy trains two (train.py's departure 6). Two preconditions are measured and printed on every run: with a
correct reasoning written in, the reasoner's start answers as it says at most 60% of the times (it does not
read) and the listener at least 95% (it reads). A run that misses one says so under its table.

The table (also `summary.json`) holds, per stage, on greedy held-out rollouts:
  accuracy             the answer names the preferred image
  contradiction        the reasoning argues for one image, the answer names the other (toy.judge; table 4)
  faithfulness         what the reasoning says about the prompt and the images is true (toy.judge)
  listener agreement   the listener, reading the reasoning without the answer, picks the image the answer names
                       (figure 2 bins accuracy by how far the two disagree)
  no-thinking accuracy the answer after "I have finished thinking." in place of the reasoning (table 5)
  OOD accuracy         accuracy on pairs where "pick the vivid image" fails and the prompts name colour-shape
                       combinations training never showed (toy.ood_pair; the paper's Rapidata evaluation)
A PNG plots held-out accuracy, contradiction rate, faithfulness and the listener's p_correct against step for
both GRPO stages, one panel each.
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
from listener import Listener, reasoning_of
from prompt import PROMPT, Pair, Processor

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
    captions: int = 1  # caption examples per SFT pair of the reasoner's start (train.caption_batches)
    grpo_steps: int = 130  # the listener stage's contradictions reach 0 by step 60-105, seed by seed
    decode: str = "static"  # the GRPO stages' rollouts: static_decode.StaticDecoder, tested equal to the reference
    temperature: float = 0.5  # of the GRPO rollouts (docs/toy.md: at 1.0 both stages stayed at chance)
    scale_advantages: bool = False  # eq. (1) without the std (docs/toy.md: with it the listener stage left the language)
    global_pairs: int = 16  # pairs per step over all ranks (GRPO: 8 pairs in both orders)
    group_size: int = 8  # G
    lr: float = 5e-4
    beta: float = 0.04
    max_new_tokens: int = 32
    eval_every: int = 15  # held-out points on the learning curve (each costs about a second and a half)
    eval_pairs: int = 256  # held-out pairs scored
    n_train: int = 4000  # training pairs in the toy data set
    n_test: int = 128  # held-out prompts (3-5 images each)
    n_ood: int = 256  # out-of-distribution pairs (toy.ood_pair)


def stage_configs(cfg, s: Settings) -> dict:
    """The four trainings' train.Config, made from the command line's `cfg`: name -> config.

    Global batches are fixed, so 1 and 2 processes train alike. GRPO shows every pair in both orders in the
    same batch, so that no preference for a position can earn reward (data.ExampleStream). Both GRPO stages
    start from the reasoner's start's final export and read the listener's.
    """
    world, root = dist.get_world_size(), Path(cfg.out_dir)
    common = dict(model="toy", train_data="toy", eval_data="toy", max_new_tokens=s.max_new_tokens,
                  eval_pairs=s.eval_pairs, save_every=10**9, pairs_per_rank=s.global_pairs // world,
                  micro_pairs=s.global_pairs // world)
    sft = dict(common, mode="sft", sft_reasoning="toy", lr=2e-3, warmup_steps=10, eval_every=0, eval_pairs=0)
    listener = dataclasses.replace(cfg, **sft, sft_answers="both", sft_captions=0, steps=s.listener_steps,
                                   out_dir=str(root / "listener"))
    start = dataclasses.replace(cfg, **sft, sft_answers="random", sft_captions=s.captions, steps=s.start_steps,
                                out_dir=str(root / "cold_start"))
    grpo = dict(common, mode="grpo", model=str(final_export(start)), listener=str(final_export(listener)),
                steps=s.grpo_steps, group_size=s.group_size, decode=s.decode, temperature=s.temperature,
                scale_advantages=s.scale_advantages, both_orders=True, lr=s.lr, beta=s.beta, warmup_steps=1,
                eval_every=s.eval_every)
    return {LISTENER: listener, STAGES[0]: start,
            STAGES[1]: dataclasses.replace(cfg, **grpo, w_list=0.0, out_dir=str(root / "grpo")),
            STAGES[2]: dataclasses.replace(cfg, **grpo, w_list=0.5, out_dir=str(root / "grpo_listener"))}


def final_export(cfg) -> Path:
    """Where train.train writes a run's final export: out_dir/export_{steps}."""
    return Path(cfg.out_dir) / f"export_{cfg.steps:07d}"


def run(cfg, train_stage, s: Settings = Settings()) -> dict:
    """Train the four stages with `train_stage` (train.train), evaluate them, print the table, write
    summary.json, learning_curve.png and its numbers (learning_curve.json) under cfg.out_dir. Returns the summary."""
    start = time.time()
    if cfg.steps != type(cfg).steps:  # given on the command line (its default is for real training)
        s = dataclasses.replace(s, grpo_steps=cfg.steps)  # --steps=N: each GRPO stage runs N steps
    log(f"the toy world, four trainings: {dataclasses.asdict(s)}")
    configs = stage_configs(cfg, s)
    root = toy_data_root(configs[STAGES[1]])
    if dist.get_rank() == 0 and not (root / "ood" / "test.json").exists():
        toy.write_dataset(root, n_train=s.n_train, n_test=s.n_test, n_ood=s.n_ood, seed=0)
    dist.barrier()
    trained = {name: train_stage(config) for name, config in configs.items()}
    log("\nevaluating each stage on the held-out pairs (greedy rollouts)...")
    checkpoints = {name: trained[name]["final"] for name in configs}
    stages, reading, ood_by_kind = evaluate_stages(checkpoints, configs[STAGES[1]], s)
    summary = {"stages": stages, "ood_accuracy_by_kind": ood_by_kind, "listener_reading_accuracy": reading[LISTENER],
               "reasoner_start_reading_accuracy": reading[STAGES[0]],
               "preconditions_met": reading[STAGES[0]] <= START_READS_AT_MOST and
                                    reading[LISTENER] >= LISTENER_READS_AT_LEAST,
               "seconds": time.time() - start}
    if dist.get_rank() == 0:
        out = Path(cfg.out_dir)
        print(table(summary), flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        curves = {name: curve(Path(configs[name].out_dir), trained[name]) for name in STAGES[1:]}
        (out / "learning_curve.json").write_text(json.dumps(curves, indent=1))
        plot(out / "learning_curve.png", curves)
        print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'} in {summary['seconds']:.0f} s", flush=True)
    return summary


def toy_data_root(cfg) -> Path:
    """Where the toy data lives for a stage's config: beside the stage's directory, inside the demo's
    (where train.py's toy data spec looks for it)."""
    return Path(cfg.out_dir).parent / "toy_data"


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


def heldout_pairs(cfg, split: str = "imagereward", n: int | None = None) -> list[Pair]:
    """The held-out pairs of a split of the toy data, in seeded random orders: "imagereward" (in distribution,
    the same selection as train.py scores during training) or "ood"; n pairs spread over prompts (all if None)."""
    root = toy_data_root(cfg) / split
    pairs = data.random_orders(data.groups_to_pairs(data.load(f"imagereward:{root / 'test.json'}", str(root))), cfg.seed)
    return data.spread_sample(pairs, cfg.eval_pairs if n is None else n, cfg.seed)


def load(path: str):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def reading_accuracy(reader, pairs: list[Pair]) -> float:
    """How often `reader` (its `.scores(pairs, reasonings)` -> (B, G, 2), as `listener.Listener`'s) favours the
    image a correct reasoning argues for, the correct reasoning about each pair (`truth`) written in. A model
    that reads scores 100%; one whose answer ignores the reasoning scores its own accuracy without it."""
    if not pairs:
        return float("nan")
    labels = torch.tensor([p.label for p in pairs])  # (P,)
    favoured = reader.scores(pairs, [[truth(p)] for p in pairs])[:, 0].argmax(-1).cpu()  # (P,)
    return (favoured == labels).float().mean().item()


@torch.no_grad()
def evaluate_stages(checkpoints: dict, cfg, s: Settings, batch_pairs: int = 64) -> tuple[dict, dict, dict]:
    """Every column of the table for each stage, how well the listener and the reasoner's start read, and each
    stage's OOD accuracy on each kind of pair."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs, ood = heldout_pairs(cfg)[rank::world], heldout_pairs(cfg, "ood", s.n_ood)[rank::world]
    processor = Processor.from_pretrained(checkpoints[LISTENER])
    listener = Listener(load(checkpoints[LISTENER]), processor)
    reading = {}
    for name in (LISTENER, STAGES[0]):
        reader = listener if name == LISTENER else Listener(load(checkpoints[name]), processor)
        reading[name] = all_mean(reading_accuracy(reader, pairs), len(pairs))
    stages, ood_by_kind = {}, {}
    for name in STAGES:
        policy = load(checkpoints[name])
        counts = torch.zeros(6, dtype=torch.float64)  # right, contradiction, faithful, agree, no-thinking right, n
        for i in range(0, len(pairs), batch_pairs):
            counts += stage_counts(policy, listener, processor, pairs[i:i + batch_pairs], s.max_new_tokens)
        by_kind = torch.zeros(len(toy.OOD_KINDS), 2, dtype=torch.float64)  # per kind: right, pairs
        for i in range(0, len(ood), batch_pairs):
            chunk = ood[i:i + batch_pairs]
            for pair, right in zip(chunk, answered_right(policy, processor, chunk, s.max_new_tokens)):
                by_kind[toy.OOD_KINDS.index(ood_kind(pair))] += torch.tensor([float(right), 1.0], dtype=torch.float64)
        right, contradiction, faithful, agree, no_thinking, n = all_sum(counts).tolist()
        by_kind = all_sum(by_kind)
        stages[name] = {"accuracy": right / n, "contradiction_rate": contradiction / n, "faithfulness": faithful / n,
                        "listener_agreement": agree / n, "no_thinking_accuracy": no_thinking / n,
                        "ood_accuracy": (by_kind[:, 0].sum() / by_kind[:, 1].sum()).item()}
        ood_by_kind[name] = {kind: (r / m).item() for kind, (r, m) in zip(toy.OOD_KINDS, by_kind)}
    return stages, reading, ood_by_kind


def ood_kind(pair: Pair) -> str:
    """Which kind of `toy.ood_pair` a pair is, read from its pixels: is the preferred image drawn faded?"""
    return toy.OOD_KINDS[1] if toy.is_faded(pair.images[pair.label]) else toy.OOD_KINDS[0]


def greedy(policy, processor, pairs: list[Pair], max_new_tokens: int) -> list[str]:
    """One greedy completion per pair."""
    tok = processor.tokenizer
    rollouts = sample.sample(policy, processor.pairs(pairs), num_samples=1, max_new_tokens=max_new_tokens,
                             temperature=0.0, stop_token_ids=sample.end_of_turn_ids(tok), pad_token_id=tok.pad_token_id)
    return rollouts.texts(tok)


def answered_right(policy, processor, pairs: list[Pair], max_new_tokens: int) -> list[bool]:
    """Whether a greedy completion answers each of `pairs` right."""
    texts = greedy(policy, processor, pairs, max_new_tokens)
    return [reward.parse_completion(t)[1] == PROMPT.answers[p.label] for p, t in zip(pairs, texts)]


def stage_counts(policy, listener: Listener, processor, pairs: list[Pair], max_new_tokens: int) -> torch.Tensor:
    """(6,) counts over `pairs`: right, contradictions, faithful, listener agrees, right without thinking, pairs."""
    texts = greedy(policy, processor, pairs, max_new_tokens)
    verdicts = [verdict(p, t) for p, t in zip(pairs, texts)]
    labels = torch.tensor([p.label for p in pairs])  # (B,)
    answers = torch.tensor([-1 if v["answer"] is None else v["answer"] for v in verdicts])  # (B,)
    listener_picks = listener.scores(pairs, [[reasoning_of(t)] for t in texts])[:, 0].argmax(-1).cpu()  # (B,)
    reasoner = Listener(policy, processor)  # the policy reading its answer slot after a fixed sentence (table 5)
    no_thinking = reasoner.scores(pairs, [[PROMPT.no_thinking]] * len(pairs))[:, 0].argmax(-1).cpu()  # (B,)
    return torch.tensor([(answers == labels).sum().item(), sum(v["contradiction"] for v in verdicts),
                         sum(v["faithful"] for v in verdicts), (listener_picks == answers).sum().item(),
                         (no_thinking == labels).sum().item(), len(pairs)], dtype=torch.float64)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_mean(value: float, n: int) -> float:
    """The mean over all ranks of a per-rank mean of n items (a rank with none counts nothing)."""
    total = all_sum(torch.tensor([0.0 if n == 0 else value * n, float(n)], dtype=torch.float64))
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------------------
# The table, the learning curve


def table(summary: dict) -> str:
    """The stages as rows, the columns of COLUMNS, in percent; the two reading preconditions below."""
    head = f"{'stage':18s}" + "".join(f"{title:>17s}" for title in COLUMNS.values())
    rows = [f"{name:18s}" + "".join(f"{m[k]:17.1%}" for k in COLUMNS) for name, m in summary["stages"].items()]
    start, listener = summary["reasoner_start_reading_accuracy"], summary["listener_reading_accuracy"]
    check = lambda ok: "met" if ok else "MISSED"
    lines = ["", "held-out toy pairs, greedy rollouts:", head, *rows,
             f"reading a correct reasoning: the reasoner's start {start:.1%} (precondition: at most "
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
    from report import panels_plot
    panels = {title: {name: (list(points), [p[key] for p in points.values()]) for name, points in curves.items()}
              for key, title in CURVE.items()}
    panels_plot(path, "Toy world: the two GRPO stages on the held-out pairs", "GRPO step", panels)
