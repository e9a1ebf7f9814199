"""train.py end to end on the toy world: 1 process vs 2 FSDP2 processes, exact resume, checkpoints, SIGTERM, NaN.

Each test launches `train.py` the way users do (`torchrun`, or plain `python` for one process) and compares
what the runs wrote: the weights of their checkpoints and the losses in metrics.jsonl.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--train_data=toy", "--eval_data=toy", "--max_new_tokens=24", "--eval_pairs=8", "--eval_every=0", "--save_every=1000", "--warmup_steps=1"]
COLD = ["--mode=sft", "--sft_answers=random", "--sft_reasoning=I compare the colour of each image with the prompt.",
        "--pairs_per_rank=16", "--micro_pairs=16", "--lr=1e-3", "--steps=60"]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch(args, nproc=1, env=None, wait=True):
    """python train.py (1 process) or torchrun --standalone (several); a start-up SIGABRT is retried once."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # never join this process's group
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for attempt in range(2):
        run = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
        if run.returncode == 0:
            return run
        if "SIGABRT" not in run.stdout + run.stderr or attempt:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def weights(run_dir: Path) -> dict:
    last = sorted(run_dir.glob("step_*"))[-1]
    return load_file(last / "model.safetensors")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One directory for every run of this module, so the toy data next to them is written once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cold_start(runs):
    """A format-only SFT cold start of the toy model: the GRPO runs below start from it."""
    out = runs / "cold"
    launch([*COLD, *TINY, f"--out_dir={out}"])
    return sorted(out.glob("step_*"))[-1]


def grpo_args(cold_start, out_dir, pairs_per_rank, **extra):
    args = ["--mode=grpo", f"--model={cold_start}", "--group_size=4", f"--pairs_per_rank={pairs_per_rank}",
            "--micro_pairs=1", "--steps=2", "--lr=1e-3", "--beta=0.04", "--w_list=0.5", "--loss_type=token",
            "--num_iterations=2", "--temperature=0.7", *TINY, f"--out_dir={out_dir}"]
    return args + [f"--{k}={v}" for k, v in extra.items()]


def test_two_processes_equal_one(cold_start, runs):
    """GRPO with the listener: 2 FSDP2 ranks of 2 pairs each == 1 process of 4 pairs, after two steps.

    Both see the same global batches and the same rollouts (sampling is seeded per pair); the loss is
    normalised over the global token count, so only float summation order differs. Losses agree to 1e-5.
    The 2-process run also checkpoints activations: each prompt's single pass, its cache read by G rows, the
    layers recomputed in the backward pass, under FSDP2, must give the 1-process gradients. Both runs read
    the listener's answer from the reference pass where they can (listener_from_reference).
    Weights move by about 4e-3 per step here (lr 1e-3); they agree to 5e-5, because AdamW divides each
    gradient by its running RMS, which turns summation noise in a gradient of ~1e-9 (a token the batch never
    uses) into a difference of ~1e-5 (the largest measured: 1.1e-5, one lm_head row).
    """
    one, two = runs / "one", runs / "two"
    launch(grpo_args(cold_start, one, pairs_per_rank=4))
    launch(grpo_args(cold_start, two, pairs_per_rank=2, activation_checkpointing="true"), nproc=2)
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_std"] > 0 for r in rows), "no reward signal: the comparison would be vacuous"
    assert all(r["listener_from_reference"] > 0 for r in rows), "the reference pass never served the listener"
    w1, w2 = weights(one), weights(two)
    start = load_file(cold_start / "model.safetensors")
    assert any(not torch.equal(w1[k], start[k]) for k in w1), "training changed nothing"
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=5e-5, rtol=0, msg=k)


