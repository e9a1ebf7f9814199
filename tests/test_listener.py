"""Tests for listener.py, on the toy model of each family: shared-prefix scoring against one full forward pass per
rollout, built here; a listener of the other family than the reasoner; the listener read from the reference pass
(fast/listener_from_reference.py).

The reference path never touches sample.py or listener.py's batching: for each rollout it encodes images +
prompt + `listener_prefix(reasoning)` as one sequence with `models.processor.Processor`, runs one full forward with the
mRoPE positions of `get_rope_index`, and takes a softmax over the answer tokens at the last position.

Run: .venv/bin/python -m pytest -q tests/test_listener.py
"""
import random

import pytest
import torch

from toy import world as toy
from formats.records import Pair
from prompt import PROMPT, listener_prefix, reasoner_messages
from listener import Listener, answer_probs, reasoning_of
from models import internals
from models.processor import answer_token_ids

TH, TH_, AN, AN_ = PROMPT.think_open, PROMPT.think_close, PROMPT.answer_open, PROMPT.answer_close
A0, A1 = PROMPT.answers

# Reasonings of very different lengths (one empty), so the G continuations of a pair are padded.
REASONINGS = [
    "The first image is red. The second image is blue. It is a circle. " * 3,
    "",
    "The second image is green.",
]


@pytest.fixture(scope="module", params=toy.FAMILIES)
def world(request):
    torch.set_num_threads(1)
    processor = toy.make_processor(request.param)
    model = toy.make_model(processor.tokenizer, family=request.param)  # fp32, eval
    rng = random.Random(0)
    pairs = []
    for label in (0, 1):
        prompt, images, ranking = toy.make_group(rng, n_images=2)
        pairs.append(Pair(prompt, tuple(images), label))
    return model, processor, pairs


