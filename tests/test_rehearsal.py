"""infra/rehearsal.py: `train.py --rehearse=GPUSxGIB` plans a run on fake tensors; here it is held against the same
step run with real tensors by two processes (torchrun, gloo), on the toy and on a checkpoint laid out like the
published Qwen2.5-VL-7B-Instruct (tests/real_layout.py), with the memory fixes' equivalences beside it.

Run: .venv/bin/python -m pytest -q tests/test_rehearsal.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import launching  # noqa: E402
import train  # noqa: E402
from infra import rehearsal  # noqa: E402

# The options both runs plan: GRPO with the listener and the KL reference, the fast paths of the README's 7B command,
# bf16 (the GPU's path), one held-out batch; small enough for two CPU processes.
OPTIONS = ["--mode=grpo", "--group_size=3", "--pairs_per_rank=2", "--max_new_tokens=8", "--max_prompt_tokens=16",
           "--max_pixels=12544", "--eval_pairs=4", "--activation_checkpointing=true", "--decode=static",
           "--shared_prompt=true", "--listener_from_reference=true", "--precision=bf16"]

# The same step on real tensors, with real weights, under torchrun: each rank writes its plan and its shards' shapes.
REAL = """
import json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/tests")
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from test_rehearsal import digest
import train
from infra import rehearsal
from infra.parallel import load_replica, setup_distributed
from infra.trainer import Trainer
rank, world, device = setup_distributed()
for name, args in {runs!r}.items():
    cfg = train.parse_args(args)
    trainer = Trainer.for_rehearsal(cfg, world, device, weights=True)
    plan = rehearsal.run_step(cfg, world, device, trainer)
    plan["shards"] = {{n: list(getattr(p, "_local_tensor", p).shape) for n, p in trainer.policy.named_parameters()}}
    units = [n for n, m in trainer.policy.named_modules() if isinstance(m, FSDPModule)]
    sizes = {{}}
    for n, p in trainer.policy.named_parameters():  # each unit's weights, whole (a DTensor's numel is the global one)
        unit = max((u for u in units if u == "" or n.startswith(u + ".")), key=len)
        sizes[unit] = sizes.get(unit, 0) + p.numel()
    plan["largest_reduce_bytes"] = 4 * max(sizes.values())  # its gradients, reduced in fp32
    with open(f"{{sys.argv[1]}}/{{name}}.{{rank}}.json", "w") as f:
        json.dump(plan, f)
# evaluate.py's replicas: rank 0 reads the checkpoint, rank 1 receives it; each rank's digest of each tensor's bytes
replica = load_replica({layout!r}, torch.bfloat16, device)
sums = {{n: digest(t) for n, t in list(replica.state_dict().items()) + list(replica.named_buffers())}}
with open(f"{{sys.argv[1]}}/replica.{{rank}}.json", "w") as f:
    json.dump(sums, f)
