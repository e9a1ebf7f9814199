"""Tests for grpo.py: every function against a plain computation written here.

Run: .venv/bin/python -m pytest -q tests/test_grpo.py
"""

import statistics

import pytest
import torch

import grpo
from models import internals

from grpo import group_advantages, grpo_loss, loss_counts, loss_mask

LOSS_TYPES = ("sequence", "token", "dr_grpo")
MAX_NEW = 9  # max_new_tokens for dr_grpo; larger than T below, as a real cap would be


# ---------------------------------------------------------------- plain references


def slow_advantages(rewards, group_size, eps, scale):
    """eq. (1) with a python loop and statistics.pstdev."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean, std = statistics.fmean(group), statistics.pstdev(group)
        for r in group:
            out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


def slow_loss(logp, old, ref, adv, mask, clip_low, clip_high, beta, loss_type, max_new_tokens=None):
    """Loss and metrics by hand, one token at a time, with if-statements for the clip and the min."""
    per_seq, all_terms, kls, ratios, lengths = [], [], [], [], []
    n_low = n_high = 0
    for i in range(logp.shape[0]):
        a = float(adv[i])
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            if ratio < 1 - clip_low:
                clipped = torch.tensor(1 - clip_low, dtype=logp.dtype)
            elif ratio > 1 + clip_high:
                clipped = torch.tensor(1 + clip_high, dtype=logp.dtype)
            else:
                clipped = ratio
            surrogate = ratio * a if ratio * a <= clipped * a else clipped * a
            n_low += bool(ratio < 1 - clip_low and a < 0)
            n_high += bool(ratio > 1 + clip_high and a > 0)
            d = ref[i, t] - logp[i, t]
            kl = torch.exp(d) - d - 1
            terms.append(-(surrogate - beta * kl))
            kls.append(float(kl.detach()))
            ratios.append(float(ratio.detach()))
        if terms:
            per_seq.append(sum(terms) / len(terms))
            all_terms += terms
            lengths.append(len(terms))
    if loss_type == "sequence":
        loss = sum(per_seq) / len(per_seq)
    elif loss_type == "token":
        loss = sum(all_terms) / len(all_terms)
    else:
        loss = sum(all_terms) / (len(per_seq) * max_new_tokens)
    n = len(all_terms)
    metrics = {"kl": sum(kls) / n, "clip_low": n_low / n, "clip_high": n_high / n,
               "ratio": sum(ratios) / n, "length": sum(lengths) / len(lengths)}
    return loss, metrics


def random_batch(seed, N=7, T=6):
    """float64 log-probs with ragged masks; row 4 is empty (a completion left out of the loss)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)  # some ratios leave [0.8, 1.2]
    ref = logp + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[4] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T) bool
    return logp, old, ref, adv, mask


# ---------------------------------------------------------------- eq. (1)


def test_group_advantages_match_pstdev_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(4 * 5, generator=g, dtype=torch.float64)
    for scale in (True, False):
        got = group_advantages(rewards, group_size=5, eps=1e-6, scale=scale)
        want = slow_advantages(rewards.tolist(), 5, 1e-6, scale)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_group_advantages_equal_group_is_exactly_zero():
    rewards = torch.cat([torch.full((10,), 0.1), torch.tensor([0.0, 1.0] * 5)])  # float32, G = 10 as the paper
    group = rewards[:10]
    naive = (group - group.mean()) / (group.std(correction=0) + 1e-6)
    assert naive.abs().max() > 0, "the example should show the rounding noise this test is about"
    adv = group_advantages(rewards, group_size=10)
    assert torch.equal(adv[:10], torch.zeros(10))
    assert torch.isfinite(adv).all()
    assert torch.equal(group_advantages(rewards, 10, scale=False)[:10], torch.zeros(10))
    torch.testing.assert_close(adv[10:], torch.tensor(slow_advantages([0.0, 1.0] * 5, 10, 1e-6, True)))


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(7), group_size=3)


