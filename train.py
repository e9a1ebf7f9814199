"""Train a vision-language preference reasoner with listener-augmented GRPO (or the paper's baselines).

    torchrun --nproc_per_node=2 train.py         # the toy world on a CPU, in minutes, nothing downloaded
    torchrun --nproc_per_node=8 train.py --mode=grpo --model=/models/Qwen2.5-VL-7B-Instruct --train_data=...

The toy run (toy/demo.py) trains GRPO, and GRPO with the listener, from a reasoner whose answers do not follow its
reasoning, and prints a table of held-out metrics. The README gives the Qwen2.5-VL-7B command on HPDv2 and the
baselines (--w_list=0: GRPO, --mode=sft, --mode=score: section 5's absolute score). Every option is a field of
`Config` (`--help`); --decode, --shared_prompt and --listener_from_reference plug in speed-ups (fast/), each tested
equal to the path shown here. The same --out_dir resumes a run exactly; metrics go to out_dir/metrics.jsonl.

Read in the method's order: `grpo_step` (G rollouts per pair, sample.py; `score_rollouts`: pi_ref's log-probs and
the listener's p_corr; `rollout_rewards`, eq. (5); advantages, eq. (1); `policy_update`, eq. (2)), one SFT step,
the loop (`train`), the options (`Config`). infra/ holds what they run on: processes, FSDP2, checkpoints.

Where this departs from the paper, and why (grpo.py lists the loss's own, listener.py and reward.py theirs):
1. Hyper-parameters the paper does not give take common GRPO values: lr 1e-6, beta 0.04, clip 0.2, temperature
   1.0, AdamW betas (0.9, 0.99) without weight decay, 10 warm-up optimiser steps, gradient norm clipped at 1.0.
2. pi_old of eq. (2) is the update's own first reading of the rollouts (detached), as in TRL and verl, not the
   sampler's log-probabilities: those come from other kernels (the decode's attention, a cache of bf16 keys) and,
   in bf16, rounding alone could carry a token past the clip range. `old_logp_gap_mean` and `old_logp_gap_max`
   (metrics.jsonl) measure the gap every step; in fp32 they agree to 1e-6.
3. The KL reference and the listener are one frozen instruct checkpoint, held once, unless --listener names
   another (the paper uses the instruct model in both roles: pi_ref, section 4.3).
4. The loss is normalised exactly across micro-batches and ranks: token and completion counts are summed over the
   global batch before any micro-batch's loss is formed (grpo.py's departure 4).
5. Sampling randomness is a function of (seed, step, pair): 1 and 2 processes train identically, and a resumed run
   samples what the uninterrupted one did.
6. The toy has two models, a listener and a reasoner, where the paper has one instruct model in both roles, and
   its GRPO stages sample at temperature 0.5 without eq. (1)'s std (toy/demo.py and docs/toy.md say why).
7. Position bias: each training pair is shown in a seeded random order (`data.random_orders`), since files often
   list the preferred image first; `--both_orders=true` shows each pair both ways in one batch. The held-out
   pairs are a seeded sample spread over prompts (`data.spread_sample`), in random orders.
8. The SFT baseline (--mode=sft) trains on `<think></think>\\n<answer>A</answer>`, an empty reasoning: the paper
   does not say what its SFT targets hold, and HPDv2 has no reasoning to imitate.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import grpo
import reward
import sample
from fast.static_decode import DECODES
from formats.images import DataError
from formats.layouts import MAX_PROMPT_TOKENS
from formats.records import Pair
from infra import checkpoint, cli, tracking
from infra.cli import OptionError, fail, option
from infra.parallel import (PRECISIONS, all_sum, exit_process, gathered, log, peak_memory_gb, setup_distributed,
                            to_device)
from infra import rehearsal
from infra.rehearsal import GPUS
from infra.trainer import Progress, StepAbandoned, Stop, Trainer, heldout_accuracy, reduce_metrics, stop_run
from models.processor import end_of_turn_ids
from prompt import PROMPT, PromptFormat
from report.metrics import rollout_metrics
from toy import demo, world


# ----------------------------------------------------------------------------------------------------------
# One GRPO step: sample -> reference pass and listener -> rewards -> advantages -> update; metrics as tensors


def grpo_step(cfg: Config, trainer: Trainer, pairs: list, step: int) -> dict:
    """Sample G rollouts per pair, reward them, and take `num_iterations` optimiser steps on eq. (2).

    In the score mode `pairs` are `Rated` images and the rewards those of section 5; the rest is the same.
    """
    t0 = time.time()
    tokenizer = trainer.processor.tokenizer
    batch = trainer.encode(pairs)  # B prompts with their images
    with gathered(trainer.policy):  # under FSDP2 the weights are gathered once for the whole rollout
        rollouts = sample.sample(trainer.policy, batch, num_samples=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, stop_token_ids=end_of_turn_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, top_p=cfg.top_p, top_k=cfg.top_k,
                                 generator=trainer.generators(pairs, step), decoder=trainer.decoder)
    texts = rollouts.texts(tokenizer)  # N = B*G completions
    examples = [p for p in pairs for _ in range(cfg.group_size)]  # the pair (or rated image) each rollout answers
    t1 = time.time()
    trainer.boundary()  # a stop request (SIGTERM) abandons the step here, or at the next boundary
    micro = trainer.micro_batches(batch, cfg.group_size)  # [(the inputs of micro_pairs prompts, their rows)]
    # pi_ref's log-probs (N, T) and the listener's p_corr (N,): `score_rollouts` below, unless the trainer has another
    ref_logp, p_correct, score_metrics = (trainer.score_rollouts or score_rollouts)(cfg, trainer, micro, rollouts,
                                                                                     pairs, texts)
    rewards = rollout_rewards(cfg, trainer, examples, texts, p_correct)  # eq. (5)
    advantages = grpo.group_advantages(rewards["total"], cfg.group_size, scale=cfg.scale_advantages)  # eq. (1)
    mask = grpo.loss_mask(rollouts.mask, ~rollouts.stopped, cfg.mask_truncated)  # (N, T)
    t2 = time.time()
    trainer.boundary()
    metrics = policy_update(cfg, trainer, micro, rollouts, ref_logp, advantages, mask)
    metrics.update(rollout_metrics(examples, texts, rollouts, rewards, p_correct, cfg.group_size, trainer.fmt),
                   **score_metrics)
    metrics.update(time_sample=torch.tensor(t1 - t0), time_score=torch.tensor(t2 - t1),
                   time_update=torch.tensor(time.time() - t2))
    return metrics


def score_rollouts(cfg: Config, trainer: Trainer, micro, rollouts, pairs: list, texts: list[str]) -> tuple:
    """What the frozen models read in the rollouts: ref_logp (N, T), pi_ref of eq. (2) at the sampling temperature
    (None when beta = 0); p_correct (N,), the listener's p_corr of eq. (5) (None without a listener or with w_list
    = 0); and what to log of how ({} here). With --listener_from_reference the trainer holds another,
    fast/listener_from_reference.py's, which reads both in one pass."""
    ref_logp = p_correct = None
    if cfg.beta > 0:
        ref_logp = grpo.reference_logprobs(trainer.reference, micro, rollouts.tokens, rollouts.mask, cfg.temperature,
                                           trainer.hidden_fn)  # (N, T)
    if trainer.listener is not None and cfg.w_list > 0:
        p_correct = trainer.listener.p_correct(pairs, texts).to(trainer.device)  # (N,)
    return ref_logp, p_correct, {}


