"""Running the project's scripts from tests as users do: plain `python`, or `torchrun --standalone` (gloo on CPU)."""
import os
import subprocess
import sys

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def command(script, args, nproc: int = 1, torchrun=()) -> list[str]:
    """python SCRIPT ARGS (one process), or torchrun --standalone --nproc_per_node=N [torchrun] SCRIPT ARGS."""
    if nproc == 1 and not torchrun:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun,
            str(script), *map(str, args)]


def environment(extra: dict | None = None) -> dict:
    """This process's environment without its own process group's variables (a child never joins it), 1 thread."""
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**inherited, "OMP_NUM_THREADS": "1", **(extra or {})}


def run(cmd: list[str], cwd, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """subprocess.run, retried once when a worker died with SIGABRT before the script printed anything: gloo's
    start-up sometimes aborts (PITFALLS 3). A run that aborted later is returned as it failed: a second try would
    start from what the first left behind (a resumed run from the first try's last checkpoint), not from where
    the test put it."""
    for attempt in range(2):
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        at_start_up = "SIGABRT" in done.stdout + done.stderr and not done.stdout.strip()
        if done.returncode == 0 or not at_start_up or attempt:
            return done
