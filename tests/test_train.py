"""train.py end to end on the toy world: 1 process vs 2 FSDP2 processes, exact resume (also on another number of
processes), exports, SIGTERM under torchrun, NaN.

Each test launches `train.py` the way users do (`torchrun`, or plain `python` for one process) and compares
what the runs wrote: the weights of their checkpoints and the losses in metrics.jsonl.
"""
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import launching

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--train_data=toy", "--eval_data=toy", "--max_new_tokens=24", "--eval_pairs=8", "--eval_every=0", "--save_every=1000", "--warmup_steps=1"]
FAST_PATHS = dict(activation_checkpointing="true", shared_prompt="true", listener_from_reference="true")  # fast/
COLD = ["--mode=sft", "--sft_answers=random", "--sft_reasoning=I have finished thinking.", "--pairs_per_rank=16",
        "--micro_pairs=16", "--lr=1e-3", "--steps=60"]


def launch(args, nproc=1, env=None, wait=True, check=True, script=ROOT / "train.py", torchrun=()):
    """python train.py (1 process) or torchrun --standalone (several), as tests/launching.py runs them.

    check=False returns a failed run instead of raising; `torchrun` holds extra flags for the launcher.
    """
    cmd, full_env = launching.command(script, args, nproc, torchrun), launching.environment(env)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = launching.run(cmd, ROOT, full_env)
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run


def weights(run_dir: Path) -> dict:
    """The weights of a run's last from_pretrained export."""
    last = sorted(run_dir.glob("export_*"))[-1]
    return load_file(last / "model.safetensors")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_moved(run_dir: Path, steps) -> None:
    """Each of `steps` moved the weights: a non-zero gradient norm, a non-zero learning rate, no skipped optimiser
    step. Without it "the resumed run equals the uninterrupted one" can hold of weights that never moved (from a
    start where every GRPO group is flat, every gradient is 0)."""
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for step in steps:
        assert rows[step]["grad_norm"] > 0 and rows[step]["lr"] > 0 and rows[step]["skipped"] == 0, rows[step]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One directory for every run of this module, so the toy data next to them is written once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cold_start(runs):
    """A format-only SFT cold start of the toy model: the GRPO runs below start from it."""
    out = runs / "cold"
    launch([*COLD, *TINY, f"--out_dir={out}"])
    return out / "export_0000060"


def grpo_args(cold_start, out_dir, pairs_per_rank, **extra):
    args = ["--mode=grpo", f"--model={cold_start}", "--group_size=4", f"--pairs_per_rank={pairs_per_rank}",
            "--micro_pairs=1", "--steps=2", "--lr=1e-3", "--beta=0.04", "--w_list=0.5", "--loss_type=token",
            "--num_iterations=2", "--temperature=0.7", *TINY, f"--out_dir={out_dir}"]
    return args + [f"--{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def two_procs(cold_start, runs):
    """GRPO with the listener on 2 FSDP2 ranks of 2 pairs with activation checkpointing and the update's and the
    listener's speed-ups (fast/), two steps, a checkpoint after each."""
    out = runs / "two"
    launch(grpo_args(cold_start, out, pairs_per_rank=2, save_every=1, **FAST_PATHS), nproc=2)
    return out


def test_two_processes_equal_one(cold_start, runs, two_procs):
    """GRPO with the listener: 2 FSDP2 ranks of 2 pairs each == 1 process of 4 pairs, after two steps.

    Both see the same global batches and the same rollouts (sampling is seeded per pair); the loss is
    normalised over the global token count, so only float summation order differs. Losses agree to 1e-5.
    The 1-process run takes the reference paths; the 2-process run checkpoints activations and takes the fast
    ones: each prompt's single pass, its cache read by G rows, the layers recomputed in the backward pass, under
    FSDP2, must give the 1-process gradients, and the listener's answer read from the reference pass where it
    can be (listener_from_reference) the listener's own pass's.
    Weights move by about 4e-3 per step here (lr 1e-3); they agree to 5e-5, because AdamW divides each
    gradient by its running RMS, which turns summation noise in a gradient of ~1e-9 (a token the batch never
    uses) into a difference of ~1e-5 (the largest measured: 1.1e-5, one lm_head row).
    """
    one, two = runs / "one", two_procs
    launch(grpo_args(cold_start, one, pairs_per_rank=4))
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_std"] > 0 for r in rows), "no reward signal: the comparison would be vacuous"
    assert_moved(one, [1, 2])
    assert_moved(two, [1, 2])
    fast = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(r["listener_from_reference"] > 0 for r in fast), "the reference pass never served the listener"
    w1, w2 = weights(one), weights(two)
    start = load_file(cold_start / "model.safetensors")
    assert any(not torch.equal(w1[k], start[k]) for k in w1), "training changed nothing"
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=5e-5, rtol=0, msg=k)


