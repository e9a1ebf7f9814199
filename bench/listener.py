"""Benchmark: the listener's shared-prefix scoring against one full forward pass per rollout.

Both score the same B pairs x G = 8 reasonings (~100 tokens each) with the same model and return the same
probabilities (checked). Shared prefix (`listener.answer_probs`): the vision tower and the prompt run once
per pair, the KV cache is copied to the G rollouts, and only the reasonings run over it. Full forward: the
B*G rows each hold images + prompt + reasoning, so the vision tower runs B*G times; this is what scoring
without a cache costs. The full-forward inputs are encoded before the clock starts (the shared path's own
encoding is timed), so the ratio is, if anything, in the full forward's favour.

Model: a Qwen2.5-VL with a 512-wide, 4-layer text model and a 4-block vision tower; 448x448 images
(256 image tokens each). One thread pool of 2 CPU threads.

    .venv/bin/python bench/listener.py
"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy import world as toy  # noqa: E402
from formats.records import Pair  # noqa: E402
from models.processor import Processor  # noqa: E402
from prompt import listener_prefix, reasoner_messages  # noqa: E402
from listener import answer_probs  # noqa: E402
from models.processor import answer_token_ids  # noqa: E402

B, G, SIZE = 2, 8, 448
SENTENCE = "The first image is red. The second image is blue. It is a circle. "


def full_forward_probs(model, processor, pairs, reasonings, answer_ids):
    """(B, G, 2) by one full forward over B*G rows of images + prompt + listener prefix (left-padded)."""
    batch = processor([reasoner_messages(p.prompt) for p in pairs for _ in range(G)],
                      [p.images for p in pairs for _ in range(G)],
                      suffixes=[listener_prefix(r) for rs in reasonings for r in rs])
    start = time.perf_counter()
    with torch.no_grad():
        position_ids, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                     image_grid_thw=batch["image_grid_thw"],
                                                     attention_mask=batch["attention_mask"])  # (3, N, T)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       position_ids=position_ids, logits_to_keep=1).logits  # (N, 1, V) left-padded: last is real
    probs = logits[:, -1, answer_ids].float().softmax(-1).view(B, G, -1)  # (B, G, 2)
    return probs, time.perf_counter() - start, batch["input_ids"].shape


def main():
    torch.set_num_threads(2)
    processor = Processor(toy.make_tokenizer(), toy.make_image_processor(min_pixels=SIZE * SIZE,
                                                                         max_pixels=SIZE * SIZE))
    model = toy.make_model(processor.tokenizer, hidden=512, layers=4, heads=8, kv_heads=2,
                           vision_hidden=256, vision_depth=4, vision_heads=4)
    rng = random.Random(0)
    pairs = [Pair(f"a red circle {b}", (toy.draw("red", "circle", rng, SIZE), toy.draw("blue", "square", rng, SIZE)), 0)
             for b in range(B)]
    reasonings = [[SENTENCE * (5 + (g + b) % 3) for g in range(G)] for b in range(B)]  # ~90..120 tokens
    answer_ids = answer_token_ids(processor.tokenizer)
    n_reason = [len(processor.tokenizer(r)["input_ids"]) for rs in reasonings for r in rs]

    answer_probs(model, processor, pairs[:1], [reasonings[0][:2]])  # warm-up, both paths
    full_forward_probs(model, processor, pairs, reasonings, answer_ids)

    start = time.perf_counter()
    shared = answer_probs(model, processor, pairs, reasonings)  # (B, G, 2)
    t_shared = time.perf_counter() - start
    full, t_full, shape = full_forward_probs(model, processor, pairs, reasonings, answer_ids)
    err = (shared - full).abs().max().item()

    print(f"B={B} pairs x G={G} rollouts, images {SIZE}x{SIZE}, reasoning {min(n_reason)}-{max(n_reason)} tokens, "
          f"full-forward rows of {shape[1]} tokens")
    print(f"shared prefix (prefill once, extend G): {t_shared * 1000:8.1f} ms")
    print(f"full forward per rollout (B*G rows):    {t_full * 1000:8.1f} ms")
    print(f"speed-up: {t_full / t_shared:.2f}x   max |difference| of the probabilities: {err:.2e}")
    assert err < 1e-4, f"the two paths disagree by {err}"


if __name__ == "__main__":
    main()
