"""Tests for sample.py (and fast/static_decode.py) on the toy model of each family, Qwen2.5-VL and Qwen3-VL (CPU,
fp32), each against an independent computation: `model.generate`, a full forward pass without a cache, or a
distribution set through the model's lm_head.

Run: .venv/bin/python -m pytest -q tests/test_sample.py
"""
import copy
import random

import pytest
import torch
from torch import nn

import sample
from toy import world as toy
from models.processor import Processor, left_pad
from prompt import reasoner_messages
from fast.static_decode import StaticDecoder, shared_prompt_attention

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a yellow triangle next to a small blue square", "green"]
IMAGE_SIZES = [((56, 56), (84, 56)), ((56, 112), (56, 56)), ((84, 56), (56, 112))]  # (width, height) pairs
IMAGES_PER_PROMPT = 2


@pytest.fixture(scope="module", params=toy.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tok(family):
    return toy.make_tokenizer(family=family)


@pytest.fixture(scope="module")
def model(tok, family):
    return sharpened(toy.make_model(tok, seed=0, family=family))


def sharpened(model, scale=10.0):
    """Scale the text layers' query and key projections: at its random initialisation the toy model attends
    almost uniformly, so its output barely depends on positions; sharp attention makes a wrong mRoPE position
    change the greedy tokens."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(scale)
                if proj.bias is not None:  # Qwen3-VL's projections have none
                    proj.bias.mul_(scale)
    return model


@pytest.fixture(scope="module")
def batch(tok, family):
    """Three prompts of different lengths, each with two images of different sizes (so different token counts)."""
    processor = Processor(tok, toy.make_image_processor(max_pixels=128 * 128, family=family))
    rng = random.Random(0)
    images = []
    for sizes in IMAGE_SIZES:
        _, group, _ = toy.make_group(rng, IMAGES_PER_PROMPT)
        images.append([im.resize(size) for im, size in zip(group, sizes)])
    out = processor([reasoner_messages(p) for p in PROMPTS], images)
    assert len(set(out["attention_mask"].sum(-1).tolist())) == len(PROMPTS), "prompt lengths should differ"
    assert len(set(out["image_grid_thw"].prod(-1).tolist())) > 1, "image sizes should differ"
    return out


def vision_ids(model):
    return [getattr(model.config, k) for k in sample.VISION_TOKEN_KEYS]


def take_prompts(batch, prompts):
    """The sub-batch of the given prompt indices, left padding recomputed."""
    real = [batch["attention_mask"][b].bool() for b in prompts]
    out = left_pad([batch["input_ids"][b][r].tolist() for b, r in zip(prompts, real)], pad_id=0)
    types = left_pad([batch["mm_token_type_ids"][b][r].tolist() for b, r in zip(prompts, real)], pad_id=0)
    out["mm_token_type_ids"] = types["input_ids"].int()
    image_ids = [b * IMAGES_PER_PROMPT + i for b in prompts for i in range(IMAGES_PER_PROMPT)]
    out["image_grid_thw"] = batch["image_grid_thw"][image_ids]
    out["pixel_values"] = torch.cat([image_pixels(batch, i) for i in image_ids])
    return out


def image_pixels(batch, i):
    """The rows of `pixel_values` that belong to image i (patches are stored image after image)."""
    counts = batch["image_grid_thw"].prod(-1)
    start = int(counts[:i].sum())
    return batch["pixel_values"][start:start + int(counts[i])]


def full_forward_logits(model, batch, b, completion):
    """Logits (P + C, V) of prompt b followed by `completion` (C,), in one forward pass with no cache and no
    padding, positions from get_rope_index over the whole sequence."""
    real = batch["attention_mask"][b].bool()
    ids = torch.cat([batch["input_ids"][b, real], completion])[None]  # (1, P + C)
    mm = torch.cat([batch["mm_token_type_ids"][b, real], torch.zeros_like(completion).int()])[None]  # (1, P + C)
    image_ids = [b * IMAGES_PER_PROMPT + i for i in range(IMAGES_PER_PROMPT)]
    grid = batch["image_grid_thw"][image_ids]
    pixels = torch.cat([image_pixels(batch, i) for i in image_ids])
    position_ids, _ = model.model.get_rope_index(ids, mm, grid)  # (3, 1, P + C)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=position_ids,
                    pixel_values=pixels, image_grid_thw=grid)
    return out.logits[0]  # (P + C, V)


def controlled_model(tok, logits, family):
    """The toy model with lm_head replaced so that every position's logits are exactly `logits` (V,)."""
    model = toy.make_model(tok, seed=1, family=family)
    hidden, V = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    head = nn.Linear(hidden, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(logits)
    model.lm_head = head
    return model


# ----------------------------------------------------------------------------------------------------------


def decoder_for(path):
    """The decode path under test: None = the eager reference (`extend`), "static" = `StaticDecoder` run eagerly.
    `block=1` sizes the static cache exactly (prompt + max_new_tokens columns): the longest prompt's last
    token goes to the cache's last column."""
    return None if path == "eager" else StaticDecoder(block=1)


@pytest.mark.parametrize("path", ["eager", "static"])
def test_greedy_matches_generate(model, batch, path):
    """Greedy sampling equals model.generate token for token: left padding, different prompt lengths and
    image sizes (so different rope deltas), 12 new tokens, no early stop."""
    max_new = 12
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # no early stop in generate, as stop_token_ids=[] here
    config.do_sample, config.max_new_tokens = False, max_new
    config.suppress_tokens = vision_ids(model)  # the sampler never emits these; make generate do the same
    expected = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]  # (B, T)
    decoder = decoder_for(path)
    rollouts = sample.sample(model, batch, max_new_tokens=max_new, temperature=0.0, stop_token_ids=[],
                             decoder=decoder)
    assert expected.shape == (len(PROMPTS), max_new)
    assert len(set(expected.flatten().tolist())) >= 5, "degenerate model output would make this test weak"
    assert torch.equal(rollouts.tokens, expected)
    assert rollouts.mask.all() and not rollouts.stopped.any()
    # G greedy copies of each prompt are its G=1 result repeated: the copied cache is the prompt's cache
    grouped = sample.sample(model, batch, num_samples=2, max_new_tokens=max_new, temperature=0.0, stop_token_ids=[],
                            decoder=decoder)  # the same decoder again: new buffers for the new shape
    assert torch.equal(grouped.tokens, expected.repeat_interleave(2, dim=0))
    assert decoder is None or len(decoder.caches) == 1  # eager: the old shape's buffers freed, not kept


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("stoppers", ["row 0", "every row"])
def test_logprobs_match_full_forward_and_mask_includes_stop(tok, model, batch, stoppers, path):
    """Sampled rollouts (temperature 0.7, G=3): every log-prob equals log_softmax(logits / 0.7) of a full
    forward over prompt + completion; the mask covers the stop token and nothing after it; the loop ends
    as soon as every row has stopped."""
    G, max_new, temperature = 3, 10, 0.7
    sub = take_prompts(batch, [0, 1])
    run = lambda stop: sample.sample(model, sub, num_samples=G, max_new_tokens=max_new, temperature=temperature,
                                     stop_token_ids=stop, generator=torch.Generator().manual_seed(0),
                                     check_every=1, decoder=decoder_for(path))
    free = run([])
    N = free.tokens.shape[0]
    # stop ids taken from the free run: row 0's token at step 3, or a token of every row at steps 1..4
    stop_ids = [int(free.tokens[0, 3])] if stoppers == "row 0" else [int(free.tokens[n, 1 + n % 4]) for n in range(N)]
    rollouts = run(stop_ids)
    pad = model.config.text_config.pad_token_id
    # the same random draws as the free run until a row stops; its length is its first stop token + 1
    lengths = []
    for n in range(N):
        hits = torch.isin(free.tokens[n], torch.tensor(stop_ids)).nonzero()
        length = int(hits[0]) + 1 if len(hits) else max_new
        lengths.append(length)
        assert bool(rollouts.stopped[n]) == bool(len(hits))
        assert int(rollouts.mask[n].sum()) == length and rollouts.mask[n, :length].all()
        assert torch.equal(rollouts.tokens[n, :length], free.tokens[n, :length])
        assert (rollouts.tokens[n, length:] == pad).all() and (rollouts.logprobs[n, length:] == 0).all()
        if len(hits):
            assert int(rollouts.tokens[n, length - 1]) in stop_ids  # the stop token is inside the mask
        text_length = length - int(rollouts.stopped[n])  # texts() ends before the stop token
        assert rollouts.texts(tok)[n] == tok.decode(free.tokens[n, :text_length], skip_special_tokens=False)
    assert rollouts.stopped[0] and rollouts.tokens.shape[1] == max(lengths)
    if stoppers == "every row":
        assert rollouts.stopped.all() and max(lengths) < max_new
    else:
        assert not rollouts.stopped.all()
    # log-probs against a full forward of each row's prompt + completion
    for n in range(N):
        b = n // G
        completion = rollouts.tokens[n, rollouts.mask[n]]  # (C,)
        logits = full_forward_logits(model, sub, b, completion)  # (P + C, V)
        P = logits.shape[0] - len(completion)
        logp = (logits[P - 1:-1] / temperature).log_softmax(-1).gather(-1, completion[:, None])[:, 0]  # (C,)
        torch.testing.assert_close(rollouts.logprobs[n, :len(completion)], logp, atol=1e-4, rtol=0)


def test_reproducible_with_generator(model, batch):
    """The same generator seed gives the same rollouts; another seed gives others."""
    run = lambda seed: sample.sample(model, batch, num_samples=2, max_new_tokens=6, temperature=1.0,
                                     stop_token_ids=[], generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_per_prompt_generators_make_rollouts_independent_of_the_batch(model, batch):
    """With one generator per prompt, prompt 1's rollouts are the same sampled alone or beside prompts 0 and 2."""
    gens = lambda: [torch.Generator().manual_seed(100 + b) for b in range(3)]
    together = sample.sample(model, batch, num_samples=2, max_new_tokens=6, stop_token_ids=[], generator=gens())
    alone = sample.sample(model, take_prompts(batch, [1]), num_samples=2, max_new_tokens=6, stop_token_ids=[],
                          generator=gens()[1:2])
    assert torch.equal(together.tokens[2:4], alone.tokens)
    torch.testing.assert_close(together.logprobs[2:4], alone.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (0, 0.65, [100, 101]),  # 0.4 < 0.65 <= 0.4 + 0.3
    (0, 0.85, [100, 101, 102]),  # 0.7 < 0.85 <= 0.9
    (3, 1.0, [100, 101, 102]),
    (2, 0.95, [100, 101]),  # top-k is the tighter bound
    (4, 0.65, [100, 101]),  # top-p is the tighter bound
])
def test_top_k_top_p_stay_in_allowed_set(tok, family, batch, top_k, top_p, allowed):
    """With logits fixed through lm_head, every sampled token lies in the top-k / nucleus set computed here,
    every token of that set is drawn, and at about its renormalised probability."""
    V = toy.make_config(tok, family=family).text_config.vocab_size
    probs = torch.full((V,), 0.05 / (V - 4))
    probs[[100, 101, 102, 103]] = torch.tensor([0.4, 0.3, 0.2, 0.05])
    model = controlled_model(tok, probs.log(), family)
    rollouts = sample.sample(model, take_prompts(batch, [0]), num_samples=64, max_new_tokens=8, temperature=1.0,
                             top_k=top_k, top_p=top_p, stop_token_ids=[], generator=torch.Generator().manual_seed(0))
    drawn = rollouts.tokens[rollouts.mask]  # (512,)
    assert sorted(set(drawn.tolist())) == allowed
    expected = probs[allowed] / probs[allowed].sum()
    frequency = torch.stack([(drawn == t).float().mean() for t in allowed])
    torch.testing.assert_close(frequency, expected, atol=0.08, rtol=0)
    # the log-prob is that of the untruncated distribution (what the training forward computes)
    torch.testing.assert_close(rollouts.logprobs[rollouts.mask], probs[drawn].log(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["eager", "static"])
def test_vision_tokens_never_sampled(tok, family, batch, path):
    """Logits that favour <|image_pad|> and the other vision tokens: none is ever emitted (an emitted
    <|image_pad|> would make the next forward fail)."""
    config = toy.make_config(tok, family=family)
    V = config.text_config.vocab_size
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    vision = [getattr(config, k) for k in sample.VISION_TOKEN_KEYS]
    logits[vision] = 20.0
    logits[config.image_token_id] = 30.0
    model = controlled_model(tok, logits, family)
    sub = take_prompts(batch, [0, 2])
    prefix = sample.prefill(model, sub)
    assert prefix.logits.argmax(-1).eq(config.image_token_id).all()  # the model does favour <|image_pad|>
    for temperature in (0.0, 1.0, 5.0):
        rollouts = sample.sample(model, sub, num_samples=4, max_new_tokens=6, temperature=temperature,
                                 stop_token_ids=[], generator=torch.Generator().manual_seed(0),
                                 decoder=decoder_for(path))
        assert not torch.isin(rollouts.tokens, torch.tensor(vision)).any()
        assert rollouts.mask.all()


def test_static_decoder_reused_across_batches(model, batch):
    """One `StaticDecoder` serves successive batches of the same shape (N rows, S columns): prompts of other
    lengths, left padding and images each time, sampled with per-prompt generators and a stop token. Its
    rollouts equal the eager reference's every time: nothing of the previous batch's cache is attended to."""
    decoder = StaticDecoder()  # block 256: the same S for all three batches, so the buffers are reused
    for prompts in ([0, 1], [1, 2], [2, 0]):
        sub = take_prompts(batch, prompts)
        run = lambda d, stop: sample.sample(model, sub, num_samples=2, max_new_tokens=8, temperature=1.0,
                                            stop_token_ids=stop, decoder=d,
                                            generator=[torch.Generator().manual_seed(b) for b in prompts])
        stop = [int(run(None, []).tokens[0, 3])]  # row 0 stops at step 3 at the latest
        expected, got = run(None, stop), run(decoder, stop)
        assert expected.stopped[0]
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.mask, expected.mask)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    assert decoder.text is model.model.language_model  # a plain model: no copy of its weights


def test_shared_prompt_attention_matches_a_plain_loop():
    """`shared_prompt_attention` (each prompt's keys stored once, read by its G rollouts in one product) equals
    attention written plainly, row by row and head by head, over that row's own [prompt, completion] keys:
    left-padded prompts, completion columns masked off (a finished row), R = 3 query heads per key/value head."""
    B, G, H, R, P, M, D = 2, 3, 2, 3, 7, 5, 4
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    q, prompt_k, prompt_v, k, v = rand(B, H, G, R, D), rand(B, H, P, D), rand(B, H, P, D), rand(B, H, G, M, D), rand(B, H, G, M, D)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[1, :3] = False  # prompt 1 is left-padded by 3
    mask = torch.ones(B, G, M, dtype=torch.bool)
    mask[0, 1, 2:] = False  # rollout (0, 1) finished after 2 tokens
    mask[1, 2, 4] = False
    got = shared_prompt_attention(q, prompt_k, prompt_v, prompt_mask, k, v, mask, scale=0.3)  # (B, H, G, R, D)
    for b in range(B):
        for g in range(G):
            keys = torch.cat([prompt_k[b][:, prompt_mask[b]], k[b, :, g][:, mask[b, g]]], dim=1)  # (H, S, D)
            values = torch.cat([prompt_v[b][:, prompt_mask[b]], v[b, :, g][:, mask[b, g]]], dim=1)
            for h in range(H):
                for r in range(R):
                    weights = torch.softmax(0.3 * (keys[h] @ q[b, h, g, r]), dim=0)  # (S,)
                    torch.testing.assert_close(got[b, h, g, r], weights @ values[h], atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)])