def test_two_processes_equal_one_in_bf16(cold_start, runs):
    """The GPU's path (--precision=bf16: FSDP2 mixed precision, bf16 weights gathered, fp32 gradients reduced, the
    frozen models in bf16): 2 FSDP2 ranks of 2 pairs == 1 process of 4 pairs, two steps. Measured here: the losses
    and the old_logp gaps equal, the weights 3.7e-9 apart after moving 4e-3; asserted to 1e-5 and 1e-6."""
    one, two = runs / "bf16_one", runs / "bf16_two"
    launch(grpo_args(cold_start, one, pairs_per_rank=4, precision="bf16"))
    launch(grpo_args(cold_start, two, pairs_per_rank=2, precision="bf16"), nproc=2)
    rows = {name: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for name, d in (("one", one), ("two", two))}
    for key in ("loss", "reward", "old_logp_gap_max"):
        assert [r[key] for r in rows["one"]] == pytest.approx([r[key] for r in rows["two"]], abs=1e-5), key
    assert all(r["reward_std"] > 0 for r in rows["one"]), "no reward signal: the comparison would be vacuous"
    assert_moved(one, [1, 2])
    w1, w2, start = weights(one), weights(two), load_file(cold_start / "model.safetensors")
    assert max((w1[k] - start[k]).abs().max() for k in w1) > 1e-3, "training changed nothing"
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=0, msg=k)


def test_resume_on_fewer_processes(cold_start, runs, two_procs):
    """The 2-rank run's step-1 checkpoint resumed by 1 process with the same global batch (4 pairs): step 2
    equals the 2-rank run's (as above, to summation order). DCP reshards weights and AdamW moments; the data
    stream and the sampling seeds count global batches. The resumed run decodes its rollouts with
    --decode=static (`StaticDecoder`, on the FSDP2-wrapped policy) where the 2-rank run used the reference
    decode: the decoder is not a training setting, and it gives the same rollouts."""
    out = runs / "two_then_one"
    out.mkdir()
    shutil.copytree(two_procs / "step_0000001", out / "step_0000001")
    run = launch(grpo_args(cold_start, out, pairs_per_rank=4, decode="static"))
    assert "resumed from" in run.stdout and "step 1" in run.stdout
    assert_moved(two_procs, [1])  # before the checkpoint resumed from
    assert_moved(out, [2])  # after it
    assert losses(out) == pytest.approx(losses(two_procs)[1:], abs=1e-5)
    w1, w2 = weights(out), weights(two_procs)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=5e-5, rtol=0, msg=k)
    refused = launch(grpo_args(cold_start, runs / "two", pairs_per_rank=1), check=False)
    assert refused.returncode != 0 and "global batch (pairs_per_rank x world size): 2 x 2 = 4 -> 1 x 1 = 1" in refused.stderr


def test_export_loads_with_from_pretrained(cold_start):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cold_start)
    saved = load_file(cold_start / "model.safetensors")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, saved[name], atol=0, rtol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(cold_start)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


# Makes every policy/reference forward (fast/shared_prompt.py's completion_hidden, the path the run takes) slow
# once step 1 is in metrics.jsonl (the SIGTERM test): step 2 then outlasts torchrun's grace. Rank 0 writes step 1's
# row before the collective that ends the step, so no rank begins step 2 before the file shows it.
SLOW = """
import os, sys, time
sys.path.insert(0, {root!r})
import train
from fast import shared_prompt
original = shared_prompt.completion_hidden
def slow(*args, **kwargs):
    after = os.environ["SLOW_AFTER"]
    if os.path.exists(after) and os.path.getsize(after) > 0:
        with open(os.environ["SLOW_LOG"], "a") as f:
            f.write(os.environ["RANK"])
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    return original(*args, **kwargs)
shared_prompt.completion_hidden = slow
train.main()
"""


