"""A training run's state and bookkeeping, apart from the method: train.py holds the method (one GRPO step,
one SFT step, the loop), this file what it runs on. `cfg` is a train.Config throughout.

- data: the training examples of a dataset spec, and the held-out sample scored during training;
- `Trainer`: the run's state (policy, reference model, listener, AdamW, the data stream, the step counters, the
  speed-ups the config switches on), built by loading and sharding the models (parallel.py); its optimiser
  step, and its checkpoints (checkpoint.py is the on-disk format; `open_run` locks out_dir and picks what to
  resume);
- metrics: held-out accuracy, each step's metrics reduced over ranks, metrics.jsonl and the --report_to trackers;
- stopping: `Stop` turns SIGTERM/Ctrl-C into a clean exit with the last finished step saved.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import sample
from data import ExampleStream
from fast import listener_from_reference, shared_prompt
from fast.static_decode import make_decoder
from formats.images import DataError
from formats.records import Group, Pair
from infra import checkpoint, tracking
from infra.parallel import all_sum, exit_process, gathered, load_model, log, resolve_precision, shard, to_device
from listener import Listener
from models import internals
from models.processor import Processor, prompt_rows
from models.prompt_format import FORMAT_FILE, checkpoint_format, format_differences, format_json, read_format
from prompt import PROMPT, PromptFormat
from report.heldout import greedy_verdicts
from toy import world


# ----------------------------------------------------------------------------------------------------------
# Data


def toy_data(cfg) -> Path:
    """Where the toy task lives: next to the run's directory, written there once by rank 0 (toy/world.py)."""
    root = Path(cfg.out_dir).parent / "toy_data"
    if dist.get_rank() == 0:
        world.dataset(root)
    dist.barrier()
    return root


def load_examples(spec: str, images: str, cfg, train: bool, prompt_limit=None, fmt: PromptFormat = PROMPT) -> list:
    """A dataset spec ("hpdv2:PATH", ...; "toy") -> training examples for cfg.mode.

    Preference modes take pairs (a ranked group gives all its untied pairs); the score mode takes single
    images with ratings on `fmt`'s scale (`data.to_rated`). `prompt_limit` (formats/layouts.py: the run's tokenizer and
    --max_prompt_tokens) refuses a record with a longer prompt, or with --skip_bad leaves it out and counts it.
    """
    if spec in ("", "toy"):  # training pairs in the HPDv2 layout, held-out groups in the ImageReward layout
        root = toy_data(cfg)
        spec, images = (f"hpdv2:{root / 'hpdv2/train.json'}", str(root / "hpdv2")) if train else \
            (f"imagereward:{root / 'imagereward/test.json'}", str(root / "imagereward"))
    kwargs, report = ({"fraction": cfg.fraction, "seed": cfg.seed} if train else {}), {}
    records = data.load(spec, images or None, skip_bad=cfg.skip_bad, exclude=cfg.exclude, prompt_limit=prompt_limit,
                        report=report, **kwargs)
    if cfg.mode == "score":
        examples = data.to_rated(records, len(fmt.ratings))
    else:
        pairs = data.groups_to_pairs(records) if records and isinstance(records[0], Group) else records
        examples = data.random_orders(pairs, cfg.seed)  # no answer hidden in the file's image order
    if not train:
        examples = data.spread_sample(examples, cfg.eval_pairs, cfg.seed)  # over prompts, in random order
    if not examples:
        raise DataError(f"no {'training' if train else 'held-out'} examples in {spec}: "
                        f"{why_empty(report, records, kwargs.get('fraction', 1.0))}")
    return examples


def why_empty(report: dict, records: list, fraction: float) -> str:
    """What left a dataset without examples, from `data.load`'s counts (`report`) and the records it returned."""
    read, kept = report.get("records", 0), report.get("pairs", report.get("groups", 0))
    if not read:
        return "its files hold no records"
    if kept and not records or report.get("selected") == 0:
        return f"--fraction={fraction} keeps none of its {read} records (raise --fraction)"
    if records:
        return f"its {len(records)} groups have no two images of different ranks (a tie is not a preference)"
    selected = f" ({report['selected']} selected by --fraction={fraction})" if fraction < 1 and "selected" in report \
        else ""
    return (f"of its {read} records{selected}, {report.get('ties', 0)} are ties, {report.get('skipped', 0)} bad "
            f"(left out by --skip_bad) and {report.get('excluded', 0)} excluded (--exclude)")


