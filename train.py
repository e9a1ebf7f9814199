"""Train a vision-language preference reasoner with listener-augmented GRPO (or the paper's baselines).

The toy world, on a CPU, in minutes (no download): an SFT cold start that can read but not see, then GRPO
and GRPO with the listener from it, and a table of held-out accuracy, contradictions, faithfulness, listener
agreement and no-thinking accuracy (demo.py):

    torchrun --nproc_per_node=2 train.py

Qwen2.5-VL-7B-Instruct on a random 16% of HPDv2, G=10, with the listener (eq. (5)), on 8 GPUs:

    torchrun --nproc_per_node=8 train.py --mode=grpo --model=/models/Qwen2.5-VL-7B-Instruct \
        --train_data=hpdv2:/data/HPDv2/train.json --train_images=/data/HPDv2 --fraction=0.16 \
        --eval_data=imagereward:/data/ImageReward/test.json --eval_images=/data/ImageReward/images \
        --group_size=10 --pairs_per_rank=2 --max_new_tokens=512 --lr=1e-6 --beta=0.04 \
        --max_pixels=200704 --activation_checkpointing=true --out_dir=runs/hpdv2_listener

The GRPO baseline is the same with --w_list=0; the SFT baseline is --mode=sft; the absolute-score variant
(one image, a rating from 1 to 5, format + exact-match + distance rewards; section 5) is --mode=score. Several nodes: torchrun's
usual --nnodes/--node_rank/--rdzv_endpoint flags. A run restarted with the same --out_dir resumes exactly from
its last checkpoint. Every option is a field of `Config` below, set with --name=value or --name value
(`python train.py --help` lists them with their defaults); bad values stop the run before anything loads.

One GRPO step (section 3.3 and 4.3 of the paper): each rank takes its pairs, samples G rollouts per pair
(sample.py), rewards them (reward.py; the listener's p_correct from listener.py), normalises the rewards
within each group (eq. (1), grpo.py), and minimises the clipped objective with KL (eq. (2), grpo.py) for
`num_iterations` passes over the rollouts, in micro-batches.

Where this departs from the paper, and why:

1. Hyper-parameters the paper does not give (learning rate, KL weight, batch size, rollout length, clip
   range, number of steps) take common GRPO values: lr 1e-6, beta 0.04, clip 0.2, temperature 1.0.
2. old_logp are the log-probabilities the sampler drew the tokens with (sample.py returns them, computed
   from logits / temperature), not a second forward pass: in fp32 they equal the training forward's
   (tests/test_sample.py); in bf16 they differ by rounding, which the clipped ratio absorbs.
3. The reference model of the KL term and the listener are the same frozen instruct checkpoint, held once
   (the paper uses the instruct model for both roles: pi_ref in section 4.3).
4. The loss is normalised exactly across micro-batches and ranks: token and completion counts are summed
   over the whole global batch before any micro-batch's loss is formed (grpo.py, `loss_type`).
5. Sampling randomness is a function of (seed, step, pair): the rollouts of a pair do not depend on how many
   processes share the batch, so 1 and 2 processes train identically, and a resumed run samples exactly
   what the uninterrupted run sampled.
6. The toy default starts from an SFT cold start (demo.py, toy.py): a randomly initialised model cannot
   write the `<think>`/`<answer>` format, nor read a reasoning, by chance; the instruct model the paper
   starts from can. Its targets' answers are drawn at random, so it does not know the preference.
7. Position bias: every training pair is shown in a seeded random order (`data.random_orders`; the label
   follows the images), since files list images in an order that often carries the answer (ranked groups
   best first). `--both_orders=true` goes further and shows each pair in both orders in the same batch. The
   held-out pairs are a seeded sample spread over prompts (`data.spread_sample`), in random orders too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import checkpoint
import cli
import data
import grpo
import reward
import sample
from cli import OptionError, fail, option
from data import PROMPT, Pair, PairStream


@dataclass
class Config:
    """Every option of `train.py`: `--name=value` or `--name value` (dashes or underscores), `--help` lists them."""
    # what to train
    mode: str = option("demo", "demo: the toy world's three stages (demo.py; no other option needed); sft | grpo | score "
                               "(absolute ratings, section 5) train --model", choices=("demo", "sft", "grpo", "score"))
    model: str = option("toy", "the starting checkpoint, a local save_pretrained directory with safetensors weights "
                               "(also the KL reference and the listener); 'toy' builds the tiny toy model")
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
    # GRPO (section 3.3) and rewards (eq. (5))
    group_size: int = option(10, "G, rollouts per pair", min=1)
    pairs_per_rank: int = option(2, "B, pairs per rank and step", min=1)
    micro_pairs: int = option(1, "pairs per forward/backward micro-batch (each with its G rollouts)", min=1)
    max_new_tokens: int = option(512, "rollout length cap", min=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts", min=0.0)
    top_p: float = option(1.0, "nucleus sampling (1: off)", above=0.0, max=1.0)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    compile: bool = option(False, "decode on a static KV cache with a compiled step (sample.StaticDecoder; CUDA "
                                  "graphs on GPU); false: the eager reference decode")
    num_iterations: int = option(1, "optimisation passes over each batch of rollouts", min=1)
    clip_low: float = option(0.2, "PPO clip range below 1 (eq. (2))", min=0.0)
    clip_high: float = option(0.2, "PPO clip range above 1 (eq. (2))", min=0.0)
    beta: float = option(0.04, "the KL weight, the paper's lambda (0: no reference model)", min=0.0)
    loss_type: str = option("sequence", "how token losses are averaged (grpo.py)",
                            choices=("sequence", "token", "dr_grpo"))
    scale_advantages: bool = option(True, "divide advantages by the group's std (eq. (1))")
    mask_truncated: bool = option(False, "no loss on completions cut at --max_new_tokens")
    w_fmt: float = option(1.0, "weight of the format reward (eq. (5))")
    w_acc: float = option(0.5, "weight of the accuracy reward (eq. (5))")
    w_list: float = option(0.5, "weight of the listener reward (eq. (5)); 0 = the paper's GRPO baseline")
    # SFT (the paper's baseline, and the toy world's cold start)
    sft_answers: str = option("label", "answers of the SFT targets: the label, or random (a cold start that does not "
                                       "know the preference)", choices=("label", "random"))
    sft_reasoning: str = option("", "the reasoning written in every SFT target; 'toy': the toy world's cold start "
                                    "(toy.cold_start_reasoning)")
    sft_captions: int = option(0, "toy world's cold start: captions per SFT pair, teaching where colours are "
                                  "(toy.caption_example)", min=0)
    # optimisation
    steps: int = option(1000, "training steps (--mode=demo: each GRPO stage's steps, 400 unless given)", min=1)
    lr: float = option(1e-6, "AdamW learning rate", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0.0)
    freeze_vision: bool = option(False, "train the language model only")
    activation_checkpointing: bool = option(False, "recompute each block in the backward pass (needed at 7B)")
    # bookkeeping
    seed: int = option(0, "seed of the data order, the sampling and the held-out sample", min=0)
    out_dir: str = option("runs/default", "checkpoints and metrics.jsonl; a run restarted here resumes")
    eval_every: int = option(50, "held-out evaluation every N steps (0: before and after only)", min=0)
    save_every: int = option(100, "checkpoint every N steps", min=1)
    keep_last: int = option(2, "checkpoints kept", min=1)
    export_every: int = option(0, "a from_pretrained export every N steps (0: only the one at the end)", min=0)
    allow_config_change: bool = option(False, "resume a checkpoint whose run had other values of options that "
                                              "change training (listed when refused)")

    def validate(self) -> None:
        """What depends on more than one option, or on the disk; runs before anything loads."""
        toy_model = self.model == "toy"
        if self.mode == "demo":
            given = [f"--{k}" for k in ("model", "listener", "train_data", "train_images", "eval_data", "eval_images")
                     if getattr(self, k) != getattr(Config, k)]
            if given:
                raise OptionError(f"--mode=demo runs the toy world and ignores {', '.join(given)}: pass "
                                  f"--mode=grpo (or sft, score) to train --model")
            return
        for name in ("model", "listener"):
            if getattr(self, name) not in ("", "toy"):
                cli.check_checkpoint(name, getattr(self, name))
        if not toy_model and not self.train_data:  # the toy task only when asked for by name
            fail("train_data", self.train_data, "a dataset with a checkpoint as --model (e.g. "
                 "hpdv2:/data/HPDv2/train.json; 'toy' for the toy task)")
        for name in ("train_data", "eval_data"):
            if getattr(self, name) not in ("", "toy"):
                cli.check_dataset(name, getattr(self, name))
        if self.mode in ("grpo", "score"):
            if self.group_size < 2:
                fail("group_size", self.group_size, "a number >= 2: GRPO learns from differences within a group")
            if self.temperature <= 0:
                fail("temperature", self.temperature, "a number > 0 in GRPO: greedy rollouts of a group are all equal")
        if self.both_orders and self.pairs_per_rank % 2:
            fail("pairs_per_rank", self.pairs_per_rank, "an even number with --both_orders=true")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            fail("min_pixels", self.min_pixels, f"at most --max_pixels={self.max_pixels}")
        if self.exclude and not Path(self.exclude).is_file():
            fail("exclude", self.exclude, "the file `python data.py check` writes")


# ----------------------------------------------------------------------------------------------------------
# Processes and devices: the one place that knows about torchrun.


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); a plain `python train.py` is a group of one."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def log(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# Models


def load_model(path: str, device: torch.device, trainable: bool):
    """A checkpoint directory (or "toy") -> `Qwen2_5_VLForConditionalGeneration` on CPU.

    Trainable weights load in fp32 (the optimiser's master copy; FSDP2 computes in bf16 on GPU); frozen ones
    in bf16 on GPU. Weights load from safetensors; no remote code. Only rank 0 reads them: the other ranks
    build the model on the meta device, and `shard` broadcasts rank 0's weights into their shards (one copy
    of the checkpoint in host memory per node, not one per process).
    """
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    if path == "toy":
        import toy
        return toy.make_model(seed=0).train(trainable)
    dtype = torch.float32 if trainable or device.type == "cpu" else torch.bfloat16
    if dist.get_rank() == 0:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                                   use_safetensors=True, local_files_only=True)
    else:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                                                    dtype=dtype, attn_implementation="sdpa")
    return model.train(trainable)


def checkpoint_blocks(model) -> None:
    """Activation checkpointing: each vision block and decoder layer keeps only its input for the backward
    pass and recomputes the rest (memory for compute; needed for 7B with G=10, see README)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    blocks = {id(b) for b in list(model.model.visual.blocks) + list(model.model.language_model.layers)}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)


