"""The first GPU's ten minutes, prepared: one command runs what only a GPU can show, in at most 8 minutes on one
H100, and writes what it saw to `--out` (report.md and report.json).

(a) Equivalence in bf16 on the device. Each fast path against the path it stands for, on the tests' own inputs
    (imported from tests/), through the functions the tests call, on the toy models held as train.py holds them
    under --precision=bf16 (the policy sharded by FSDP2 with bf16 compute and fp32 gradients, its blocks
    checkpointed; the frozen reference in bf16); each with its largest difference and a stated tolerance
    (`TOLERANCES`):
    - greedy sampling (sample.py) against `model.generate`;
    - the static and the compiled decode (fast/static_decode.py) against the reference decode (sample.CopiedCache);
    - the shared-prompt update (fast/shared_prompt.completion_hidden) against the repeated prompt
      (models.internals.completion_hidden), through grpo.completion_logprobs: log-probs and every gradient;
    - the listener read from the reference pass (fast/listener_from_reference.py) against its own pass.
    Two greedy decodes in bf16 may part where two tokens are within rounding of each other: the log-probs are
    compared over the steps both decodes condition on the same tokens, and a row may part only at such a near tie
    (a margin of at most twice the tolerance).
(b) A toy GRPO run of a few steps under torchrun on every visible GPU (NCCL; gloo on the CPU), bf16 and the
    README's fast paths, and the old_logp gap of each step: `old_logp_gap_mean` / `old_logp_gap_max` of
    metrics.jsonl, "absent" where train.py does not write them.
(c) The decode step at the paper's shape: Qwen2.5-VL-7B-Instruct's published config (bench/rehearsal.py's MODELS),
    random bf16 weights, 2 pairs x G=10, 600-token prompts, 512 new tokens, for each --decode: the median step
    against the memory-bandwidth floor (the bytes one step must read, the text weights and the KV cache with each
    prompt's keys once, over --gpu's bandwidth in infra/rehearsal.py's GPUS) and tokens/s. The compiled decode's
    timed run is under `fail_on_recompile`: a recompilation after its warm-up is an error.
(d) One GRPO step of the Qwen2.5-VL-3B-Instruct shape with one update micro-batch (the README's options, one pair
    per GPU, no held-out batch), random weights, real allocation: each phase's `torch.cuda.max_memory_allocated`
    against the prediction of `train.py <the same options> --rehearse=1xGIB` (infra/rehearsal.py; it runs on the
    CPU, beside (a)-(c)). Both go through `rehearsal.run_step`, the one on fake tensors, the other on real ones.

Each part runs in a process of its own, so a part that fails (an error, a timeout, out of memory) is reported as
such and the others still run; together they stop at `--budget` seconds. `--device=cpu` runs the same at tiny
shapes: the toy model everywhere, gloo, inductor's C++ for the compiled step; its report says it is a CPU run, and
no time in it is a GPU's.

    python bench/gpu_check.py                          # the GPU machine: every visible GPU for (b), one for the rest
    python bench/gpu_check.py --device=cpu             # tiny shapes on the CPU: about 2 minutes on 2 cores
    python bench/gpu_check.py --device=cpu --quick     # fewer steps and tokens: tests/test_gpu_check.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import unittest.mock
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' inputs, imported, not copied

import torch  # noqa: E402

from fast.static_decode import DECODES  # noqa: E402
from infra import cli  # noqa: E402
from infra.cli import option  # noqa: E402
from infra.rehearsal import GIB, GPUS  # noqa: E402


@dataclass
class Config:
    device: str = option("cuda", "where (a), (c) and (d) run; cpu: tiny shapes", choices=("cuda", "cpu"))
    out: str = option("runs/gpu_check", "the folder report.md, report.json and the runs' own files go to", blank=False)
    gpu: str = option("h100", "the GPU whose memory bandwidth gives (c)'s floor (infra/rehearsal.py)",
                      choices=tuple(GPUS))
    quick: bool = option(False, "with --device=cpu: fewer steps and tokens (the test's preset)")
    budget: float = option(480.0, "seconds for everything; a part still running then is stopped and reported", above=0)
    worker: str = option("", "internal: run one part in this process and print its result")


# What each preset runs: (a) greedy tokens; (b) steps and new tokens; (c) the model, prompts, G, prompt and new
# tokens, the decodes timed; (d) the model (bench/rehearsal.py's MODELS, or the toy). --quick leaves out (c)'s
# compiled decode, whose compilation is most of its time on a CPU (the same step is compiled and checked in (a)).
PRESETS = {
    "cuda": dict(greedy_tokens=32, grpo_steps=3, grpo_tokens=64, decode_model="Qwen2.5-VL-7B-Instruct", pairs=2,
                 group=10, prompt_tokens=600, new_tokens=512, decodes=DECODES,
                 update_model="Qwen2.5-VL-3B-Instruct"),
    "cpu": dict(greedy_tokens=24, grpo_steps=2, grpo_tokens=24, decode_model="toy", pairs=2, group=10,
                prompt_tokens=64, new_tokens=32, decodes=DECODES, update_model="toy"),
    "quick": dict(greedy_tokens=12, grpo_steps=1, grpo_tokens=12, decode_model="toy", pairs=2, group=4,
                  prompt_tokens=32, new_tokens=8, decodes=("reference", "static"), update_model="toy"),
}

# (a)'s tolerances, bf16: log-probs in nats (a bf16 logit near 10 is rounded by up to 0.03), the listener's
# probability of the right answer, and gradients as the largest difference over the largest gradient. Measured on
# this project's 2-core CPU in bf16 (--device=cpu): greedy vs generate 0 (the same tokens, the same kernels), static
# 0.012, compiled 0.008, shared-prompt log-probs 0 and gradients 0.006, listener 2.4e-4. A GPU's kernels (flash
# attention, cuBLAS's summation orders) round otherwise: the tolerances leave them a margin of 5 and more.
TOLERANCES = {"logprob": 0.1, "gradient": 0.05, "probability": 0.02}


def preset(cfg: Config) -> dict:
    return PRESETS["cuda" if cfg.device == "cuda" else "quick" if cfg.quick else "cpu"]


# ----------------------------------------------------------------------------------------------------------
# (a) Equivalence in bf16


def equivalence(cfg: Config) -> list[dict]:
    """(a)'s rows: {"check", "max_abs_diff", "tolerance", "passed", "detail"}."""
    from fast.static_decode import make_decoder
    from infra.parallel import setup_distributed, shard, to_device
    from test_grpo import grpo_toy_batch  # two left-padded prompts, images of two sizes, ragged completions
    from test_sample import sharpened  # attention sharp enough that a wrong position changes the tokens
    from toy import world as toy
    setup_distributed()  # FSDP2: a process group of one
    device, T = torch.device(cfg.device), preset(cfg)["greedy_tokens"]
    processor, batch, completions, mask = grpo_toy_batch()
    batch, completions, mask = to_device(batch, device), completions.to(device), mask.to(device)
    # the policy as train.py holds it under --precision=bf16: FSDP2, fp32 weights, bf16 compute, checkpointed blocks
    policy = shard(sharpened(toy.make_model(processor.tokenizer, seed=0)), device, checkpointing=True,
                   precision="bf16")
    reference = lambda G: greedy(policy, batch, T, G, decoder=None)
    failed = lambda *names: [{"check": name, "max_abs_diff": None, "tolerance": None, "passed": False}
                             for name in names]
    name = "greedy sampling vs model.generate"

    def against_generate() -> list[dict]:
        sampled = reference(1)  # first: generate cannot be an FSDP2 model's first forward (its lazy set-up)
        return [agreement(name, generated(policy, batch, T), sampled)]
    rows = attempt(against_generate, failed(name))
    for decode in ("static", "compiled"):
        name = f"{decode} decode vs reference decode (G=3)"
        fast = lambda: greedy(policy, batch, T, G=3, decoder=make_decoder(decode, "bf16"))
        rows += attempt(lambda: [agreement(name, reference(3), fast())], failed(name))
    rows += attempt(lambda: shared_prompt_update(policy, batch, completions, mask),
                    failed("shared-prompt vs repeated-prompt log-probs", "shared-prompt vs repeated-prompt gradients"))
    name = "listener from the reference pass vs its own pass"
    rows += attempt(lambda: [listener_from_reference_pass(device)], failed(name))
    return rows