def test_static_decode_step_groups_query_heads(tok, family, batch, heads, kv_heads):
    """`decode_step` does grouped-query attention itself (query head j reads key/value head j // R): with
    R = 4 query heads per key/value head (8 on 2, where a wrong grouping reads the wrong head) and R = 1 (4 on
    4), as with the suite's R = 2, greedy tokens equal model.generate's and sampled log-probs the eager
    reference's."""
    model = sharpened(toy.make_model(tok, seed=2, family=family, heads=heads, kv_heads=kv_heads))
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.do_sample, config.max_new_tokens = None, False, 8
    config.suppress_tokens = vision_ids(model)
    expected = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]  # (B, T)
    greedy = sample.sample(model, batch, max_new_tokens=8, temperature=0.0, stop_token_ids=[],
                           decoder=StaticDecoder())
    assert len(set(expected.flatten().tolist())) >= 4, "degenerate model output would make this test weak"
    assert torch.equal(greedy.tokens, expected)
    run = lambda d: sample.sample(model, batch, num_samples=2, max_new_tokens=8, temperature=1.0, stop_token_ids=[],
                                  generator=torch.Generator().manual_seed(0), decoder=d)
    reference, got = run(None), run(StaticDecoder())
    assert torch.equal(got.tokens, reference.tokens)
    torch.testing.assert_close(got.logprobs, reference.logprobs, atol=1e-5, rtol=0)


