"""infra/checkpoint.py: damaged checkpoints fall back to the last good one, changed configs are refused, metrics.jsonl
survives a partial line, one live run per out_dir, and exports keep the starting checkpoint's files and dtype.

The checkpoints are real ones, written by `train.py` on the toy model (one short SFT run); the damage is done
here, the way a kill, a full disk or a careless hand would do it.
"""
import dataclasses
import errno
import json
import os
import pickle
import re
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
from infra import checkpoint, tracking  # noqa: E402
from infra.trainer import open_run  # noqa: E402
from real_layout import GENERATION_CONFIG, PREPROCESSOR_CONFIG  # noqa: E402
from test_train import assert_moved, launch  # noqa: E402
from toy import world as toy_world  # noqa: E402

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


def copy_run(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoints and metrics copied to a new out_dir beside it (named after the test's tmp_path), where
    the toy data the run wrote beside itself serves the copy too."""
    to = run.parent / tmp_path.name
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


def edit_manifest(d: Path, change) -> None:
    """Rewrite step d's manifest.json as `change(manifest)` returns it (a careless hand, or a hostile one)."""
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(change(manifest)))


def rehashed(d: Path, name: str) -> None:
    """Record file `name`'s current size and sha256 in the manifest, as someone covering an edit would."""
    def change(m):
        m["files"][name] = {"size": (d / name).stat().st_size, "sha256": checkpoint.sha256(d / name)}
        return m
    edit_manifest(d, change)


def set_saved_step(d: Path, step: int) -> None:
    state = json.loads((d / "trainer_state.json").read_text())
    (d / "trainer_state.json").write_text(json.dumps(dict(state, step=step)))
    rehashed(d, "trainer_state.json")


def without_index(d: Path) -> None:
    edit_manifest(d, lambda m: dict(m, files={k: v for k, v in m["files"].items() if k != ".metadata"}))


DAMAGE = {  # name -> (what to do to step_0000002, the words of the warning)
    "truncated shard": (lambda d: truncate(d / "__0_0.distcp"), "__0_0.distcp has"),
    "empty shard": (lambda d: truncate(d / "__0_0.distcp", 0), "__0_0.distcp has 0 bytes"),
    "flipped bit in a shard": (lambda d: flip(d / "__0_0.distcp"), "__0_0.distcp does not match its sha256"),
    "missing shard index": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "truncated trainer_state.json": (lambda d: truncate(d / "trainer_state.json"), "trainer_state.json has"),
    "no manifest (interrupted save)": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    "truncated manifest": (lambda d: truncate(d / "manifest.json"), "manifest.json unreadable"),
    "shard index not in the manifest": (without_index, "manifest.json does not list .metadata (the shards' index"),
    "manifest of the wrong shape": (lambda d: (d / "manifest.json").write_text("[1, 2]"),
                                    "manifest.json has the wrong shape (expected {\"step\": N, \"files\""),
    "manifest entry without size": (lambda d: edit_manifest(d, lambda m: dict(m, files={
        k: {"sha256": v["sha256"]} if k == "__0_0.distcp" else v for k, v in m["files"].items()})),
        "manifest.json: the entry of '__0_0.distcp' has the wrong shape"),
    "trainer_state.json says another step": (lambda d: set_saved_step(d, 1),
                                             "trainer_state.json says step 1, manifest.json step 2"),
    "a shard the manifest does not list": (lambda d: shutil.copy(d / "__0_0.distcp", d / "__1_0.distcp"),
                                           "__1_0.distcp is in the directory but not in manifest.json"),
    "manifest nested too deep": (lambda d: (d / "manifest.json").write_text("[" * 100_000),
                                 "manifest.json unreadable (maximum recursion depth exceeded"),
    "trainer_state.json nested too deep": (lambda d: ((d / "trainer_state.json").write_text("[" * 100_000),
                                                      rehashed(d, "trainer_state.json")),
                                           "trainer_state.json unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_falls_back(run, group, tmp_path, capsys, case):
    out = copy_run(run, tmp_path)
    damage, words = DAMAGE[case]
    damage(out / "step_0000002")
    assert checkpoint.pick(out, 0, 1) == out / "step_0000001"
    warning = capsys.readouterr().out
    assert f"warning: checkpoint {out / 'step_0000002'} is damaged" in warning and words in warning, warning


def test_stray_names_are_ignored_and_an_empty_step_dir_reported(run, group, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    (out / "step_notes.txt").write_text("lr 1e-3 looked fine")
    (out / "step_0000009").mkdir()
    (out / ".tmp_step_0000003").mkdir()  # a save killed before its rename
    assert checkpoint.pick(out, 0, 1) == out / "step_0000002"
    warning = capsys.readouterr().out
    assert "step_0000009 is damaged (rank 0: no manifest.json" in warning and "step_notes" not in warning


def test_no_usable_checkpoint_is_an_error(run, group, tmp_path):
    out = copy_run(run, tmp_path)
    for p in checkpoint.checkpoints(out):
        (p / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="(?s)no usable checkpoint in .*step_0000002: rank 0: no manifest"):
        checkpoint.pick(out, 0, 1)


def test_resume_past_a_damaged_latest_equals_the_uninterrupted_run(run, tmp_path):
    """End to end: step 2's shard truncated; the run warns, resumes at step 1, redoes step 2 and ends with the
    weights of the undamaged run (one process, fp32: exactly); the damaged directory is kept aside."""
    out = copy_run(run, tmp_path)
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
    assert_moved(out, [1, 2])  # step 1 before the damaged checkpoint, step 2 redone after it


class Touch:
    """Unpickling this creates a file: what a hostile or stale .metadata could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_shard_index_the_manifest_does_not_list_is_never_unpickled(run, tmp_path):
    """step_0000002/.metadata replaced by a pickle that creates a file when loaded, and dropped from manifest.json
    (so no sha256 protects it): the checkpoint counts as damaged, the pickle is never loaded, the run resumes
    from step 1, and step 1 is left as it was."""
    out = copy_run(run, tmp_path)
    sentinel, proof = tmp_path / "unpickled", tmp_path / "unpickled_here"
    pickle.loads(pickle.dumps(Touch(proof)))
    assert proof.exists()  # loading this pickle does leave a trace
    (out / "step_0000002" / ".metadata").write_bytes(pickle.dumps(Touch(sentinel)))
    without_index(out / "step_0000002")
    result = launch([*SFT, f"--out_dir={out}"])
    assert "step_0000002 is damaged (rank 0: manifest.json does not list .metadata" in result.stdout, result.stdout
    assert f"resumed from {out / 'step_0000001'} at step 1" in result.stdout
    assert not sentinel.exists()
    assert not (out / "step_0000001.damaged").exists() and checkpoint.problem(out / "step_0000001", 0, 1) is None
    assert (out / "step_0000002.damaged").is_dir() and checkpoint.problem(out / "step_0000002", 0, 1) is None


def test_a_directory_that_says_another_step_is_damaged_and_no_good_checkpoint_is_renamed(run, tmp_path):
    """step_0000003 holding step 1's checkpoint (its trainer_state.json and manifest say step 1): resuming it would
    redo steps 2-3 and rename the good step_0000002 aside. It is reported as damaged; the run resumes from step 2,
    writes step 3, and steps 1 and 2 stay as they were."""
    out = copy_run(run, tmp_path)
    shutil.copytree(out / "step_0000001", out / "step_0000003")
    result = launch([*SFT, "--steps=3", f"--out_dir={out}"])
    assert ("step_0000003 is damaged (rank 0: trainer_state.json says step 1, the directory's name step 3"
            in result.stdout), result.stdout
    assert f"resumed from {out / 'step_0000002'} at step 2" in result.stdout
    assert sorted(p.name for p in out.glob("step_*")) == ["step_0000001", "step_0000002", "step_0000003",
                                                         "step_0000003.damaged"]
    for name in ("step_0000001", "step_0000002"):
        assert (out / name / "manifest.json").read_bytes() == (run / name / "manifest.json").read_bytes(), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_changed_config_is_refused_unless_allowed(run, tmp_path):
    out = copy_run(run, tmp_path)
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


def test_metrics_rows_without_a_step_or_not_utf8_name_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    for bad, why in ((b'{"loss": 0.5}', 'is not a metrics row (a JSON object with an integer "step")'),
                     (b'{"step": "2"}', "is not a metrics row"), (b'[1, 2]', "is not a metrics row"),
                     (b'{"step": 2, "note": "caf\xe9"}', "is not UTF-8 text (byte 24)")):
        path.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 3}\n')
        with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 {why}")):
            checkpoint.open_metrics(path, 3)
        assert path.read_bytes().startswith(b'{"step": 1}\n' + bad)  # left as it was: not ours to throw away
        path.write_bytes(b'{"step": 1}\n{"step": 2}\n' + bad[:-2])  # the same, cut short as the last line
        checkpoint.open_metrics(path, 3).close()
        assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
        assert f"warning: {path}: dropping a partial last line 3" in capsys.readouterr().out


def test_the_trackers_read_metrics_as_the_run_does(tmp_path):
    """tracking.read_rows (a --report_to run's first look at metrics.jsonl) reads it as open_metrics does: a last
    line cut inside a UTF-8 character (a kill mid-write) is left out, where it raised UnicodeDecodeError naming no
    file; any other bad line, not UTF-8 or nested too deep, raises naming the file and the line."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "note": "caf\xc3')
    assert tracking.read_rows(path) == [{"step": 1}]
    for bad, why in ((b'{"step": 2, "note": "caf\xe9"}', "is not UTF-8 text"), (b"[" * 100_000, "nested too deep")):
        path.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 3}\n')
        with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 ") + ".*" + why):
            tracking.read_rows(path)


def sft_config(out: Path, *extra: str):
    """The module run's train.Config with `out_dir=out` and `extra` options (not validated: open_run is tested)."""
    import train
    cfg = train.parse_args([*SFT, *extra])
    return dataclasses.replace(cfg, out_dir=str(out))


def test_resuming_refuses_fewer_steps_and_allows_what_the_mode_never_reads(run, group, tmp_path):
    """open_run, before anything loads: --steps below the checkpoint's step is refused (it exited 0 having done
    nothing); options SFT never reads (--group_size, --temperature, --beta) may change; one it reads may not."""
    out = copy_run(run, tmp_path)
    with pytest.raises(SystemExit, match=re.escape(f"--steps=1 is not allowed: expected at least 2, the step of "
                                                   f"{out / 'step_0000002'}, where this run resumes")):
        open_run(sft_config(out, "--steps=1"), 0, 1)
    lock, resume, _ = open_run(sft_config(out, "--group_size=3", "--temperature=0.3", "--beta=0.5"), 0, 1)
    assert resume == out / "step_0000002"
    lock.close()
    with pytest.raises(SystemExit, match="--sft_answers: 'random' -> 'label'"):
        open_run(sft_config(out, "--sft_answers=label"), 0, 1)
    grpo = {"mode": "grpo", "group_size": 4, "sft_answers": "random", "pairs_per_rank": 2}
    assert checkpoint.config_differences(grpo, 1, dict(grpo, sft_answers="label"), 1, grpo, ("sft_answers",)) == []
    assert checkpoint.config_differences(grpo, 1, dict(grpo, group_size=5), 1, grpo, ("sft_answers",)) == [
        "--group_size: 4 -> 5"]


def test_an_out_dir_that_cannot_be_made_is_named(group, tmp_path):
    """What train.py's option check cannot see in advance (a file put where --out_dir goes since): one line naming
    --out_dir and what the OS said, not a FileExistsError from inside open_run."""
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(SystemExit, match=re.escape(f"--out_dir={out}: the folder cannot be made (")):
            open_run(sft_config(out), 0, 1)


def test_a_stop_before_the_first_step_finished_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    """A stop during step 1: no checkpoint exists, and the message says so (it said "the checkpoint of step 0 is
    in OUT"); the process exits 0."""
    from types import SimpleNamespace
    from infra import trainer
    monkeypatch.setattr(trainer, "exit_process", lambda code: sys.exit(code))
    with pytest.raises(SystemExit) as stop:
        trainer.stop_run(SimpleNamespace(step=0, saved_step=0, out=tmp_path), "stop requested during step 1: abandoned")
    assert stop.value.code == 0
    said = capsys.readouterr().out
    assert ("stop requested during step 1: abandoned; no step had finished, so no checkpoint was written: the same "
            "command starts the run afresh") in said and "step 0" not in said


def test_a_bad_metrics_file_stops_the_run_before_anything_loads(run, tmp_path):
    out = copy_run(run, tmp_path)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(rows[0] + "\n" + '{"loss": 1}\n' + rows[1] + "\n")
    refused = launch([*SFT, f"--out_dir={out}"], check=False)
    assert refused.returncode != 0 and f"{out / 'metrics.jsonl'}: line 2 is not a metrics row" in refused.stderr, \
        refused.stderr[-2000:]


def test_a_failed_save_names_the_checkpoint_and_a_full_disk(tmp_path, monkeypatch):
    """What a save that fails raises (checkpoint.save_error): torch reports a full disk as "unexpected pos", so
    the free space decides; an ENOSPC anywhere in the chain does too; anything else still names the checkpoint."""
    final, tmp = tmp_path / "step_0000004", tmp_path / ".tmp_step_0000004"
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(12 << 20, 12 << 20, 0))
    full = checkpoint.save_error(torch_says, final, tmp)
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert str(full).startswith(f"[Errno 28] saving checkpoint {final} failed: no space left on device (0 bytes free "
                                f"on the filesystem of {tmp_path}; RuntimeError: [enforce fail"), str(full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    chained = RuntimeError("write failed")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left on device" in str(checkpoint.save_error(chained, final, tmp))
    other = checkpoint.save_error(torch_says, final, tmp)
    assert isinstance(other, RuntimeError) and "no space" not in str(other)
    assert str(other) == f"saving checkpoint {final} (written first to {tmp}) failed: RuntimeError: {torch_says}"


def small_disk_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not small_disk_available(), reason="needs `unshare -rm` (a user and mount namespace) for a tmpfs")
def test_disk_full_during_a_save_says_so_and_the_run_resumes_once_there_is_space(tmp_path):
    """The run's --out_dir on a 6 MiB tmpfs (a toy checkpoint is 8.6 MiB): the first save fails with "no space left
    on device" naming the checkpoint and the filesystem, and no step_* directory is left half-written; once the
    tmpfs is grown, the same command runs to its end (the partial .tmp_step_* ignored, then replaced)."""
    data = toy_world.write_dataset(tmp_path / "data", n_train=16, n_test=4, seed=0)
    disk = tmp_path / "disk"
    disk.mkdir()
    args = [a for a in SFT if not a.startswith(("--train_data", "--eval_data"))] + [
        f"--train_data=hpdv2:{data['train']}", f"--train_images={data['train_images']}",
        f"--eval_data=imagereward:{data['test']}", f"--eval_images={data['test_images']}", f"--out_dir={disk / 'run'}"]
    command = " ".join([sys.executable, str(ROOT / "train.py"), *args])
    script = (f"mount -t tmpfs -o size=6m tmpfs {disk} && {{ {command}; echo first=$?; }} && ls -a {disk / 'run'} && "
              f"mount -o remount,size=64m {disk} && {{ {command}; echo second=$?; }} && ls -a {disk / 'run'}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env={**env, "OMP_NUM_THREADS": "1"})
    out = result.stdout + result.stderr
    assert "first=1" in out and "second=0" in out, out[-4000:]
    assert (f"saving checkpoint {disk / 'run' / 'step_0000001'} failed: no space left on device (" in out and
            f"bytes free on the filesystem of {disk / 'run'}" in out), out[-4000:]
    first_listing = result.stdout.split("first=1")[1].split("second=")[0].split()
    assert ".tmp_step_0000001" in first_listing and "step_0000001" not in first_listing  # never a step_* half-written
    second_listing = result.stdout.split("second=0")[1].split()
    assert {"step_0000001", "step_0000002"} <= set(second_listing) and ".tmp_step_0000001" not in second_listing


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


def test_export_of_a_published_layout_start(real_checkpoint, run, tmp_path):
    """From a directory laid out like the Qwen2.5-VL-7B-Instruct download (bf16 shards with an index, published
    preprocessor and generation configs, real vocabulary), on 2 processes (rank 0 reads the weights and
    broadcasts them), with --max_pixels and lr 0: the export holds the starting weights bit for bit, in bf16, and
    the starting checkpoint's preprocessor, generation and tokenizer files unchanged; the pixel bounds the run
    used are in trainer_state.json."""
    out = run.parent / tmp_path.name  # beside the module's run: its toy data serves this run too
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
