"""Evaluation: a checkpoint -> the paper's numbers (tables 2-5, figures 2-4), and a reward model people can use.

Scoring (sections 4.2 and 5). For a pair (a, b) the reasoner writes k reasonings (sample.py); for each one we
read the probability that b is preferred from its answer logits given that reasoning, eq. (4),
p(b | C) = sigma(f(b | C) - f(a | C)), and average over the k rollouts (Mean@k). A group of n images is scored
against an anchor: the anchor gets 0.5 and every other image its probability of beating the anchor, n - 1
comparisons instead of n (n - 1) / 2 (section 5). The absolute-score variant rates each image alone and
scores it by its expected rating, eq. (3). Beside this file: eval_inputs.py (the options, the checkpoints and
records they name, a dataset as comparisons), metrics.py (scores and labels -> the paper's numbers, the
contradiction judge), report.py (those numbers as the paper's tables and figures, written to disk).

Commands (`--model` is any local Qwen2.5-VL checkpoint directory: a trained reasoner, or the untrained
instruct model for the zero-shot row of table 3; every option: `python evaluate.py --help`):

    python evaluate.py                                    # toy model on toy data, nothing downloaded
    python evaluate.py --model PATH --data imagereward:test.json --images ROOT --out runs/eval --k 3
    torchrun --nproc_per_node=8 evaluate.py --model PATH --data rapidata:a.parquet,b.parquet --out runs/ood \\
        --k 3 --both-orders --no-thinking --listener /models/Qwen2.5-VL-7B-Instruct --judge /models/Qwen2.5-14B-Instruct
    python evaluate.py --model PATH --scoring absolute --data imagereward:test.json --images ROOT --k 3  # --mode=score
    python evaluate.py --model PATH --prompt "a red circle" --images a.png b.png c.png   # reward-model use

Under torchrun each process holds the whole model and takes every N-th comparison; each pair's rollouts are
seeded by (--seed, its index), so N processes give exactly what one gives. Rank 0 runs the listener (figure 2)
and the judge (table 4) on its own and writes the outputs.

Choices the paper leaves open, made here (metrics.py lists those of the metrics and the judge):
1. Mean@k averages probabilities (not logits). Majority vote counts the parsed answers of well-formed
   rollouts; a tie, or no readable answer, scores 0.5, which every metric counts as wrong.
2. The anchor is drawn per prompt from a seeded generator (`--anchor=-1`, the default) or fixed (`--anchor=i`).
3. `--both-orders` (beyond the paper) also shows every pair as (b, a) and averages p(b) with 1 - p(a), which
   removes position bias; both numbers are reported.
4. Tables 4 and 5 use, where the data has votes, the most confident pairs with at least 20 votes
   (`--confident-top`, `--min-votes`); otherwise every pair with a human preference.

Legend for shapes: B pairs, G = k rollouts per pair, N = B*G, T tokens, V vocabulary.
Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py tests/test_real_use.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import metrics
from eval_inputs import (Config, DatasetPairs, anchor_pairs, confident_or_labelled, dataset_pairs, load_judge,
                         load_reasoner, load_records, sampling_args)
from listener import answer_probs, answer_slots, answer_token_ids, continuation_ids, reasoning_of
from prompt import PROMPT, Group, Pair, PromptFormat, Rated, left_pad, score_messages, swapped
from reward import expected_score, parse_completion
from report import markdown_tables, write_outputs, write_ratings
from sample import end_of_turn_ids, sample as sample_rollouts
from static_decode import make_decoder


# ----------------------------------------------------------------------------------------------------------
# Scoring: p(b) given each rollout's reasoning (eq. (4)), Mean@k and the vote over k rollouts, anchor scores


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
    def p_forward(self) -> float:
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


def sampled_p_b(processor, pairs: list[Pair], texts: list[str], rollouts, fmt: PromptFormat) -> torch.Tensor:
    """(B, G) p(b) read from the sampler's own answer logits, NaN where it cannot be.

    Where a completion's first tokens are exactly what the second pass would read (`listener_prefix` of its
    reasoning, as the tokenizer writes it: `listener.answer_slots`), the logits the sampler computed at that
    slot are the second pass's, so eq. (4) is read from them with no second prefill.
    """
    slots = answer_slots(processor.tokenizer, pairs, texts, rollouts.tokens, rollouts.mask, fmt).cpu()  # (N,)
    watched = rollouts.watched.cpu()  # (N, T, 2)
    ok = (slots >= 0) & (slots < watched.shape[1])  # (N,)
    rows = torch.arange(len(slots))
    p = watched[rows, slots.clamp(0, watched.shape[1] - 1)].softmax(-1)[:, 1]  # (N,) eq. (4)
    return torch.where(ok, p, torch.nan).view(len(pairs), -1)  # (B, G)


def _compare_batch(model, processor, pairs: list[Pair], k: int, no_thinking: bool, sampling: dict,
                   fmt: PromptFormat, reuse: bool = True) -> list[Comparison]:
    """k rollouts per pair, then p(b) given each rollout's reasoning, read by the reasoner itself (eq. (4))."""
    if no_thinking:  # table 5: the reasoning is a fixed sentence, so one "rollout" says everything
        reasonings = [[fmt.no_thinking] for _ in pairs]
        texts = [[fmt.answer_prefix(fmt.no_thinking)] for _ in pairs]
        answers = None  # read from the probabilities below: the answer the model would give greedily
    else:
        batch = {key: value.to(model.device) for key, value in processor.pairs(pairs, fmt).items()}
        answer_ids = answer_token_ids(processor.tokenizer, fmt) if reuse else None
        rollouts = sample_rollouts(model, batch, num_samples=k, watch_ids=answer_ids, **sampling)  # rows b*G + g
        flat = rollouts.texts(processor.tokenizer)  # N strings, each up to its stop token
        texts = [flat[b * k:(b + 1) * k] for b in range(len(pairs))]
        reasonings = [[reasoning_of(t) for t in row] for row in texts]
        answers = [[answer_index(parse_completion(t, fmt)[1], fmt) for t in row] for row in texts]
    p_b = sampled_p_b(processor, pairs, flat, rollouts, fmt) if reuse and not no_thinking else None  # (B, G)
    if p_b is None or bool(p_b.isnan().any()):  # a second pass where the sampler did not read the answer slot
        probs = answer_probs(model, processor, pairs, reasonings, fmt=fmt)  # (B, G, 2)
        read = probs[..., 1].float().cpu()  # (B, G) eq. (4): sigma(f(b) - f(a)) = softmax over the two answers
        p_b = read if p_b is None else torch.where(p_b.isnan(), read, p_b)
    out = []
    for b in range(len(pairs)):
        row = p_b[b].tolist()
        row_answers = answers[b] if answers is not None else [None if p == 0.5 else int(p > 0.5) for p in row]
        out.append(Comparison(statistics.fmean(row), row, texts[b], reasonings[b], row_answers, majority(row_answers)))
    return out