def test_compiled_decoder_keeps_a_step_and_buffers_per_bucket(tok, model, batch):
    """The suite's compiled case (torch.compile of the decode step, inductor on this CPU: seconds per shape).
    Training-shaped calls (3 or 4 prompts x G=2, sampled, a stop token mid-way) and held-out-shaped ones (2 prompts
    x 1, greedy) in turn, as a run's steps and held-out batches alternate: every rollout equals the eager
    reference's; the step is compiled once per bucket in the warm-up (3 and 4 prompts share the bucket of 4, the
    padding prompt's rows dropped) and never again after it (`fail_on_recompile`), and each bucket's cache buffers
    are the same tensors at every call, not reallocated (a CUDA graph replays on the addresses it recorded)."""
    from torch._dynamo.utils import counters
    decoder = StaticDecoder(compile=True)
    gens = lambda prompts: [torch.Generator().manual_seed(10 + b) for b in prompts]
    free = sample.sample(model, batch, num_samples=2, max_new_tokens=8, stop_token_ids=[], generator=gens(range(3)))
    stop = [int(free.tokens[1, 4])]  # row 1 stops at step 4, the others run on unless they draw it too

    def same_as_reference(prompts, G, temperature):
        sub = take_prompts(batch, prompts)
        run = lambda d: sample.sample(model, sub, num_samples=G, max_new_tokens=8, temperature=temperature,
                                      stop_token_ids=stop, generator=gens(prompts), decoder=d)
        expected, got = run(None), run(decoder)
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.stopped, expected.stopped)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
        return expected

    def buffers():
        return {bucket: [t.data_ptr() for t in cache.keys + cache.prompt_values + [cache.mask]]
                for bucket, cache in decoder.caches.items()}

    graphs = counters["stats"]["unique_graphs"]
    training = same_as_reference([0, 1, 2], G=2, temperature=1.0)  # warm-up: one compilation per bucket
    same_as_reference([0, 1], G=1, temperature=0.0)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert sorted(bucket[:2] for bucket in decoder.caches) == [(2, 1), (4, 2)]  # (prompts B', G)
    warm = buffers()
    with torch.compiler.set_stance("fail_on_recompile"):  # a recompilation would raise
        for prompts, G, temperature in (([2, 0, 1, 1], 2, 1.0), ([2, 0], 1, 0.0), ([0, 1, 2], 2, 1.0),
                                        ([1, 2], 1, 0.0)):
            same_as_reference(prompts, G, temperature)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert buffers() == warm
    assert training.stopped[1] and not training.stopped.all()