def rollout_rewards(cfg: Config, trainer: Trainer, examples: list, texts: list[str], p_correct) -> dict:
    """Rewards of the N completions, `examples[n]` the pair (or rated image) completion n answers: eq. (5), or
    section 5's in the score mode; each component (N,)."""
    if cfg.mode == "score":
        rewards = reward.score_rewards(texts, [r.rating for r in examples], fmt=trainer.fmt)  # format, exact, distance
    else:
        rewards = reward.preference_rewards(texts, [p.label for p in examples], p_correct, w_fmt=cfg.w_fmt,
                                            w_acc=cfg.w_acc, w_list=cfg.w_list if p_correct is not None else 0.0,
                                            fmt=trainer.fmt)
    return {k: v.to(trainer.device).float() for k, v in rewards.items()}


def policy_update(cfg: Config, trainer: Trainer, micro, rollouts, ref_logp, advantages, mask) -> dict:
    """`num_iterations` optimiser steps on eq. (2), each accumulated over the micro-batches; the whole global batch's
    counts make each micro-batch's loss its exact share (departure 4); pi_old is the first pass's (departure 2)."""
    num_tokens, num_sequences = (all_sum(c.to(trainer.device).float()) for c in grpo.loss_counts(mask))
    old_logp = torch.zeros_like(rollouts.logprobs)  # (N, T) the first pass's log-probs, pi_old of eq. (2)
    metrics: dict = {}
    share = 1 / (len(micro) * cfg.num_iterations)
    for iteration in range(cfg.num_iterations):
        for i, (mb, rows) in enumerate(micro):
            if iteration == 0 and i > 0:
                trainer.boundary()  # after the first optimiser step the step runs to its end
            logp = grpo.completion_logprobs(trainer.policy, mb, rollouts.tokens[rows], rollouts.mask[rows],
                                            cfg.temperature, trainer.hidden_fn)  # (n, T)
            if iteration == 0:
                old_logp[rows] = logp.detach()
            loss, m = grpo.grpo_loss(logp, old_logp[rows], None if ref_logp is None else ref_logp[rows],
                                     advantages[rows], mask[rows], cfg.clip_low, cfg.clip_high, cfg.beta,
                                     cfg.loss_type, num_tokens=num_tokens, num_sequences=num_sequences,
                                     max_new_tokens=cfg.max_new_tokens)
            (loss * trainer.world_size).backward()  # FSDP2 averages gradients over ranks; the loss is already global
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0) + v.detach() * share
            metrics["loss"] = metrics.get("loss", 0) + loss.detach() / cfg.num_iterations
        metrics.update(trainer.optimizer_step())
    gap = (rollouts.logprobs - old_logp).abs() * mask  # (N, T) the sampler's numbers against the trainer's
    metrics.update(old_logp_gap_mean=gap.sum() / num_tokens.clamp(min=1), old_logp_gap_max=gap.max())
    return metrics


