"""Checkpoints that survive a cluster: sharded saves every rank writes in parallel, a manifest written last,
fallback to the last good checkpoint, a lock on the run directory, and `from_pretrained` exports.

    out_dir/
      step_0000100/          one checkpoint of the run (policy + AdamW + data stream), complete once its
        __0_0.distcp ...     manifest exists: each rank's shards of the fp32 weights and AdamW moments
        .metadata            (torch.distributed.checkpoint, DCP); .metadata is DCP's index of the shards
        trainer_state.json   step, stream position, config, world size, global batch, pixel bounds used
        prompt_format.json   the prompt format the run asks in (prompt.py), every field
        manifest.json        every file's size and sha256; written last (fsync, then rename)
      export_0000100/        a from_pretrained directory: config, safetensors in the starting checkpoint's
                             dtype, the starting checkpoint's tokenizer, preprocessor and generation configs,
                             and prompt_format.json (what evaluate.py and reward_model.py ask it in)
      metrics.jsonl
      .lock                  flock held by rank 0 of the live run

No rank ever holds the full optimiser state: each reads and writes its own shards, and DCP reshards when the
number of ranks changes. DCP's `.metadata` is a pickle (its format, not ours); it is read only from the run's
own out_dir, and only after its sha256 matched the manifest. Weights handed to others (exports) are safetensors.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models import families

STEP_DIR = re.compile(r"step_(\d{7})")
# Config fields that do not change what is trained: how long, where, how often to evaluate or save, and how
# the global batch is split over ranks and micro-batches (the stream and the sampling seeds are global), and
# which speed-ups compute it (fast/: the same numbers up to rounding).
NOT_TRAINING = {"out_dir", "steps", "eval_every", "eval_pairs", "eval_data", "eval_images", "save_every",
                "keep_last", "export_every", "allow_config_change", "activation_checkpointing", "micro_pairs",
                "pairs_per_rank", "decode", "shared_prompt", "listener_from_reference", "report_to", "wandb_project",
                "prompt_format"}  # the file's name: its contents, the format, are compared (infra/trainer.open_run)


def step_dir(out: Path, step: int) -> Path:
    return out / f"step_{step:07d}"


def export_dir(out: Path, step: int) -> Path:
    return out / f"export_{step:07d}"


# ----------------------------------------------------------------------------------------------------------
# The run directory: one live run, visible to every rank


def lock(out: Path):
    """Rank 0: hold an flock on out_dir/.lock for the life of the process, or raise naming the holder.

    The kernel drops an flock when its process dies, so a lock left by a killed run is taken over.
    """
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RuntimeError(f"{out} is in use by a live run ({holder}); stop it first or pick another --out_dir")
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def check_shared(out: Path, rank: int, world: int) -> None:
    """Every rank must see the files rank 0 writes in out_dir (checkpoints are written and read by all)."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = out / f".shared_{token[0]}"
    if rank == 0:
        write_synced(probe, token[0].encode())
    dist.barrier()
    sees = probe.exists() and probe.read_bytes() == token[0].encode()
    unseen = [None] * world
    dist.all_gather_object(unseen, None if sees else f"rank {rank} on {socket.gethostname()}")
    dist.barrier()
    if rank == 0:
        probe.unlink()
    unseen = [b for b in unseen if b]
    if unseen:
        raise RuntimeError(f"--out_dir={out} is not shared between the nodes: {', '.join(unseen)} cannot see a file "
                           f"rank 0 wrote there; put out_dir on a filesystem every node mounts")