def attempt(check, failed: list[dict]) -> list[dict]:
    """`check()`'s rows, or where it raises, the rows `failed` with what it raised: one check that cannot run on this
    device leaves the others their say."""
    import traceback
    try:
        return check()
    except Exception:  # on a GPU's first run, any error is a finding
        return [{**row, "error": traceback.format_exc().strip().splitlines()[-1][:300]} for row in failed]


@contextlib.contextmanager
def recorded_logits():
    """Within: every `sample.choose` call's log-softmax of its logits (N, V), in order (one per step)."""
    import sample
    seen, choose = [], sample.choose

    def recording(logits, *args):
        seen.append(logits.float().log_softmax(-1))  # (N, V)
        return choose(logits, *args)
    with unittest.mock.patch.object(sample, "choose", recording):
        yield seen


def greedy(model, batch: dict, T: int, G: int, decoder) -> tuple:
    """Greedy rollouts (N, T) and each step's log-probs (N, T, V), by sample.sample with `decoder`, the weights
    gathered as train.py gathers them for a rollout."""
    import sample
    from infra.parallel import gathered
    with recorded_logits() as seen, gathered(model):
        rollouts = sample.sample(model, batch, num_samples=G, max_new_tokens=T, temperature=0.0, stop_token_ids=[],
                                 decoder=decoder)
    return rollouts.tokens, torch.stack(seen, dim=1)  # (N, T), (N, T, V)