def compare_pairs(model, processor, pairs: Sequence[Pair], k: int = 1, both_orders: bool = False,
                  no_thinking: bool = False, max_new_tokens: int = 512, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, generator: torch.Generator | None = None,
                  seeds: Sequence[int] | None = None, fmt: PromptFormat = PROMPT,
                  progress: bool = False, reuse_logits: bool = True, decoder=None) -> list[Comparison]:
    """The batched core: one `Comparison` per pair, p_b = Mean@k probability that image 1 is preferred.

    With `both_orders`, each pair is also shown as (b, a), next to its forward order in the same batch, and
    p_b = (Mean@k p(b | a, b) + 1 - Mean@k p(a | b, a)) / 2; the forward order alone stays in `p_forward`.
    With `no_thinking` nothing is sampled: the reasoning is `fmt.no_thinking` (table 5).
    p(b) is read from the sampler's own logits at the answer slot where it can be (`sampled_p_b`), else by a
    second pass over prompt + reasoning (`reuse_logits=False`: always the second pass). `decoder`: `sample`'s
    (a `static_decode.StaticDecoder`, or None for the reference decode).
    `seeds` (one per pair) seed each pair's rollouts on their own, so that a pair's result does not depend on
    the batch or the process it lands in (`compare_all`); otherwise `generator` drives the whole run.
    """
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_token_ids=end_of_turn_ids(processor.tokenizer), generator=generator,
                    pad_token_id=processor.tokenizer.pad_token_id, decoder=decoder)  # never the model config's: real ones have none
    shown = [q for p in pairs for q in ((p, swapped(p)) if both_orders else (p,))]
    shown_seeds = None if seeds is None else [2 * s + o for s in seeds for o in ((0, 1) if both_orders else (0,))]
    results = []
    with tqdm(total=len(shown), desc="compare", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(shown), batch_size):
            if shown_seeds is not None:  # one generator per pair shown: its G rollouts draw from it alone
                sampling["generator"] = [torch.Generator(model.device).manual_seed(s)
                                         for s in shown_seeds[start:start + batch_size]]
            results += _compare_batch(model, processor, list(shown[start:start + batch_size]), k, no_thinking,
                                      sampling, fmt, reuse_logits)
            bar.update(len(shown[start:start + batch_size]))  # pairs/s and the time left, from tqdm
    if both_orders:  # results alternate (a, b), (b, a): each forward order keeps its reverse
        for forward, backward in zip(results[0::2], results[1::2]):
            forward.reversed, forward.p_b = backward, both_orders_p(forward.probs, backward.probs)
    return results[0::2] if both_orders else results