def test_resume_equals_uninterrupted(cold_start, runs):
    """Two steps, stop, two more == four steps: same losses and weights (fp32, 1 process, deterministic)."""
    straight, resumed = runs / "straight", runs / "resumed"
    launch(grpo_args(cold_start, straight, 2, steps=4, save_every=2))
    launch(grpo_args(cold_start, resumed, 2, steps=2))
    launch(grpo_args(cold_start, resumed, 2, steps=4, save_every=2))
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    w1, w2 = weights(straight), weights(resumed)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=0, msg=k)


def test_checkpoint_loads_with_from_pretrained(cold_start):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cold_start)
    saved = load_file(cold_start / "model.safetensors")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, saved[name], atol=0, rtol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(cold_start)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_sigterm_leaves_a_loadable_checkpoint(cold_start, runs):
    out = runs / "term"
    proc = launch(grpo_args(cold_start, out, 2, steps=1000), wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    from transformers import Qwen2_5_VLForConditionalGeneration
    last = sorted(out.glob("step_*"))[-1]
    Qwen2_5_VLForConditionalGeneration.from_pretrained(last)
    state = json.loads((last / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 1000


def test_nan_gradient_step_is_skipped(cold_start, runs, monkeypatch):
    """A NaN in any gradient: the optimiser step is skipped and counted; the weights stay as they were."""
    import train
    cfg = train.Config(mode="sft", model=str(cold_start), out_dir=str(runs / "nan"), eval_pairs=2,
                       pairs_per_rank=2, micro_pairs=2)
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in zip(DIST_VARS, ("0", "1", "0", "127.0.0.1", str(port))):  # a group of one, undone after the test
        monkeypatch.setenv(k, v)
    rank, world, device = train.setup_distributed()
    state = train.Trainer(cfg, rank, world, device)
    before = {k: v.detach().clone() for k, v in state.policy.state_dict().items()}
    metrics = train.sft_step(cfg, state, next(state.stream), 0)  # a normal step moves the weights
    assert metrics["skipped"] == 0 and state.optimizer_steps == 1
    moved = {k: v.detach().clone() for k, v in state.policy.state_dict().items()}
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    original = train.grpo.completion_logprobs
    monkeypatch.setattr(train.grpo, "completion_logprobs", lambda *a, **k: original(*a, **k) * float("nan"))
    metrics = train.sft_step(cfg, state, next(state.stream), 1)
    assert metrics["skipped"] == 1 and state.optimizer_steps == 1
    for k, v in state.policy.state_dict().items():
        assert torch.equal(v, moved[k]), k



def test_score_mode_runs_and_rewards_ratings(cold_start, runs):
    """The absolute-score variant is a config switch: two GRPO steps on single images with rating rewards."""
    out = runs / "score"
    launch(grpo_args(cold_start, out, 2, mode="score", w_list=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"reward_exact", "reward_distance", "reward_format"} <= set(rows[0])
    # the cold start answers "1" or "2", both valid ratings: some rollouts earn distance reward
    assert max(r["reward_distance"] for r in rows) > 0
    from transformers import Qwen2_5_VLForConditionalGeneration
    Qwen2_5_VLForConditionalGeneration.from_pretrained(sorted(out.glob("step_*"))[-1])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """The same GRPO loss on the toy model with and without activation checkpointing: equal to 1e-6."""
    import random

    import grpo
    import toy
    import train
    from data import Pair, Processor

    processor = Processor.toy()
    rng = random.Random(0)
    pairs = [Pair(p, tuple(ims), 0) for p, ims, _ in (toy.make_group(rng, 2) for _ in range(2))]
    batch = processor.pairs(pairs)
    completions = torch.randint(20, 400, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for checkpointing in (False, True):
        model = toy.make_model(processor.tokenizer, seed=0).train()
        if checkpointing:
            train.checkpoint_blocks(model)
            wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
            assert len(wrapped) == len(model.model.visual.blocks) + len(model.model.language_model.layers)
        logp = grpo.completion_logprobs(model, batch, completions, mask)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0)
        loss.backward()
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss0, loss1, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], atol=1e-6, rtol=0, msg=name)
