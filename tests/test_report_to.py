"""train.py --report_to (infra/tracking.py), without tensorboard or wandb installed: stand-ins that record every
call (tests/tracker_stand_ins.py) show that the trackers receive every field of every metrics.jsonl row at its
step, from rank 0 only, and that a resumed run continues the same curves; a missing package is named when the
options are checked.

Run: .venv/bin/python -m pytest -q tests/test_report_to.py
"""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

import train
from infra import tracking
from test_train import launch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--mode=grpo", "--model=toy", "--train_data=toy", "--eval_data=toy", "--group_size=2", "--max_new_tokens=6",
        "--eval_pairs=4", "--eval_every=1", "--save_every=2", "--warmup_steps=1"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_is_named_when_the_options_are_checked(name, monkeypatch, capsys):
    module, package = tracking.TRACKERS[name]
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails, installed or not
    with pytest.raises(SystemExit):
        train.parse_args(["--mode=grpo", f"--report_to={name}"])
    assert f"--report_to={name} needs the `{package}` package" in capsys.readouterr().err
    assert f"pip install {package}" in str(pytest.raises(Exception, tracking.require, name).value)
    with pytest.raises(SystemExit):
        train.parse_args(["--mode=grpo", "--report_to=tensorbord"])
    assert "expected none, or one or more of tensorboard, wandb" in capsys.readouterr().err
    assert train.parse_args(["--mode=grpo"]).report_to == "none"  # the default needs neither


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def tensorboard_curves(recorded: list[dict]) -> dict[str, dict[int, float]]:
    """What TensorBoard shows from the recorded calls: {tag: {step: value}}. A writer opened with purge_step p
    drops the earlier events of steps >= p; within one writer no (tag, step) may come twice."""
    curves, seen = {}, set()
    for c in recorded:
        if c["call"] == "SummaryWriter":
            curves = {tag: {s: v for s, v in points.items() if s < c["purge_step"]} for tag, points in curves.items()}
            seen = set()
        elif c["call"] == "add_scalar":
            assert (c["tag"], c["step"]) not in seen, f"{c['tag']} logged twice at step {c['step']}"
            seen.add((c["tag"], c["step"]))
            curves.setdefault(c["tag"], {})[c["step"]] = c["value"]
    return curves


def jsonl_curves(rows: list[dict]) -> dict[str, dict[int, float]]:
    curves = {}
    for row in rows:
        for field, value in row.items():
            if field != "step":
                curves.setdefault(field, {})[row["step"]] = value
    return curves


def test_trackers_receive_every_field_and_a_resumed_run_continues(tmp_path):
    """Three runs in one out_dir. A: steps 1-2 without a tracker, a checkpoint at 2. B: --report_to=tensorboard,
    wandb, resumed at 2 to step 3: each tracker is sent rows 1-2 (its curves start at step 1), then row 3. Then
    B's checkpoint of step 3 is deleted: a crash after step 3 was logged, before it was saved. C, under torchrun
    on 2 processes with the same global batch: resumed at 2 to step 4, so it trains step 3 again.

    TensorBoard shows exactly metrics.jsonl's final rows, every field at its step (C's writer purges the crashed
    step 3 and logs it again). W&B: the same run id resumed; steps 1, 2, 3 from B and 4 from C, each once, each
    with every field of its row (step 3's from B: W&B keeps what it got first). Only rank 0 reported."""
    out, log = tmp_path / "run", tmp_path / "calls.jsonl"
    stand_ins = dict(script=ROOT / "tests" / "tracker_stand_ins.py", env={"TRACKER_LOG": str(log)})
    report = "--report_to=tensorboard,wandb"
    launch(TINY + ["--pairs_per_rank=2", "--steps=2", f"--out_dir={out}"])
    launch([str(ROOT / "train.py"), *TINY, "--pairs_per_rank=2", "--steps=3", report, f"--out_dir={out}"], **stand_ins)
    rows_b = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    shutil.rmtree(out / "step_0000003")
    shutil.rmtree(out / "export_0000003")
    b_calls = len(calls(log))
    launch([str(ROOT / "train.py"), *TINY, "--pairs_per_rank=1", "--steps=4", report, f"--out_dir={out}"], nproc=2,
           **stand_ins)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in final] == [1, 2, 3, 4] and final[:2] == rows_b[:2]
    assert any("heldout_accuracy" in r for r in final) and any("heldout_accuracy" not in r for r in final)

    recorded = calls(log)
    assert {c["rank"] for c in recorded} == {0}
    writers = [c for c in recorded if c["call"] == "SummaryWriter"]
    assert writers == [{"rank": 0, "call": "SummaryWriter", "log_dir": str(out / "tensorboard"), "purge_step": 3}] * 2
    assert tensorboard_curves(recorded) == jsonl_curves(final)

    inits = [c for c in recorded if c["call"] == "wandb.init"]
    assert len(inits) == 2 and inits[0] == inits[1]
    assert inits[0]["id"] == (out / "wandb_id").read_text().strip() and inits[0]["resume"] == "allow"
    assert inits[0]["name"] == out.name and inits[0]["config_keys"] == sorted(dataclasses.asdict(train.Config()))
    logged = [(i < b_calls, c["step"], c["data"]) for i, c in enumerate(recorded) if c["call"] == "wandb.log"]
    assert [(in_b, step) for in_b, step, _ in logged] == [(True, 1), (True, 2), (True, 3), (False, 4)]
    expected = {1: rows_b[0], 2: rows_b[1], 3: rows_b[2], 4: final[3]}
    for _, step, data in logged:
        assert data == {k: v for k, v in expected[step].items() if k != "step"}
    assert sum(c["call"] == "wandb.finish" for c in recorded) == 2