def full_forward_probs(model, processor, pair, reasoning):
    """(2,): one rollout scored by one full forward over images + prompt + listener prefix, no cache."""
    batch = processor([reasoner_messages(pair.prompt)], [pair.images], suffixes=[listener_prefix(reasoning)])
    position_ids, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 image_grid_thw=batch["image_grid_thw"],
                                                 attention_mask=batch["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       position_ids=position_ids).logits  # (1, T, V)
    ids = [processor.tokenizer(a, add_special_tokens=False)["input_ids"] for a in PROMPT.answers]
    assert all(len(i) == 1 for i in ids)
    return logits[0, -1, [i[0] for i in ids]].softmax(-1)  # (2,)


def family_of(world) -> str:
    """The toy family `world`'s model is of."""
    return "qwen3_vl" if "Qwen3" in type(world[0]).__name__ else "qwen2_5_vl"


def completions(reasonings, answers):
    return [f"{TH}{r}{TH_}\n{AN}{a}{AN_}" for r, a in zip(reasonings, answers)]


def test_p_correct_matches_full_forward(world):
    """Prefill once + G padded continuations == one full forward per rollout, row by row."""
    model, processor, pairs = world
    listener = Listener(model, processor)
    answers = [A0, A1, A1]
    texts = [t for _ in pairs for t in completions(REASONINGS, answers)]  # prompt-major, N = B*G
    p = listener.p_correct(pairs, texts)  # (N,)
    scores = listener.scores(pairs, [REASONINGS] * len(pairs))  # (B, G, 2)
    assert p.shape == (len(pairs) * len(REASONINGS),) and p.dtype == torch.float32
    for b, pair in enumerate(pairs):
        for g, r in enumerate(REASONINGS):
            expected = full_forward_probs(model, processor, pair, r)  # (2,)
            torch.testing.assert_close(scores[b, g], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(p[b * len(REASONINGS) + g], expected[pair.label], atol=1e-5, rtol=0)


def test_row_does_not_depend_on_its_batchmates(world):
    """A reasoning scored alone (G=1) and among longer and shorter ones (G=3) gets the same score."""
    model, processor, pairs = world
    alone = answer_probs(model, processor, pairs[:1], [[REASONINGS[2]]])  # (1, 1, 2)
    together = answer_probs(model, processor, pairs[:1], [REASONINGS])  # (1, 3, 2)
    torch.testing.assert_close(together[0, 2], alone[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together.sum(-1), torch.ones(1, 3))


def test_answer_never_changes_p_correct(world):
    """Same reasoning, any answer (right, wrong, missing, garbage): the same p_correct."""
    model, processor, pairs = world
    listener = Listener(model, processor)
    r = REASONINGS[0]
    texts = [f"{TH}{r}{TH_}\n{AN}{A0}{AN_}", f"{TH}{r}{TH_}\n{AN}{A1}{AN_}", f"{TH}{r}{TH_}\n{AN}{AN_}",
             f"{TH}{r}{TH_}\n{AN}{A1} {A1} image two!{AN_}", f"{TH}{r}{TH_}\n{A1}"]
    for pair in pairs:
        p = listener.p_correct([pair], texts)  # (5,)
        torch.testing.assert_close(p, p[:1].expand(len(texts)), atol=1e-6, rtol=0)


def test_a_listener_of_the_other_family(world):
    """The listener needs only its own processor and the reasoner's text: a reasoner of one family, a listener of
    the other, give the listener's own full-forward probabilities (the reasoning is read as text)."""
    model, processor, pairs = world
    other = next(f for f in toy.FAMILIES if f != family_of(world))
    other_processor = toy.make_processor(other)
    listener = Listener(toy.make_model(other_processor.tokenizer, seed=3, family=other), other_processor)
    texts = completions(REASONINGS, [A0, A1, A1])  # what a reasoner of `world`'s family wrote about pairs[0]
    p = listener.p_correct(pairs[:1], texts)  # (3,)
    for g, r in enumerate(REASONINGS):
        expected = full_forward_probs(listener.model, other_processor, pairs[0], r)  # (2,)
        torch.testing.assert_close(p[g], expected[pairs[0].label], atol=1e-5, rtol=0)


def test_reasoning_changes_p_correct(world):
    model, processor, pairs = world
    listener = Listener(model, processor)
    p = listener.p_correct(pairs[:1], completions(REASONINGS, [A0] * len(REASONINGS)))  # (3,)
    assert (p[0] - p[1]).abs() > 1e-4 and (p[0] - p[2]).abs() > 1e-4 and (p[1] - p[2]).abs() > 1e-4


def test_reasoning_of_well_formed():
    for r in ["", "plain", "  spaced \n lines \n", "Das zweite Bild 🐱 ist schöner."]:
        for a in PROMPT.answers:
            assert reasoning_of(f"{TH}{r}{TH_}\n{AN}{a}{AN_}") == r
    assert reasoning_of(f"  {TH}r{TH_}{AN}{A1}{AN_}\n") == "r"


MALFORMED = [  # (text, reasoning that must survive); the reasoning holds no digit, the answers are digits
    (f"{TH}red wins{TH_}\n{A1}", "red wins"),  # no answer tags: bare answer after </think>
    (f"{TH}red wins{TH_}\n{AN}{A1}", "red wins"),  # no </answer>
    (f"{TH}red wins\n{AN}{A1}{AN_}", "red wins\n"),  # no </think>
    (f"red wins{TH_}\n{AN}{A1}{AN_}", "red wins"),  # no <think>
    (f"red wins\n{AN}{A1}{AN_}", "red wins\n"),  # no think tags
    (f"red wins {A1}{AN_}", ""),  # only </answer>: where the answer starts is unknown, nothing is safe
    (f"{TH}red wins{TH_} {A1}{AN_}", "red wins"),  # no <answer>, but </think> ends the reasoning
    (f"{TH}red {A1}{AN_} wins{TH_}", ""),  # an answer closed inside the think block
    (f"{TH}red {AN}{A1}{AN_} wins{TH_}\n{AN}{A0}{AN_}", "red "),  # answer inside the think block
    (f"{TH}red{TH} wins{TH_}{TH_}\n{AN}{A1}{AN_}", "red wins"),  # repeated think tags
    (f"{TH}red wins{TH_}\n{AN}{A1}{AN_}{TH}more{TH_}{AN}{A0}{AN_}", "red wins"),  # two blocks
    (f"{AN}{A1}{AN_}{TH}red wins{TH_}", ""),  # answer first
    (f"{TH}red wins", "red wins"),  # truncated before the answer
]


@pytest.mark.parametrize("text,kept", MALFORMED)
def test_reasoning_of_malformed_never_includes_the_answer(text, kept):
    r = reasoning_of(text)
    assert not any(a in r for a in PROMPT.answers), r
    assert not any(tag in r for tag in (TH, TH_, AN, AN_)), r
    assert r == kept


def test_listener_is_frozen(world):
    _, processor, pairs = world
    model = toy.make_model(processor.tokenizer, family=family_of(world)).train()
    listener = Listener(model, processor)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    p = listener.p_correct(pairs, completions(REASONINGS[:2], [A0, A1]) * len(pairs))
    assert not p.requires_grad and p.grad_fn is None


def test_reference_pass_gives_the_listener_answer_where_it_claims_to(world):
    """fast/listener_from_reference.py: the reference pass over prompt + completion (models.internals.completion_hidden),
    read at `answer_slots`, equals the listener's own pass on every row it claims; `reference_and_listener`
    gives the reference pass's log-probs and the listener's p_corr on every row, claimed or not.

    Rows: well-formed completions written as the tokenizer writes them (claimed), a truncated one and one whose
    ids spell the same text in other tokens (both not claimed: what the listener reads is not what the
    reference pass read).
    """
    import grpo
    import sample
    from fast.listener_from_reference import answer_slots, reference_and_listener
    model, processor, pairs = world
    tok = processor.tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    reasoning = REASONINGS[0]
    spelled = [i for ch in f"{TH}{reasoning}{TH_}\n{AN}{A0}{AN_}" for i in encode(ch)]  # same text, other ids
    rows = [encode(completions([reasoning], [A0])[0]) + [tok.eos_token_id],
            encode(completions([REASONINGS[2]], [A1])[0]) + [tok.eos_token_id],
            encode(f"{TH}{REASONINGS[2]}"),  # truncated: no answer slot
            spelled + [tok.eos_token_id]]
    assert spelled != rows[0][:-1] and tok.decode(spelled) == tok.decode(rows[0][:-1])
    G, T = len(rows), max(map(len, rows))
    tokens = torch.full((2 * G, T), tok.pad_token_id)
    mask = torch.zeros(2 * G, T, dtype=torch.bool)
    for n, r in enumerate(rows * 2):
        tokens[n, :len(r)], mask[n, :len(r)] = torch.tensor(r), True
    stopped = torch.tensor([True, True, False, True] * 2)
    texts = sample.Rollouts(tokens, torch.zeros(tokens.shape), mask, stopped).texts(tok)

    slots = answer_slots(tok, pairs, texts, tokens, mask)  # (N,)
    claimed = slots >= 0
    assert claimed.tolist() == [True, True, False, False] * 2
    batch = processor.pairs(pairs)
    with torch.no_grad():
        logits = model.lm_head(internals.completion_hidden(model, batch, tokens, mask))  # (N, T+1, V)
    at_slot = logits[torch.arange(2 * G), slots.clamp(min=0)][:, answer_token_ids(tok)].softmax(-1)  # (N, 2)
    listener = Listener(model, processor)
    separate = listener.scores(pairs, [[reasoning_of(t) for t in texts[b * G:(b + 1) * G]] for b in range(2)])
    torch.testing.assert_close(at_slot[claimed], separate.view(-1, 2)[claimed], atol=1e-5, rtol=0)
    for hidden_fn in (internals.completion_hidden, __import__("fast.shared_prompt").shared_prompt.completion_hidden):
        ref_logp, p_correct, read = reference_and_listener(model, listener, hidden_fn, [(batch, slice(0, 2 * G))],
                                                           tokens, mask, pairs, texts, temperature=0.7)
        assert read.item() == 0.5  # the claimed rows
        expected_logp = (logits[:, :-1] / 0.7).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]  # (N, T)
        torch.testing.assert_close(ref_logp[mask], expected_logp[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(p_correct, listener.p_correct(pairs, texts), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reference model"):  # another model's pass cannot stand for the listener's
        reference_and_listener(toy.make_model(tok, seed=5, family=family_of(world)), listener, internals.completion_hidden,
                               [(batch, slice(0, 2 * G))], tokens, mask, pairs, texts, temperature=1.0)


def test_the_fast_score_rollouts_stands_in_for_trains(world):
    """trainer.score_rollouts's two choices, train.score_rollouts (the reference pass, then the listener's own) and
    fast/listener_from_reference.py's (one pass for both), take the same arguments and give the same reference
    log-probs and p_corr, on well-formed rollouts and a truncated one."""
    from types import SimpleNamespace

    import grpo
    import sample
    import train
    from fast import listener_from_reference
    model, processor, pairs = world
    tok = processor.tokenizer
    texts = completions(REASONINGS, [A0, A1, A0]) + [f"{TH}{REASONINGS[0]}"]  # the last one truncated
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * (i < 3) for i, t in enumerate(texts)]
    G, T = len(rows), max(map(len, rows))
    tokens = torch.full((2 * G, T), tok.pad_token_id)
    mask = torch.zeros(2 * G, T, dtype=torch.bool)
    for n, r in enumerate(rows * 2):
        tokens[n, :len(r)], mask[n, :len(r)] = torch.tensor(r), True
    rollouts = sample.Rollouts(tokens, torch.zeros(tokens.shape), mask, torch.tensor([True] * 3 + [False]).repeat(2))
    texts = rollouts.texts(tok)
    cfg = SimpleNamespace(beta=0.04, w_list=0.5, temperature=0.7)
    trainer = SimpleNamespace(reference=model, listener=Listener(model, processor), hidden_fn=internals.completion_hidden,
                              fmt=PROMPT, device=torch.device("cpu"))
    micro = [(processor.pairs(pairs[:1]), slice(0, G)), (processor.pairs(pairs[1:]), slice(G, 2 * G))]
    plain = train.score_rollouts(cfg, trainer, micro, rollouts, pairs, texts)
    fast = listener_from_reference.score_rollouts(cfg, trainer, micro, rollouts, pairs, texts)
    torch.testing.assert_close(fast[0][mask], plain[0][mask], atol=1e-5, rtol=0)  # (N, T) pi_ref's log-probs
    torch.testing.assert_close(fast[1], plain[1], atol=1e-5, rtol=0)  # (N,) p_corr
    assert plain[2] == {} and fast[2]["listener_from_reference"].item() == 0.75  # the truncated rows: own pass