def generated(model, batch: dict, T: int) -> tuple:
    """`model.generate`'s greedy tokens (B, T) and log-probs (B, T, V), the vision tokens suppressed as sample.py
    blocks them, no early stop."""
    from transformers import GenerationConfig

    import sample
    from infra.parallel import gathered
    config = GenerationConfig(do_sample=False, max_new_tokens=T, eos_token_id=None,
                              pad_token_id=model.config.text_config.pad_token_id,
                              suppress_tokens=[getattr(model.config, k) for k in sample.VISION_TOKEN_KEYS],
                              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), gathered(model):
        out = model.generate(**batch, generation_config=config)
    tokens = out.sequences[:, batch["input_ids"].shape[1]:]  # (B, T)
    return tokens, torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, T), (B, T, V)


def agreement(name: str, a: tuple, b: tuple, tol: float = TOLERANCES["logprob"]) -> dict:
    """Two greedy decodes of the same prompts, (tokens (N, T), log-probs (N, T, V)) each: the largest difference
    of the log-prob of a's token over the steps whose logits follow the same tokens in both (up to and including
    the first step where they part), and where a row parts, a's margin between the two tokens (a near tie when at
    most 2 x tol: each decode within tol of the exact value can pick either)."""
    (tokens_a, logp_a), (tokens_b, logp_b) = a, b
    N, T = tokens_a.shape
    differ = tokens_a != tokens_b  # (N, T)
    parts = torch.where(differ.any(-1), differ.float().argmax(-1), T).tolist()  # (N,) first step that differs
    worst, margins = 0.0, []
    for n, d in enumerate(parts):
        same = tokens_a[n, :min(d + 1, T), None]  # (t, 1) a's tokens while both saw the same ones
        gap = logp_a[n, :len(same)].gather(-1, same) - logp_b[n, :len(same)].gather(-1, same)  # (t, 1)
        worst = max(worst, float(gap.abs().max()))
        if d < T:
            margins.append(float(logp_a[n, d, tokens_a[n, d]] - logp_a[n, d, tokens_b[n, d]]))
    ties = all(m <= 2 * tol for m in margins)
    detail = f"{N - len(margins)}/{N} rows identical over {T} tokens"
    if margins:
        detail += f"; parted at margins {', '.join(f'{m:.3f}' for m in margins)}" + ("" if ties else " (not near ties)")
    return {"check": name, "max_abs_diff": worst, "tolerance": tol, "passed": worst <= tol and ties, "detail": detail}


