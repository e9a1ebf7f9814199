"""The GPU's bf16 path, run on the CPU (`--precision=bf16`: FSDP2 mixed precision, frozen models and the decode in
bf16): each piece against its fp32 reference computation or its own other path, with the tolerance measured here
written beside it (max |difference| seen over the toy models of both families, then a margin of about 3x).

In bf16 the sampler's log-probs and the update pass's differ by rounding (other kernels, a cache of bf16 keys);
train.py's pi_old is the update pass's own first reading, so the ratio of eq. (2) starts at exactly 1 whatever
that gap (`test_first_pass_ratio_is_exactly_one_in_bf16`).

Run: .venv/bin/python -m pytest -q tests/test_bf16.py
"""
from __future__ import annotations

import random

import pytest
import torch

import grpo
import sample
from fast import shared_prompt
from fast.static_decode import StaticDecoder
from formats.records import Pair
from models import internals
from models.processor import Processor
from toy import world as toy

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=toy.FAMILIES)
def setup(request):
    """A bf16 toy model, its processor, two prompts of different lengths with two images each."""
    from PIL import Image
    family = request.param
    tok = toy.make_tokenizer(family=family)
    processor = Processor(tok, toy.make_image_processor(max_pixels=128 * 128, family=family))
    rng = random.Random(0)
    image = lambda w, h: Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    pairs = [Pair("a red circle", (image(56, 56), image(84, 56)), 0),
             Pair("a yellow triangle next to a small blue square", (image(56, 112), image(56, 56)), 1)]
    model = toy.make_model(tok, seed=0, family=family).to(torch.bfloat16)
    return model, processor, processor.pairs(pairs)


def test_sampled_logprobs_equal_a_full_forward_in_bf16(setup):
    """The sampler's log-probs (its decode over a bf16 KV cache) against one forward over prompt + completion in
    bf16, the update pass's computation: measured max 5e-7 (Qwen2.5-VL) and 0.0024 (Qwen3-VL), the toy's
    log-probs being about -6: tolerance 0.01."""
    model, processor, batch = setup
    g = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with torch.no_grad():
        rollouts = sample.sample(model, batch, num_samples=3, max_new_tokens=12, temperature=1.0, generator=g,
                                 stop_token_ids=[], pad_token_id=processor.tokenizer.pad_token_id)
        full = grpo.completion_logprobs(model, batch, rollouts.tokens, rollouts.mask)  # (N, T)
    gap = (rollouts.logprobs - full).abs()[rollouts.mask]
    assert gap.max() < 0.01, gap.max()


