"""infra/checkpoint.py: damaged checkpoints fall back to the last good one, changed configs are refused, metrics.jsonl
survives a partial line, one live run per out_dir, and exports keep the starting checkpoint's files and dtype.

The checkpoints are real ones, written by `train.py` on the toy model (one short SFT run); the damage is done
here, the way a kill, a full disk or a careless hand would do it.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from infra import checkpoint  # noqa: E402
from real_layout import GENERATION_CONFIG, PREPROCESSOR_CONFIG, real_checkpoint  # noqa: E402, F401
from test_train import launch  # noqa: E402

SFT = ["--mode=sft", "--train_data=toy", "--eval_data=toy", "--sft_answers=random", "--pairs_per_rank=4", "--micro_pairs=4", "--lr=1e-3", "--steps=2",
       "--max_new_tokens=8", "--eval_pairs=2", "--eval_every=0", "--save_every=1", "--keep_last=5", "--warmup_steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two SFT steps of the toy model, a checkpoint after each, and the final export."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    launch([*SFT, f"--out_dir={out}"])
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step_0000001", "step_0000002"]
    return out


@pytest.fixture(scope="module")
def group():
    """A process group of one in this process (checkpoint.pick is collective)."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for p in checkpoint.checkpoints(run):
        shutil.copytree(p, to / p.name)
    shutil.copy(run / "metrics.jsonl", to / "metrics.jsonl")
    return to


def truncate(path: Path, size=None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if size is None else size])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {  # name -> (what to do to step_0000002, the words of the warning)
    "truncated shard": (lambda d: truncate(d / "__0_0.distcp"), "__0_0.distcp has"),
    "empty shard": (lambda d: truncate(d / "__0_0.distcp", 0), "__0_0.distcp has 0 bytes"),
    "flipped bit in a shard": (lambda d: flip(d / "__0_0.distcp"), "__0_0.distcp does not match its sha256"),
    "missing shard index": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "truncated trainer_state.json": (lambda d: truncate(d / "trainer_state.json"), "trainer_state.json has"),
    "no manifest (interrupted save)": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    "truncated manifest": (lambda d: truncate(d / "manifest.json"), "manifest.json unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_falls_back(run, group, tmp_path, capsys, case):
    out = copy_run(run, tmp_path / "out")
    damage, words = DAMAGE[case]
    damage(out / "step_0000002")
    assert checkpoint.pick(out, 0, 1) == out / "step_0000001"
    warning = capsys.readouterr().out
    assert f"warning: checkpoint {out / 'step_0000002'} is damaged" in warning and words in warning, warning


def test_stray_names_are_ignored_and_an_empty_step_dir_reported(run, group, tmp_path, capsys):
    out = copy_run(run, tmp_path / "out")
    (out / "step_notes.txt").write_text("lr 1e-3 looked fine")
    (out / "step_0000009").mkdir()
    (out / ".tmp_step_0000003").mkdir()  # a save killed before its rename
    assert checkpoint.pick(out, 0, 1) == out / "step_0000002"
    warning = capsys.readouterr().out
    assert "step_0000009 is damaged (rank 0: no manifest.json" in warning and "step_notes" not in warning


def test_no_usable_checkpoint_is_an_error(run, group, tmp_path):
    out = copy_run(run, tmp_path / "out")
    for p in checkpoint.checkpoints(out):
        (p / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="(?s)no usable checkpoint in .*step_0000002: rank 0: no manifest"):
        checkpoint.pick(out, 0, 1)


def test_resume_past_a_damaged_latest_equals_the_uninterrupted_run(run, tmp_path):
    """End to end: step 2's shard truncated; the run warns, resumes at step 1, redoes step 2 and ends with the
    weights of the undamaged run (one process, fp32: exactly); the damaged directory is kept aside."""
    out = copy_run(run, tmp_path / "out")
    truncate(out / "step_0000002" / "__0_0.distcp")
    result = launch([*SFT, f"--out_dir={out}"])
    assert "step_0000002 is damaged" in result.stdout and "resumed from" in result.stdout
    assert (out / "step_0000002.damaged").is_dir() and checkpoint.problem(out / "step_0000002", 0, 1) is None
    resumed, straight = load_file(out / "export_0000002/model.safetensors"), load_file(run / "export_0000002/model.safetensors")
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_changed_config_is_refused_unless_allowed(run, tmp_path):
    out = copy_run(run, tmp_path / "out")
    refused = launch([*SFT, f"--out_dir={out}", "--seed=1", "--lr=0.01", "--steps=3", "--eval_every=7"], check=False)
    assert refused.returncode != 0
    assert "--seed: 0 -> 1" in refused.stderr and "--lr: 0.001 -> 0.01" in refused.stderr, refused.stderr
    assert "--steps" not in refused.stderr and "--eval_every" not in refused.stderr  # these do not change training
    allowed = launch([*SFT, f"--out_dir={out}", "--seed=1", "--allow_config_change=true"])
    assert "warning: resuming" in allowed.stdout and "--seed: 0 -> 1" in allowed.stdout


def test_config_differences():
    cfg = {"seed": 0, "lr": 1e-3, "pairs_per_rank": 2, "micro_pairs": 1, "steps": 10, "out_dir": "a"}
    defaults = dict(cfg, skip_bad=False)
    same_batch = dict(cfg, pairs_per_rank=4, micro_pairs=4, steps=20, out_dir="b")
    assert checkpoint.config_differences(cfg, 2, same_batch, 1, defaults) == []
    assert checkpoint.config_differences(cfg, 2, dict(cfg, lr=1e-4), 2, defaults) == ["--lr: 0.001 -> 0.0001"]
    assert checkpoint.config_differences(cfg, 2, cfg, 1, defaults) == [
        "global batch (pairs_per_rank x world size): 2 x 2 = 4 -> 2 x 1 = 2"]
    # an option added after the checkpoint was written: fine at its default, a difference when set
    assert checkpoint.config_differences(cfg, 2, dict(cfg, skip_bad=False), 2, defaults) == []
    assert checkpoint.config_differences(cfg, 2, dict(cfg, skip_bad=True), 2, defaults) == [
        "--skip_bad: not an option when the checkpoint was written; now True"]


def test_metrics_partial_last_line_is_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    checkpoint.open_metrics(path, 2).close()
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
    assert f"warning: {path}: dropping a partial last line 4" in capsys.readouterr().out
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}: line 2 is not JSON"):
        checkpoint.open_metrics(path, 2)


def test_one_live_run_per_out_dir(run, tmp_path):
    """A held lock stops a second run with a message naming the holder; a dead holder's lock is taken over."""
    out = tmp_path / "out"
    out.mkdir()
    held = checkpoint.lock(out)
    second = launch([*SFT, f"--out_dir={out}"], check=False)
    assert second.returncode != 0 and f"{out} is in use by a live run (host {socket.gethostname()} pid {os.getpid()}" \
        in second.stderr, second.stderr
    held.close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from infra import checkpoint;"
                               " from pathlib import Path; h = checkpoint.lock(Path(sys.argv[2])); print('locked', flush=True);"
                               " time.sleep(600)", str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=f"pid {holder.pid}"):
        checkpoint.lock(out)
    holder.send_signal(signal.SIGKILL)  # killed: its lock file stays, its flock goes
    holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()
    checkpoint.lock(out).close()