def write_synced(path: Path, data: bytes) -> None:
    """Write through a temporary name, fsync, rename: the file is complete or absent."""
    tmp = path.with_name(f".tmp_{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Save and load: every rank its own shards


def save(out: Path, step: int, policy, optimizer, trainer_state: dict, keep_last: int,
         files: dict[str, bytes] | None = None) -> Path:
    """Write step_{step}/ collectively: DCP shards by every rank, then trainer_state.json and `files` (name ->
    contents: prompt_format.json), then the manifest, which lists them all.

    Each rank hashes the files it wrote; rank 0 writes the manifest last and renames the directory into place.
    An older directory of the same name (a damaged checkpoint the run fell back from: `pick` takes the newest
    good one, so every newer step_* is damaged) is renamed `*.damaged`. A failed save (a full disk: "no space
    left on device") raises on every rank, naming the checkpoint; the partial `.tmp_step_*` is never picked.
    """
    rank = dist.get_rank()
    final = step_dir(out, step)
    tmp = out / f".tmp_{final.name}"
    on_rank0(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)), final, tmp)
    model_sd, optim_sd = get_state_dict(policy, optimizer)  # this rank's shards (DTensors), fp32
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        mine = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.glob(f"__{rank}_*"))}
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises a rank's failure on every rank
        raise save_error(e, final, tmp) from e
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, mine)

    def finish():  # rank 0: trainer_state.json, the manifest (last), the rename, the old checkpoints removed
        write_synced(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1).encode())
        for name, contents in (files or {}).items():
            write_synced(tmp / name, contents)
        listed = {k: v for f in shards for k, v in f.items()}
        listed.update({name: {"size": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
                       for name in (".metadata", "trainer_state.json", *(files or {}))})
        manifest = {"step": step, "files": dict(sorted(listed.items()))}
        write_synced(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        if final.exists():
            shutil.rmtree(final.with_name(final.name + ".damaged"), ignore_errors=True)
            os.replace(final, final.with_name(final.name + ".damaged"))
        os.replace(tmp, final)  # atomic: a step_* directory is complete, or absent, or damaged later
        sync_dir(out)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    on_rank0(finish, final, tmp)
    return final


# A full disk does not always say so: torch's zip writer reports a short write as "unexpected pos 704 vs 598".
# So a failed save also asks the filesystem: this little space left counts as full.
FULL_BYTES = 64 << 20


def _errors(error: BaseException):
    """`error`, its causes and contexts, and each rank's failure inside DCP's CheckpointException."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]


def save_error(error: BaseException, final: Path, tmp: Path) -> Exception:
    """The error a failed save raises: it names the checkpoint and, when the disk is full, says so."""
    first = next((str(e).strip().splitlines()[-1] for e in _errors(error) if str(e).strip()), type(error).__name__)
    cause = f"{type(error).__name__}: {first}"
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _errors(error)) or \
            (free is not None and free < FULL_BYTES):
        return OSError(errno.ENOSPC, f"saving checkpoint {final} failed: no space left on device ({free} bytes free "
                                     f"on the filesystem of {tmp.parent}; {cause}). The partial {tmp.name} is never "
                                     f"resumed from, and the next save removes it: free space (or lower --keep_last) "
                                     f"and restart, and the run resumes from its newest complete checkpoint")
    return RuntimeError(f"saving checkpoint {final} (written first to {tmp}) failed: {cause}")


def on_rank0(fn, final: Path, tmp: Path) -> None:
    """Run `fn` on rank 0; if it fails, every rank raises its error (no rank waits for one that has stopped)."""
    message, cause = [None], None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # OSError, RuntimeError, safetensors' SafetensorError: all raised on every rank
            error, cause = save_error(e, final, tmp), e
            message = [(type(error), error.args)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        kind, args = message[0]
        raise kind(*args) from cause


def load(path: Path, policy, optimizer) -> dict:
    """Read step_*/ into the (sharded) policy and optimiser, each rank its own shards; return trainer_state."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "trainer_state.json").read_text())


def checkpoints(out: Path) -> list[Path]:
    """The step_NNNNNNN directories, oldest first; other names (step_notes.txt, *.damaged, .tmp_*) are ignored."""
    return sorted(p for p in out.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())


def problem(path: Path, rank: int, world: int) -> str | None:
    """What is wrong with checkpoint `path` as this rank sees it, or None.

    The manifest must list every shard, the shards' index `.metadata` (a pickle, unpickled on load: so it is
    trusted only once its sha256 matched) and trainer_state.json; every rank checks that each listed file exists
    with its manifest size, and the sha256 sums are split over ranks. The step in the directory's name, in the
    manifest and in trainer_state.json must agree: a directory that says another step would be resumed as it
    (and its steps redone over good checkpoints).
    """
    manifest = read_manifest(path)
    if isinstance(manifest, str):
        return manifest
    files = sorted(manifest["files"].items())
    for name, why in ((".metadata", "the shards' index, a pickle: it is read only once its sha256 matched"),
                      ("trainer_state.json", "the step and data position to resume")):
        if name not in manifest["files"]:
            return f"manifest.json does not list {name} ({why})"
    if not any(name.endswith(".distcp") for name, _ in files):
        return "manifest.json lists no shards (*.distcp)"
    unlisted = sorted(p.name for p in path.glob("*.distcp") if p.name not in manifest["files"])
    if unlisted:
        return f"{unlisted[0]} is in the directory but not in manifest.json"
    for i, (name, entry) in enumerate(files):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
        if i % world == rank and sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in manifest.json"
    return step_problem(path, manifest)


def read_manifest(path: Path) -> dict | str:
    """manifest.json as {"step", "files": {name: {"size", "sha256"}}}, or what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest.json (an interrupted save, or not a checkpoint)"
    except (ValueError, OSError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; JSON nested too deep
        return f"manifest.json unreadable ({e})"
    shape = 'expected {"step": N, "files": {name: {"size": bytes, "sha256": hex}}}'
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"manifest.json has the wrong shape ({shape}, got {json.dumps(manifest)[:60]})"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not _count(entry.get("size")) or not isinstance(entry.get("sha256"), str):
            return f"manifest.json: the entry of {name!r} has the wrong shape ({shape}, got {json.dumps(entry)[:60]})"
        if name != Path(name).name or name in ("", ".", ".."):
            return f"manifest.json names {name!r}, which is not a file of the checkpoint directory"
    return manifest


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def step_problem(path: Path, manifest: dict) -> str | None:
    """The directory's name, the manifest and trainer_state.json must name the same step."""
    match = STEP_DIR.fullmatch(path.name)
    step = int(match.group(1)) if match else None
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (ValueError, OSError, RecursionError) as e:
        return f"trainer_state.json unreadable ({e})"
    saved = state.get("step") if isinstance(state, dict) else None
    if not _count(saved):
        return f"trainer_state.json has no step (expected {{\"step\": N, ...}}, got {json.dumps(state)[:60]})"
    if manifest.get("step") != saved:
        return f"trainer_state.json says step {saved}, manifest.json step {manifest.get('step')!r}"
    if step is not None and saved != step:
        return (f"trainer_state.json says step {saved}, the directory's name step {step}: resuming it would redo "
                f"steps over good checkpoints")
    return None


def pick(out: Path, rank: int, world: int) -> Path | None:
    """The newest checkpoint every rank can read, chosen by rank 0 and checked by all; damaged ones are reported
    and skipped. None when out_dir has no checkpoint; an error when it has some and none is usable."""
    names = [[p.name for p in checkpoints(out)] if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    damaged = []
    for name in reversed(names[0]):
        seen = [None] * world
        dist.all_gather_object(seen, problem(out / name, rank, world))
        bad = [f"rank {r}: {p}" for r, p in enumerate(seen) if p]
        if not bad:
            return out / name
        damaged.append(f"{out / name}: {'; '.join(bad)}")
        if rank == 0:
            print(f"warning: checkpoint {out / name} is damaged ({'; '.join(bad)}); trying the previous one", flush=True)
    if damaged:
        raise RuntimeError(f"no usable checkpoint in {out}:\n  " + "\n  ".join(damaged) +
                           "\nmove them away to start this run afresh")
    return None


def config_differences(saved: dict, saved_world: int, current: dict, world: int, defaults: dict,
                       unread: Sequence[str] = ()) -> list[str]:
    """Fields that change training and differ between a checkpoint's run and this one (global batch included).
    An option newer than the checkpoint counts only when it is set to other than its default; `unread` are the
    options the run's mode never reads (train.py's UNREAD: --group_size in SFT)."""
    ignored = NOT_TRAINING | set(unread)
    diffs = [f"--{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
             if k not in ignored and k in saved and saved[k] != v]
    diffs += [f"--{k}: not an option when the checkpoint was written; now {current[k]!r}" for k in current
              if k not in saved and k not in ignored and current[k] != defaults.get(k)]
    before, after = saved["pairs_per_rank"] * saved_world, current["pairs_per_rank"] * world
    if before != after:
        diffs.append(f"global batch (pairs_per_rank x world size): {saved['pairs_per_rank']} x {saved_world} = "
                     f"{before} -> {current['pairs_per_rank']} x {world} = {after}")
    return diffs


# ----------------------------------------------------------------------------------------------------------
# Exports: what evaluate.py and from_pretrained read


WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.safetensors\.index\.json$|config\.json$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def start_dtype(start: str) -> torch.dtype:
    """The dtype the starting checkpoint stores its weights in (its config's dtype); the toy is fp32."""
    if start == "toy":
        return torch.float32
    config = json.loads((Path(start) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def export(final: Path, policy, processor, start: str, shard_bytes: int = 5 << 30,
           files: dict[str, bytes] | None = None) -> Path:
    """A from_pretrained directory of the policy, collectively: each weight gathered in turn and cast to the
    starting checkpoint's dtype on rank 0 (its host holds the bf16 model, 16 GB at 7B, not the fp32 one).

    The tokenizer, preprocessor_config.json and generation_config.json are the starting checkpoint's files,
    copied unchanged (a run's --max_pixels is recorded in trainer_state.json, not here); `files` (name ->
    contents: this run's prompt_format.json) are written last, over a starting checkpoint's file of that name.
    """
    rank, dtype = dist.get_rank(), start_dtype(start)
    weights = {}
    for name, value in policy.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # collective
        if rank == 0:
            weights[name.replace("_checkpoint_wrapped_module.", "")] = value.detach().to("cpu", dtype).clone()
    tmp = final.with_name(f".tmp_{final.name}")

    def write():  # rank 0
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = policy.config
        config.architectures = [families.family_of(config).model_class]
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        save_weights(weights, tmp, shard_bytes)
        if start == "toy":
            processor.save_pretrained(str(tmp))
        else:
            for f in sorted(Path(start).iterdir()):
                if f.is_file() and not WEIGHTS.fullmatch(f.name) and f.name != "trainer_state.json":
                    shutil.copy2(f, tmp / f.name)
        for name, contents in (files or {}).items():
            (tmp / name).write_bytes(contents)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sync_dir(final.parent)

    on_rank0(write, final, tmp)  # a failure (a full disk) raises on every rank, naming the export
    return final


def save_weights(weights: dict[str, torch.Tensor], path: Path, shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than shard_bytes (as published)."""
    from safetensors.torch import save_file
    shards, size = [{}], 0
    for name, t in weights.items():
        if size and size + t.nbytes > shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + t.nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
    total = sum(t.nbytes for t in weights.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": index}, indent=1))


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: Path, warn: bool = True) -> list[tuple[str, int]]:
    """(line, step) of each row of metrics.jsonl. A bad last line (a kill mid-write: cut JSON, a cut UTF-8
    character) is dropped, with a warning if `warn`; any other line that is not a JSON object with an integer
    "step" raises, naming the file and the line: it is not ours to throw away."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows = []
    for i, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            why = f"is not UTF-8 text (byte {e.start})"
        else:
            why = _row_problem(line)
        if why is None:
            rows.append((line, json.loads(line)["step"]))
        elif i == len(lines) - 1:
            if warn:
                print(f"warning: {path}: dropping a partial last line {i + 1} ({raw[:60]!r})", flush=True)
        else:
            raise ValueError(f"{path}: line {i + 1} {why}: {raw[:80]!r}")
    return rows


def _row_problem(line: str) -> str | None:
    try:
        row = json.loads(line)
    except ValueError:
        return "is not JSON"
    except RecursionError:
        return "is JSON nested too deep to read"
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        return 'is not a metrics row (a JSON object with an integer "step")'
    return None


def open_metrics(path: Path, step: int):
    """The JSONL metrics file, for appending after `step`. Rows of steps a resumed run will redo are dropped,
    and so is a partial last line (a kill mid-write), with a warning; the file is rewritten atomically."""
    if path.exists():
        rows = [line for line, row_step in read_metrics(path) if row_step <= step]
        write_synced(path, "".join(line + "\n" for line in rows).encode())
    return open(path, "a")