def both_orders_p(forward_probs: Sequence[float], backward_probs: Sequence[float]) -> float:
    """Mean of p(b) shown as (a, b) and 1 - p(a) shown as (b, a): the position-debiased p(b)."""
    return (statistics.fmean(forward_probs) + 1.0 - statistics.fmean(backward_probs)) / 2


def compare(model, processor, prompt: str, image_a, image_b, k: int = 1, **kwargs) -> Comparison:
    """Which of two images people would prefer for `prompt`: `.p_b` is the Mean@k probability for image b."""
    return compare_pairs(model, processor, [Pair(prompt, (image_a, image_b), label=0)], k=k, **kwargs)[0]


def anchor_scores(n: int, anchor: int, p_beats_anchor: Sequence[float]) -> list[float]:
    """Section 5: the anchor scores 0.5, image i its probability of beating the anchor (n - 1 values in order)."""
    if len(p_beats_anchor) != n - 1:
        raise ValueError(f"{n} images need {n - 1} anchor comparisons, got {len(p_beats_anchor)}")
    scores = list(p_beats_anchor)
    scores.insert(anchor, 0.5)
    return scores


def score_group(model, processor, prompt: str, images: Sequence, k: int = 1, anchor: int = 0, **kwargs) -> list[float]:
    """A score per image from n - 1 batched comparisons against `images[anchor]`; higher is preferred."""
    results = compare_pairs(model, processor, anchor_pairs(prompt, images, anchor), k=k, **kwargs)
    return anchor_scores(len(images), anchor, [r.p_b for r in results])


# ----------------------------------------------------------------------------------------------------------
# The absolute-score variant (section 5): each image rated alone, scored by its expected rating, eq. (3)


def rating_logits(model, processor, records: Sequence[Rated], reasonings: Sequence[Sequence[str]],
                  fmt: PromptFormat = PROMPT) -> torch.Tensor:
    """(B, G, R) logits of the R rating tokens at the answer slot, given each of the G reasonings of record b.

    As `listener.answer_probs`, on the rating prompt: one prefill per image, copied to its G continuations.
    """
    import sample
    tokenizer, B, G = processor.tokenizer, len(records), len(reasonings[0])
    ids = answer_token_ids(tokenizer, dataclasses.replace(fmt, answers=fmt.ratings))  # one token per rating
    rows = []
    for record, rs in zip(records, reasonings):
        prompt = tokenizer.apply_chat_template(score_messages(record.prompt, fmt), tokenize=False,
                                               add_generation_prompt=True)
        rows += continuation_ids(tokenizer, prompt, [fmt.answer_prefix(r) for r in rs])
    continuation = left_pad(rows, tokenizer.pad_token_id)  # (N, T)
    device = sample.model_device(model)
    with torch.no_grad(), sample.gathered(model):
        prefix = sample.expand(sample.prefill(model, processor.rated(records, fmt)), G)  # B rows -> N rows
        sample.extend(model, prefix, continuation["input_ids"].to(device), continuation["attention_mask"].to(device),
                      logits_to_keep=1)
    return prefix.logits[:, ids].float().view(B, G, -1)  # (B, G, R)


