"""Evaluation: a checkpoint -> the paper's numbers (tables 2-5, figures 2-4), and a reward model people can use.

Scoring (sections 4.2 and 5). For a pair (a, b) the reasoner writes k reasonings (sample.py); given each, the
probability that b is preferred is read from its answer logits, eq. (4), p(b | C) = sigma(f(b | C) - f(a | C)),
and averaged over the k rollouts (Mean@k). A group of n images is scored against an anchor: the anchor gets 0.5,
every other image its probability of beating the anchor, n - 1 comparisons instead of n (n - 1) / 2 (section 5).
The absolute-score variant rates each image alone, by its expected rating, eq. (3). report/ makes the tables.

    python evaluate.py                        # the toy model on toy data, nothing downloaded
    python evaluate.py --model PATH --data imagereward:test.json --images ROOT --out runs/eval --k 3
    python evaluate.py --model PATH --prompt "a red circle" --images a.png b.png c.png   # reward-model use

A checkpoint is asked in the prompt format it was trained in (its prompt_format.json). Under torchrun each process
holds the whole model and takes every N-th comparison, each seeded by (--seed, its index): N processes give what
one gives. The README gives each table's and figure's command, `--help` every option.

Where this departs from the paper, or chooses what it leaves open (report/metrics.py and report/judge.py list
those of the metrics and of tables 4 and 5):
1. Eq. (4) writes the answers 0 and 1; here they are the format's answer words, "1" and "2" by default ("1" naming
   the first image, as the question asks), and p(b) = sigma(f("2") - f("1")): the same formula.
2. Mean@k averages probabilities, not logits. Mean@j is the mean of the first j rollouts' p(b) (`mean_at`), so
   Mean@1 is the first rollout's, not the mean single-rollout accuracy over the k (which would vary less with the
   seed). The majority vote counts well-formed rollouts' answers; a tie, or none readable, scores 0.5: wrong.
3. Truncated and malformed rollouts get a p(b) too, read after the reasoning `listener.reasoning_of` finds in their
   text (listener.py's departure 2), and enter Mean@k (only the vote leaves them out): a reasoner that runs out of
   tokens is scored on what it wrote, not dropped.
4. Rollouts are sampled at temperature 1.0 (`--temperature`; the paper gives none), without top-p or top-k: the
   distribution the reasoner was trained to sample from.
5. The anchor is drawn per prompt from a seeded generator (`--anchor=-1`) or fixed (`--anchor=i`), and always shown
   first (data.py's departure 1), so every comparison of a group carries the same position bias. `--both-orders`
   also shows each pair as (b, a) and averages p(b) with 1 - p(a), which removes it; both numbers are reported.

Shapes: B pairs, G = k rollouts per pair, N = B*G rows, R ratings, V vocabulary.
Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py tests/test_real_use.py
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from data import DatasetPairs, anchor_pairs, dataset_pairs
from fast.answer_logits import WatchAnswers, sampled_p_b
from fast.static_decode import DECODES, make_decoder
from formats.images import DataError
from formats.layouts import MAX_PROMPT_TOKENS
from formats.records import Group, Pair, Rated, swapped
from infra import cli
from infra.cli import fail, option
from infra.parallel import PRECISIONS, compute_dtype, leave_group, load_replica, resolve_precision, setup_distributed
from listener import Listener, answer_probs, reasonings_by_pair, slot_logits
from models.processor import Processor, answer_token_ids, continuation_ids, end_of_turn_ids, prompt_tokens
from models.prompt_format import checkpoint_format
from prompt import PROMPT, PromptFormat, score_messages
from report import judge, metrics
from report.tables import OUTPUTS, markdown_tables, write_outputs, write_ratings
from reward import expected_score, parse_completion
from sample import sample, seeded_generators


# ----------------------------------------------------------------------------------------------------------
# Scoring: p(b) given each rollout's reasoning (eq. (4)), Mean@k and the vote over k rollouts, anchor scores


def score_group(model, processor, prompt: str, images: Sequence, k: int = 1, anchor: int = 0, **kwargs) -> list[float]:
    """A score per image from n - 1 batched comparisons against `images[anchor]`; higher is preferred."""
    results = compare_pairs(model, processor, anchor_pairs(prompt, images, anchor), k=k, **kwargs)
    return anchor_scores(len(images), anchor, [r.p_b for r in results])


def anchor_scores(n: int, anchor: int, p_beats_anchor: Sequence[float]) -> list[float]:
    """Section 5: the anchor scores 0.5, image i its probability of beating the anchor (n - 1 values in order)."""
    if len(p_beats_anchor) != n - 1:
        raise ValueError(f"{n} images need {n - 1} anchor comparisons, got {len(p_beats_anchor)}")
    scores = list(p_beats_anchor)
    scores.insert(anchor, 0.5)
    return scores


def compare(model, processor, prompt: str, image_a, image_b, k: int = 1, **kwargs) -> Comparison:
    """Which of two images people would prefer for `prompt`: `.p_b` is the Mean@k probability for image b."""
    return compare_pairs(model, processor, [Pair(prompt, (image_a, image_b), label=0)], k=k, **kwargs)[0]


def compare_pairs(model, processor, pairs: Sequence[Pair], k: int = 1, both_orders: bool = False,
                  no_thinking: bool = False, max_new_tokens: int = 512, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, keys: Sequence[tuple] | None = None,
                  seed: int = 0, fmt: PromptFormat = PROMPT, progress: bool = False, reuse_sampler_logits: bool = False,
                  decoder=None) -> list[Comparison]:
    """The batched core: one `Comparison` per pair, p_b = Mean@k probability that image 1 is preferred.

    `both_orders` also shows each pair as (b, a), in the same batch: p_b = (Mean@k p(b | a, b) + 1 - Mean@k
    p(a | b, a)) / 2, the forward order alone in `p_b_forward`. `no_thinking` samples nothing: the reasoning is
    `fmt.no_thinking` (table 5). `decoder`: sample.py's. Each pair's rollouts are seeded by its key (`keys`; by
    default (seed, its index)), so its result does not depend on the batch or process it lands in (`compare_all`).
    """
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_token_ids=end_of_turn_ids(processor.tokenizer), decoder=decoder,
                    pad_token_id=processor.tokenizer.pad_token_id)  # never the model config's: real ones have none
    keys = [(seed, i) for i in range(len(pairs))] if keys is None else list(keys)
    orders = (0, 1) if both_orders else (0,)
    shown = [q for p in pairs for q in ((p, swapped(p)) if both_orders else (p,))]
    shown_keys = [tuple(key) + (order,) for key in keys for order in orders]
    results = []
    with tqdm(total=len(shown), desc="compare", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(shown), batch_size):  # tqdm shows pairs/s and the time left
            sampling["generator"] = seeded_generators(model.device, shown_keys[start:start + batch_size])
            results += _compare_batch(model, processor, list(shown[start:start + batch_size]), k, no_thinking,
                                      sampling, fmt, reuse_sampler_logits)
            bar.update(len(shown[start:start + batch_size]))
    if both_orders:  # results alternate (a, b), (b, a): each forward order keeps its reverse
        for forward, backward in zip(results[0::2], results[1::2]):
            forward.reversed, forward.p_b = backward, both_orders_p(forward.probs, backward.probs)
    return results[0::2] if both_orders else results


def both_orders_p(forward_probs: Sequence[float], backward_probs: Sequence[float]) -> float:
    """Mean of p(b) shown as (a, b) and 1 - p(a) shown as (b, a): the position-debiased p(b)."""
    return (statistics.fmean(forward_probs) + 1.0 - statistics.fmean(backward_probs)) / 2


def _compare_batch(model, processor, pairs: list[Pair], k: int, no_thinking: bool, sampling: dict,
                   fmt: PromptFormat, reuse_sampler_logits: bool) -> list[Comparison]:
    """k rollouts per pair, then p(b) given each rollout's reasoning, read by the reasoner itself (eq. (4))."""
    p_b = None
    if no_thinking:  # table 5: the reasoning is a fixed sentence, so one "rollout" says everything
        reasonings = [[fmt.no_thinking] for _ in pairs]
        texts = [[fmt.answer_prefix(fmt.no_thinking)] for _ in pairs]
        answers = None  # read from the probabilities below: the answer the model would give greedily
    else:
        if reuse_sampler_logits:  # fast/answer_logits.py: the sampler keeps the answer tokens' logits
            sampling = dict(sampling, decoder=WatchAnswers(answer_token_ids(processor.tokenizer, fmt), sampling["decoder"]))
        rollouts = sample(model, processor.pairs(pairs, fmt), num_samples=k, **sampling)  # rows b*G + g
        flat = rollouts.texts(processor.tokenizer)  # N strings, each up to its stop token
        texts = [flat[b * k:(b + 1) * k] for b in range(len(pairs))]
        reasonings = reasonings_by_pair(flat, len(pairs), fmt)
        answers = [[answer_index(parse_completion(t, fmt)[1], fmt) for t in row] for row in texts]
        if reuse_sampler_logits:
            p_b = sampled_p_b(processor, pairs, flat, rollouts, sampling["decoder"].watched(), fmt)  # (B, G)
    if p_b is None or bool(p_b.isnan().any()):  # the second pass, where the sampler's logits were not read
        read = answer_probs(model, processor, pairs, reasonings, fmt=fmt)[..., 1].cpu()  # (B, G) eq. (4)
        p_b = read if p_b is None else torch.where(p_b.isnan(), read, p_b)
    out = []
    for b in range(len(pairs)):
        row = p_b[b].tolist()
        row_answers = answers[b] if answers is not None else [None if p == 0.5 else int(p > 0.5) for p in row]
        out.append(Comparison(statistics.fmean(row), row, texts[b], reasonings[b], row_answers, majority(row_answers)))
    return out