def shard(model, device: torch.device, checkpointing: bool = False):
    """FSDP2, torchtitan style: each vision block, the vision tower, each decoder layer, then the root.

    Ranks that built the model on the meta device (`load_model`) receive rank 0's weights, shard by shard.
    """
    meta = bool(all_sum(torch.tensor(float(any(p.is_meta for p in model.parameters())), device=device)) > 0)
    full = model.state_dict() if meta and dist.get_rank() == 0 else {}  # rank 0's full weights, to broadcast
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mp_policy": mp} if mp is not None else {}
    if checkpointing:
        checkpoint_blocks(model)
    for block in model.model.visual.blocks:
        fully_shard(block, **kw)
    fully_shard(model.model.visual, **kw)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    elif device.type == "cuda":
        model.to(device)
    if meta:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # not in the state dict (rotary inv_freq): rank 0's are the computed ones
            dist.broadcast(buffer, src=0)
    return model


def frozen(model):
    model.eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------
# Data


def toy_data(cfg: Config) -> Path:
    """Where the toy task lives: next to the run's directory, written once by rank 0 (toy.py)."""
    root = Path(cfg.out_dir).parent / "toy_data"
    if dist.get_rank() == 0 and not (root / "imagereward" / "test.json").exists():
        import toy
        toy.write_dataset(root, n_train=4000, n_test=128, seed=0)
    dist.barrier()
    return root