def rate_images(model, processor, records: Sequence[Rated], k: int, seeds: Sequence[int], batch_size: int,
                fmt: PromptFormat = PROMPT, progress: bool = False, **sampling) -> list[list[float]]:
    """k rollouts of the rating prompt per image, then the expected rating given each reasoning (eq. (3)):
    one list of k expected ratings per record. `seeds` (one per record) seed each record's rollouts."""
    sampling.update(stop_token_ids=end_of_turn_ids(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    out = []
    with tqdm(total=len(records), desc="rate", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start:start + batch_size])
            batch = {key: v.to(model.device) for key, v in processor.rated(chunk, fmt).items()}
            generators = [torch.Generator(model.device).manual_seed(s) for s in seeds[start:start + batch_size]]
            texts = sample_rollouts(model, batch, num_samples=k, generator=generators, **sampling).texts(processor.tokenizer)
            reasonings = [[reasoning_of(t, fmt) for t in texts[b * k:(b + 1) * k]] for b in range(len(chunk))]
            logits = rating_logits(model, processor, chunk, reasonings, fmt)  # (B, G, R)
            out += expected_score(logits, fmt.ratings).cpu().tolist()  # (B, G) eq. (3)
            bar.update(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N evaluate.py ...` splits the comparisons N ways


def distributed() -> tuple[int, int]:
    """(rank, world size): joins torchrun's process group when launched by torchrun, else (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def split_over_processes(work, items: Sequence, seed: int) -> list:
    """`work(my_items, my_seeds, progress)` on every N-th item (rank r takes items r, r + N, ...), item i seeded
    by (seed, i) so that 1 and N processes give the same; every rank gets all the results, in the items' order."""
    rank, world = distributed()
    mine = list(range(rank, len(items), world))
    results = work([items[i] for i in mine], [hash((seed, i)) % 2**62 for i in mine], rank == 0)
    if world == 1:
        return results
    parts = [None] * world
    dist.all_gather_object(parts, list(zip(mine, results)))
    return [r for _, r in sorted((x for part in parts for x in part), key=lambda x: x[0])]


def compare_all(model, processor, pairs: Sequence[Pair], seed: int, **kwargs) -> list[Comparison]:
    """`compare_pairs` on every pair, split over the processes; pair i's rollouts are seeded by (seed, i)."""
    return split_over_processes(lambda mine, seeds, progress: compare_pairs(
        model, processor, mine, seeds=seeds, progress=progress, **kwargs), pairs, seed)


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


def no_thinking_metrics(model, processor, dataset: DatasetPairs, results, subset: list[int], cfg: Config) -> dict:
    """Table 5: accuracy with and without the reasoning on the same pairs."""
    pairs = [dataset.compared[i] for i in subset]
    plain = compare_all(model, processor, pairs, cfg.seed, both_orders=cfg.both_orders, no_thinking=True,
                        batch_size=cfg.batch_size)
    rows = {"w/ thinking, Mean@1": [mean_at(results[i].probs, 1) for i in subset],
            f"w/ thinking, Mean@{cfg.k}": [results[i].p_forward for i in subset],
            "w/o thinking": [r.p_forward for r in plain]}
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
    judge_model, judge_tokenizer = load_judge(judge_path)
    rate = metrics.contradiction_rate(judge_model, judge_tokenizer, [r for r, _ in items], [a for _, a in items],
                                      cfg.judge_batch_size)
    return {"rate": rate, "judged": len(items)}


def run(cfg: Config) -> dict | None:
    """Evaluate `cfg.model` on `cfg.data`; write results.json, results.md, rollouts.jsonl and figures to `cfg.out`.

    Under torchrun the comparisons are split over the processes; rank 0 computes the metrics, runs the
    listener and the judge, writes the outputs and returns the report (the other ranks return None).
    """
    torch.manual_seed(cfg.seed)
    rank, _ = distributed()
    with tempfile.TemporaryDirectory() as scratch:  # the toy data lives here while it is read
        spec, records, unreadable = load_records(cfg, scratch)
        if cfg.scoring == "absolute":
            return run_absolute(cfg, spec, records)
        dataset = dataset_pairs(records, cfg.anchor, cfg.seed)  # the data is checked before the model loads
        model, processor = load_reasoner(cfg.model, cfg)
        sampling = {k: v for k, v in sampling_args(cfg).items() if k != "generator"}
        results = compare_all(model, processor, dataset.compared, cfg.seed, k=cfg.k, both_orders=cfg.both_orders,
                              **sampling)
        subset = confident_or_labelled(dataset, cfg.min_votes, cfg.confident_top)
        plain = no_thinking_metrics(model, processor, dataset, results, subset, cfg) if cfg.no_thinking else None
        if rank != 0:
            return None
        probs = p_b_by_rule(results, cfg.k)
        report = {"model": cfg.model, "data": spec, "layout": "pairs" if dataset.groups is None else "groups",
                  "records": len(records), "unreadable_images": unreadable, "comparisons": len(dataset.compared),
                  "k": cfg.k, "well_formed": statistics.fmean(a is not None for r in results for a in r.answers),
                  "accuracy": {name: dataset_accuracy(dataset, v) for name, v in probs.items()},
                  "ece": metrics.expected_calibration_error([results[i].p_b for i in dataset.labelled],
                                                            [dataset.compared[i].label for i in dataset.labelled]),
                  **metrics.vote_metrics(dataset, probs)}
        if plain is not None:
            report["no_thinking"] = plain
        if cfg.listener:
            report["disagreement"] = metrics.disagreement_metrics(*load_reasoner(cfg.listener, cfg, seed=1), dataset,
                                                                  results, cfg)
        if cfg.judge:
            report["contradiction"] = contradiction_metrics(cfg.judge, results, subset, cfg)
    report["config"] = dataclasses.asdict(cfg)
    write_outputs(Path(cfg.out), report, dataset, results)
    return report


def run_absolute(cfg: Config, spec: str, records: list) -> dict | None:
    """The absolute-score evaluation: rate every image (split over the processes; a group's images in order, a
    pair's two), score each by its Mean@j expected rating, rank each group by it, write the outputs."""
    model, processor = load_reasoner(cfg.model, cfg)
    items = [Rated(r.prompt, im, 0) for r in records for im in r.images]
    scores = split_over_processes(lambda mine, seeds, progress: rate_images(
        model, processor, mine, cfg.k, seeds, cfg.batch_size, progress=progress, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, decoder=make_decoder(cfg.decode, model.device)),
        items, cfg.seed)  # (images, k)
    if distributed()[0] != 0:
        return None
    ratings = {f"mean@{j}": [mean_at(s, j) for s in scores] for j in range(1, cfg.k + 1)}  # one per image
    report = {"model": cfg.model, "data": spec, "scoring": "absolute",
              "layout": "groups" if isinstance(records[0], Group) else "pairs", "records": len(records),
              "images": len(items), "k": cfg.k,
              "accuracy": {name: metrics.rating_accuracy(records, v) for name, v in ratings.items()},
              "config": dataclasses.asdict(cfg)}
    write_ratings(Path(cfg.out), report, items, scores)
    return report


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """The command line -> a checked Config (cli.py: `--name=value` or `--name value`, `--help`)."""
    return cli.parse(Config, argv, __doc__)


def rank_images(cfg: Config) -> list[float]:
    """Reward-model use: score `cfg.images` for `cfg.prompt` against an anchor, print the scores and the best."""
    if len(cfg.images) < 2:
        raise ValueError(f"--prompt needs at least two --images to compare, got {cfg.images}")
    model, processor = load_reasoner(cfg.model, cfg)
    scores = score_group(model, processor, cfg.prompt, cfg.images, k=cfg.k, anchor=max(cfg.anchor, 0),
                         both_orders=cfg.both_orders, **sampling_args(cfg))
    for path, s in zip(cfg.images, scores):
        print(f"{s:.4f}  {path}")
    print(f"best: {cfg.images[max(range(len(scores)), key=scores.__getitem__)]}")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=1), file=sys.stderr)
    try:
        if cfg.prompt:
            rank_images(cfg)
            return
        report = run(cfg)
    except cli.OptionError as e:  # found once the data is read (e.g. --anchor against the groups' sizes)
        raise SystemExit(f"evaluate.py: error: {e}")
    if report is not None:  # rank 0
        print(markdown_tables(report))
        print(f"wrote {cfg.out}/results.json, results.md and "
              f"{'ratings.jsonl' if cfg.scoring == 'absolute' else 'rollouts.jsonl and figures'}")


if __name__ == "__main__":
    main()
