"""The toy world's three stages for several seeds: mean and spread of every column of the demo's table.

    torchrun --nproc_per_node=2 bench/toy_listener.py            # seeds 0 1 2, runs/bench_toy_listener/seed_N
    torchrun --nproc_per_node=2 bench/toy_listener.py --seeds=0,1,2,3,4 --grpo_steps=400

Any field of `demo.Settings` can be set the same way (--sft_steps=300, --captions=4, --lr=1e-3, ...).

Each seed runs the whole demo (demo.run: cold start, GRPO, GRPO + listener, same sizes as the default). Besides
the table's columns, it checks the learning targets on the held-out curve of each GRPO stage: accuracy of at
least 80% within the first 40% of its steps, and at least 95% at the end. Not a test: it prints what it finds.
"""
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

import cli  # noqa: E402
import demo  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402


def targets(points: dict, steps: int) -> dict:
    """The learning targets on one curve (step -> {accuracy, ...}): early >= 80%, final >= 95%."""
    early = [p["accuracy"] for s, p in points.items() if int(s) <= 0.4 * steps]
    final = points[max(points, key=int)]["accuracy"]
    return {"80% by 40% of steps": float(max(early) >= 0.8), "95% at the end": float(final >= 0.95)}


def parse(kind: str, value: str):
    if kind == "bool":
        return cli.boolean(value)
    return float(value) if kind == "float" else int(value)


def main() -> None:
    seeds, settings = [0, 1, 2], demo.Settings()
    types = {f.name: f.type for f in dataclasses.fields(demo.Settings)}
    for arg in sys.argv[1:]:
        name, _, value = arg.removeprefix("--").partition("=")
        if name == "seeds":
            seeds = [int(s) for s in value.split(",")]
        elif name in types and value:
            settings = dataclasses.replace(settings, **{name: parse(types[name], value)})
        else:
            raise SystemExit(f"expected --seeds=0,1,2 or --FIELD=VALUE with FIELD one of {list(types)}, got {arg!r}")
    parallel.setup_distributed()
    rows = {name: [] for name in demo.STAGES}
    reading, seconds = [], []
    for seed in seeds:
        out = Path("runs/bench_toy_listener") / f"seed_{seed}"
        summary = demo.run(dataclasses.replace(train.Config(), seed=seed, out_dir=str(out)), train.train, settings)
        reading.append(summary["listener_reading_accuracy"])
        seconds.append(summary["seconds"])
        curves = json.loads((out / "learning_curve.json").read_text()) if dist.get_rank() == 0 else {}
        for name, row in summary["stages"].items():
            extra = targets(curves[name], settings.grpo_steps) if name in curves else {}
            rows[name].append({**row, **extra})
    if dist.get_rank() == 0:
        print(report(rows, reading, seconds, seeds))
    dist.destroy_process_group()


def report(rows: dict, reading: list, seconds: list, seeds: list) -> str:
    spread = lambda xs: f"{statistics.mean(xs):6.1%} +- {statistics.pstdev(xs):5.1%}"
    lines = [f"\n{len(seeds)} seeds {seeds}: mean +- standard deviation over seeds"]
    for name, runs in rows.items():
        lines.append(f"{name}:")
        for column in runs[0]:
            values = [r[column] for r in runs]
            lines.append(f"  {column:24s} {spread(values)}   ({', '.join(f'{v:.1%}' for v in values)})")
    lines.append(f"listener reading accuracy  {spread(reading)}")
    lines.append(f"seconds per seed           {statistics.mean(seconds):.0f} ({', '.join(f'{s:.0f}' for s in seconds)})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