def test_extend_matches_full_forward(tok, model, batch):
    """prefill + expand + two right-padded extensions of different lengths (one row gets none): the logits of
    every real token, and the logits after each row's last real token, equal those of a full forward."""
    G = 2
    sub = take_prompts(batch, [1, 2])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prefix = sample.prefill(model, sub)
        for b in range(2):
            full = full_forward_logits(model, sub, b, torch.zeros(0, dtype=torch.long))
            torch.testing.assert_close(prefix.logits[b], full[-1], atol=1e-4, rtol=0)
        prefix = sample.expand(prefix, G)
        fed = [torch.zeros(0, dtype=torch.long) for _ in range(2 * G)]  # real tokens so far, per row
        for lengths in ([3, 1, 4, 2], [2, 3, 0, 1]):
            width = max(lengths) + 1  # one column of padding at least
            ids = torch.randint(20, len(tok), (2 * G, width), generator=gen)  # (N, T') text tokens only
            mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()  # (N, T') right-padded
            logits = sample.extend(model, prefix, ids, mask)  # (N, T', V)
            for n, length in enumerate(lengths):
                fed[n] = torch.cat([fed[n], ids[n, :length]])
                full = full_forward_logits(model, sub, n // G, fed[n])  # (P + C, V)
                if length:
                    torch.testing.assert_close(logits[n, :length], full[-length:], atol=1e-4, rtol=0)
                torch.testing.assert_close(prefix.logits[n], full[-1], atol=1e-4, rtol=0)
                assert int(prefix.next_position[n]) == full.shape[0]


def test_gathered_unshards_once_under_fsdp2(tok, family, batch):
    """Under FSDP2 (one process), `sample` inside `infra.parallel.gathered` all-gathers each sharded module once
    for the whole rollout, where plain forwards gather again at every decode step; it returns the same tokens as
    the unsharded model, also when it is the sharded model's first use, and leaves the weights sharded and the
    reshard-after-forward settings as they were."""
    from infra.parallel import gathered
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    sub = take_prompts(batch, [0, 1])
    reference = sharpened(toy.make_model(tok, seed=0, family=family))
    expected = sample.sample(reference, sub, max_new_tokens=5, temperature=0.0, stop_token_ids=[]).tokens
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gathers = []
    unshard = FSDPParamGroup.unshard

    def counting_unshard(group, *args, **kwargs):
        if not group.is_unsharded and group._all_gather_result is None:
            gathers.append(group)
        return unshard(group, *args, **kwargs)

    def sharded_model():
        model = sharpened(toy.make_model(tok, seed=0, family=family))
        for block in list(model.model.language_model.layers) + list(model.model.visual.blocks):
            fully_shard(block)
        fully_shard(model)
        return model

    def gathered_sample(model, **kwargs):
        with gathered(model):
            return sample.sample(model, sub, max_new_tokens=5, temperature=0.0, stop_token_ids=[], **kwargs)

    try:
        FSDPParamGroup.unshard = counting_unshard
        first_use = gathered_sample(sharded_model()).tokens  # gathered before FSDP2 has seen a forward
        assert torch.equal(first_use, expected)
        model = sharded_model()
        n_modules = sum(isinstance(m, FSDPModule) for m in model.modules())

        def plain_decode():  # prefill + 3 decode steps, without `gathered`
            gathers.clear()
            with torch.no_grad():
                prefix = sample.prefill(model, sub)
                for t in range(3):
                    sample.extend(model, prefix, expected[:, t:t + 1], torch.ones(2, 1))
            return len(gathers)

        before = plain_decode()
        assert before > n_modules  # each text layer gathers again at every step
        # the root keeps its weights after forward (FSDP2's default), the blocks were resharded
        def own_parameters(m):  # those of m not managed by an FSDP module inside it
            inner = {id(p) for c in m.modules() if c is not m and isinstance(c, FSDPModule) for p in c.parameters()}
            return [p for p in m.parameters() if id(p) not in inner]

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)
                   and any(isinstance(p, DTensor) for p in own_parameters(m))]
        assert 0 < len(sharded) < n_modules
        gathers.clear()
        tokens = gathered_sample(model).tokens
        assert len(gathers) == len(sharded) == len(set(gathers))  # once per sharded module, not per step
        assert torch.equal(tokens, expected)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded on exit
        assert plain_decode() == before  # reshard_after_forward restored
        # the static decode runs on the gathered weights themselves (no copy), the sharded ones' values each call
        decoder = StaticDecoder()
        gathers.clear()
        static = gathered_sample(model, decoder=decoder)
        assert torch.equal(static.tokens, expected) and len(gathers) == len(sharded)
        assert decoder.text is model.model.language_model
        with torch.no_grad():  # an "optimiser step" on the sharded weights
            for p in model.model.language_model.parameters():
                p.to_local().mul_(1.5)
        updated = gathered_sample(model)
        assert not torch.equal(updated.tokens, expected)
        assert torch.equal(gathered_sample(model, decoder=decoder).tokens, updated.tokens)
        # in another dtype (as a CUDA graph's fixed addresses need) it decodes on a plain copy, refreshed at every
        # call, and the gathered decoder layers are freed once the copy holds their weights
        copied = StaticDecoder(dtype=torch.float64)
        with gathered(model), torch.no_grad():
            copied.start(model, sample.prefill(model, sub), 2, 8)
            layers = model.model.language_model.layers
            assert all(isinstance(p, DTensor) for p in layers.parameters())  # resharded: only the copy remains
            assert not any(isinstance(p, DTensor) for p in copied.text.parameters())
            assert copied.text is not model.model.language_model and copied.lm_head.weight.dtype == torch.float64
    finally:
        FSDPParamGroup.unshard = unshard
        dist.destroy_process_group()


def test_extend_logits_to_keep_matches_full_logits(tok, model, batch):
    """Left-padded continuations with logits_to_keep=1 leave the same prefix.logits as the full logits do."""
    continuation = torch.tensor([[0, 0, 41, 42], [43, 44, 45, 46]])  # (2, 4), row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    two = take_prompts(batch, [0, 1])
    full, kept = sample.prefill(model, two), sample.prefill(model, two)
    all_logits = sample.extend(model, full, continuation, mask)  # (2, 4, V)
    last_logits = sample.extend(model, kept, continuation, mask, logits_to_keep=1)  # (2, 1, V)
    assert last_logits.shape[1] == 1
    torch.testing.assert_close(kept.logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(last_logits[:, 0], all_logits[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="outside the last 1 positions"):
        sample.extend(model, sample.prefill(model, two), continuation, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
                      logits_to_keep=1)