def test_sigterm_inside_a_step_under_torchrun(cold_start, runs, two_procs, tmp_path):
    """SIGTERM to torchrun (grace --shutdown-timeout=10 s) as step 2's first of six forwards begins, each taking
    2 s (step 1's ran at full speed): the step (12 s left) cannot finish in the grace, so it is abandoned at its
    next phase boundary (at most two forwards away) and the checkpoint of step 1 is written. Resuming from it gives
    the uninterrupted run's step 2 exactly (same losses and weights to 1e-6): weights, AdamW moments and the data
    stream were restored. Step 1 moved the weights before the stop, and step 2 after it: the equality is not that
    of weights that never moved.

    What the user sees, as docs/checkpoints.md says: the workers save and stop cleanly, and torchrun itself, which
    was the one signalled, exits 1 with its `SignalException` traceback ("got signal: 15")."""
    out, log_file = runs / "term", tmp_path / "forwards"
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW.format(root=str(ROOT)))
    env = {"SLOW_LOG": str(log_file), "SLOW_SECONDS": "2", "SLOW_AFTER": str(out / "metrics.jsonl")}
    proc = launch(grpo_args(cold_start, out, 2, **FAST_PATHS), nproc=2, env=env, wait=False, script=script,
                  torchrun=["--shutdown-timeout=10"])
    deadline = time.time() + 300
    while not log_file.exists() or "0" not in log_file.read_text():  # rank 0 began the first forward of step 2
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.1)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert_moved(out, [1])
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert f"stop requested during step 2: abandoned; the checkpoint of step 1 is in {out}" in output, output
    assert "forcefully" not in output and "SIGKILL" not in output, output
    assert proc.returncode == 1 and "SignalException: Process" in output and "got signal: 15" in output, output
    assert [p.name for p in sorted(out.glob("step_*"))] == ["step_0000001"], output
    state = json.loads((out / "step_0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and (state["stream"]["epoch"], state["stream"]["index"]) == (0, 1)
    launch(grpo_args(cold_start, out, 2, **FAST_PATHS), nproc=2)  # resume, at full speed
    assert_moved(out, [2])
    assert losses(out) == pytest.approx(losses(two_procs), abs=1e-6)
    w1, w2 = weights(out), weights(two_procs)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=0, msg=k)


def test_nan_gradient_step_is_skipped(cold_start, runs, monkeypatch):
    """A NaN in any gradient: the optimiser step is skipped and counted; the weights stay as they were."""
    import train
    from infra.parallel import setup_distributed
    from infra.trainer import Trainer
    cfg = train.Config(mode="sft", model=str(cold_start), out_dir=str(runs / "nan"), eval_pairs=2,
                       pairs_per_rank=2, micro_pairs=2)
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in zip(launching.DIST_VARS, ("0", "1", "0", "127.0.0.1", str(port))):  # a group of one, undone after the test
        monkeypatch.setenv(k, v)
    rank, world, device = setup_distributed()
    trainer = Trainer(cfg, rank, world, device)
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    metrics = train.sft_step(cfg, trainer, next(trainer.stream), 0)  # a normal step moves the weights
    assert metrics["skipped"] == 0 and trainer.optimizer_steps == 1
    moved = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    original = train.grpo.token_logprobs
    monkeypatch.setattr(train.grpo, "token_logprobs", lambda *a, **k: original(*a, **k) * float("nan"))
    metrics = train.sft_step(cfg, trainer, next(trainer.stream), 1)
    assert metrics["skipped"] == 1 and trainer.optimizer_steps == 1
    for k, v in trainer.policy.state_dict().items():
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
    Qwen2_5_VLForConditionalGeneration.from_pretrained(sorted(out.glob("export_*"))[-1])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """The same GRPO loss on the toy model with and without activation checkpointing: equal to 1e-6."""
    import random

    import grpo
    from infra import parallel
    from toy import world as toy
    from formats.records import Pair
    from models.processor import Processor

    processor = toy.make_processor()
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
            parallel.checkpoint_blocks(model)
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