dist.destroy_process_group()
"""


def digest(tensor: torch.Tensor) -> str:
    """A tensor's bytes, hashed: equal digests, equal values (bit for bit)."""
    import hashlib
    return hashlib.sha1(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def fake_plan(args: list[str], out: Path) -> dict:
    """The rehearsal on two fake ranks, in this process; its plan, and its rank 0's shards' shapes."""
    cfg = train.parse_args(args + [f"--out_dir={out}", "--rehearse=2x80"])
    shards = {}
    run_step = rehearsal.run_step

    def keep_shards(cfg, world, device, trainer=None):
        from infra.trainer import Trainer
        trainer = Trainer.for_rehearsal(cfg, world, device)
        plan = run_step(cfg, world, device, trainer)
        shards.update({n: list(getattr(p, "_local_tensor", p).shape) for n, p in trainer.policy.named_parameters()})
        return plan
    rehearsal.run_step = keep_shards
    try:
        assert rehearsal.rehearse(cfg) == 0
    finally:
        rehearsal.run_step = run_step
    return {**json.loads((out / "rehearsal.json").read_text()), "shards": shards}


@pytest.fixture(scope="module")
def plans(real_checkpoint, tmp_path_factory):
    """{name: (the fake rehearsal's plan, rank 0's plan of the real two-process run)} for the toy and the 7B layout."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    runs = {"toy": OPTIONS + ["--model=toy"],
            "layout": OPTIONS + [f"--model={real_checkpoint}", "--train_data=toy", "--eval_data=toy"]}
    script = tmp / "real.py"
    script.write_text(REAL.format(root=str(ROOT), runs={k: v + [f"--out_dir={tmp / k}"] for k, v in runs.items()},
                                  layout=str(real_checkpoint)))
    run = launching.run(launching.command(script, [tmp], nproc=2), ROOT, launching.environment())
    assert run.returncode == 0, run.stderr[-3000:]
    plans = {name: (fake_plan(args, tmp / f"fake_{name}"), json.loads((tmp / f"{name}.0.json").read_text()))
             for name, args in runs.items()}
    plans["replicas"] = [json.loads((tmp / f"replica.{rank}.json").read_text()) for rank in (0, 1)]
    return plans


@pytest.mark.parametrize("name", ["toy", "layout"])
def test_rehearsal_agrees_with_the_real_step(plans, name):
    """Each phase's peak memory per rank within 10% of the same step's on real tensors (the same accounting, the
    tensors torch allocates), its FLOPs within 1%, and the sharded weights of the fake process group exactly the
    real group's: every parameter's local shard has the same shape on rank 0.

    One difference is gloo's, not the rehearsal's: gloo reduce-scatters by all-reducing a copy of the whole input
    (NCCL, which the rehearsal stands for, does not), so the real update holds one more copy of the largest
    unit's fp32 gradients at its peak; it is added to the prediction of that phase."""
    fake, real = plans[name]
    assert fake["phases"].keys() == real["phases"].keys() == {"rollout", "reference", "listener", "update", "heldout"}
    gloo = {"update": real["largest_reduce_bytes"] / 2**30}
    errors = {phase: (fake["phases"][phase]["peak_gib"] + gloo.get(phase, 0)) / row["peak_gib"] - 1
              for phase, row in real["phases"].items()}
    assert all(abs(e) <= 0.10 for e in errors.values()), "\n".join(
        f"{p}: {e:+.1%} " + " ".join(f"{k[:-4]} {fake['phases'][p][k] * 1024:.1f}/{real['phases'][p][k] * 1024:.1f}"
                                     for k in real["phases"][p] if k.endswith("_gib")) for p, e in errors.items())
    for phase, row in real["phases"].items():
        assert fake["phases"][phase]["flops"] == pytest.approx(row["flops"], rel=0.01), phase
    assert fake["shards"] == real["shards"]
    assert fake["state_gib"] == pytest.approx(real["state_gib"], rel=1e-9)
    total = sum(torch.Size(shape).numel() for shape in real["shards"].values())
    assert fake["state_gib"] * 2**30 == 16 * total  # fp32 weights, gradients and AdamW's two moments


def test_each_evaluation_process_gets_the_checkpoint_read_by_rank_0(plans, real_checkpoint):
    """infra.parallel.load_replica under torchrun x2 (evaluate.py's loading): rank 1, which reads nothing, holds
    exactly the weights and buffers rank 0 read, and both equal the checkpoint loaded here in one process."""
    from models import families
    direct = families.load(real_checkpoint, torch.bfloat16)
    expected = {n: digest(t) for n, t in list(direct.state_dict().items()) + list(direct.named_buffers())}
    rank0, rank1 = plans["replicas"]
    assert rank0 == rank1 == expected


def test_a_run_that_does_not_fit_exits_3_naming_the_phase(tmp_path, capsys):
    """--rehearse=GPUSxGIB with too little memory: status 3 and the phase that needs more, by how much."""
    cfg = train.parse_args(OPTIONS + ["--model=toy", f"--out_dir={tmp_path}", "--rehearse=2x0.01"])
    assert rehearsal.rehearse(cfg) == 3
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "rehearsal.json").read_text())
    worst = max(plan["phases"], key=lambda p: plan["phases"][p]["peak_gib"])
    assert not plan["fits"] and f"does not fit: the {worst} phase needs" in out
    assert plan["peak_gib"] > 0.01 * (1 - rehearsal.HEADROOM)


@pytest.mark.parametrize("spec", ["8", "8x", "x80", "0x80", "8x0", "8*80", "eight x 80"])
def test_a_gpu_spec_that_does_not_parse_is_refused(spec, capsys):
    """Before anything loads: one line naming --rehearse, the value and the form expected."""
    with pytest.raises(SystemExit):
        train.parse_args(["--mode=grpo", f"--rehearse={spec}"])
    assert f"--rehearse={spec!r}: expected GPUSxGIB" in capsys.readouterr().err


def test_the_skipped_decode_steps_leave_the_state_stepping_them_would(world_model):
    """SkippingDecoder runs a decode's first two and last two steps and advances the state between: the cache, the
    positions and the masks then equal those of running every step (the reference decode and the static one)."""
    import sample
    from fast.static_decode import StaticDecoder
    model, processor, pairs = world_model
    batch = processor.pairs(pairs)
    for make in (sample.CopiedCache, StaticDecoder):
        states = []
        for skip in (False, True):
            ledger = rehearsal.Ledger()
            ledger.phase = "rollout"
            decoder = rehearsal.SkippingDecoder(make(), ledger) if skip else make()
            with torch.no_grad():
                sample.sample(model, batch, num_samples=2, max_new_tokens=9, temperature=0.0, stop_token_ids=[],
                              pad_token_id=processor.tokenizer.pad_token_id, decoder=decoder)
            states.append(decoder_state(decoder.inner if skip else decoder))
        assert states[0] == states[1], make.__name__


def decoder_state(decoder) -> dict:
    """What a decoder's next step reads, as shapes and position values."""
    if hasattr(decoder, "state"):  # sample.CopiedCache
        p = decoder.state
        return {"cache": [tuple(layer.keys.shape) for layer in p.cache.layers], "mask": p.attention_mask.tolist(),
                "next": p.next_position.tolist()}
    return {"column": decoder.column, "index": decoder.column_index.tolist(), "mask": decoder.cache.mask.tolist(),
            "next": decoder.next_position.tolist()}


@pytest.fixture(scope="module")
def world_model():
    """The toy model and processor, and two pairs of prompts of different lengths (left padding)."""
    from PIL import Image

    from formats.records import Pair
    from toy import world as toy
    processor = toy.make_processor()
    image = lambda colour: Image.new("RGB", (56, 56), colour)
    pairs = [Pair("a red circle", (image("red"), image("blue")), 0),
             Pair("a blue square in the middle of the picture", (image("green"), image("blue")), 1)]
    return toy.make_model(processor.tokenizer, seed=0), processor, pairs