# ----------------------------------------------------------------------------------------------------------
# One SFT step: the paper's baseline, and the toy world's cold start


def sft_step(cfg: Config, trainer: Trainer, pairs: list[Pair], step: int) -> dict:
    """The SFT baseline: maximise log p(target completion | images, prompt), a token mean over the global batch."""
    if cfg.sft_answers == "both":
        pairs = [p for p in pairs for _ in (0, 1)]
    tokens, mask = sft_targets(trainer.processor.tokenizer, pairs, cfg, step, trainer.device, trainer.fmt)  # (B, T)
    batches = [(mb, tokens[rows], mask[rows]) for mb, rows in trainer.micro_batches(trainer.encode(pairs), 1)]
    if cfg.sft_captions:
        batches += caption_batches(trainer, pairs * cfg.sft_captions, step)
    if cfg.sft_answer_captions:
        batches += caption_batches(trainer, pairs * cfg.sft_answer_captions, step + 10**6, answer_slot=True)
    num_tokens = all_sum(sum(m.sum() for _, _, m in batches).float())
    loss_total = 0
    for i, (mb, t, m) in enumerate(batches):
        if i > 0:
            trainer.boundary()
        logp = grpo.completion_logprobs(trainer.policy, mb, t, m, hidden=trainer.hidden_fn)  # (n, T)
        loss = -(logp * m).sum() / num_tokens
        (loss * trainer.world_size).backward()
        loss_total = loss_total + loss.detach()
    return {"loss": loss_total, **trainer.optimizer_step()}