def load_examples(spec: str, images: str, cfg: Config, train: bool) -> list:
    """A dataset spec ("hpdv2:PATH", ...; "toy") -> training examples for cfg.mode.

    Preference modes take pairs (a ranked group gives all its untied pairs); the score mode takes single
    images with ratings (`data.to_rated`).
    """
    if spec in ("", "toy"):  # training pairs in the HPDv2 layout, held-out groups in the ImageReward layout
        root = toy_data(cfg)
        spec, images = (f"hpdv2:{root / 'hpdv2/train.json'}", str(root / "hpdv2")) if train else \
            (f"imagereward:{root / 'imagereward/test.json'}", str(root / "imagereward"))
    kwargs = {"fraction": cfg.fraction, "seed": cfg.seed} if train else {}
    records = data.load(spec, images or None, skip_bad=cfg.skip_bad, exclude=cfg.exclude, **kwargs)
    if cfg.mode == "score":
        examples = data.to_rated(records, len(PROMPT.ratings))
    else:
        pairs = data.groups_to_pairs(records) if records and isinstance(records[0], data.Group) else records
        examples = data.random_orders(pairs, cfg.seed)  # no answer hidden in the file's image order
    if not train:
        examples = data.spread_sample(examples, cfg.eval_pairs, cfg.seed)  # over prompts, in random order
    if not examples:
        raise ValueError(f"no training examples in {spec}")
    return examples