@pytest.mark.parametrize("compiled", [False, True])
def test_static_decode_equals_the_reference_in_bf16(setup, compiled):
    """The static decode (its own attention and RoPE, the prompt's keys shared) against the reference decode (the
    model's forward on a growing cache), both bf16, the same sampled tokens fed to both: each step's log-probs,
    measured max 0.0039 (both families): tolerance 0.015. Compiled (torch.compile, inductor on this CPU; the
    Qwen2.5-VL toy only, for time): measured max 0.0030, the same tolerance."""
    model, processor, batch = setup
    if compiled and model.config.model_type != "qwen2_5_vl":
        pytest.skip("compiled: one family is enough to show the compiled step's bf16 numbers")
    g = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]
    kw = dict(num_samples=3, max_new_tokens=10, temperature=1.0, stop_token_ids=[],
              pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        reference = sample.sample(model, batch, generator=g(), **kw)
        forced = Forced(StaticDecoder(compile=compiled), reference.tokens)  # the reference's tokens: same rows
        static = sample.sample(model, batch, generator=g(), decoder=forced, **kw)
    gap = (forced.logprobs() - reference.logprobs).abs()[reference.mask]
    assert gap.max() < 0.015, gap.max()
    assert static.tokens.shape == reference.tokens.shape


class Forced:
    """A decoder that feeds given tokens (N, T) instead of the sampled ones and keeps the log-probs of those
    tokens under the logits it returns."""

    def __init__(self, decoder, tokens: torch.Tensor):
        self.decoder, self.tokens, self.seen = decoder, tokens, []

    def start(self, model, prefix, G, max_new_tokens):
        self.t = 0
        return self.keep(self.decoder.start(model, prefix, G, max_new_tokens))

    def step(self, token, live):
        self.t += 1
        return self.keep(self.decoder.step(self.tokens[:, self.t - 1], live))

    def keep(self, logits):
        if self.t < self.tokens.shape[1]:
            self.seen.append(logits.float().log_softmax(-1).gather(-1, self.tokens[:, self.t, None])[:, 0])
        return logits

    def logprobs(self):
        return torch.stack(self.seen, dim=1)  # (N, T)


def test_shared_prompt_equals_repeated_prompt_in_bf16(setup):
    """The shared-prompt update against the repeated-prompt one, bf16 weights (the GPU's mixed-precision forward):
    log-probs measured max 0 (equal), tolerance 0.01; each weight's gradient, its error relative to its norm,
    measured max 0.011 (Qwen2.5-VL) and 0.097 (Qwen3-VL), tolerance 0.3 (bf16 keeps 8 bits of mantissa, and the
    two sum the prompt's G gradients in different orders)."""
    model, processor, batch = setup
    model = model.train()
    g = torch.Generator().manual_seed(3)
    N, T = 6, 7
    completions = torch.randint(20, 400, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[1, 4:] = False
    weights = torch.rand(N, T, generator=g) - 0.5
    results = []
    for hidden in (shared_prompt.completion_hidden, internals.completion_hidden):
        model.zero_grad(set_to_none=True)
        logp = grpo.completion_logprobs(model, batch, completions, mask, 0.7, hidden)  # (N, T)
        (logp * weights * mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (shared, shared_grads), (repeated, repeated_grads) = results
    assert (shared - repeated).abs()[mask].max() < 0.01
    for name, grad in repeated_grads.items():
        error = (shared_grads[name] - grad).norm() / grad.norm().clamp(min=1e-6)
        assert error < 0.3, (name, error)
    model.eval()


@pytest.fixture(scope="module")
def group_of_one():
    """This process as a process group of one (gloo), as a plain `python train.py` is; undone after the module."""
    import os
    import socket

    import torch.distributed as dist
    from infra.parallel import setup_distributed
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(zip(names, ("0", "1", "0", "127.0.0.1", str(port))))
    yield setup_distributed()
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_first_pass_ratio_is_exactly_one(group_of_one, tmp_path, precision):
    """One GRPO step of the toy (two micro-batches, two passes): pi_old is the first pass's own reading, so the
    ratio of eq. (2) is exactly 1 on it and no token is clipped, in bf16 as in fp32; the sampler's log-probs are
    reported against it, `old_logp_gap_*`: about 1e-7 in fp32 and above 1e-3 in bf16 (measured 0.002-0.03)."""
    import train
    from infra.trainer import Trainer
    rank, world, device = group_of_one
    cfg = train.parse_args(["--mode=grpo", f"--out_dir={tmp_path / precision}", "--group_size=4", "--pairs_per_rank=2",
                            "--micro_pairs=1", "--max_new_tokens=6", "--eval_pairs=0", "--w_list=0", "--decode=static",
                            "--shared_prompt=true", f"--precision={precision}", "--num_iterations=2"])
    trainer = Trainer(cfg, rank, world, device)
    seen = []
    grpo_loss = grpo.grpo_loss

    def first_pass(logp, old_logp, *args, **kwargs):  # the ratio of each micro-batch's pass, as grpo_loss sees it
        seen.append(torch.exp(logp.detach() - old_logp))
        return grpo_loss(logp, old_logp, *args, **kwargs)
    grpo.grpo_loss = first_pass
    try:
        metrics = train.grpo_step(cfg, trainer, next(trainer.stream), 0)
    finally:
        grpo.grpo_loss = grpo_loss
    assert len(seen) == 4 and all(bool((r == 1).all()) for r in seen[:2])  # the first pass's two micro-batches
    assert metrics["old_logp_gap_mean"] <= metrics["old_logp_gap_max"]
    if precision == "fp32":
        assert metrics["old_logp_gap_max"] < 1e-4
    else:
        assert metrics["old_logp_gap_max"] > 1e-3