def shared_prompt_update(policy, batch: dict, completions, mask) -> list[dict]:
    """fast/shared_prompt's completion_hidden vs models.internals.completion_hidden in grpo.completion_logprobs, on the
    sharded `policy`: the log-probs of the completion tokens, and every parameter's gradient of a weighted sum of
    them."""
    import grpo
    from models import internals
    from fast import shared_prompt
    weights = torch.rand(completions.shape, generator=torch.Generator().manual_seed(2)).to(mask.device) - 0.5  # (N, T)
    passes = []
    for hidden in (shared_prompt.completion_hidden, internals.completion_hidden):
        policy.zero_grad(set_to_none=True)
        logp = grpo.completion_logprobs(policy, batch, completions, mask, temperature=0.7, hidden=hidden)  # (N, T)
        (logp * weights * mask).sum().backward()
        passes.append((logp.detach()[mask], {n: p.grad.full_tensor() for n, p in policy.named_parameters()}))
    (shared, shared_grads), (repeated, repeated_grads) = passes
    largest = max(float(g.abs().max()) for g in repeated_grads.values())
    grad_gap = max(float((shared_grads[n] - g).abs().max()) for n, g in repeated_grads.items()) / largest
    logp_gap = float((shared - repeated).abs().max())
    return [{"check": "shared-prompt vs repeated-prompt log-probs", "max_abs_diff": logp_gap,
             "tolerance": TOLERANCES["logprob"], "passed": logp_gap <= TOLERANCES["logprob"],
             "detail": f"{int(mask.sum())} completion tokens, FSDP2 bf16, activation checkpointing"},
            {"check": "shared-prompt vs repeated-prompt gradients", "max_abs_diff": grad_gap,
             "tolerance": TOLERANCES["gradient"], "passed": grad_gap <= TOLERANCES["gradient"],
             "detail": f"relative to the largest gradient, {largest:.3g}; {len(repeated_grads)} parameters"}]


def listener_from_reference_pass(device) -> dict:
    """p_corr of well-formed completions read from the reference pass (the README's shared-prompt one) vs the
    listener's own pass, on the toy reference model loaded and sharded as train.py does under --precision=bf16."""
    import grpo
    import sample
    import train
    from fast import shared_prompt
    from fast.listener_from_reference import reference_and_listener
    from formats.records import Pair
    from infra.parallel import load_model, shard, to_device
    from listener import Listener
    from prompt import PROMPT
    from test_listener import REASONINGS, completions  # reasonings of very different lengths, one empty
    from toy import world as toy
    processor, rng = toy.make_processor(), random.Random(0)
    pairs = []
    for label in (0, 1):
        prompt, images, _ = toy.make_group(rng, n_images=2)
        pairs.append(Pair(prompt, tuple(images), label))
    reference = shard(load_model("toy", False, "bf16"), device, precision="bf16")  # frozen as it loads
    listener = Listener(reference, processor)
    texts = completions(REASONINGS, [PROMPT.answers[i % 2] for i in range(len(REASONINGS))]) * len(pairs)  # N = B*G
    tokens, mask = train.completion_tokens(processor.tokenizer, texts, device)  # (N, T), each ending in EOS
    texts = sample.Rollouts(tokens, torch.zeros(tokens.shape), mask, mask.any(-1)).texts(processor.tokenizer)
    _, fast, read = reference_and_listener(reference, listener, shared_prompt.completion_hidden,
                                           [(to_device(processor.pairs(pairs), device), slice(0, len(texts)))],
                                           tokens, mask, pairs, texts, temperature=1.0)
    gap = float((fast - listener.p_correct(pairs, texts)).abs().max())
    return {"check": "listener from the reference pass vs its own pass", "max_abs_diff": gap,
            "tolerance": TOLERANCES["probability"], "passed": gap <= TOLERANCES["probability"] and float(read) == 1.0,
            "detail": f"p_corr of {len(texts)} rollouts, {float(read):.0%} read from the reference pass"}


# ----------------------------------------------------------------------------------------------------------
# (b) A toy GRPO run under torchrun


