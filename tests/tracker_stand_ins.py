"""Stand-ins for `torch.utils.tensorboard` and `wandb` that record every call, so that --report_to is tested
where neither package is installed (neither is a dependency of this project).

    TRACKER_LOG=calls.jsonl python tests/tracker_stand_ins.py train.py --report_to=tensorboard,wandb ...
    TRACKER_LOG=calls.jsonl torchrun --nproc_per_node=2 tests/tracker_stand_ins.py train.py ...

`install(log)` puts both in sys.modules; then each call appends one JSON line to `log`, with the rank of the
process that made it. Run as a script, it installs them and runs the script it is given as `python` would.
"""
import json
import os
import runpy
import sys
import types
from pathlib import Path


def install(log: str) -> None:
    def record(call: str, **fields) -> None:
        with open(log, "a") as f:  # one short append per call: lines of two processes do not mix
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "call": call, **fields}) + "\n")

    class SummaryWriter:
        def __init__(self, log_dir=None, purge_step=None, **kwargs):
            record("SummaryWriter", log_dir=log_dir, purge_step=purge_step)

        def add_scalar(self, tag, scalar_value, global_step=None, **kwargs):
            record("add_scalar", tag=tag, value=scalar_value, step=global_step)

        def flush(self):
            pass

        def close(self):
            record("SummaryWriter.close")

    class Run:
        def log(self, data, step=None, **kwargs):
            record("wandb.log", data=data, step=step)

        def finish(self):
            record("wandb.finish")

    def init(**kwargs):
        config = kwargs.pop("config", None) or {}
        record("wandb.init", **kwargs, config_keys=sorted(config))
        return Run()

    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = SummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.init = init
    sys.modules.update({"torch.utils.tensorboard": tensorboard, "wandb": wandb})


if __name__ == "__main__":
    import torch  # noqa: F401  (torch first: the stand-in then sits under the real torch.utils)
    install(os.environ["TRACKER_LOG"])
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(script.parent)  # as `python SCRIPT` sets it
    runpy.run_path(str(script), run_name="__main__")