@dataclass
class Comparison:
    """The reasoner's verdict on one pair shown as (a, b)."""
    p_b: float  # probability that b is preferred: Mean@k, and averaged over both orders when asked
    probs: list[float]  # p(b) given each rollout's reasoning, eq. (4)
    texts: list[str]  # each rollout's completion
    reasonings: list[str]  # what the answer was read after (the listener reads the same)
    answers: list[int | None]  # each rollout's parsed answer as an image index, None when unreadable
    vote: int | None  # majority vote of `answers`, None on a tie or when no answer is readable
    reversed: Comparison | None = None  # the same pair shown as (b, a), in that order's own terms

    @property
    def p_b_forward(self) -> float:
        """Mean@k p(b) from the (a, b) order alone."""
        return statistics.fmean(self.probs)


def answer_index(answer: str | None, fmt: PromptFormat = PROMPT) -> int | None:
    """A parsed answer ("1"/"2") -> the index of the image it names (0/1); None stays None."""
    return None if answer is None else fmt.answers.index(answer)


def majority(answers: Sequence[int | None]) -> int | None:
    """The image most rollouts chose; None on a tie or when no rollout gave a readable answer."""
    share = vote_share(answers)
    return None if share == 0.5 else int(share > 0.5)


def vote_share(answers: Sequence[int | None]) -> float:
    """Fraction of readable answers that name image 1; 0.5 when none is readable (a tie: counted wrong)."""
    readable = [a for a in answers if a is not None]
    return sum(readable) / len(readable) if readable else 0.5