# ---------------------------------------------------------------- eq. (2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_grad_match_token_loop(loss_type):
    logp, old, ref, adv, mask = random_batch(seed=1)
    kw = dict(clip_low=0.2, clip_high=0.28, beta=0.05)
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, max_new_tokens=MAX_NEW, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_()
    want, want_metrics = slow_loss(y, old, ref, adv, mask, loss_type=loss_type, max_new_tokens=MAX_NEW, **kw)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6)
    assert 0 < want_metrics["clip_low"] + want_metrics["clip_high"], "the batch should clip some tokens"
    for name, value in want_metrics.items():
        assert not metrics[name].requires_grad
        torch.testing.assert_close(metrics[name].double(), torch.tensor(value, dtype=torch.float64),
                                   rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_pass_gradient_is_policy_gradient(loss_type):
    logp, _, _, adv, mask = random_batch(seed=2)
    x = logp.clone().requires_grad_()
    loss, _ = grpo_loss(x, logp.detach(), None, adv, mask, beta=0.0, loss_type=loss_type, max_new_tokens=MAX_NEW)
    (grad,) = torch.autograd.grad(loss, x)
    want = torch.zeros_like(logp)
    lengths = mask.sum(1).tolist()
    kept = sum(1 for n in lengths if n > 0)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                scale = {"sequence": lengths[i] * kept, "token": sum(lengths), "dr_grpo": kept * MAX_NEW}
                want[i, t] = -adv[i] / scale[loss_type]
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_kl_is_zero_at_reference_and_positive_elsewhere():
    logp, old, ref, adv, mask = random_batch(seed=3)
    zero_adv = torch.zeros_like(adv)
    loss, metrics = grpo_loss(logp, old, logp.clone(), zero_adv, mask, beta=0.1, loss_type="token")
    assert loss == 0 and metrics["kl"] == 0
    loss, metrics = grpo_loss(logp, old, ref, zero_adv, mask, beta=0.1, loss_type="token")
    assert loss > 0 and metrics["kl"] > 0
    torch.testing.assert_close(loss, 0.1 * metrics["kl"])  # with A = 0 the loss is the KL term alone


def test_clipping_stops_gradient_on_the_right_side():
    # one token per row: (ratio, A); clip_low = 0.2, clip_high = 0.28
    cases = [(1.5, 1.0, "zero"), (0.5, -1.0, "zero"), (1.25, 1.0, "grad"),  # 1.25 is inside clip-higher
             (0.5, 1.0, "grad"), (1.5, -1.0, "grad")]
    old = torch.zeros(len(cases), 1, dtype=torch.float64)
    logp = torch.tensor([[torch.log(torch.tensor(r)).item()] for r, _, _ in cases], dtype=torch.float64)
    adv = torch.tensor([a for _, a, _ in cases], dtype=torch.float64)
    mask = torch.ones(len(cases), 1, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, None, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.0, loss_type="token")
    (grad,) = torch.autograd.grad(loss, x)
    for i, (ratio, a, expect) in enumerate(cases):
        if expect == "zero":
            assert grad[i, 0] == 0, cases[i]
        else:
            torch.testing.assert_close(grad[i, 0], torch.tensor(-a * ratio / len(cases), dtype=torch.float64))
    assert metrics["clip_high"] == 1 / len(cases) and metrics["clip_low"] == 1 / len(cases)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_global_counts_equal_full_batch(loss_type):
    logp, old, ref, adv, mask = random_batch(seed=4)
    kw = dict(beta=0.05, loss_type=loss_type, max_new_tokens=MAX_NEW)
    x = logp.clone().requires_grad_()
    full, _ = grpo_loss(x, old, ref, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, x)

    parts = [slice(0, 3), slice(3, None)]
    counts = [loss_counts(mask[p]) for p in parts]
    num_tokens = sum(c[0] for c in counts)  # what an all-reduce over micro-batches and ranks would give
    num_sequences = sum(c[1] for c in counts)
    y = logp.clone().requires_grad_()
    summed = sum(grpo_loss(y[p], old[p], ref[p], adv[p], mask[p], num_tokens=num_tokens,
                           num_sequences=num_sequences, **kw)[0] for p in parts)
    (summed_grad,) = torch.autograd.grad(summed, y)
    torch.testing.assert_close(summed, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(summed_grad, full_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_gets_zero_grad_and_stop_token_gets_grad(loss_type):
    logp, old, ref, adv, mask = random_batch(seed=5)
    adv = adv.sign() + adv  # |A| >= 1: every kept row has a clear gradient
    clean, _ = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_new_tokens=MAX_NEW)
    # garbage in the padding: overflowing ratios, -inf, NaN must change nothing
    logp = logp.masked_fill(~mask, 60.0)
    old = old.masked_fill(~mask, -float("inf"))
    ref = ref.masked_fill(~mask, float("nan"))
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, max_new_tokens=MAX_NEW)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(loss, clean)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    for i, n in enumerate(mask.sum(1).tolist()):
        if n > 0:
            assert grad[i, n - 1] != 0, f"stop token of row {i} got no gradient"


def test_loss_mask_drops_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([False, True, False])
    assert torch.equal(loss_mask(mask, truncated, mask_truncated=False), mask)
    dropped = loss_mask(mask, truncated, mask_truncated=True)
    for i in range(3):
        want = torch.zeros(3, dtype=torch.bool) if truncated[i] else mask[i]
        assert torch.equal(dropped[i], want)


def test_gradient_flows_only_through_logp():
    logp, old, ref, adv, mask = random_batch(seed=6)
    inputs = [t.clone().requires_grad_() for t in (logp, old, ref, adv)]
    loss, _ = grpo_loss(*inputs, mask, beta=0.05)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:]), "old_logp, ref_logp and advantages must be constants"