def heldout_examples(cfg: Config) -> list:
    """The held-out examples scored during training: none without --eval_data for a real model."""
    if not cfg.eval_data and cfg.model != "toy" or cfg.eval_pairs == 0:
        log("no held-out evaluation (pass --eval_data and --eval_pairs to have one)")
        return []
    heldout = load_examples(cfg.eval_data, cfg.eval_images, cfg, train=False)
    if cfg.skip_bad:  # every rank decodes the same list, so all keep the same examples
        heldout, unreadable = data.drop_unreadable(heldout)
        log(f"held-out: left out {unreadable} unreadable images")
    return heldout


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sft_targets(tokenizer, pairs: list[Pair], cfg: Config, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised completions `<think>{reasoning}</think>\\n<answer>{answer}</answer><|im_end|>`, right-padded.

    The reasoning is `cfg.sft_reasoning`, or with "toy" the toy world's ungrounded description arguing for
    the target answer (toy.cold_start_reasoning).
    """
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    texts = []
    for pair in pairs:
        label = int(torch.randint(2, (1,), generator=g)) if cfg.sft_answers == "random" else pair.label
        if cfg.sft_reasoning == "toy":
            import toy
            reasoning = toy.cold_start_reasoning(pair.prompt, label)
        else:
            reasoning = cfg.sft_reasoning
        texts.append(PROMPT.completion(reasoning, PROMPT.answers[label]))
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


def caption_batches(state: "Trainer", pairs: list[Pair], step: int) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """The toy cold start's perception task, a caption per pair: "Which of the two images above is green?" ->
    "The first image is green." (toy.caption_example). It teaches where colours are, not which image people
    prefer. Returns micro-batches of (model inputs, target tokens, their mask)."""
    import toy
    rng = random.Random(state.cfg.seed * 1_000_003 + step)
    out, m = [], 4 * state.cfg.micro_pairs  # caption rows are about a quarter as long as the reasoner's
    for i in range(0, len(pairs), m):
        chunk = pairs[i:i + m]
        messages, targets = zip(*(toy.caption_example(pair.images, rng) for pair in chunk))
        batch = state.processor(list(messages), [pair.images for pair in chunk])
        tokens, mask = completion_tokens(state.processor.tokenizer, list(targets), state.device)
        out.append((to_device(batch, state.device), tokens, mask))
    return out


# ----------------------------------------------------------------------------------------------------------
# One step of each mode. Both return a dict of metrics (tensors, synced once by the caller).


def grpo_step(cfg: Config, state: "Trainer", pairs: list, step: int) -> dict:
    """Sample G rollouts per pair, reward them, and take `num_iterations` optimiser steps on eq. (2).

    In the score mode `pairs` are `data.Rated` images and the rewards those of section 5; the rest is the same.
    """
    t0 = time.time()
    tok = state.processor.tokenizer
    batch = to_device(state.processor.encode(pairs), state.device)
    rollouts = sample.sample(state.policy, batch, num_samples=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             stop_token_ids=sample.stop_token_ids(tok), pad_token_id=tok.pad_token_id,
                             generator=state.generators(pairs, step), decoder=state.decoder)
    texts = rollouts.texts(tok)
    t1 = time.time()
    state.boundary()  # a stop request abandons the step here, or at the next boundary
    micro = state.micro_batches(pairs, cfg.group_size)
    ref_logp, known = reference_pass(cfg, state, pairs, texts, micro, rollouts)  # (N, T), (N, 2)
    rewards, p_correct = score(cfg, state, pairs, texts, known)
    advantages = grpo.group_advantages(rewards["total"], cfg.group_size, scale=cfg.scale_advantages)  # eq. (1)
    mask = grpo.loss_mask(rollouts.mask, ~rollouts.stopped, cfg.mask_truncated)  # (N, T)
    t2 = time.time()
    state.boundary()
    metrics = policy_update(cfg, state, micro, rollouts, ref_logp, advantages, mask)
    metrics.update(rollout_metrics(cfg, pairs, texts, rollouts, rewards, p_correct, known))
    metrics.update(time_sample=torch.tensor(t1 - t0), time_score=torch.tensor(t2 - t1),
                   time_update=torch.tensor(time.time() - t2))
    return metrics


def reference_pass(cfg: Config, state: "Trainer", pairs: list, texts: list[str], micro, rollouts):
    """The reference model's log-probs of the rollouts (N, T) for the KL term, or None when beta = 0; and, when
    the listener is that same model, its answer probabilities (N, 2) for the rollouts whose answer slot this
    pass reads anyway (NaN rows for the others; None when the listener is another model).

    The listener reads prompt + `<think>{reasoning}</think>\n<answer>` and the reference pass reads prompt +
    completion: for a well-formed rollout these are the same tokens up to the answer slot, and one pass of the
    frozen model serves both. `listener.answer_slots` states the condition and checks it per rollout.
    """
    if cfg.beta == 0:
        return None, None
    lst = state.listener
    fused = lst is not None and lst.model is state.reference and lst.fmt == PROMPT  # conditions (a), (b)
    if fused:
        import listener
        slots = listener.answer_slots(state.processor.tokenizer, pairs, texts, rollouts.tokens, rollouts.mask)  # (N,)
    ref_logp, known = [], []
    with torch.no_grad():
        for mb, rows in micro:
            tokens = rollouts.tokens[rows]  # (n, T)
            logits = grpo.completion_logits(state.reference, mb, tokens, rollouts.mask[rows])  # (n, T+1, V)
            ref_logp.append(grpo.token_logprobs(logits[:, :-1], tokens, cfg.temperature))  # (n, T)
            if fused:
                slot = slots[rows]  # (n,)
                at_slot = logits[torch.arange(len(slot), device=slot.device), slot.clamp(min=0)]  # (n, V)
                probs = listener.slot_probs(at_slot, lst.answer_ids)  # (n, 2) eq. (4)
                known.append(probs.masked_fill((slot < 0)[:, None], float("nan")))
    return torch.cat(ref_logp), (torch.cat(known) if fused else None)  # (N, T), (N, 2)


def score(cfg: Config, state: "Trainer", pairs: list, texts: list[str], known=None):
    """Rewards of the B*G completions (eq. (5), or section 5's in the score mode); the listener's p_correct.

    `known` (N, 2): listener probabilities already read by the reference pass (NaN rows where not).
    """
    if cfg.mode == "score":
        targets = [r.rating for r in pairs for _ in range(cfg.group_size)]
        rewards = reward.score_rewards(texts, targets)  # format, exact, distance, total
        return {k: v.to(state.device).float() for k, v in rewards.items()}, None
    labels = [p.label for p in pairs for _ in range(cfg.group_size)]
    p_correct = None
    if state.listener is not None:
        known = None if known is None else in_step(known)
        p_correct = state.listener.p_correct(pairs, texts, known).to(state.device)  # reads the NaN rows itself
    rewards = reward.preference_rewards(texts, labels, p_correct, w_fmt=cfg.w_fmt, w_acc=cfg.w_acc,
                                        w_list=cfg.w_list if p_correct is not None else 0.0)
    return {k: v.to(state.device).float() for k, v in rewards.items()}, p_correct


def in_step(known: torch.Tensor) -> torch.Tensor:
    """`known` with row 0 set to NaN, to be scored again, when this rank has no row left for the listener's own
    pass but another rank has: that pass gathers the FSDP2 weights, a collective every rank must join."""
    here = torch.isnan(known).any()
    if bool(all_sum(here.float()) > 0) and not bool(here):
        known = known.clone()
        known[0] = float("nan")
    return known


def policy_update(cfg: Config, state: "Trainer", micro, rollouts, ref_logp, advantages, mask) -> dict:
    """`num_iterations` optimiser steps on the clipped objective, each accumulated over the micro-batches.

    The token and completion counts are summed over the whole global batch first (all micro-batches, all
    ranks), so each micro-batch's loss is its exact share of the global loss.
    """
    num_tokens, num_sequences = (all_sum(c.to(state.device).float()) for c in grpo.loss_counts(mask))
    metrics: dict = {}
    share = 1 / (len(micro) * cfg.num_iterations)
    for iteration in range(cfg.num_iterations):
        for i, (mb, rows) in enumerate(micro):
            if iteration == 0 and i > 0:
                state.boundary()  # after the first optimiser step the step runs to its end
            logp = grpo.completion_logprobs(state.policy, mb, rollouts.tokens[rows], mask[rows], cfg.temperature)
            loss, m = grpo.grpo_loss(logp, rollouts.logprobs[rows], None if ref_logp is None else ref_logp[rows],
                                     advantages[rows], mask[rows], cfg.clip_low, cfg.clip_high, cfg.beta,
                                     cfg.loss_type, num_tokens=num_tokens, num_sequences=num_sequences,
                                     max_new_tokens=cfg.max_new_tokens)
            (loss * state.world).backward()  # FSDP2 averages gradients over ranks; the loss is already global
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0) + v.detach() * share
            metrics["loss"] = metrics.get("loss", 0) + loss.detach() / cfg.num_iterations
        metrics.update(state.optimizer_step())
    return metrics


def rollout_metrics(cfg: Config, pairs, texts, rollouts, rewards, p_correct, known=None) -> dict:
    """What the rollouts looked like: rewards per component, accuracy, lengths, the listener's view."""
    lengths = rollouts.mask.sum(-1).float()  # (N,)
    total = rewards["total"]
    out = {f"reward_{k}": v.mean() for k, v in rewards.items() if k != "total"}  # each component
    out.update({"reward": total.mean(), "reward_std": total.std(unbiased=False),
           "flat_groups": (total.view(-1, cfg.group_size).std(-1, unbiased=False) == 0).float().mean(),
           "length": lengths.mean(), "length_max": lengths.max(), "truncated": (~rollouts.stopped).float().mean(),
           "tokens": lengths.sum()})
    if p_correct is not None:
        labels = torch.tensor([p.label for p in pairs], device=p_correct.device).repeat_interleave(cfg.group_size)
        picked = torch.tensor([PROMPT.answers.index(a) if a is not None else -1
                               for a in (reward.parse_completion(t)[1] for t in texts)], device=p_correct.device)
        listener_pick = torch.where(p_correct > 0.5, labels, 1 - labels)  # (N,) the image the listener favours
        out["listener_p_correct"] = p_correct.mean()
        if known is not None:
            out["listener_from_reference"] = (~torch.isnan(known).any(-1)).float().mean()  # fused rows
        out["listener_agreement"] = (picked == listener_pick).float().mean()
    return out


def sft_step(cfg: Config, state: "Trainer", pairs: list[Pair], step: int) -> dict:
    """The SFT baseline: maximise log p(target completion | images, prompt), a token mean over the global batch."""
    tokens, mask = sft_targets(state.processor.tokenizer, pairs, cfg, step, state.device)
    batches = [(mb, tokens[rows], mask[rows]) for mb, rows in state.micro_batches(pairs, 1)]
    if cfg.sft_captions:
        batches += caption_batches(state, pairs * cfg.sft_captions, step)
    num_tokens = all_sum(sum(m.sum() for _, _, m in batches).float())
    loss_total = 0
    for i, (mb, t, m) in enumerate(batches):
        if i > 0:
            state.boundary()
        logp = grpo.completion_logprobs(state.policy, mb, t, m)  # (n, T)
        loss = -(logp * m).sum() / num_tokens
        (loss * state.world).backward()
        loss_total = loss_total + loss.detach()
    return {"loss": loss_total, **state.optimizer_step()}


# ----------------------------------------------------------------------------------------------------------
# The trainer's state: models, optimiser, data stream, checkpoints.


class Trainer:
    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.out_dir)
        self.lock, resume, saved = open_run(cfg, rank, world)  # before anything heavy loads
        self.processor = self._processor(cfg.model)
        self.policy = load_model(cfg.model, device, trainable=True)
        if cfg.freeze_vision:
            self.policy.model.visual.requires_grad_(False)
        self.policy = shard(self.policy, device, cfg.activation_checkpointing)
        self.reference = self.listener = None
        if cfg.mode in ("grpo", "score") and (cfg.beta > 0 or (cfg.mode == "grpo" and cfg.w_list > 0 and not cfg.listener)):
            self.reference = frozen(shard(load_model(cfg.model, device, trainable=False), device))
        if cfg.mode == "grpo" and cfg.w_list > 0:
            import listener
            model = self.reference if not cfg.listener else frozen(shard(load_model(cfg.listener, device, False), device))
            self.listener = listener.Listener(model, self.processor)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # --compile: the decode runs on a plain copy of the gathered text weights (bf16 on GPU), see sample.py
        self.decoder = sample.StaticDecoder(compile=True, dtype=torch.bfloat16 if device.type == "cuda" else None) \
            if cfg.compile else None
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.stream = PairStream(load_examples(cfg.train_data, cfg.train_images, cfg, train=True), cfg.pairs_per_rank,
                                 rank=rank, world_size=world, seed=cfg.seed, both_orders=cfg.both_orders,
                                 decode=True, skip_bad=cfg.skip_bad)
        heldout = heldout_examples(cfg)
        self.heldout, self.heldout_total, self.spare = heldout[rank::world], len(heldout), heldout[:1]
        self.step, self.optimizer_steps, self.skipped, self.saved_step = 0, 0, 0, 0
        self.stop = None  # a Stop, checked at the phase boundaries of a step (train() sets it)
        if resume:
            self._load(resume, saved)

    def _processor(self, path: str):
        if path == "toy":
            return data.Processor.toy()
        return data.Processor.from_pretrained(path, self.cfg.min_pixels or None, self.cfg.max_pixels or None)

    def generators(self, pairs: list[Pair], step: int) -> list[torch.Generator]:
        """One generator per pair, seeded by (seed, step, the pair's place in the global batch): see note 5."""
        first = self.rank * len(pairs)
        return [torch.Generator(self.device).manual_seed(hash((self.cfg.seed, step, first + i)) % 2**62)
                for i in range(len(pairs))]

    def micro_batches(self, pairs: list[Pair], group_size: int):
        """[(processor batch of micro_pairs prompts, slice of their rows in the (B*G) rollout batch)]."""
        m = self.cfg.micro_pairs
        return [(to_device(self.processor.encode(pairs[i:i + m]), self.device),
                 slice(i * group_size, (i + len(pairs[i:i + m])) * group_size)) for i in range(0, len(pairs), m)]

    def lr(self) -> float:
        return self.cfg.lr * min(1.0, (self.optimizer_steps + 1) / max(1, self.cfg.warmup_steps))

    def optimizer_step(self) -> dict:
        """Clip, then step, unless the loss or a gradient is NaN/inf: then skip the step and count it."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if torch.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr()
            self.optimizer.step()
            self.optimizer_steps += 1
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm.detach(), "lr": torch.tensor(self.lr()), "skipped": torch.tensor(float(self.skipped))}

    def boundary(self) -> None:
        """A phase boundary inside a step, before the first optimiser step: abandon the step if a stop was asked."""
        if self.stop is not None and self.stop.agreed(self.device):
            raise StepAbandoned

    # -- checkpoints (checkpoint.py): sharded DCP saves of the policy and AdamW, exports for from_pretrained --

    def trainer_state(self) -> dict:
        size = self.processor.image_processor.size  # {shortest,longest}_edge: the pixel bounds in transformers 5
        return {"step": self.step, "optimizer_steps": self.optimizer_steps, "skipped": self.skipped,
                "stream": self.stream.state_dict(), "config": dataclasses.asdict(self.cfg), "world_size": self.world,
                "global_batch": self.cfg.pairs_per_rank * self.world,
                "pixels": {"min_pixels": size.shortest_edge, "max_pixels": size.longest_edge}}

    def save(self) -> Path:
        t = time.time()
        replaced = int(all_sum(torch.tensor(float(self.stream.replaced), device=self.device)))  # over all ranks
        state = self.trainer_state()
        state["stream"]["replaced"] = replaced
        path = checkpoint.save(self.out, self.step, self.policy, self.optimizer, state, self.cfg.keep_last)
        self.saved_step = self.step
        log(f"saved {path} in {time.time() - t:.1f} s")
        return path

    def export(self) -> Path:
        return checkpoint.export(checkpoint.export_dir(self.out, self.step), self.policy, self.processor, self.cfg.model)

    def _load(self, path: Path, saved: dict) -> None:
        t = time.time()
        checkpoint.load(path, self.policy, self.optimizer)
        self.step, self.optimizer_steps, self.skipped = saved["step"], saved["optimizer_steps"], saved["skipped"]
        self.saved_step = self.step
        stream = dict(saved["stream"])  # its count of replaced examples is summed over ranks: rank 0 carries it
        stream["replaced"] = stream.get("replaced", 0) if self.rank == 0 else 0
        if saved["global_batch"] != self.cfg.pairs_per_rank * self.world:  # allowed by --allow_config_change
            stream["index"] = min(stream["index"] * saved["global_batch"] // (self.cfg.pairs_per_rank * self.world),
                                  self.stream.steps_per_epoch)
        self.stream.load_state_dict(stream)
        log(f"resumed from {path} at step {self.step} ({time.time() - t:.1f} s)")


class StepAbandoned(Exception):
    """A stop request seen inside a step, before the step touched the weights."""


def open_run(cfg: Config, rank: int, world: int) -> tuple:
    """Lock out_dir (one live run), check every rank sees it, pick the checkpoint to resume (rank 0 chooses,
    all check they can read it; a damaged one is reported and the previous used) and refuse a changed config.

    Returns (the lock, or None off rank 0; the checkpoint or None; its trainer_state or None).
    """
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    held, error = None, None
    if rank == 0:
        try:
            held = checkpoint.lock(out)
        except RuntimeError as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise SystemExit(message[0])
    try:
        checkpoint.check_shared(out, rank, world)
        resume = checkpoint.pick(out, rank, world)
    except RuntimeError as e:  # an out_dir not shared between nodes; no usable checkpoint
        raise SystemExit(str(e)) from None
    if resume is None:
        return held, None, None
    saved = json.loads((resume / "trainer_state.json").read_text())
    diffs = checkpoint.config_differences(saved["config"], saved["world_size"], dataclasses.asdict(cfg), world,
                                          dataclasses.asdict(Config()))
    if diffs and not cfg.allow_config_change:
        raise SystemExit(f"{resume} was written by a run with another config; resuming it with this one would not "
                         f"continue that run:\n  " + "\n  ".join(diffs) +
                         "\npass --allow_config_change=true to resume anyway, or use another --out_dir")
    if diffs:
        log(f"warning: resuming {resume} with a changed config (--allow_config_change):\n  " + "\n  ".join(diffs))
    return held, resume, saved


# ----------------------------------------------------------------------------------------------------------
# Held-out accuracy and the training loop


@torch.no_grad()
def heldout_accuracy(state: Trainer, batch_pairs: int = 16) -> dict:
    """Greedy rollouts on the held-out examples: the fraction answered right (the preferred image; in the score
    mode the exact rating), and the fraction well formed. On the toy task also the judge's verdicts
    (toy.judge): the fraction of contradictions and of faithful reasonings.

    Every rank runs the same number of batches (sampling under FSDP2 is collective); a rank whose shard is
    shorter re-scores a pair it does not count.
    """
    tok, device = state.processor.tokenizer, state.device
    if not state.heldout_total:
        return {"accuracy": math.nan, "format": math.nan}
    judged = state.cfg.mode == "grpo" and state.cfg.eval_data in ("", "toy")  # the toy task: toy.judge reads it
    if judged:
        from demo import verdict
    counts = torch.zeros(5, device=device)  # right, well-formed, scored, contradictions, faithful
    batches = math.ceil(math.ceil(state.heldout_total / state.world) / batch_pairs)
    for i in range(batches):
        pairs = state.heldout[i * batch_pairs:(i + 1) * batch_pairs]
        batch = to_device(state.processor.encode(pairs or state.spare), device)
        rollouts = sample.sample(state.policy, batch, num_samples=1, max_new_tokens=state.cfg.max_new_tokens,
                                 temperature=0.0, stop_token_ids=sample.stop_token_ids(tok),
                                 pad_token_id=tok.pad_token_id, decoder=state.decoder)
        for example, text in zip(pairs, rollouts.texts(tok)):
            if isinstance(example, data.Rated):  # the score mode: the exact rating
                answer, target = reward.parse_completion(text, vocabulary=PROMPT.ratings)[1], PROMPT.ratings[example.rating - 1]
            else:
                answer, target = reward.parse_completion(text)[1], PROMPT.answers[example.label]
            judge = verdict(example, text) if judged else {"contradiction": 0, "faithful": 0}
            counts += torch.tensor([answer == target, answer is not None, 1.0, judge["contradiction"],
                                    judge["faithful"]], device=device)
    right, formatted, n, contradictions, faithful = all_sum(counts).tolist()
    out = {"accuracy": right / max(n, 1), "format": formatted / max(n, 1)}
    if judged:
        out.update(contradiction_rate=contradictions / max(n, 1), faithfulness=faithful / max(n, 1))
    return out


def reduce_metrics(metrics: dict, world: int, device: torch.device) -> dict[str, float]:
    """Per-rank step metrics -> global ones: sums for the loss and token counts, maxima for maxima, means else."""
    names = sorted(metrics)
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=device).reshape(()) for k in names])
    summed, largest = values.clone(), values.clone()
    dist.all_reduce(summed)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    row = {}
    for k, s_, m in zip(names, summed.tolist(), largest.tolist()):
        row[k] = s_ if k in ("loss", "tokens", "replaced_examples") else m if k in ("length_max", "skipped") else s_ / world
    return row


class Stop:
    """SIGTERM / Ctrl-C: abandon the current step at its next phase boundary, save the last finished one, exit.

    torchrun kills its workers --shutdown-timeout seconds after forwarding SIGTERM (default 30; SLURM's KillWait
    is also 30): so the step is not finished first. Boundaries are after sampling, after scoring, and between
    micro-batches up to the first optimiser step (`Trainer.boundary`); all ranks agree on each (one all-reduce).
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        return bool(all_sum(torch.tensor(float(self.requested), device=device)) > 0)


def train(cfg: Config) -> dict:
    """Run one stage (sft or grpo) to cfg.steps; return held-out accuracy before and after, and the final export."""
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    state = Trainer(cfg, rank, world, device)
    step_fn = sft_step if cfg.mode == "sft" else grpo_step  # the score mode is GRPO with other rewards
    state.stop = stop = Stop()
    before = heldout_accuracy(state)
    log(f"[{cfg.out_dir}] held-out before: accuracy {before['accuracy']:.3f}, well-formed {before['format']:.3f}")
    metrics_file = checkpoint.open_metrics(state.out / "metrics.jsonl", state.step) if rank == 0 else None
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=state.step, desc=f"{cfg.mode} {Path(cfg.out_dir).name}", dynamic_ncols=True)
    while state.step < cfg.steps:
        t = time.time()
        position = state.stream.state_dict()
        pairs = next(state.stream)
        try:
            metrics = step_fn(cfg, state, pairs, state.step)
        except StepAbandoned:  # the weights are those of the last finished step; so is the stream, again
            state.optimizer.zero_grad(set_to_none=True)
            state.stream.load_state_dict(position)
            stop_run(state, f"stop requested during step {state.step + 1}: abandoned")
        metrics["replaced_examples"] = torch.tensor(float(state.stream.replaced))  # unreadable, so far (skip_bad)
        state.step += 1
        row = reduce_metrics(metrics, world, device)  # two collectives and one host sync per step
        row.update(step=state.step, step_time=time.time() - t)
        if "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["step_time"]  # completion tokens sampled, all ranks
        if cfg.eval_every and state.heldout_total and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
            row.update({f"heldout_{k}": v for k, v in heldout_accuracy(state).items()})
        if rank == 0:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward", "reward_accuracy", "heldout_accuracy") if k in row})
        if stop.agreed(device):
            stop_run(state, f"stop requested after step {state.step}")
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            state.save()
        if cfg.export_every and state.step % cfg.export_every == 0 and state.step < cfg.steps:
            state.export()
    final = checkpoint.export_dir(state.out, state.step)
    if not (final / "config.json").exists():
        state.export()
    after = heldout_accuracy(state)
    if rank == 0:
        bar.close()
        metrics_file.close()
    peaks = [None] * world
    dist.all_gather_object(peaks, round(peak_memory_gb(device), 2))
    replaced = int(all_sum(torch.tensor(float(state.stream.replaced), device=device)))
    log(f"[{cfg.out_dir}] held-out after:  accuracy {after['accuracy']:.3f}, well-formed {after['format']:.3f}"
        f"; peak memory per rank (GiB): {peaks}; unreadable examples replaced: {replaced}")
    return {"before": before, "after": after, "final": str(final), "replaced_examples": replaced}


def stop_run(state: Trainer, why: str) -> None:
    """Save the last finished step (unless saved already, or none), then exit cleanly."""
    if state.step > state.saved_step:
        state.save()
    log(f"{why}; the checkpoint of step {state.step} is in {state.out}")
    dist.destroy_process_group()
    sys.exit(0)


def parse_args(argv: list[str]) -> Config:
    """The command line -> a checked Config (cli.py: `--name=value` or `--name value`, `--help`)."""
    return cli.parse(Config, argv, __doc__)


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    rank, world, device = setup_distributed()
    log(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"world size {world}, device {device.type}")
    if cfg.mode == "demo":
        import demo
        demo.run(cfg, train)
    else:
        train(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