def heldout_examples(cfg, prompt_limit=None, fmt: PromptFormat = PROMPT) -> list:
    """The held-out examples scored during training: none without --eval_data for a real model."""
    if not cfg.eval_data and cfg.model != "toy" or cfg.eval_pairs == 0:
        log("no held-out evaluation (pass --eval_data and --eval_pairs to have one)")
        return []
    heldout = load_examples(cfg.eval_data, cfg.eval_images, cfg, train=False, prompt_limit=prompt_limit, fmt=fmt)
    if cfg.skip_bad:  # every rank decodes the same list, so all keep the same examples
        heldout, unreadable = data.drop_unreadable(heldout)
        log(f"held-out: left out {unreadable} unreadable images")
    return heldout


# ----------------------------------------------------------------------------------------------------------
# The run's state: models, optimiser, data stream, checkpoints


class Trainer:
    """One run's state: loads and shards the models, builds AdamW and the data stream, resumes from out_dir."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.out = Path(cfg.out_dir)
        self.fmt = checkpoint_format(cfg.model, cfg.prompt_format)  # what the run asks (prompt.py)
        self.lock, resume, saved = open_run(cfg, rank, world_size, self.fmt)  # before anything heavy loads
        self.processor = self._processor(cfg.model)
        # The data before the models: a bad record (a prompt over --max_prompt_tokens, ...) stops the run before
        # minutes of loading weights, and long before any forward pass could allocate memory for it.
        limit = self.processor.prompt_limit(cfg.max_prompt_tokens)
        examples = load_examples(cfg.train_data, cfg.train_images, cfg, train=True, prompt_limit=limit, fmt=self.fmt)
        self.stream = ExampleStream(examples, cfg.pairs_per_rank, rank=rank, world_size=world_size, seed=cfg.seed,
                                    both_orders=cfg.both_orders, decode=True, skip_bad=cfg.skip_bad)
        heldout = heldout_examples(cfg, limit, self.fmt)
        self.precision = resolve_precision(cfg.precision, device)
        self.build_models(cfg, device)
        self.optimizer = self.make_optimizer()
        # this rank's share of the held-out examples; `filler` is scored, not counted, when the share runs out
        self.heldout, self.heldout_total, self.filler = heldout[rank::world_size], len(heldout), heldout[:1]
        self.step, self.optimizer_steps, self.skipped, self.saved_step = 0, 0, 0, 0
        self.stop = None  # a Stop, checked at the phase boundaries of a step (train.train sets it)
        if resume:
            self._load(resume, saved)

    def build_models(self, cfg, device: torch.device, weights: bool = True) -> None:
        """The policy, the reference model and the listener, loaded and sharded; the speed-ups the config switches
        on. `weights=False` builds them from config.json alone, without weights (infra/rehearsal.py)."""
        load = lambda path, trainable: load_model(path, trainable, self.precision, weights)  # frozen unless trainable
        self.policy = load(cfg.model, True)
        if cfg.freeze_vision:
            self.policy.model.visual.requires_grad_(False)
        self.policy = shard(self.policy, device, cfg.activation_checkpointing, self.precision)
        self.reference = self.listener = None
        if cfg.mode in ("grpo", "score") and (cfg.beta > 0 or (cfg.mode == "grpo" and cfg.w_list > 0 and not cfg.listener)):
            self.reference = shard(load(cfg.model, False), device, precision=self.precision)
        if cfg.mode == "grpo" and (cfg.w_list > 0 or cfg.listener):  # with w_list = 0: scored, not rewarded
            model = self.reference if not cfg.listener else shard(load(cfg.listener, False), device,
                                                                  precision=self.precision)
            self.listener = Listener(model, self._processor(cfg.listener) if cfg.listener else self.processor, self.fmt)
        # The speed-ups the config switches on (fast/), each in place of one reference function, chosen here once:
        self.decoder = make_decoder(cfg.decode, self.precision)  # sample.py's decode; None: sample.CopiedCache
        self.hidden_fn = shared_prompt.completion_hidden if cfg.shared_prompt else internals.completion_hidden
        # the reference pass and the listener; None: train.score_rollouts
        self.score_rollouts = listener_from_reference.score_rollouts if cfg.listener_from_reference else None

    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable weights, fused: one kernel per step, no full-size temporaries (the foreach
        implementation makes a copy of the weights' size)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.99),
                                 fused=True)

    @classmethod
    def for_rehearsal(cls, cfg, world_size: int, device: torch.device, weights: bool = False) -> "Trainer":
        """The run's models and optimiser, without data or out_dir, at the GPU's precision; built from config.json
        without weights (infra/rehearsal.py builds them on fake tensors) unless `weights`."""
        self = cls.__new__(cls)
        self.cfg, self.rank, self.world_size, self.device = cfg, dist.get_rank(), world_size, device
        self.processor = self._processor(cfg.model)
        self.fmt = checkpoint_format(cfg.model, cfg.prompt_format)
        self.precision = resolve_precision(cfg.precision, torch.device("cuda"))
        self.build_models(cfg, device, weights=weights)
        self.optimizer = self.make_optimizer()
        self.step, self.optimizer_steps, self.skipped, self.saved_step, self.stop = 0, 0, 0, 0, None
        return self

    def _processor(self, path: str):
        if path == "toy":
            return world.make_processor()
        return Processor.from_pretrained(path, self.cfg.min_pixels or None, self.cfg.max_pixels or None)

    def encode(self, examples: list) -> dict:
        """The step's examples as model inputs on this rank's device, encoded once (sampling reads them whole,
        the update in micro-batches: `micro_batches`)."""
        return to_device(self.processor.encode(examples, self.fmt), self.device)

    def generators(self, pairs: list[Pair], step: int) -> list[torch.Generator]:
        """One generator per pair, seeded by (seed, step, the pair's place in the global batch): train.py's departure 5."""
        first = self.rank * len(pairs)
        return sample.seeded_generators(self.device, [(self.cfg.seed, step, first + i) for i in range(len(pairs))])

    def micro_batches(self, batch: dict, group_size: int):
        """[(the inputs of micro_pairs prompts, the slice of their rows in the (B*G) rollout batch)], cut out of
        the step's encoded `batch` of B prompts."""
        B, m = batch["input_ids"].shape[0], self.cfg.micro_pairs
        return [(prompt_rows(batch, range(i, min(i + m, B))), slice(i * group_size, min(i + m, B) * group_size))
                for i in range(0, B, m)]

    def lr(self) -> float:
        return self.cfg.lr * min(1.0, (self.optimizer_steps + 1) / max(1, self.cfg.warmup_steps))

    def optimizer_step(self) -> dict:
        """Clip, then step, unless the loss or a gradient is NaN/inf: then skip the step and count it."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        lr = self.lr()  # this step's (`lr` moves on with optimizer_steps)
        if torch.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer_steps += 1
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm.detach(), "lr": torch.tensor(lr), "skipped": torch.tensor(float(self.skipped))}

    def boundary(self) -> None:
        """A phase boundary inside a step, before the first optimiser step: abandon the step if a stop was asked."""
        if self.stop is not None and self.stop.agreed(self.device):
            raise StepAbandoned

    # -- checkpoints (checkpoint.py): sharded DCP saves of the policy and AdamW, exports for from_pretrained --

    def trainer_state(self) -> dict:
        size = self.processor.image_processor.size  # {shortest,longest}_edge: the pixel bounds in transformers 5
        return {"step": self.step, "optimizer_steps": self.optimizer_steps, "skipped": self.skipped,
                "stream": self.stream.state_dict(), "config": dataclasses.asdict(self.cfg), "world_size": self.world_size,
                "global_batch": self.cfg.pairs_per_rank * self.world_size,
                "pixels": {"min_pixels": size.shortest_edge, "max_pixels": size.longest_edge}}

    def save(self) -> Path:
        t = time.time()
        replaced = int(all_sum(torch.tensor(float(self.stream.replaced), device=self.device)))  # over all ranks
        state = self.trainer_state()
        state["stream"]["replaced"] = replaced
        path = checkpoint.save(self.out, self.step, self.policy, self.optimizer, state, self.cfg.keep_last,
                               self.format_file())
        self.saved_step = self.step
        log(f"saved {path} in {time.time() - t:.1f} s")
        return path

    def export(self) -> Path:
        return checkpoint.export(checkpoint.export_dir(self.out, self.step), self.policy, self.processor, self.cfg.model,
                                 files=self.format_file())

    def format_file(self) -> dict[str, bytes]:
        """prompt_format.json, written into every checkpoint and export: the format this run asks in."""
        return {FORMAT_FILE: format_json(self.fmt).encode()}

    def _load(self, path: Path, saved: dict) -> None:
        t = time.time()
        checkpoint.load(path, self.policy, self.optimizer)
        self.step, self.optimizer_steps, self.skipped = saved["step"], saved["optimizer_steps"], saved["skipped"]
        self.saved_step = self.step
        stream = dict(saved["stream"])  # its count of replaced examples is summed over ranks: rank 0 carries it
        stream["replaced"] = stream.get("replaced", 0) if self.rank == 0 else 0
        if saved["global_batch"] != self.cfg.pairs_per_rank * self.world_size:  # allowed by --allow_config_change
            stream["index"] = min(stream["index"] * saved["global_batch"] // (self.cfg.pairs_per_rank * self.world_size),
                                  self.stream.steps_per_epoch)
        self.stream.load_state_dict(stream)
        log(f"resumed from {path} at step {self.step} ({time.time() - t:.1f} s)")


class StepAbandoned(Exception):
    """A stop request seen inside a step, before the step touched the weights."""


def open_run(cfg, rank: int, world_size: int, fmt: PromptFormat = PROMPT) -> tuple:
    """Lock out_dir (one live run), check every rank sees it, pick the checkpoint to resume (rank 0 chooses,
    all check they can read it; a damaged one is reported and the previous used) and refuse a changed config,
    the prompt format `fmt` included (a checkpoint without prompt_format.json was trained in `PROMPT`).

    Returns (the lock, or None off rank 0; the checkpoint or None; its trainer_state or None).
    """
    out = Path(cfg.out_dir)
    held, error = None, None
    if rank == 0:
        try:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # train.py's options check this first: here, what changed since, or a full disk
                raise OSError(f"--out_dir={cfg.out_dir}: the folder cannot be made ({type(e).__name__}: {e})") from None
            held = checkpoint.lock(out)
            if (out / "metrics.jsonl").exists():  # a damaged row stops the run now, not after the models load
                checkpoint.read_metrics(out / "metrics.jsonl", warn=False)
        except (RuntimeError, ValueError, OSError) as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise SystemExit(message[0])
    try:
        checkpoint.check_shared(out, rank, world_size)
        resume = checkpoint.pick(out, rank, world_size)
    except RuntimeError as e:  # an out_dir not shared between nodes; no usable checkpoint
        raise SystemExit(str(e)) from None
    if resume is None:
        return held, None, None
    saved = json.loads((resume / "trainer_state.json").read_text())
    if saved["step"] > cfg.steps:  # the loop would not run, and the run would end saying nothing
        raise SystemExit(f"--steps={cfg.steps} is not allowed: expected at least {saved['step']}, the step of "
                         f"{resume}, where this run resumes (to train fewer steps from the start, use another "
                         f"--out_dir)")
    diffs = checkpoint.config_differences(saved["config"], saved["world_size"], dataclasses.asdict(cfg), world_size,
                                          dataclasses.asdict(type(cfg)()), cfg.unread())
    saved_fmt = read_format(resume / FORMAT_FILE) if (resume / FORMAT_FILE).is_file() else PROMPT
    diffs += [f"prompt format ({FORMAT_FILE}) {name}: {getattr(saved_fmt, name)!r:.60} -> {getattr(fmt, name)!r:.60}"
              for name in format_differences(saved_fmt, fmt)]
    if diffs and not cfg.allow_config_change:
        raise SystemExit(f"{resume} was written by a run with another config; resuming it with this one would not "
                         f"continue that run:\n  " + "\n  ".join(diffs) +
                         "\npass --allow_config_change=true to resume anyway, or use another --out_dir")
    if diffs:
        log(f"warning: resuming {resume} with a changed config (--allow_config_change):\n  " + "\n  ".join(diffs))
    return held, resume, saved


# ----------------------------------------------------------------------------------------------------------
# Metrics: held-out accuracy, each step's metrics reduced over ranks, and their record


def heldout_batch_pairs(cfg) -> int:
    """Held-out pairs a rank scores at once: one greedy rollout each, at most as many rows as a training step's
    rollout (pairs_per_rank x group_size) and 64, so the held-out scoring never needs more memory than the step:
    with 64 rows it was the largest phase of seven of the eight runs rehearsed (docs/performance.md)."""
    return min(64, cfg.pairs_per_rank * cfg.group_size)


@torch.no_grad()
def heldout_accuracy(trainer: Trainer) -> dict:
    """Greedy rollouts on the held-out examples (report/heldout.py): the fraction answered right (the preferred
    image; in the score mode the exact rating), and the fraction well formed. On the toy task also the judge's
    verdicts (toy/world.py): the fraction of contradictions and of faithful reasonings. With a listener, its
    mean p_correct on the rollouts' reasoning and how often the image it favours is the one answered.

    Every rank runs the same number of batches (sampling under FSDP2 is collective); a rank whose shard is
    shorter re-scores a pair it does not count.
    """
    batch_pairs = heldout_batch_pairs(trainer.cfg)
    if not trainer.heldout_total:
        return {"accuracy": math.nan, "format": math.nan}
    judged = trainer.cfg.mode == "grpo" and trainer.cfg.eval_data in ("", "toy")  # the toy task: its judge reads it
    keys = ["right", "well_formed"] + (["contradiction", "faithful"] if judged else []) + \
        (["p_correct", "agrees"] if trainer.listener is not None else [])
    sums = torch.zeros(len(keys) + 1, device=trainer.device)  # each key's sum, then the examples scored
    batches = math.ceil(math.ceil(trainer.heldout_total / trainer.world_size) / batch_pairs)
    for i in range(batches):
        examples = trainer.heldout[i * batch_pairs:(i + 1) * batch_pairs]
        with gathered(trainer.policy):
            seen = greedy_verdicts(trainer.policy, trainer.processor, examples or trainer.filler,
                                   trainer.cfg.max_new_tokens, trainer.listener,
                                   functools.partial(world.verdict, fmt=trainer.fmt) if judged else None,
                                   trainer.decoder, trainer.fmt)[:len(examples)]
        for v in seen:
            sums += torch.tensor([float(v[k]) for k in keys] + [1.0], device=trainer.device)
    totals = all_sum(sums).tolist()
    n = max(totals[-1], 1)
    names = {"right": "accuracy", "well_formed": "format", "contradiction": "contradiction_rate",
             "faithful": "faithfulness", "p_correct": "listener_p_correct", "agrees": "listener_agreement"}
    return {names[k]: total / n for k, total in zip(keys, totals)}


SUMMED = ("loss", "tokens", "replaced_examples", "old_logp_gap_mean")  # each rank's share of a global quantity


def reduce_metrics(metrics: dict, world_size: int, device: torch.device) -> dict[str, float]:
    """Per-rank step metrics -> global ones: sums for the loss and token counts, maxima for maxima, means else."""
    names = sorted(metrics)
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=device).reshape(()) for k in names])
    summed, largest = values.clone(), values.clone()
    dist.all_reduce(summed)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    row = {}
    for k, total, m in zip(names, summed.tolist(), largest.tolist()):
        row[k] = total if k in SUMMED else m if k in ("length_max", "skipped", "old_logp_gap_max") else total / world_size
    return row


class Progress:
    """Rank 0's record of the run: a row of metrics.jsonl per step (rows past a resumed step cut, see
    `checkpoint.open_metrics`), the same row to each tracker of --report_to (tracking.py) and a progress bar; on
    the other ranks it does nothing."""

    def __init__(self, cfg, step: int, rank: int):
        self.file = self.bar = None
        self.trackers = []
        if rank == 0:
            from tqdm import tqdm
            path = Path(cfg.out_dir) / "metrics.jsonl"
            earlier = tracking.read_rows(path)  # before the rows this run trains again are cut
            self.file = checkpoint.open_metrics(path, step)
            self.trackers = tracking.start(cfg, step, earlier)
            self.bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.mode} {Path(cfg.out_dir).name}", dynamic_ncols=True)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: Python's message names no file
            raise OSError(e.errno, f"{self.file.name}: writing step {row.get('step')}'s metrics failed: "
                                   f"{e.strerror}") from e
        for tracker in self.trackers:
            tracker.log(row)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward", "reward_accuracy", "heldout_accuracy") if k in row})

    def close(self) -> None:
        if self.file is not None:
            self.bar.close()
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


# ----------------------------------------------------------------------------------------------------------
# Stopping: a signal ends the run at a safe point, with its last finished step saved


class Stop:
    """SIGTERM / Ctrl-C: abandon the current step at its next phase boundary, save the last finished one, exit.

    torchrun kills its workers --shutdown-timeout seconds after forwarding SIGTERM (default 30; SLURM's KillWait
    is also 30): so the step is not finished first. Boundaries are after sampling, after scoring, and between
    micro-batches up to the first optimiser step (`Trainer.boundary`); all ranks agree on each (one all-reduce).
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        return bool(all_sum(torch.tensor(float(self.requested), device=device)) > 0)


def stop_run(trainer: Trainer, why: str) -> None:
    """Save the last finished step (unless saved already, or none), then exit cleanly."""
    if trainer.step > trainer.saved_step:
        trainer.save()
    if trainer.step == 0:
        log(f"{why}; no step had finished, so no checkpoint was written: the same command starts the run afresh")
    else:
        log(f"{why}; the checkpoint of step {trainer.step} is in {trainer.out}")
    exit_process(0)