# ---------------------------------------------------------------------------------------------------------
# completion_logprobs on the toy Qwen2.5-VL, against a naive full forward per row


FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # toy/world.py builds either


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_logprobs_equal_naive_forward_per_row(family):
    import random

    from toy import world as toy
    from formats.records import Pair
    from models.processor import Processor
    from grpo import completion_logprobs

    torch.manual_seed(0)
    processor = Processor(toy.make_tokenizer(family=family), toy.make_image_processor(max_pixels=128 * 128, family=family))
    model = toy.make_model(processor.tokenizer, family=family)
    rng = random.Random(0)
    pairs = []
    for size in [(56, 56), (112, 56)]:  # different image sizes -> different numbers of image tokens
        prompt, images, _ = toy.make_group(rng, 2)
        pairs.append(Pair(prompt + " and more words" * len(pairs), tuple(im.resize(size) for im in images), 0))
    batch = processor.pairs(pairs)  # left-padded: the two prompts differ in length
    G, T, temperature = 3, 6, 0.7
    completions = torch.randint(20, 400, (2 * G, T))
    mask = torch.ones(2 * G, T, dtype=torch.bool)
    mask[1, 4:] = False  # ragged: row 1 stopped after 4 tokens, the rest is padding
    mask[4, 2:] = False
    got = completion_logprobs(model, batch, completions, mask, temperature=temperature)  # (N, T)

    for n in range(2 * G):
        single = processor.pairs([pairs[n // G]])  # one prompt, no padding
        length = int(mask[n].sum())
        ids = torch.cat([single["input_ids"], completions[n:n + 1, :length]], dim=1)
        mm = torch.cat([single["mm_token_type_ids"], torch.zeros(1, length, dtype=torch.int)], dim=1)
        logits = model(input_ids=ids, pixel_values=single["pixel_values"], image_grid_thw=single["image_grid_thw"],
                       mm_token_type_ids=mm).logits[0]  # (P+length, V), positions from the model itself
        P = single["input_ids"].shape[1]
        for t in range(length):
            expected = torch.log_softmax(logits[P - 1 + t] / temperature, -1)[completions[n, t]]
            assert abs(got[n, t].item() - expected.item()) < 1e-4, (n, t)


def grpo_toy_batch(family="qwen2_5_vl"):
    """Two left-padded prompts of different lengths with images of two sizes, G=3 ragged completions."""
    import random

    from toy import world as toy
    from formats.records import Pair
    from models.processor import Processor
    processor = Processor(toy.make_tokenizer(family=family), toy.make_image_processor(max_pixels=128 * 128, family=family))
    rng = random.Random(0)
    pairs = []
    for size in [(56, 56), (112, 56)]:  # 4 and 8 image tokens per image
        prompt, images, _ = toy.make_group(rng, 2)
        pairs.append(Pair(prompt + " and more words" * len(pairs), tuple(im.resize(size) for im in images), 0))
    batch = processor.pairs(pairs)
    assert (batch["attention_mask"] == 0).any(), "the prompts must differ in length (left padding)"
    g = torch.Generator().manual_seed(1)
    G, T = 3, 7
    completions = torch.randint(20, 400, (2 * G, T), generator=g)
    mask = torch.ones(2 * G, T, dtype=torch.bool)
    mask[1, 4:] = False  # ragged: row 1 stopped after 4 tokens
    mask[3, 1:] = False  # row 3 after 1 token
    mask[5, 6:] = False
    return processor, batch, completions, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_equals_repeated_prompt_with_gradients(checkpointing, family):
    """One prompt pass per group (fast/shared_prompt.py) == the reference, models.internals.completion_hidden, which repeats
    each prompt and its image patches G times and runs one plain forward over prompt + completion per row:
    log-probs and every parameter's gradient, 1e-5. With activation checkpointing each layer is recomputed in the
    backward pass: the prompt cache must neither grow nor change then.
    """
    from fast import shared_prompt
    from grpo import completion_logprobs
    from models.internals import completion_hidden
    from infra import parallel
    from toy import world as toy

    processor, batch, completions, mask = grpo_toy_batch(family)
    model = toy.make_model(processor.tokenizer, seed=0, family=family).train()
    if checkpointing:
        parallel.checkpoint_blocks(model)
    weights = torch.rand(completions.shape, generator=torch.Generator().manual_seed(2)) - 0.5  # (N, T)
    results = []
    for fn in (shared_prompt.completion_hidden, completion_hidden):
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(model, batch, completions, mask, temperature=0.7, hidden=fn)  # (N, T)
        (logp * weights * mask).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((logp.detach(), grads))
    (shared, shared_grads), (repeated, repeated_grads) = results
    torch.testing.assert_close(shared[mask], repeated[mask], atol=1e-5, rtol=0)
    assert shared_grads.keys() == repeated_grads.keys()
    visual = [n for n in shared_grads if ".visual." in n]
    assert visual and all(shared_grads[n].abs().sum() > 0 for n in visual[:3]), "the vision tower got no gradient"
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], repeated_grads[name], atol=1e-5, rtol=0, msg=name)


def test_shared_prompt_frees_the_prompt_pass_after_its_backward(monkeypatch):
    """The prompt pass's keys, values and last hidden state, read by the completions as leaves, die with the
    backward pass, garbage collector off: a reference cycle through the queued prompt-pass backward kept them (and
    their gradients) alive until the collector ran."""
    import gc
    import weakref

    from fast import shared_prompt
    from grpo import completion_logprobs
    from toy import world as toy

    processor, batch, completions, mask = grpo_toy_batch("qwen2_5_vl")
    model = toy.make_model(processor.tokenizer, seed=0).train()
    kept = []

    def watched(cache, last):
        reading, leaf = prompt_pass_after(cache, last)
        kept.extend(weakref.ref(t) for layer in reading.layers for t in (layer.keys, layer.values))
        kept.append(weakref.ref(leaf))
        return reading, leaf
    prompt_pass_after = shared_prompt.prompt_pass_after
    monkeypatch.setattr(shared_prompt, "prompt_pass_after", watched)
    gc.collect()
    gc.disable()
    try:
        logp = completion_logprobs(model, batch, completions, mask, hidden=shared_prompt.completion_hidden)
        (logp * mask).sum().backward()
        del logp
        alive = sum(ref() is not None for ref in kept)
    finally:
        gc.enable()
    assert kept and alive == 0, f"{alive} of {len(kept)} prompt-pass leaves outlived the backward"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_logprobs_equal_a_full_forward_and_its_log_softmax(family):
    """grpo.completion_logprobs (the final hidden states, then the LM head and log-softmax a chunk of tokens at a
    time, each chunk recomputed in the backward pass) == one plain forward over prompt + completion whose whole
    logits (N, T+1, V) go through log_softmax, as written here: the log-probs and every parameter's gradient, 1e-5,
    with chunks that split rows (5 tokens) and one chunk for all; without autograd too."""
    from grpo import completion_logprobs
    from models.processor import prompt_rows
    from toy import world as toy

    processor, batch, completions, mask = grpo_toy_batch(family)
    model = toy.make_model(processor.tokenizer, seed=0, family=family).train()
    (N, T), G = completions.shape, completions.shape[0] // batch["input_ids"].shape[0]
    weights = torch.rand(completions.shape, generator=torch.Generator().manual_seed(2)) - 0.5  # (N, T)

    def plain():  # the whole logits at once, then their log-softmax
        rows = prompt_rows(batch, [b for b in range(N // G) for _ in range(G)])  # each prompt G times
        ids = torch.cat([rows["input_ids"], completions], 1)  # (N, P+T)
        attention = torch.cat([rows["attention_mask"], mask.long()], 1)
        types = torch.cat([rows["mm_token_type_ids"], torch.zeros_like(completions, dtype=torch.int32)], 1)
        positions, _ = model.model.get_rope_index(ids, types, rows["image_grid_thw"], attention_mask=attention)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, mm_token_type_ids=types,
                       pixel_values=rows["pixel_values"], image_grid_thw=rows["image_grid_thw"]).logits  # (N, P+T, V)
        logp = (logits[:, -(T + 1):-1].float() / 0.7).log_softmax(-1)  # (N, T, V)
        return logp.gather(-1, completions[..., None])[..., 0]  # (N, T)

    def chunked(chunk):  # completion_logprobs with another chunk
        hidden = internals.completion_hidden(model, batch, completions, mask)  # (N, T+1, C)
        return grpo.token_logprobs(model.lm_head, hidden[:, :-1], completions, 0.7, chunk=chunk)

    results = []
    for fn in (plain, lambda: completion_logprobs(model, batch, completions, mask, temperature=0.7),
               lambda: chunked(5), lambda: chunked(N * T)):
        model.zero_grad(set_to_none=True)
        logp = fn()  # (N, T)
        (logp * weights * mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (expected, expected_grads), *others = results
    for logp, grads in others:
        torch.testing.assert_close(logp[mask], expected[mask], atol=1e-5, rtol=0)
        for name in expected_grads:
            torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(chunked(5)[mask], expected[mask], atol=1e-5, rtol=0)


TOKEN_LOGPROBS_ON_TWO_RANKS = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import grpo
from infra.parallel import setup_distributed, shard
from toy import world as toy
rank, world, device = setup_distributed()
model = toy.make_model(toy.make_tokenizer(), seed=0).requires_grad_(False)
full = model.lm_head.weight.detach().clone()  # (V, C)
shard(model, device)  # frozen: the LM head is a unit of its own, resharded after each forward
T = 2 if rank == 0 else 20  # 8 tokens, 1 chunk of 16, on rank 0; 80 tokens, 5 chunks, on rank 1
g = torch.Generator().manual_seed(rank)
hidden, tokens = torch.randn(4, T, full.shape[1], generator=g), torch.randint(0, full.shape[0], (4, T), generator=g)
for _ in range(2):
    logp = grpo.token_logprobs(model.lm_head, hidden, tokens, chunk=16)
expected = torch.log_softmax(hidden @ full.T, -1).gather(-1, tokens[..., None])[..., 0]
assert torch.allclose(logp, expected, atol=1e-5), (logp - expected).abs().max()
print("rank", rank, "equal", flush=True)
dist.destroy_process_group()
"""


def test_token_logprobs_of_a_sharded_frozen_head_with_a_different_length_on_each_rank(tmp_path):
    """torchrun x2: a frozen model's LM head, an FSDP2 unit resharded after each forward, read in chunks whose
    number depends on the rank's completion length (1 chunk on rank 0, 5 on rank 1), as the reference pass reads
    it: equal to a log-softmax over the full head, on both ranks. When each chunk gathered the head, a collective
    the other rank did not join, rank 1 failed here, and the toy demo's seed 2 hung at its GRPO step 57."""
    import launching
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "token_logprobs.py"
    script.write_text(TOKEN_LOGPROBS_ON_TWO_RANKS.format(root=str(root)))
    run = launching.run(launching.command(script, [], nproc=2), root, launching.environment(), timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "rank 0 equal" in run.stdout and "rank 1 equal" in run.stdout