def toy_grpo(cfg: Config, out: Path, deadline: float) -> dict:
    """Train the toy for a few GRPO steps on every visible GPU (2 CPU processes on the CPU); its metrics."""
    sizes = preset(cfg)
    nproc = torch.cuda.device_count() if cfg.device == "cuda" else 2
    run_dir = out / "toy_grpo"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    args = ["--mode=grpo", "--model=toy", "--train_data=toy", "--eval_data=toy", "--eval_pairs=8", "--eval_every=0",
            f"--steps={sizes['grpo_steps']}", "--group_size=4", "--pairs_per_rank=2",
            f"--max_new_tokens={sizes['grpo_tokens']}", "--warmup_steps=1", "--save_every=1000", "--precision=bf16",
            "--decode=static", "--shared_prompt=true", "--listener_from_reference=true",
            "--activation_checkpointing=true", f"--out_dir={run_dir}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    ran = run(command, cfg, deadline)
    result = {"command": "torchrun " + " ".join(command[3:]), "processes": nproc,
              "backend": "nccl" if cfg.device == "cuda" else "gloo", **ran, "output": ran["output"][-3000:]}
    if ran["status"] == "ok":
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        keys = ("loss", "reward", "ratio", "old_logp_gap_mean", "old_logp_gap_max", "step_time")
        result["steps"] = [{"step": r["step"], **{k: r.get(k, "absent") for k in keys}} for r in rows]
    return result


# ----------------------------------------------------------------------------------------------------------
# (c) The decode step at the paper's shape


def decode_speed(cfg: Config) -> dict:
    """Each --decode's median step, tokens/s and multiple of the bandwidth floor, on random bf16 weights."""
    from bench.sample import STAMPS, stamped_choose, timed  # each step's time, taken where its token is chosen
    from torch._dynamo.utils import counters

    import sample
    from fast.static_decode import head_dim, make_decoder
    sizes, device = preset(cfg), torch.device(cfg.device)
    model = random_model(sizes["decode_model"], device)
    B, G, P, T = sizes["pairs"], sizes["group"], sizes["prompt_tokens"], sizes["new_tokens"]
    ids = torch.randint(20, 400, (B, P), generator=torch.Generator().manual_seed(0)).to(device)  # (B, P) text
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
    text, head = model.model.language_model, model.lm_head
    size = lambda t: t.numel() * t.element_size()
    # every text weight once, but of the embedding table only N rows (the LM head reads all of it: when tied, the same)
    weights = sum(size(p) for p in text.parameters()) - size(text.embed_tokens.weight) + size(head.weight)
    layers, heads = text.config.num_hidden_layers, text.config.num_key_value_heads
    kv_token = layers * 2 * heads * head_dim(text.config) * head.weight.element_size()  # keys and values, bytes
    kv = kv_token * (B * P + B * G * T / 2)  # the mean step: each prompt's keys once, each row's completion so far
    bandwidth = GPUS[cfg.gpu][1]
    floor = (weights + kv) / bandwidth  # seconds: no decode step reads less
    result = {"device": device.type, "model": sizes["decode_model"],
              "parameters": sum(p.numel() for p in model.parameters()), "B": B, "G": G, "prompt_tokens": P,
              "new_tokens": T, "weight_bytes": weights, "kv_bytes_mean_step": kv, "gpu": cfg.gpu,
              "bandwidth": bandwidth, "floor_s": floor, "decodes": []}

    def timing(name: str) -> dict:
        decoder, graphs = make_decoder(name, "bf16"), counters["stats"]["unique_graphs"]
        rollout = lambda new_tokens: lambda: sample.sample(
            model, batch, num_samples=G, max_new_tokens=new_tokens, stop_token_ids=[], pad_token_id=0,
            decoder=decoder, generator=torch.Generator(device).manual_seed(0))
        warm, _ = timed(rollout(T if name == "compiled" else 2), cfg.device)  # compiled: its shape compiled, recorded
        STAMPS.clear()
        with torch.compiler.set_stance("fail_on_recompile"):  # a recompilation now is an error
            seconds, _ = timed(rollout(T), cfg.device)
        step = statistics.median(b[0] - a[0] for a, b in zip(STAMPS, STAMPS[1:]))
        return {"decode": name, "step_s": step, "floor_multiple": step / floor if device.type == "cuda" else None,
                "decode_tokens_per_s": B * G / step, "tokens_per_s": B * G * T / seconds, "seconds": seconds,
                "compile_s": warm - seconds if name == "compiled" else None,
                "graphs": counters["stats"]["unique_graphs"] - graphs}

    with unittest.mock.patch.object(sample, "choose", stamped_choose(sample.choose)):
        for name in sizes["decodes"]:
            result["decodes"] += attempt(lambda: [timing(name)], [{"decode": name}])
    return result


def random_model(name: str, device):
    """A Qwen2.5-VL of `name` (bench/rehearsal.py's MODELS: the published config; "toy": toy/world.py's), random
    bf16 weights, built on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bench.rehearsal import MODELS
    from toy import world as toy
    config = toy.make_config(toy.make_tokenizer()) if name == "toy" else Qwen2_5_VLConfig(**MODELS[name])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


# ----------------------------------------------------------------------------------------------------------
# (d) One step's memory against its rehearsal


def update_options(cfg: Config, out: Path) -> list[str]:
    """train.py's options for (d): the README's command on (d)'s model, one pair per GPU (one update micro-batch),
    no held-out batch; with --rehearse, so that neither the weights nor the data are looked for."""
    from bench.rehearsal import PIXELS, README, write_checkpoint
    model = preset(cfg)["update_model"]
    gib = torch.cuda.get_device_properties(0).total_memory / GIB if cfg.device == "cuda" else 80
    if model == "toy":  # tests/test_rehearsal.py's toy-sized options
        from test_rehearsal import OPTIONS
        options = OPTIONS + ["--model=toy"]
    else:
        options = README + [PIXELS["Qwen2.5-VL"], f"--model={write_checkpoint(out / 'checkpoints', model)}"]
    ours = ["--pairs_per_rank=1", "--eval_pairs=0", "--precision=bf16", f"--rehearse=1x{gib:.0f}",
            f"--rehearse_gpu={cfg.gpu}"]
    named = {o.split("=")[0] for o in ours}
    return [o for o in options if o.split("=")[0] not in named] + ours


def update_memory(cfg: Config) -> dict:
    """The step of `update_options` on this device with real tensors: each phase's peak as rehearsal's ledger
    counts it and, on a GPU, as the CUDA allocator does (max_memory_allocated from the phase's start to its end)."""
    import train
    from infra import rehearsal
    from infra.parallel import setup_distributed
    from infra.trainer import Trainer
    rank, world, device = setup_distributed()
    out = Path(cfg.out) / "update"
    run_cfg = train.parse_args(update_options(cfg, Path(cfg.out)) + [f"--out_dir={out}"])
    trainer = Trainer.for_rehearsal(run_cfg, world, device, weights=run_cfg.model == "toy")
    if run_cfg.model != "toy":  # built on the meta device, then allocated: random values, as a GPU holds them
        with torch.no_grad():
            for model in (trainer.policy, trainer.reference):
                for t in list(model.parameters()) + list(model.buffers()):
                    getattr(t, "_local_tensor", t).normal_(0.0, 0.02)
    allocated: dict[str, float] = {}
    with allocator_peaks(allocated, device):
        plan = rehearsal.run_step(run_cfg, world, device, trainer)
    return {"ledger_gib": {phase: row["peak_gib"] for phase, row in plan["phases"].items()}, "allocated_gib": allocated}


@contextlib.contextmanager
def allocator_peaks(peaks: dict, device):
    """Within: `peaks[phase]` = torch.cuda.max_memory_allocated over each phase rehearsal's ledger enters (GiB);
    nothing on the CPU."""
    from infra import rehearsal
    enter, current = rehearsal.Ledger.enter, [None]

    def entering(ledger, phase):
        enter(ledger, phase)
        if ledger.phase != current[0]:  # a new phase: the last one's peak, then a fresh count
            finish(ledger.phase)

    def finish(phase):
        if current[0] is not None:
            peaks[current[0]] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
        current[0] = phase
    if device.type != "cuda":
        yield
        return
    with unittest.mock.patch.object(rehearsal.Ledger, "enter", entering):
        yield
    finish(None)


def start_rehearsal(cfg: Config, out: Path) -> subprocess.Popen:
    """`train.py <update_options> --out_dir=out/rehearsal` on the CPU, in the background: its rehearsal.json."""
    shutil.rmtree(out / "rehearsal", ignore_errors=True)
    command = [sys.executable, str(ROOT / "train.py"), *update_options(cfg, out), f"--out_dir={out / 'rehearsal'}"]
    return start(command, environment(cfg, cpu=True))


def update(cfg: Config, out: Path, rehearsing: subprocess.Popen, deadline: float) -> dict:
    """(d): the real step's peaks beside the rehearsal's prediction, phase by phase."""
    result = {"model": preset(cfg)["update_model"], "options": update_options(cfg, out)}
    real = worker(cfg, "update", deadline)
    _, log = finish(rehearsing, deadline)
    plan_file = out / "rehearsal" / "rehearsal.json"
    if not plan_file.is_file():
        return {**result, "status": "error", "error": "the rehearsal wrote no plan:\n" + log[-3000:]}
    plan = json.loads(plan_file.read_text())
    result.update(predicted_gib={p: row["peak_gib"] for p, row in plan["phases"].items()},
                  rehearsal_seconds=plan["seconds"], **real)
    return result


# ----------------------------------------------------------------------------------------------------------
# Processes


def environment(cfg: Config, cpu: bool = False) -> dict:
    """This process's environment for a child: never this process's group; no GPU for a CPU run or a rehearsal."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if cpu or cfg.device == "cpu" else env


def start(command: list[str], env: dict) -> subprocess.Popen:
    """`command` in a session of its own (so that torchrun's workers go with it when it is stopped), output kept."""
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, deadline: float) -> tuple[str, str]:
    """Wait for `proc` until the deadline, then stop it and its session: ("ok" | "error" | "timeout", its output)."""
    try:
        output = proc.communicate(timeout=max(1.0, deadline - time.time()))[0]
        return ("ok" if proc.returncode == 0 else "error"), output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return "timeout", proc.communicate()[0]


def run(command: list[str], cfg: Config, deadline: float) -> dict:
    """Run `command` until it ends or the deadline: {"status", "seconds", "output"}."""
    started = time.time()
    status, output = finish(start(command, environment(cfg)), deadline)
    return {"status": status, "seconds": round(time.time() - started, 1), "output": output}


def worker(cfg: Config, part: str, deadline: float) -> dict:
    """One part in a fresh process (`--worker=part`): {"status", "seconds", "result"} or the error's output."""
    args = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "worker"]
    ran = run([sys.executable, str(Path(__file__).resolve()), *args, f"--worker={part}"], cfg, deadline)
    lines = [line for line in ran["output"].splitlines() if line.startswith("RESULT ")]
    if ran["status"] == "ok" and lines:
        return {"status": "ok", "seconds": ran["seconds"], "result": json.loads(lines[-1][len("RESULT "):])}
    return {**ran, "status": ran["status"] if ran["status"] != "ok" else "error", "output": ran["output"][-3000:]}


WORKERS = {"equivalence": equivalence, "decode": decode_speed, "update": update_memory}


# ----------------------------------------------------------------------------------------------------------
# The report


def main() -> None:
    cfg = cli.parse(Config, None, __doc__)
    if cfg.worker:
        print("RESULT " + json.dumps(WORKERS[cfg.worker](cfg)), flush=True)
        return
    started = time.time()
    deadline, out = started + cfg.budget, Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rehearsing = start_rehearsal(cfg, out)  # on the CPU, while the device runs (a)-(c)
    report = {"device": device_name(cfg), "cpu_run": cfg.device == "cpu", "preset": preset(cfg),
              "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for part, job in (("equivalence", lambda: worker(cfg, "equivalence", deadline)),
                      ("toy_grpo", lambda: toy_grpo(cfg, out, deadline)),
                      ("decode", lambda: worker(cfg, "decode", deadline)),
                      ("update", lambda: update(cfg, out, rehearsing, deadline))):
        print(f"gpu_check: {part} ...", flush=True)
        report[part] = job()
        print(f"gpu_check: {part}: {report[part]['status']} ({time.time() - started:.0f} s so far)", flush=True)
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {out / 'report.md'} and {out / 'report.json'} ({report['seconds']:.0f} s)")
    failed = [part for part in ("equivalence", "toy_grpo", "decode", "update") if report[part]["status"] != "ok"]
    failed += [r["check"] for r in report["equivalence"].get("result", []) if not r["passed"]]
    if failed:
        sys.exit(f"gpu_check: not ok: {', '.join(failed)}")


def device_name(cfg: Config) -> str:
    if cfg.device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"CPU, {os.cpu_count()} cores"


def markdown(report: dict) -> str:
    """report.json as a page: one table per part, a failed part's output in its place."""
    lines = [f"# gpu_check on {report['device']}, {report['started']}", "",
             f"`{report['command']}`: {report['seconds']:.0f} s in all.", ""]
    if report["cpu_run"]:
        lines += ["**A CPU run**: tiny shapes (the toy model in every part), gloo, inductor's C++ for the compiled "
                  "step. No number here is a GPU's.", ""]
    for title, part, table in (("(a) Equivalence in bf16", "equivalence", equivalence_table),
                               ("(b) Toy GRPO under torchrun", "toy_grpo", grpo_table),
                               ("(c) The decode step", "decode", decode_table),
                               ("(d) One step's memory against its rehearsal", "update", update_table)):
        section = report[part]
        lines += [f"## {title}", ""]
        if section["status"] != "ok":
            lines += [f"**{section['status']}** after {section.get('seconds', 0):.0f} s:", "", "```",
                      section.get("error") or section.get("output", "")[-3000:], "```", ""]
            continue
        lines += table(section) + [""]
    return "\n".join(lines) + "\n"


def equivalence_table(section: dict) -> list[str]:
    rows = section["result"]
    return ["| check | max abs diff | tolerance | result | detail |", "| --- | --- | --- | --- | --- |"] + [
        f"| {r['check']} | {number(r['max_abs_diff'], '.2e')} | {number(r['tolerance'], 'g')} | "
        f"{'pass' if r['passed'] else '**FAIL**'} | {r.get('error') or r['detail']} |" for r in rows] + [
        "", f"{sum(r['passed'] for r in rows)} of {len(rows)} pass."]


def number(value, spec: str = ".3g") -> str:
    """A table cell: a number in `spec`, text as it is, "-" for nothing."""
    return "-" if value is None else value if isinstance(value, str) else format(value, spec)


def grpo_table(section: dict) -> list[str]:
    keys = ("loss", "reward", "ratio", "old_logp_gap_mean", "old_logp_gap_max", "step_time")
    return [f"{section['processes']} processes ({section['backend']}), {section['seconds']:.0f} s: "
            f"`{section['command']}`", "", "| step | " + " | ".join(keys) + " |",
            "| --- |" + " --- |" * len(keys)] + [
        f"| {r['step']} | " + " | ".join(number(r[k]) for k in keys) + " |" for r in section["steps"]]


def decode_table(section: dict) -> list[str]:
    r = section["result"]
    floor = (f"over {r['gpu']}'s {r['bandwidth'] / 1e12:g} TB/s = {r['floor_s'] * 1e3:.2f} ms"
             if r["device"] == "cuda" else "(a GPU's floor: none on a CPU run)")
    lines = [f"{r['model']} ({r['parameters'] / 1e6:.1f}M parameters, random bf16 weights): {r['B']} prompts of "
             f"{r['prompt_tokens']} tokens x G={r['G']}, {r['new_tokens']} new tokens. A mean step reads "
             f"{r['weight_bytes'] / 1e9:.4f} GB of weights and {r['kv_bytes_mean_step'] / 1e9:.4f} GB of KV cache "
             f"{floor}.", "",
             "| decode | ms/step | x floor | decode tokens/s | tokens/s end to end | compile s | graphs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in r["decodes"]:
        if "error" in d:
            lines.append(f"| {d['decode']} | **error**: {d['error']} | | | | | |")
            continue
        compile_s = "" if d["compile_s"] is None else f"{d['compile_s']:.1f}"
        multiple = "-" if d["floor_multiple"] is None else f"{d['floor_multiple']:.1f}"  # a CPU run: no GPU's floor
        lines.append(f"| {d['decode']} | {d['step_s'] * 1e3:.2f} | {multiple} | "
                     f"{d['decode_tokens_per_s']:.0f} | {d['tokens_per_s']:.0f} | {compile_s} | {d['graphs']} |")
    return lines


def update_table(section: dict) -> list[str]:
    real = section["result"]
    allocated = real["allocated_gib"]
    lines = [f"{section['model']}, real tensors (random weights) against the rehearsal on fake ones, rehearsed in "
             f"{section['rehearsal_seconds']:.0f} s: `train.py {' '.join(section['options'])}`", "",
             "| phase | predicted GiB | real, as the ledger counts | real, CUDA max allocated | real / predicted |",
             "| --- | --- | --- | --- | --- |"]
    for phase, predicted in section["predicted_gib"].items():
        measured = allocated.get(phase, real["ledger_gib"].get(phase))
        cuda = f"{allocated[phase]:.3f}" if phase in allocated else "- (CPU)" if not allocated else "-"
        ratio = f"{measured / predicted:.3f}" if measured is not None and predicted else "-"
        lines.append(f"| {phase} | {predicted:.3f} | {real['ledger_gib'].get(phase, float('nan')):.3f} | {cuda} | "
                     f"{ratio} |")
    return lines


if __name__ == "__main__":
    main()
