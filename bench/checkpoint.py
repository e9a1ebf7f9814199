"""Time a checkpoint save, load and export, and each rank's host memory meanwhile, on a widened toy model.

    torchrun --nproc_per_node=2 bench/checkpoint.py --hidden=1024 --layers=8 --out=/tmp/bench_ckpt

Each rank builds the same model (FSDP2, AdamW state initialised by one step), then: `checkpoint.save` (DCP
shards + manifest), `checkpoint.load` into a fresh model and optimiser, `checkpoint.export` (from_pretrained
directory). It prints, per rank, the seconds of each and the peak resident set size (RSS) during each, sampled
every 5 ms, above what the rank held before; and the bytes written, so the 7B figures can be scaled from them.
"""
import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra import checkpoint  # noqa: E402
from toy import world as toy  # noqa: E402
from infra import parallel  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest RSS seen while the block runs, sampled by a thread."""

    def __enter__(self):
        self.base, self.peak, self.running = rss(), rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t = time.time()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def build(args, device):
    model = toy.make_model(seed=0, hidden=args.hidden, layers=args.layers).train()
    model = parallel.shard(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_checkpoint")
    args = parser.parse_args()
    rank, world, device = parallel.setup_distributed()
    out = Path(args.out)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    dist.barrier()
    model, optimizer = build(args, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist, as in a checkpoint of a real run
    params = sum(p.numel() for p in model.parameters())  # DTensor numel is the full size
    rows = {}
    with PeakRSS() as m:
        path = checkpoint.save(out, 1, model, optimizer, {"step": 1}, keep_last=1)
    rows["save"] = m
    fresh, fresh_opt = build(args, device)
    with PeakRSS() as m:
        checkpoint.load(path, fresh, fresh_opt)
    rows["load"] = m
    with PeakRSS() as m:
        checkpoint.export(out / "export", fresh, toy.make_processor(), "toy")
    rows["export"] = m
    written = sum(f.stat().st_size for f in path.iterdir())
    report = {k: (round(v.seconds, 2), round((v.peak - v.base) / 2**20, 1), round(v.peak / 2**20, 1)) for k, v in rows.items()}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        print(f"{params / 1e6:.1f}M parameters, {world} ranks; checkpoint {written / 2**20:.1f} MiB "
              f"(weights + 2 AdamW moments, fp32)")
        for r, rep in enumerate(reports):
            print(f"rank {r}: " + "; ".join(f"{k} {s} s, peak RSS +{d} MiB (total {t} MiB)" for k, (s, d, t) in rep.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