def test_export_of_a_published_layout_start(real_checkpoint, tmp_path):
    """From a directory laid out like the Qwen2.5-VL-7B-Instruct download (bf16 shards with an index, published
    preprocessor and generation configs, real vocabulary), on 2 processes (rank 0 reads the weights and
    broadcasts them), with --max_pixels and lr 0: the export holds the starting weights bit for bit, in bf16, and
    the starting checkpoint's preprocessor, generation and tokenizer files unchanged; the pixel bounds the run
    used are in trainer_state.json."""
    out = tmp_path / "out"
    launch([*SFT, "--steps=1", "--lr=0", "--pairs_per_rank=2", "--micro_pairs=2", f"--model={real_checkpoint}",
            "--max_pixels=50176", f"--out_dir={out}"], nproc=2)
    export = out / "export_0000001"
    for name in ("preprocessor_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.json"):
        assert (export / name).read_bytes() == (real_checkpoint / name).read_bytes(), name
    exported = load_file(export / "model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    state = json.loads((out / "step_0000001/trainer_state.json").read_text())
    assert state["pixels"] == {"min_pixels": PREPROCESSOR_CONFIG["min_pixels"], "max_pixels": 50176}
    from transformers import Qwen2_5_VLForConditionalGeneration
    start = Qwen2_5_VLForConditionalGeneration.from_pretrained(real_checkpoint, use_safetensors=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, use_safetensors=True)
    assert model.dtype == torch.bfloat16 and model.generation_config.eos_token_id == GENERATION_CONFIG["eos_token_id"]
    expected = start.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, expected[name]), name


def test_out_dir_not_shared_between_ranks_is_reported(tmp_path):
    """Two ranks whose --out_dir resolves to different directories (as on two nodes without a shared
    filesystem): both stop at start with a message naming the rank that cannot see rank 0's files."""
    script = tmp_path / "two_views.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      f"os.makedirs(os.path.join({str(tmp_path)!r}, 'node' + os.environ['RANK']), exist_ok=True)\n"
                      f"os.chdir(os.path.join({str(tmp_path)!r}, 'node' + os.environ['RANK']))\n"
                      "import train\ntrain.main()\n")
    run = launch([*SFT, "--out_dir=run"], nproc=2, script=script, check=False)
    assert run.returncode != 0
    assert "--out_dir=run is not shared between the nodes: rank 1 on" in run.stdout + run.stderr, run.stderr[-3000:]
