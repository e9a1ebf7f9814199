"""Watching a training run live: every row of metrics.jsonl also goes to TensorBoard and/or Weights & Biases.

    torchrun --nproc_per_node=8 train.py ... --report_to=tensorboard    # then: tensorboard --logdir OUT_DIR/tensorboard
    torchrun --nproc_per_node=8 train.py ... --report_to=wandb --wandb_project=NAME
    torchrun --nproc_per_node=8 train.py ... --report_to=tensorboard,wandb

Neither package is a dependency of this project: each is imported only when --report_to names it, and one that
is missing stops train.py when the options are checked, before anything loads, naming the package and how to
install it (`require`). Rank 0 reports (infra/trainer.py's `Progress`, which writes metrics.jsonl): every field
of each row under its metrics.jsonl name, at the row's step, the x-axis.

A resumed run continues the same curves. It resumes at its checkpoint's step s, and metrics.jsonl drops the rows
past s that a crashed run wrote (it trains those steps again). TensorBoard: events go to OUT_DIR/tensorboard
with purge_step = s + 1, which makes TensorBoard drop the earlier events from step s + 1 on (step s is the
last one kept: rows are numbered by the step they finish). W&B: the run's id is kept in OUT_DIR/wandb_id and
the run resumed (`wandb.init(id=..., resume="allow")`). W&B cannot drop steps from a run (its "rewind" is a
private preview) and ignores steps below its last, so steps that were logged before the crash are not sent
again: they keep the crashed run's values, equal to the redone ones (a resumed run repeats its steps exactly)
but for the timings. A tracker switched on in a run that has rows already receives them first, so its curves
start at step 1.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import uuid
from pathlib import Path

from infra import checkpoint
from infra.cli import OptionError

# --report_to name -> (the module imported, the package that provides it)
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def names(report_to: str) -> list[str]:
    """'none' -> []; 'tensorboard,wandb' -> both; anything else is an OptionError naming the option."""
    asked = [n.strip() for n in report_to.split(",") if n.strip()]
    if asked == ["none"]:
        return []
    unknown = [n for n in asked if n not in TRACKERS]
    if unknown or not asked:
        raise OptionError(f"--report_to={report_to!r} is not allowed: expected none, or one or more of "
                          f"{', '.join(TRACKERS)} separated by commas")
    return list(dict.fromkeys(asked))


def require(report_to: str) -> None:
    """Import each tracker asked for, now: a missing package stops the run at option validation."""
    for name in names(report_to):
        module, package = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise OptionError(f"--report_to={name} needs the `{package}` package, which is not installed here "
                              f"({e}): pip install {package}") from None


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl as earlier runs left it: a partial last line (a kill mid-write, which may cut a
    UTF-8 character) left out; any other bad line raises naming the file and line (checkpoint.read_metrics)."""
    return [json.loads(line) for line, _ in checkpoint.read_metrics(path, warn=False)] if path.exists() else []


def start(cfg, step: int, earlier: list[dict]) -> list:
    """The trackers --report_to asks for, for a run starting (or resuming) at `step`, whose metrics.jsonl held
    `earlier` (read before the rows past `step` were dropped). Rank 0 only."""
    trackers = []
    for name in names(cfg.report_to):
        tracker = TensorBoard(cfg, step) if name == "tensorboard" else WandB(cfg, step, earlier)
        if tracker.new:  # switched on in a run with rows already: its curves start at step 1
            for row in earlier:
                if row["step"] <= step:
                    tracker.log(row)
        trackers.append(tracker)
    return trackers


def scalars(row: dict) -> dict:
    """Every field of a metrics.jsonl row but the step, which is the x-axis."""
    return {k: v for k, v in row.items() if k != "step"}


class TensorBoard:
    """Event files in out_dir/tensorboard; a resumed run purges the steps it trains again."""

    def __init__(self, cfg, step: int):
        from torch.utils.tensorboard import SummaryWriter
        log_dir = Path(cfg.out_dir) / "tensorboard"
        self.new = not log_dir.exists()
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1)

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        self.writer.flush()  # as metrics.jsonl is flushed: what a crash leaves is what TensorBoard shows

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run named after out_dir, its id kept in out_dir/wandb_id so that a resumed run continues it."""

    def __init__(self, cfg, step: int, earlier: list[dict]):
        import wandb
        id_file = Path(cfg.out_dir) / "wandb_id"
        self.new = not id_file.exists()
        if self.new:
            checkpoint.write_synced(id_file, uuid.uuid4().hex[:12].encode())
        self.last_step = 0 if self.new else max((r["step"] for r in earlier), default=0)  # what the run holds
        self.run = wandb.init(project=cfg.wandb_project, name=Path(cfg.out_dir).name, id=id_file.read_text().strip(),
                              resume="allow", dir=cfg.out_dir, config=dataclasses.asdict(cfg))

    def log(self, row: dict) -> None:
        if row["step"] > self.last_step:  # W&B ignores a step below its last one: each step is sent once
            self.run.log(scalars(row), step=row["step"])
            self.last_step = row["step"]

    def close(self) -> None:
        self.run.finish()
