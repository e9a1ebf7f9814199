"""The toy world's demo for several seeds: mean, spread and each seed of every column of the demo's table.

    torchrun --nproc_per_node=2 bench/toy_listener.py            # seeds 0-4, runs/bench_toy_listener/seed_N
    torchrun --nproc_per_node=2 bench/toy_listener.py --seeds=0,1,2 --grpo_steps=200

Any field of `demo.Settings` can be set the same way (--start_steps=80, --captions=2, --lr=1e-3, ...).

Each seed runs the whole demo (demo.run: the listener and the reasoner's start, GRPO, GRPO + listener, the
default's sizes). Besides the table's columns it prints the two reading preconditions, each stage's OOD accuracy
by kind of pair, what the listener changes (the GRPO + listener stage minus the GRPO stage, seed by seed), and
the learning targets on each GRPO stage's held-out curve: accuracy of at least 80% within the first 40% of its
steps, and at least 95% at the end. Not a test: it prints what it finds.
"""
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from infra import cli  # noqa: E402
from toy import demo  # noqa: E402
from infra import parallel  # noqa: E402
import train  # noqa: E402

DIFFERENCES = ("contradiction_rate", "faithfulness", "listener_agreement", "accuracy", "ood_accuracy")


def targets(points: dict, steps: int) -> dict:
    """The learning targets on one curve (step -> {accuracy, ...}): early >= 80%, final >= 95%."""
    early = [p["accuracy"] for s, p in points.items() if int(s) <= 0.4 * steps]
    final = points[max(points, key=int)]["accuracy"]
    return {"80% by 40% of steps": float(max(early) >= 0.8), "95% at the end": float(final >= 0.95)}


def parse(kind: str, value: str):
    if kind == "bool":
        return cli.boolean(value)
    return value if kind == "str" else float(value) if kind == "float" else int(value)


def main() -> None:
    seeds, settings = [0, 1, 2, 3, 4], demo.Settings()
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
    summaries, curves = [], []
    for seed in seeds:
        out = Path("runs/bench_toy_listener") / f"seed_{seed}"
        summaries.append(demo.run(dataclasses.replace(train.Config(), seed=seed, out_dir=str(out)), train.train, settings))
        curves.append(json.loads((out / "learning_curve.json").read_text()) if dist.get_rank() == 0 else {})
    if dist.get_rank() == 0:
        print(report(summaries, curves, seeds, settings.grpo_steps))
    dist.destroy_process_group()


def report(summaries: list[dict], curves: list[dict], seeds: list, steps: int) -> str:
    spread = lambda xs: f"{statistics.mean(xs):7.1%} +- {statistics.pstdev(xs):5.1%}"
    each = lambda xs: ", ".join(f"{v:.1%}" for v in xs)
    lines = [f"\n{len(seeds)} seeds {seeds}: mean +- standard deviation over seeds (each seed in brackets)"]
    for name in demo.STAGES:
        lines.append(f"{name}:")
        rows = [dict(s["stages"][name]) for s in summaries]
        for row, summary, curve in zip(rows, summaries, curves):
            row.update({f"ood: {kind}": v for kind, v in summary["ood_accuracy_by_kind"][name].items()})
            if name in curve:
                row.update(targets(curve[name], steps))
        for column in rows[0]:
            values = [r[column] for r in rows]
            lines.append(f"  {column:26s} {spread(values)}   ({each(values)})")
    lines.append("GRPO + listener minus GRPO:")
    for column in DIFFERENCES:
        values = [s["stages"][demo.STAGES[2]][column] - s["stages"][demo.STAGES[1]][column] for s in summaries]
        lines.append(f"  {column:26s} {spread(values)}   ({each(values)})")
    for key in ("reasoner_start_reading_accuracy", "listener_reading_accuracy"):
        values = [s[key] for s in summaries]
        lines.append(f"{key:28s} {spread(values)}   ({each(values)})")
    met = [s["preconditions_met"] for s in summaries]
    lines.append(f"preconditions met            {sum(met)} of {len(met)} seeds")
    seconds = [s["seconds"] for s in summaries]
    lines.append(f"seconds per seed             {statistics.mean(seconds):.0f} ({', '.join(f'{s:.0f}' for s in seconds)})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