def sft_targets(tokenizer, pairs: list[Pair], cfg: Config, step: int, device,
                fmt: PromptFormat = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised completions `<think>{reasoning}</think>\\n<answer>{answer}</answer><|im_end|>` in `fmt`, right-padded.

    The reasoning is `cfg.sft_reasoning`, or with "toy" the toy world's ungrounded description arguing for
    the target answer (toy/world.py's `cold_start_reasoning`).
    """
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    texts = []
    for i, pair in enumerate(pairs):
        if cfg.sft_answers == "both":  # `sft_step` lists each pair twice: answer image 0, then image 1
            label = i % 2
        else:
            label = int(torch.randint(2, (1,), generator=g)) if cfg.sft_answers == "random" else pair.label
        if cfg.sft_reasoning == "toy":
            reasoning = world.cold_start_reasoning(pair.prompt, label)
        else:
            reasoning = cfg.sft_reasoning
        texts.append(fmt.completion(reasoning, fmt.answers[label]))
    return completion_tokens(tokenizer, texts, device)


def completion_tokens(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion texts -> right-padded tokens ending in EOS, and their mask: (N, T) each."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return tokens.to(device), mask.to(device)


def caption_batches(trainer: Trainer, pairs: list[Pair], step: int,
                    answer_slot: bool = False) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """The toy cold start's perception task, a caption per pair: "Which of the two images above is green?" ->
    "The first image is green.", or, `answer_slot`, the same question in the answer format answered "1" at the
    answer slot (toy/world.py's `caption_example`). It teaches where colours are, not which image people prefer.
    Returns micro-batches of (model inputs, target tokens, their mask)."""
    rng = random.Random(trainer.cfg.seed * 1_000_003 + step)
    out, m = [], 4 * trainer.cfg.micro_pairs  # caption rows are about a quarter as long as the reasoner's
    for i in range(0, len(pairs), m):
        chunk = pairs[i:i + m]
        messages, targets = zip(*(world.caption_example(pair.images, rng, answer_slot, trainer.fmt) for pair in chunk))
        batch = trainer.processor(list(messages), [pair.images for pair in chunk])
        tokens, mask = completion_tokens(trainer.processor.tokenizer, list(targets), trainer.device)
        out.append((to_device(batch, trainer.device), tokens, mask))
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config) -> dict:
    """Run one stage (sft or grpo) to cfg.steps; return held-out accuracy before and after, and the final export."""
    rank, world_size, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, rank, world_size, device)
    step_fn = sft_step if cfg.mode == "sft" else grpo_step  # the score mode is GRPO with other rewards
    trainer.stop = stop = Stop()
    before = heldout_accuracy(trainer)
    log(f"[{cfg.out_dir}] held-out before: accuracy {before['accuracy']:.3f}, well-formed {before['format']:.3f}")
    progress = Progress(cfg, trainer.step, rank)  # metrics.jsonl and a progress bar, on rank 0
    while trainer.step < cfg.steps:
        t = time.time()
        position = trainer.stream.state_dict()
        pairs = next(trainer.stream)
        try:
            metrics = step_fn(cfg, trainer, pairs, trainer.step)
        except StepAbandoned:  # the weights are those of the last finished step; so is the stream, again
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.stream.load_state_dict(position)
            stop_run(trainer, f"stop requested during step {trainer.step + 1}: abandoned")
        metrics["replaced_examples"] = torch.tensor(float(trainer.stream.replaced))  # unreadable, so far (skip_bad)
        trainer.step += 1
        row = reduce_metrics(metrics, world_size, device)  # two collectives and one host sync per step
        row.update(step=trainer.step, step_time=time.time() - t)
        if "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["step_time"]  # completion tokens sampled, all ranks
        if cfg.eval_every and trainer.heldout_total and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps:
            row.update({f"heldout_{k}": v for k, v in heldout_accuracy(trainer).items()})
        progress.write(row)
        if stop.agreed(device):
            stop_run(trainer, f"stop requested after step {trainer.step}")
        if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
            trainer.save()
        if cfg.export_every and trainer.step % cfg.export_every == 0 and trainer.step < cfg.steps:
            trainer.export()
    final = checkpoint.export_dir(trainer.out, trainer.step)
    if not (final / "config.json").exists():
        trainer.export()
    after = heldout_accuracy(trainer)
    progress.close()
    peaks = [None] * world_size
    dist.all_gather_object(peaks, round(peak_memory_gb(device), 2))
    replaced = int(all_sum(torch.tensor(float(trainer.stream.replaced), device=device)))
    log(f"[{cfg.out_dir}] held-out after:  accuracy {after['accuracy']:.3f}, well-formed {after['format']:.3f}"
        f"; peak memory per rank (GiB): {peaks}; unreadable examples replaced: {replaced}")
    return {"before": before, "after": after, "final": str(final), "replaced_examples": replaced}


# ----------------------------------------------------------------------------------------------------------
# The options


@dataclass
class Config:
    """Every option of `train.py`: `--name=value` or `--name value` (dashes or underscores), `--help` lists them."""
    # what to train
    mode: str = option("demo", "demo: the toy world's four trainings and their table (toy/demo.py; no other option needed); sft | grpo | score "
                               "(absolute ratings, section 5) train --model", choices=("demo", "sft", "grpo", "score"))
    model: str = option("toy", "the starting checkpoint, a local save_pretrained directory with safetensors weights "
                               "(also the KL reference and the listener); 'toy' builds the tiny toy model", blank=False)
    listener: str = option("", "the listener's checkpoint directory; '' = the reference model (held once)")
    train_data: str = option("", "hpdv2:PATH | imagereward:PATH | rapidata:P1,P2 | pickapic:P | toy; required "
                                 "with a checkpoint as --model ('' = toy with --model=toy)")
    train_images: str = option("", "image root of --train_data")
    eval_data: str = option("", "held-out data, same forms as --train_data; '' = toy with --model=toy, no "
                                "held-out evaluation with a checkpoint")
    eval_images: str = option("", "image root of --eval_data")
    fraction: float = option(1.0, "deterministic random subsample of the training pairs (the paper: 0.16 of HPDv2)",
                             above=0.0, max=1.0)
    skip_bad: bool = option(False, "leave out bad records; replace an example whose image cannot be read by the next "
                                   "readable one (counted: replaced_examples in metrics.jsonl)")
    exclude: str = option("", "records to leave out: the file `python data.py check` writes")
    both_orders: bool = option(False, "show each training pair in both orders, side by side (beyond the seeded "
                                      "per-pair order swap, which is always on)")
    eval_pairs: int = option(256, "held-out pairs scored every --eval_every steps: a seeded sample spread over "
                                  "prompts", min=0)
    min_pixels: int = option(0, "image processor min_pixels (0: the checkpoint's)", min=0)
    max_pixels: int = option(0, "image processor max_pixels (0: the checkpoint's); bounds the image tokens", min=0)
    max_prompt_tokens: int = option(MAX_PROMPT_TOKENS, "the longest dataset prompt read, in tokens: a longer record "
                                    "is refused, naming it (left out and counted with --skip_bad)", min=1)
    prompt_format: str = option("", "JSON file of prompt.PromptFormat's fields (the question, tags, answers, ratings) "
                                    "to train in; '' = --model's prompt_format.json, else prompt.PROMPT. Written into "
                                    "every checkpoint and export as prompt_format.json")
    # GRPO (section 3.3) and rewards (eq. (5))
    group_size: int = option(10, "G, rollouts per pair", min=1)
    pairs_per_rank: int = option(2, "B, pairs per rank and step", min=1)
    micro_pairs: int = option(1, "pairs per forward/backward micro-batch (each with its G rollouts)", min=1)
    max_new_tokens: int = option(512, "rollout length cap", min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    decode: str = option("reference", "how rollouts are decoded: reference (sample.CopiedCache, the readable one), "
                         "static (fast/static_decode.py: a static KV cache, each prompt's keys and values stored once) "
                         "or compiled (that step under torch.compile; CUDA graphs on GPU)", choices=DECODES)
    shared_prompt: bool = option(False, "the update and the KL reference pass read each prompt once for its G "
                                        "completions (fast/shared_prompt.py) instead of once per completion")
    listener_from_reference: bool = option(False, "read the listener's answer slot out of the KL reference pass "
                                                  "where a rollout allows it (fast/listener_from_reference.py); the "
                                                  "listener must be the reference model (no --listener)")
    num_iterations: int = option(1, "optimisation passes over each batch of rollouts", min=1)
    clip_low: float = option(0.2, "PPO clip range below 1 (eq. (2)): the ratio is clipped at 1 - clip_low, which "
                                  "must stay above 0", min=0.0, below=1.0)
    clip_high: float = option(0.2, "PPO clip range above 1 (eq. (2))", min=0.0)
    beta: float = option(0.04, "the KL weight, the paper's lambda (0: no reference model)", min=0.0)
    loss_type: str = option("sequence", "how token losses are averaged (grpo.py)",
                            choices=("sequence", "token", "dr_grpo"))
    scale_advantages: bool = option(True, "divide advantages by the group's std (eq. (1))")
    mask_truncated: bool = option(False, "no loss on completions cut at --max_new_tokens")
    w_fmt: float = option(1.0, "weight of the format reward (eq. (5))", min=0.0)
    w_acc: float = option(0.5, "weight of the accuracy reward (eq. (5))", min=0.0)
    w_list: float = option(0.5, "weight of the listener reward (eq. (5)); 0 = the paper's GRPO baseline", min=0.0)
    # SFT (the paper's baseline, and the toy world's cold start)
    sft_answers: str = option("label", "answers of the SFT targets: the label; random (a cold start that does not "
                                       "know the preference); or both (each pair twice, answering each image: the "
                                       "toy listener, whose answer only reading can explain). The toy reasoning "
                                       "(--sft_reasoning=toy) argues for the answer", choices=("label", "random", "both"))
    sft_reasoning: str = option("", "the reasoning written in every SFT target; 'toy': the toy world's cold start "
                                    "(toy/world.py's cold_start_reasoning)")
    sft_captions: int = option(0, "toy world's cold start: captions per SFT pair, teaching where colours are "
                                  "(toy/world.py's caption_example)", min=0)
    sft_answer_captions: int = option(0, "toy world's cold start: captions per SFT pair asked in the answer format, "
                                         "answered at the answer slot: it learns to see there too", min=0)
    # optimisation
    steps: int = option(1000, "training steps (--mode=demo: each GRPO stage's steps, toy/demo.py's 130 unless "
                                "given)", min=1)
    lr: float = option(1e-6, "AdamW learning rate", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0.0)
    freeze_vision: bool = option(False, "train the language model only")
    activation_checkpointing: bool = option(False, "recompute each block in the backward pass (needed at 7B)")
    precision: str = option("auto", "bf16: FSDP2 mixed precision (fp32 weights and AdamW, bf16 compute, fp32 gradient "
                                    "reduction; frozen models in bf16); fp32 throughout; auto: bf16 on a GPU, fp32 on "
                                    "the CPU (infra/parallel.py)", choices=PRECISIONS)
    # bookkeeping
    seed: int = option(0, "seed of the data order, the sampling and the held-out sample", min=0, max=2**63 - 1)
    out_dir: str = option("runs/default", "checkpoints and metrics.jsonl; a run restarted here resumes", blank=False)
    eval_every: int = option(50, "held-out evaluation every N steps (0: before and after only)", min=0)
    save_every: int = option(100, "checkpoint every N steps", min=1)
    keep_last: int = option(2, "checkpoints kept", min=1)
    export_every: int = option(0, "a from_pretrained export every N steps (0: only the one at the end)", min=0)
    allow_config_change: bool = option(False, "resume a checkpoint whose run had other values of options that "
                                              "change training (listed when refused)")
    report_to: str = option("none", "watch the run live, every metrics.jsonl field per step: tensorboard (event files "
                                    "in out_dir/tensorboard), wandb, or tensorboard,wandb; each package is needed only "
                                    "when named (infra/tracking.py)")
    wandb_project: str = option("listener-grpo", "the W&B project of --report_to=wandb (the run is named after out_dir)")
    # planning
    rehearse: str = option("", "GPUSxGIB, e.g. 8x80: plan this run on this CPU instead of running it: the models at "
                                "their real size on fake tensors, FSDP2 over GPUS fake ranks, one step at the worst "
                                "case the options allow; prints each phase's peak memory per GPU and writes "
                                "out_dir/rehearsal.json; exit status 3 when it does not fit in GIB (infra/rehearsal.py)")
    rehearse_gpu: str = option("h100", "the GPU whose peak bf16 FLOP/s and memory bandwidth give --rehearse's time "
                                       "floors", choices=tuple(GPUS))

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        tracking.require(self.report_to)  # a missing tensorboard or wandb stops the run here
        cli.check_output("out_dir", self.out_dir, folder=True)
        toy_model = self.model == "toy"
        if self.rehearse and self.mode == "demo":
            fail("rehearse", self.rehearse, "a run to plan: --mode=grpo, sft or score with its options (the demo's "
                 "four stages are toy-sized)")
        if self.mode == "demo":
            given = [f"--{k}" for k in ("model", "listener", "train_data", "train_images", "eval_data", "eval_images",
                                        "prompt_format") if getattr(self, k) != getattr(Config, k)]
            if given:
                raise OptionError(f"--mode=demo runs the toy world and ignores {', '.join(given)}: pass "
                                  f"--mode=grpo (or sft, score) to train --model")
            return
        if self.rehearse:
            try:
                rehearsal.parse_spec(self.rehearse)
            except ValueError as e:
                raise OptionError(str(e)) from None
        cli.check_models({"model": self.model, "listener": self.listener}, self.min_pixels, self.max_pixels,
                         self.max_prompt_tokens, self.max_new_tokens, weights=not self.rehearse)
        cli.check_prompt_format("prompt_format", self.prompt_format, {"model": self.model, "listener": self.listener})
        if not toy_model and not self.train_data and not self.rehearse:  # the toy task only when asked for by name
            fail("train_data", self.train_data, "a dataset with a checkpoint as --model (e.g. "
                 "hpdv2:/data/HPDv2/train.json; 'toy' for the toy task)")
        for name in ("train_data", "eval_data"):
            if getattr(self, name) not in ("", "toy") and not self.rehearse:  # a rehearsal reads no data
                cli.check_dataset(name, getattr(self, name))
                cli.check_folder(name.replace("data", "images"), getattr(self, name.replace("data", "images")),
                                 f"the image root of --{name}")
        if self.mode == "grpo" and self.w_fmt + self.w_acc + self.w_list == 0:
            fail("w_acc", self.w_acc, "a weight > 0 on at least one reward (--w_fmt, --w_acc, --w_list): with all "
                 "three 0 every reward is 0 and GRPO has nothing to learn")
        if self.mode in ("grpo", "score"):
            if self.group_size < 2:
                fail("group_size", self.group_size, "a number >= 2: GRPO learns from differences within a group")
            if self.temperature <= 0:
                fail("temperature", self.temperature, "a number > 0 in GRPO: greedy rollouts of a group are all equal")
        if self.both_orders and self.pairs_per_rank % 2:
            fail("pairs_per_rank", self.pairs_per_rank, "an even number with --both_orders=true")
        if self.exclude and not Path(self.exclude).is_file():
            fail("exclude", self.exclude, "the file `python data.py check` writes")
        if self.listener_from_reference and (self.listener or self.beta == 0 or self.mode != "grpo" or self.w_list == 0):
            fail("listener_from_reference", True, "a listener that is the KL reference model: --mode=grpo, --w_list > 0, "
                 "--beta > 0 and no --listener")

    def unread(self) -> tuple[str, ...]:
        """The options this mode never reads while it trains (`UNREAD`)."""
        return UNREAD.get(self.mode, ())


# The options a mode never reads while it trains (the held-out evaluation aside): a resumed run may change them,
# as it may change the options checkpoint.py's NOT_TRAINING lists.
SFT_ONLY = ("sft_answers", "sft_reasoning", "sft_captions", "sft_answer_captions")
UNREAD = {"sft": ("group_size", "max_new_tokens", "temperature", "top_p", "top_k", "listener", "num_iterations",
                  "clip_low", "clip_high", "beta", "loss_type", "scale_advantages", "mask_truncated", "w_fmt", "w_acc",
                  "w_list"),
          "grpo": SFT_ONLY, "score": SFT_ONLY + ("listener", "w_fmt", "w_acc", "w_list")}


def parse_args(argv: list[str]) -> Config:
    """The command line -> a checked Config (infra/cli.py: `--name=value` or `--name value`, `--help`)."""
    return cli.parse(Config, argv, __doc__)


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    if cfg.rehearse:  # plan the run on this CPU instead (infra/rehearsal.py)
        sys.exit(rehearsal.rehearse(cfg))
    rank, world_size, device = setup_distributed()
    log(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"world size {world_size}, device {device.type}")
    try:
        if cfg.mode == "demo":
            demo.run(cfg, train)
        else:
            train(cfg)
    except DataError as e:  # a dataset that cannot be used: the message names its file, record and field
        raise SystemExit(f"train.py: error: {e}")
    exit_process(0)


if __name__ == "__main__":
    main()
