"""Benchmark: a GRPO step's passes over the rollouts with each prompt read once per group
(fast/shared_prompt.py, `--shared_prompt=true`) against the reference, `models.internals.completion_hidden`, which repeats
each prompt and its images G times.

The passes of one step and micro-batch (train.py's default: one pair and its G rollouts):
- update: the policy's log-probs with gradients, the GRPO loss, backward (num_iterations times a step);
- reference: the reference model's log-probs, without gradients (once a step).
Both methods compute the same log-probabilities (checked here; tests/test_grpo.py checks the gradients).

Model and inputs are bench/sample.py's: a 14M-parameter Qwen2.5-VL (hidden 512, 4 layers, 4 vision blocks),
two 448x448 images per prompt (256 tokens each after the 2x2 merge), here with 128-token completions, for
G = 4, 8, 16. Time: the fastest of `repeats` runs, the methods taking turns. Peak memory: measured in a
fresh process per method and G, as bench/sample.py measures it (on CPU the peak resident memory the pass
adds, on GPU torch.cuda.max_memory_allocated). The last line is the speed-up of update + reference at G=8.

    .venv/bin/python bench/update.py
    .venv/bin/python bench/update.py --image=224 --groups=8     # shorter prompts: 64 tokens per image
    .venv/bin/python bench/update.py --device=cuda --dtype=bfloat16
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import grpo  # noqa: E402
from models import internals  # noqa: E402
from fast import shared_prompt  # noqa: E402
from infra import cli  # noqa: E402
from toy import world as toy  # noqa: E402


def _bench_sample():
    """bench/sample.py, for its model, inputs and memory probes (a module named `sample` exists already)."""
    spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(ROOT, "bench", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sample"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


bench_sample = _bench_sample()


@dataclass
class Config:
    device: str = "cpu"
    dtype: str = "float32"
    shape: str = "small"  # bench/sample.py's model shapes
    prompts: int = 1  # B pairs in the micro-batch
    groups: str = "4,8,16"  # the values of G to run
    new_tokens: int = 128  # T, every completion this long
    image: int = 448
    checkpointing: bool = False  # activation checkpointing (parallel.checkpoint_blocks)
    threads: int = 2
    seed: int = 0
    repeats: int = 2
    worker: str = ""  # internal: "shared:G" or "repeated:G" measures memory in this process


def logprobs(hidden_fn):
    """Per-token log-probs (N, T) through one of the two hidden-state functions, as train.py computes them."""
    return lambda model, batch, tokens, mask, temperature=1.0: grpo.completion_logprobs(
        model, batch, tokens, mask, temperature, hidden=hidden_fn)


METHODS = {"shared": logprobs(shared_prompt.completion_hidden), "repeated": logprobs(internals.completion_hidden)}


def setup(cfg: Config):
    torch.set_num_threads(cfg.threads)
    tok = toy.make_tokenizer()
    model, batch = bench_sample.build_model(cfg, tok), bench_sample.build_batch(cfg, tok)
    if cfg.checkpointing:
        from infra import parallel
        parallel.checkpoint_blocks(model)
    return model.train(), batch


def rollouts(cfg: Config, G: int):
    """(N, T) completion ids (ordinary text tokens) and an all-ones mask: N = B*G rows of `new_tokens`."""
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(20, 400, (cfg.prompts * G, cfg.new_tokens), generator=g).to(cfg.device)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def update_pass(fn, model, batch, tokens, mask):
    """Log-probs with gradients, the GRPO loss (eq. (2)) and backward: one micro-batch of the update."""
    logp = fn(model, batch, tokens, mask)  # (N, T)
    advantages = torch.linspace(-1, 1, tokens.shape[0], device=logp.device)  # (N,)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach() - 0.01, advantages, mask, beta=0.04)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return logp.detach()


def reference_pass(fn, model, batch, tokens, mask):
    with torch.no_grad():
        return fn(model, batch, tokens, mask)


PASSES = {"update": update_pass, "reference": reference_pass}


def timed(run, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timings(cfg: Config, model, batch, G: int) -> dict:
    """{(method, pass): fastest seconds}, the methods taking turns so that load on a shared machine hits both."""
    tokens, mask = rollouts(cfg, G)
    got = {m: reference_pass(fn, model, batch, tokens, mask) for m, fn in METHODS.items()}  # warm-up and check
    err = (got["shared"] - got["repeated"]).abs().max().item()
    assert err < (1e-4 if cfg.dtype == "float32" else 0.1), f"G={G}: the two methods differ by {err}"
    best = {}
    for _ in range(cfg.repeats):
        for method, fn in METHODS.items():
            for name, run in PASSES.items():
                seconds = timed(lambda: run(fn, model, batch, tokens, mask), cfg.device)
                best[method, name] = min(seconds, best.get((method, name), float("inf")))
    return best


def peak_memory(cfg: Config) -> dict:
    """Memory each pass adds at its peak, for the method and G of `cfg.worker`, in this (fresh) process."""
    method, G = cfg.worker.split(":")
    model, batch = setup(cfg)
    tokens, mask = rollouts(cfg, int(G))
    fn = METHODS[method]
    out = {}
    for name, run in PASSES.items():
        run(fn, model, batch, tokens[:1 * cfg.prompts, :8], mask[:1 * cfg.prompts, :8])  # warm-up, G=1
        before = bench_sample.memory_now(cfg.device)
        run(fn, model, batch, tokens, mask)
        out[name] = bench_sample.memory_peak(cfg.device) - before
    return out


def main() -> None:
    cfg = cli.parse(Config, None, __doc__)  # --name=value, strict booleans
    if cfg.worker:
        print("RESULT " + json.dumps(peak_memory(cfg)), flush=True)
        return
    groups = [int(g) for g in cfg.groups.split(",")]
    print(f"device: {bench_sample.device_name(cfg)}\nconfig: {cfg}")
    # peak memory first, each in a fresh process, before this process holds a model
    memory = {(m, G): bench_sample.launch(cfg, f"{m}:{G}", __file__) for G in groups for m in METHODS}
    model, batch = setup(cfg)
    P, T = batch["input_ids"].shape[1], cfg.new_tokens
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; B={cfg.prompts} prompt(s) of "
          f"{P} tokens (two {cfg.image}x{cfg.image} images), completions of {T} tokens, {cfg.dtype}"
          f"{', activation checkpointing' if cfg.checkpointing else ''}")
    print(f"{'G':>3} {'pass':<10}{'shared s':>10}{'repeated s':>12}{'speed-up':>10}{'shared MiB':>12}"
          f"{'repeated MiB':>14}{'token work':>12}")
    speedup = {}
    for G in groups:
        best = timings(cfg, model, batch, G)
        work = G * (P + T) / (P + G * T)  # tokens through the decoder, repeated / shared
        for name in (*PASSES, "both"):
            names = PASSES if name == "both" else [name]
            s, r = (sum(best[m, n] for n in names) for m in METHODS)
            ms, mr = (max(memory[m, G][n] for n in names) / 2**20 for m in METHODS)
            print(f"{G:>3} {name:<10}{s:>10.2f}{r:>12.2f}{r / s:>9.2f}x{ms:>12.0f}{mr:>14.0f}{work:>11.2f}x")
            speedup[G] = r / s
    main_G = 8 if 8 in speedup else groups[0]
    print(f"update + reference at G={main_G}, shared prompt over repeated prompt")
    print(f"speed-up: {speedup[main_G]:.2f}x")


if __name__ == "__main__":
    main()