def mean_at(probs: Sequence[float], j: int) -> float:
    """Mean@j: the average p(b) over the first j rollouts."""
    return statistics.fmean(probs[:j])


# ----------------------------------------------------------------------------------------------------------
# The absolute-score variant (section 5): each image rated alone, scored by its expected rating, eq. (3)


def rating_logits(model, processor, records: Sequence[Rated], reasonings: Sequence[Sequence[str]],
                  fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(B, G, R) logits of the R rating tokens at the answer slot, given each of the G reasonings of record b:
    as `listener.answer_probs` reads the answer slot, on the rating prompt."""
    tokenizer, rows = processor.tokenizer, []
    for record, rs in zip(records, reasonings):
        prompt = tokenizer.apply_chat_template(score_messages(record.prompt, fmt), tokenize=False,
                                               add_generation_prompt=True)
        rows += continuation_ids(tokenizer, prompt, [fmt.answer_prefix(r) for r in rs])
    ids = answer_token_ids(tokenizer, fmt, fmt.ratings)  # one token per rating
    logits = slot_logits(model, processor.rated(records, fmt), rows, ids, tokenizer.pad_token_id)  # (N, R)
    return logits.view(len(records), -1, len(ids))  # (B, G, R)


def rate_images(model, processor, records: Sequence[Rated], k: int, keys: Sequence[tuple], batch_size: int,
                fmt: PromptFormat = PROMPT, progress: bool = False, **sampling) -> list[list[float]]:
    """k rollouts of the rating prompt per image, then the expected rating given each reasoning (eq. (3)): one
    list of k expected ratings per record. Each record's rollouts are seeded by its key (`keys`)."""
    tokenizer = processor.tokenizer
    sampling.update(stop_token_ids=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    out = []
    with tqdm(total=len(records), desc="rate", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start:start + batch_size])
            generators = seeded_generators(model.device, keys[start:start + batch_size])
            texts = sample(model, processor.rated(chunk, fmt), num_samples=k, generator=generators,
                           **sampling).texts(tokenizer)
            reasonings = reasonings_by_pair(texts, len(chunk), fmt)
            logits = rating_logits(model, processor, chunk, reasonings, fmt)  # (B, G, R)
            out += expected_score(logits, fmt.ratings).cpu().tolist()  # (B, G) eq. (3)
            bar.update(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------------------
# Several processes


def split_over_processes(work, items: Sequence, seed: int) -> list:
    """`work(my_items, my_keys, progress)` on every N-th item (rank r takes items r, r + N, ...), item i keyed
    by (seed, i) so that 1 and N processes give the same; every rank gets all the results, in the items' order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(items), world))
    results = work([items[i] for i in mine], [(seed, i) for i in mine], rank == 0)
    if world == 1:
        return results
    parts = [None] * world
    dist.all_gather_object(parts, list(zip(mine, results)))
    return [r for _, r in sorted((x for part in parts for x in part), key=lambda x: x[0])]


def compare_all(model, processor, pairs: Sequence[Pair], seed: int, **kwargs) -> list[Comparison]:
    """`compare_pairs` on every pair, split over the processes; pair i's rollouts are seeded by (seed, i)."""
    return split_over_processes(lambda mine, keys, progress: compare_pairs(
        model, processor, mine, keys=keys, progress=progress, **kwargs), pairs, seed)


# ----------------------------------------------------------------------------------------------------------
# One evaluation: compare, then every number the data allows


def p_b_by_rule(results: Sequence[Comparison], k: int) -> dict[str, list[float]]:
    """One p(b) per comparison for each rule that turns rollouts into a number: Mean@j and Vote@j (j <= k), and
    Mean@j both orders when both orders were shown."""
    out = {}
    for j in range(1, k + 1):
        out[f"mean@{j}"] = [mean_at(r.probs, j) for r in results]
        out[f"vote@{j}"] = [vote_share(r.answers[:j]) for r in results]
        if results and results[0].reversed is not None:
            out[f"mean@{j} both orders"] = [both_orders_p(r.probs[:j], r.reversed.probs[:j]) for r in results]
    return out


def dataset_accuracy(dataset: DatasetPairs, p: Sequence[float]) -> dict:
    """Headline accuracy for one p(b) per comparison: pairwise (micro/macro) for groups, pair accuracy else."""
    if dataset.groups is None:
        return {"accuracy": metrics.pair_accuracy(dataset.compared, p), "pairs": len(dataset.compared)}
    scores, start = [], 0
    for group, anchor in zip(dataset.groups, dataset.anchors):
        n = len(group.images)
        scores.append(anchor_scores(n, anchor, p[start:start + n - 1]))
        start += n - 1
    result = metrics.pairwise_accuracy(dataset.groups, scores)
    return {"accuracy": result["micro"], **result}


def no_thinking_metrics(model, processor, dataset: DatasetPairs, results, subset: list[int], cfg: Config,
                        fmt: PromptFormat = PROMPT) -> dict:
    """Table 5: accuracy with and without the reasoning on the same pairs."""
    pairs = [dataset.compared[i] for i in subset]
    plain = compare_all(model, processor, pairs, cfg.seed, both_orders=cfg.both_orders, no_thinking=True,
                        batch_size=cfg.batch_size, fmt=fmt)
    rows = {"w/ thinking, Mean@1": [mean_at(results[i].probs, 1) for i in subset],
            f"w/ thinking, Mean@{cfg.k}": [results[i].p_b_forward for i in subset],
            "w/o thinking": [r.p_b_forward for r in plain]}
    if cfg.both_orders:
        rows[f"w/ thinking, Mean@{cfg.k}, both orders"] = [results[i].p_b for i in subset]
        rows["w/o thinking, both orders"] = [r.p_b for r in plain]
    return {name: metrics.accuracy_with_interval(pairs, v) for name, v in rows.items()}


def contradiction_metrics(judge_path: str, results, subset: list[int], cfg: Config, fmt: PromptFormat = PROMPT) -> dict:
    """Table 4: fraction of well-formed rollouts whose answer the judge finds contradicts their reasoning."""
    items = [parse_completion(t, fmt) for i in subset for t in results[i].texts]
    items = [(r, f"{a} (the {'first' if a == fmt.answers[0] else 'second'} image)") for r, a in items if a is not None]
    if not items:
        return {"rate": None, "judged": 0}
    judge_model, judge_tokenizer = load_judge(judge_path, cfg.precision)
    rate = judge.contradiction_rate(judge_model, judge_tokenizer, [r for r, _ in items], [a for _, a in items],
                                    cfg.judge_batch_size)
    return {"rate": rate, "judged": len(items)}


def disagreement_metrics(listener: Listener, dataset: DatasetPairs, results, batch_size: int) -> dict:
    """Figure 2: per rollout, ||listener (s1, s2) - reasoner (s1, s2)|| for the same reasoning, binned, with
    whether that rollout's p(b) orders its (labelled) pair as people do."""
    distances, correct = [], []
    for start in tqdm(range(0, len(dataset.labelled), batch_size), desc="listener"):
        idx = dataset.labelled[start:start + batch_size]
        listened = listener.scores([dataset.compared[i] for i in idx], [results[i].reasonings for i in idx])  # (B, G, 2)
        reasoner = torch.tensor([[[1 - q, q] for q in results[i].probs] for i in idx])  # (B, G, 2)
        distances += metrics.score_distance(reasoner, listened.float().cpu()).flatten().tolist()  # (N,)
        correct += [(q != 0.5 and (q > 0.5) == (dataset.compared[i].label == 1)) for i in idx for q in results[i].probs]
    return {"bins": metrics.accuracy_by_bin(distances, correct),
            "mean_distance": statistics.fmean(distances) if distances else None}


def run(cfg: Config) -> dict | None:
    """Evaluate `cfg.model` on `cfg.data`; write results.json, results.md, rollouts.jsonl and figures to `cfg.out`.

    Under torchrun the comparisons are split over the processes; rank 0 computes the metrics, runs the
    listener and the judge, writes the outputs and returns the report (the other ranks return None).
    """
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:  # the toy data lives here while it is read
        spec, records, unreadable = load_records(cfg, scratch)
        if cfg.scoring == "absolute":
            return run_absolute(cfg, spec, records)
        try:
            dataset = dataset_pairs(records, cfg.anchor, cfg.seed)  # the data is checked before the model loads
        except ValueError as e:  # an empty dataset, an --anchor beyond a group
            raise cli.OptionError(str(e)) from None
        fmt = checkpoint_format(cfg.model, cfg.prompt_format)  # the format --model was trained in, unless given
        model, processor = load_reasoner(cfg.model, cfg, replicas=True)
        results = compare_all(model, processor, dataset.compared, cfg.seed, k=cfg.k, both_orders=cfg.both_orders,
                              fmt=fmt, **sampling_args(cfg, model.device))
        subset = metrics.confident_or_labelled(dataset, cfg.min_votes, cfg.confident_top)
        plain = no_thinking_metrics(model, processor, dataset, results, subset, cfg, fmt) if cfg.no_thinking else None
        if dist.get_rank() != 0:
            return None
        probs = p_b_by_rule(results, cfg.k)
        report = {"model": cfg.model, "data": spec, "layout": "pairs" if dataset.groups is None else "groups",
                  "records": len(records), "unreadable_images": unreadable, "comparisons": len(dataset.compared),
                  "prompt_format": dataclasses.asdict(fmt),
                  "k": cfg.k, "well_formed": statistics.fmean(a is not None for r in results for a in r.answers),
                  "accuracy": {name: dataset_accuracy(dataset, v) for name, v in probs.items()},
                  "ece": metrics.expected_calibration_error([results[i].p_b for i in dataset.labelled],
                                                            [dataset.compared[i].label for i in dataset.labelled]),
                  **metrics.vote_metrics(dataset, probs)}
        if plain is not None:
            report["no_thinking"] = plain
        if cfg.listener:
            listener = Listener(*load_reasoner(cfg.listener, cfg, seed=1, replicas=True), fmt)
            report["disagreement"] = disagreement_metrics(listener, dataset, results, cfg.batch_size)
        if cfg.judge:
            report["contradiction"] = contradiction_metrics(cfg.judge, results, subset, cfg, fmt)
    report["config"] = dataclasses.asdict(cfg)
    write_outputs(Path(cfg.out), report, dataset, results)
    return report


def run_absolute(cfg: Config, spec: str, records: list) -> dict | None:
    """The absolute-score evaluation: rate every image (split over the processes; a group's images in order, a
    pair's two), score each by its Mean@j expected rating, rank each group by it, write the outputs."""
    fmt = checkpoint_format(cfg.model, cfg.prompt_format)
    model, processor = load_reasoner(cfg.model, cfg, replicas=True)
    items = [Rated(r.prompt, im, 0) for r in records for im in r.images]
    sampling = {k: v for k, v in sampling_args(cfg, model.device).items() if k not in ("batch_size", "reuse_sampler_logits")}
    scores = split_over_processes(lambda mine, keys, progress: rate_images(
        model, processor, mine, cfg.k, keys, cfg.batch_size, fmt, progress=progress, **sampling), items, cfg.seed)
    if dist.get_rank() != 0:
        return None
    ratings = {f"mean@{j}": [mean_at(s, j) for s in scores] for j in range(1, cfg.k + 1)}  # one per image
    report = {"model": cfg.model, "data": spec, "scoring": "absolute",
              "layout": "groups" if isinstance(records[0], Group) else "pairs", "records": len(records),
              "images": len(items), "k": cfg.k, "prompt_format": dataclasses.asdict(fmt),
              "accuracy": {name: metrics.rating_accuracy(records, v) for name, v in ratings.items()},
              "config": dataclasses.asdict(cfg)}
    write_ratings(Path(cfg.out), report, items, scores)
    return report


# ----------------------------------------------------------------------------------------------------------
# What the options name: checkpoints, records, sampling


def device_and_dtype(precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Each process holds the whole model on its GPU (infra.parallel.setup_distributed chose it) or the CPU, in the
    dtype of --precision (auto: bf16 on a GPU, fp32 on the CPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return device, compute_dtype(resolve_precision(precision, device))


@functools.lru_cache(maxsize=1)
def toy_processor():
    """The toy processor, built once per process (training its tokenizer takes a second or two)."""
    from toy import world
    return world.make_processor()


def load_processor(path: str, cfg: Config) -> Processor:
    """The processor of a checkpoint (reasoner or listener); 'toy' the toy's."""
    if path == "toy":
        return toy_processor()
    return _checkpoint_processor(path, cfg.min_pixels or None, cfg.max_pixels or None)


@functools.lru_cache(maxsize=2)  # read before the data (its tokenizer measures the prompts), then used to score
def _checkpoint_processor(path: str, min_pixels, max_pixels) -> Processor:
    return Processor.from_pretrained(path, min_pixels, max_pixels)


def load_reasoner(path: str, cfg: Config, seed: int = 0, device=None, dtype: torch.dtype | None = None,
                  replicas: bool = False):
    """A checkpoint (reasoner or listener) and its processor; 'toy' builds a random toy model (fp32 unless `dtype`).
    `device`, `dtype`: None takes `device_and_dtype(cfg.precision)`'s (auto: bf16 on a GPU, fp32 on the CPU).
    `replicas`: every process of the group calls this; rank 0 reads the checkpoint, the others receive it
    (infra.parallel.load_replica)."""
    default_device, default_dtype = device_and_dtype(cfg.precision)
    device = torch.device(device) if device is not None else default_device
    processor = load_processor(path, cfg)
    if path == "toy":
        from toy import world
        return world.make_model(processor.tokenizer, seed=seed).to(device, dtype or default_dtype), processor
    return load_replica(path, dtype or default_dtype, device, shared=replicas), processor


def load_judge(path: str, precision: str = "auto"):
    """(model, tokenizer) of the table 4 judge: any causal LM with a chat template; 'toy' a tiny random one."""
    device, dtype = device_and_dtype(precision)
    if path == "toy":
        tokenizer = toy_processor().tokenizer
        return judge.make_toy_judge(tokenizer).to(device), tokenizer
    return judge.load_judge(path, device, dtype)


def load_records(cfg: Config, scratch: str) -> tuple[str, list, int]:
    """(spec, records, unreadable images left out) of --data; with --model toy and no --data, a toy ImageReward
    test set under `scratch`. A record whose prompt is over --max_prompt_tokens (the model's tokenizer counts)
    is refused, or with --skip_bad left out and counted. With --skip_bad every image is decoded first, and a
    pair with an unreadable image (or that image of a group) is left out."""
    spec, root = cfg.data, (cfg.images[0] if cfg.images else None)
    if not spec:
        if cfg.model != "toy":
            raise ValueError("--data is required with a real --model (e.g. --data imagereward:test.json)")
        from toy import world
        paths = world.write_dataset(scratch, n_train=0, n_test=cfg.toy_prompts, seed=cfg.seed)
        spec, root = f"imagereward:{paths['test']}", str(paths["test_images"])
    limit = load_processor(cfg.model, cfg).prompt_limit(cfg.max_prompt_tokens)
    records = list(data.load(spec, root, skip_bad=cfg.skip_bad, exclude=cfg.exclude, prompt_limit=limit))
    records = records[:cfg.limit] if cfg.limit else records
    return (spec, *data.drop_unreadable(records)) if cfg.skip_bad else (spec, records, 0)


def sampling_args(cfg: Config, device) -> dict:
    """The sampling arguments of `compare_pairs` that the options give."""
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                batch_size=cfg.batch_size, decoder=make_decoder(cfg.decode),
                reuse_sampler_logits=cfg.reuse_sampler_logits)


# ----------------------------------------------------------------------------------------------------------
# Options


@dataclass
class Config:
    """Every option of `evaluate.py`: `--name=value` or `--name value` (dashes or underscores), `--help` lists them."""
    model: str = option("toy", "reasoner checkpoint (a local model directory with safetensors weights); the "
                               "untrained instruct model gives the zero-shot row of table 3; 'toy' builds the tiny "
                               "random model and, without --data, toy data", blank=False)
    data: str = option("", "imagereward:JSON | hpdv2:JSON | rapidata:P1,P2 | pickapic:P (see data.load)")
    images: list = option([], "image root of --data; with --prompt, the image files to score")
    prompt: str = option("", "score --images for this prompt and print the best one (reward-model use)", blank=False)
    out: str = option("runs/eval", "folder for results.json, results.md, rollouts.jsonl and the figures", blank=False)
    k: int = option(1, "reasoning rollouts per comparison (Mean@k, majority vote)", min=1)
    both_orders: bool = option(False, "also compare (b, a) and average with 1 - p: removes position bias")
    no_thinking: bool = option(False, "also run the table 5 ablation: the reasoning replaced by a fixed sentence")
    listener: str = option("", "frozen listener checkpoint for figure 2 ('toy': a second random toy model)")
    judge: str = option("", "causal LM judging contradictions for table 4 ('toy': a tiny random Qwen2)")
    limit: int = option(0, "evaluate the first N records of --data (0: all)", min=0)
    skip_bad: bool = option(False, "leave out bad records and unreadable images, counted in results.json")
    exclude: str = option("", "records to leave out: the file `python data.py check` writes")
    anchor: int = option(-1, "anchor image index per prompt; -1 draws one per prompt from --seed", min=-1)
    max_new_tokens: int = option(512, "reasoning length cap", min=1)
    max_prompt_tokens: int = option(MAX_PROMPT_TOKENS, "the longest prompt read, in tokens: a longer record of --data "
                                    "is refused, naming it (left out and counted with --skip_bad); so is --prompt",
                                    min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts (0: greedy)", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    decode: str = option("reference", "how rollouts are decoded: reference, static or compiled (as train.py's --decode)",
                         choices=DECODES)
    reuse_sampler_logits: bool = option(False, "read p(b) from the sampler's logits at the answer slot where they are "
                                               "the second pass's (fast/answer_logits.py), not from a second pass")
    batch_size: int = option(8, "pairs per batch (each gives k rollouts)", min=1)
    precision: str = option("auto", "bf16 or fp32 weights and compute; auto: bf16 on a GPU, fp32 on the CPU "
                                    "(infra/parallel.py)", choices=PRECISIONS)
    judge_batch_size: int = option(8, "judge prompts per batch", min=1)
    min_pixels: int = option(0, "image processor min_pixels (0: the checkpoint's)", min=0)
    max_pixels: int = option(0, "image processor max_pixels (0: the checkpoint's); bounds the image tokens", min=0)
    min_votes: int = option(20, "tables 4 and 5: pairs with at least this many votes ...", min=0)
    confident_top: int = option(5139, "... and, of those, the most confident N (the paper's 5139; 0: all)", min=0)
    toy_prompts: int = option(6, "prompts in the toy test set written when --model toy has no --data", min=1)
    seed: int = option(0, "seed of the anchors and of the sampler", min=0, max=2**63 - 1)
    scoring: str = option("pairwise", "pairwise: each image against an anchor, eq. (4); absolute: each image rated "
                                      "alone, its expected rating, eq. (3) (checkpoints of train.py --mode=score; "
                                      "table 3's abs-score row)", choices=("pairwise", "absolute"))
    prompt_format: str = option("", "JSON file of prompt.PromptFormat's fields to ask --model in; '' = its "
                                    "prompt_format.json (what train.py trained it with), else prompt.PROMPT")

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        cli.check_models({"model": self.model, "listener": self.listener, "judge": self.judge}, self.min_pixels,
                         self.max_pixels, self.max_prompt_tokens, self.max_new_tokens)
        cli.check_prompt_format("prompt_format", self.prompt_format, {"model": self.model, "listener": self.listener})
        if self.prompt:
            ignored = [f"--{k}" for k in DATASET_ONLY if getattr(self, k) != getattr(Config, k)]
            if ignored:
                names = ", ".join(ignored)
                fail(ignored[0][2:], getattr(self, ignored[0][2:]), f"no {names} with --prompt (--prompt scores the "
                     f"--images files for one prompt; {names} {'is an option' if len(ignored) == 1 else 'are options'}"
                     f" of a dataset evaluation): pass one or the other")
            if len(self.images) < 2:
                fail("images", self.images, "at least two image files to compare with --prompt")
            for path in self.images:
                if not Path(path).is_file():
                    fail("images", self.images, f"image files that exist ({path} "
                                                f"{'is a folder' if Path(path).is_dir() else 'does not exist'})")
            if self.anchor >= len(self.images):
                fail("anchor", self.anchor, f"-1 or an index below the {len(self.images)} --images")
            return
        if self.data:
            cli.check_dataset("data", self.data)
        elif self.model != "toy":
            fail("data", self.data, "a dataset with a real --model (e.g. --data imagereward:test.json), or --prompt")
        if len(self.images) > 1:
            fail("images", self.images, "one image root with --data (several files only with --prompt)")
        cli.check_folder("images", self.images[0] if self.images else "", "the image root of --data")
        if self.exclude and not Path(self.exclude).is_file():
            fail("exclude", self.exclude, "the file `python data.py check` writes")
        cli.check_output("out", self.out, folder=True, writes=OUTPUTS)


# The options of a dataset evaluation, which reward-model use (--prompt) does not read.
DATASET_ONLY = ("data", "limit", "skip_bad", "exclude", "no_thinking", "listener", "judge", "min_votes",
                "confident_top", "toy_prompts", "scoring", "out")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """The command line -> a checked Config (infra/cli.py: `--name=value` or `--name value`, `--help`)."""
    return cli.parse(Config, argv, __doc__)


def rank_images(cfg: Config) -> list[float]:
    """Reward-model use: score `cfg.images` for `cfg.prompt` against an anchor, print the scores and the best."""
    tokens = prompt_tokens(load_processor(cfg.model, cfg).tokenizer, cfg.prompt)
    if tokens > cfg.max_prompt_tokens:
        fail("prompt", cfg.prompt if len(cfg.prompt) <= 60 else cfg.prompt[:60] + "...",
             f"a prompt of at most {cfg.max_prompt_tokens} tokens (--max_prompt_tokens), got {tokens} tokens")
    fmt = checkpoint_format(cfg.model, cfg.prompt_format)
    model, processor = load_reasoner(cfg.model, cfg, replicas=True)
    scores = score_group(model, processor, cfg.prompt, cfg.images, k=cfg.k, anchor=max(cfg.anchor, 0),
                         both_orders=cfg.both_orders, seed=cfg.seed, fmt=fmt, **sampling_args(cfg, model.device))
    for path, s in zip(cfg.images, scores):
        print(f"{s:.4f}  {path}")
    print(f"best: {cfg.images[max(range(len(scores)), key=scores.__getitem__)]}")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(argv)
    setup_distributed()
    print(json.dumps(dataclasses.asdict(cfg), indent=1), file=sys.stderr)
    try:
        report = None
        if cfg.prompt:
            rank_images(cfg)
        else:
            report = run(cfg)
    except (cli.OptionError, DataError) as e:  # found once the data is read (--anchor against the groups' sizes, a
        raise SystemExit(f"evaluate.py: error: {e}")  # bad record or image: the message names its file and record)
    if report is not None:  # rank 0
        print(markdown_tables(report))
        print(f"wrote {cfg.out}/results.json, results.md and "
              f"{'ratings.jsonl' if cfg.scoring == 'absolute' else 'rollouts.jsonl and figures'}")
    leave_group()


if __name__ == "__main__":
    main()
