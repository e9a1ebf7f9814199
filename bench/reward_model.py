"""Benchmark: images/s of `RewardModel.score_batch` (the comparisons of all prompts batched together) and of
`rm.reward_fn()` (a diffusion trainer's batch: one (N, 3, H, W) tensor, each prompt repeated for its images)
against calling `RewardModel.score` prompt by prompt, on the same model, prompts and options, in one process;
and of `rm.reward_fn(mode="pairs")`, which compares every pair of a prompt's images in both orders.

A prompt of n images takes n - 1 comparisons against its anchor (section 5), each k rollouts: prompt by prompt,
a batch holds at most n - 1 comparisons (2(n - 1) with --both_orders), whatever --batch_size allows; batched,
every batch but the last is full. The three anchor methods give the same scores (checked here to 1e-5: the
rollouts are seeded per comparison within its prompt; each prompt is made distinct with its number, so that the
reward function's grouping by prompt finds the same groups). Mode "pairs" takes n (n - 1) comparisons a
prompt. Timings are the fastest of --repeats runs, the methods taking turns, after a warm-up run of each.

    .venv/bin/python bench/reward_model.py                                  # toy model on the CPU, ~30 s
    .venv/bin/python bench/reward_model.py --model CKPT --device cuda --prompts 64 --images 4 --k 3 \\
        --max_new_tokens 512 --batch_size 32
"""
import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: E402
import torch  # noqa: E402

from infra import cli  # noqa: E402
from infra.cli import option  # noqa: E402
from reward_model import RewardModel  # noqa: E402
from toy import world  # noqa: E402


@dataclass
class Config:
    model: str = option("toy", "reasoner checkpoint; 'toy': the tiny random toy model")
    device: str = option("", "'' = the GPU if there is one, else the CPU")
    prompts: int = option(8, "prompts scored", min=1)
    images: int = option(4, "images per prompt (toy images, 56x56)", min=2)
    k: int = option(1, "rollouts per comparison", min=1)
    both_orders: bool = option(False, "also compare each pair as (b, a)")
    max_new_tokens: int = option(8, "rollout length cap", min=1)
    batch_size: int = option(16, "comparisons per batch", min=1)
    threads: int = option(2, "torch CPU threads", min=1)
    repeats: int = option(2, "timed runs of each method (the fastest is reported)", min=1)
    seed: int = option(0, "seed of the toy prompts and of the sampler", min=0)


def timed(fn) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    cfg = cli.parse(Config, None, __doc__)
    torch.set_num_threads(cfg.threads)
    rm = RewardModel.from_pretrained(cfg.model, device=cfg.device or None, k=cfg.k, both_orders=cfg.both_orders,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    groups = [(f"{prompt} {i}", images) for i, (prompt, images, _) in  # [(prompt, PIL images)], prompts distinct
              enumerate(world.make_group(rng, n_images=cfg.images) for _ in range(cfg.prompts))]
    prompts = [prompt for prompt, images in groups for _ in images]  # N = prompts x images, as a trainer passes them
    pixels = torch.stack([torch.from_numpy(numpy.array(im)).permute(2, 0, 1) for _, images in groups
                          for im in images]).float().div(255).to(rm.model.device)  # (N, 3, H, W) in [0, 1]
    anchor_fn, pairs_fn = rm.reward_fn(), rm.reward_fn(mode="pairs")
    per_prompt = lambda scores: [scores[i:i + cfg.images] for i in range(0, len(scores), cfg.images)]  # noqa: E731
    methods = {"score, prompt by prompt": lambda: [rm.score(prompt, images) for prompt, images in groups],
               "score_batch (batched across prompts)": lambda: rm.score_batch(groups),
               "reward_fn (one generator batch)": lambda: per_prompt(anchor_fn(pixels, prompts)[0].tolist()),
               "reward_fn, mode=pairs": lambda: per_prompt(pairs_fn(pixels, prompts)[0].tolist())}
    best, scores = {name: float("inf") for name in methods}, {}
    for repeat in range(cfg.repeats + 1):  # run 0 warms up
        for name, fn in methods.items():
            seconds, scores[name] = timed(fn)
            if repeat:
                best[name] = min(best[name], seconds)
    alone, *anchored, _ = scores.values()
    gap = max(abs(a - b) for other in anchored for x, y in zip(other, alone) for a, b in zip(x, y))
    total = cfg.prompts * cfg.images
    print(f"model {cfg.model} on {rm.model.device} ({rm.model.dtype}), {torch.get_num_threads()} threads; "
          f"{cfg.prompts} prompts x {cfg.images} images, k={cfg.k}, both_orders={cfg.both_orders}, "
          f"max_new_tokens={cfg.max_new_tokens}, batch_size={cfg.batch_size}")
    for name in methods:
        print(f"  {name:40s} {total / best[name]:8.1f} images/s  {1000 * best[name] / total:7.1f} ms/image  "
              f"x{best['score, prompt by prompt'] / best[name]:.2f}")
    print(f"  largest anchor score difference from score prompt by prompt: {gap:.1e}")
    assert gap < 1e-5, f"the batched scores differ from the per-prompt ones by {gap}"
    print(f"config: {dataclasses.asdict(cfg)}")


if __name__ == "__main__":
    main()
