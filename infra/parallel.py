"""Processes, devices and FSDP2: the one place that knows about torchrun and how the models are sharded.

`setup_distributed` joins torchrun's process group (or makes a group of one for a plain `python train.py`);
everything else asks for `rank`/`world_size`, and only rank 0 prints (`log`). `load_model` reads a checkpoint
on rank 0 only; `shard` applies FSDP2's `fully_shard` block by block, bottom-up, root last (as torchtitan's
parallelize.py does), with bf16 compute and fp32 gradient reduction under `--precision=bf16`, and broadcasts
rank 0's weights into every rank's shards. `gathered` holds a sharded model's full weights for a whole rollout.

Precision: "bf16" is the GPU's path (FSDP2 mixed precision: fp32 weights and optimiser state, bf16 forward and
backward, fp32 gradient reduction; frozen models held in bf16), "fp32" computes in fp32 throughout. "auto", the
default, is bf16 on a GPU and fp32 on the CPU; bf16 on the CPU runs exactly the GPU's path (tests/ do).
"""
from __future__ import annotations

import contextlib
import os
import socket
import weakref

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from models import families
from toy import world


# ----------------------------------------------------------------------------------------------------------
# Processes and devices: the one place that knows about torchrun.


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); a plain `python train.py` is a group of one."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def leave_group() -> None:
    """Close the process group once every rank is done with it (evaluate.py, reward_model.py: their `main` also
    runs inside other programs, which go on)."""
    dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a training process once every rank is done: a barrier, the atexit handlers (trackers' last writes), then
    os._exit, without tearing the process group down. The teardown at exit ended about one finished two-process
    run in ten with SIGABRT ("terminate called without an active exception"), destroy_process_group or not."""
    import atexit
    import sys
    dist.barrier()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def log(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# Models


PRECISIONS = ("auto", "bf16", "fp32")  # the choices of --precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision as it applies on `device`: "auto" is bf16 on a GPU, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype forwards run in: bf16 or fp32 (`precision` resolved)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(path: str, trainable: bool, precision: str, weights: bool = True):
    """A checkpoint directory (or "toy") -> its model in host memory (rank 0) or on the meta device (the other
    ranks); `shard` puts it on the device.

    Trainable weights load in fp32 (the optimiser's master copy; FSDP2 computes in bf16 under bf16 precision);
    frozen ones load in the precision's dtype. Only rank 0 reads the checkpoint (models/families.py: safetensors,
    no remote code): the other ranks build the model on the meta device, and `shard` broadcasts rank 0's weights
    into their shards (one copy of the checkpoint in host memory per node, not one per process). `weights=False`
    builds it on the meta device on every rank, from config.json alone (infra/rehearsal.py).
    """
    dtype = torch.float32 if trainable else compute_dtype(precision)
    meta = dist.get_rank() != 0 or not weights
    if path == "toy":
        with torch.device("meta") if meta else contextlib.nullcontext():
            return world.make_model(seed=0).to(dtype).train(trainable).requires_grad_(trainable)
    return families.load(path, dtype, meta=meta, weights=weights).train(trainable).requires_grad_(trainable)


def load_replica(path: str, dtype: torch.dtype, device: torch.device, shared: bool = True):
    """A checkpoint's whole model on this process's `device`, in eval mode (evaluation: each process holds a
    replica). `shared`: every process of the group calls this; rank 0 reads the checkpoint and the others receive
    its weights, tensor by tensor: one copy of the model in host memory per node, not one per process (eight of
    16.6 GB at once for a 7B model on an 8-GPU node). Not `shared` (one caller, such as the reward model's Python
    API), or in a group of one, this process reads it alone."""
    if not shared or not dist.is_initialized() or dist.get_world_size() == 1:
        return families.load(path, dtype).to(device).eval()
    model = families.load(path, dtype, meta=dist.get_rank() != 0)
    model = model.to(device) if dist.get_rank() == 0 else model.to_empty(device=device)
    for tensor in list(model.state_dict().values()) + list(model.buffers()):  # buffers: rotary inv_freq too
        dist.broadcast(tensor, src=0)
    return model.eval()


def checkpoint_blocks(model) -> None:
    """Activation checkpointing: each vision block and decoder layer keeps only its input for the backward
    pass and recomputes the rest (memory for compute; needed for 7B with G=10, see README)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    vision, decoder = families.blocks(model)
    wrapped = {id(b) for b in vision + decoder}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in wrapped)


def shard(model, device: torch.device, checkpointing: bool = False, precision: str = "fp32"):
    """FSDP2, torchtitan style: each vision block, the vision tower, each decoder layer, the LM head, then the root.

    A trainable model keeps its root (the embedding) and its LM head gathered from its forward to the end of its
    backward, which needs them again at once; a frozen one (the reference, the listener) has no backward, and
    gathers them for each forward only. The LM head is a unit of its own in a frozen model, so that the chunks of
    `grpo.token_logprobs` can call it after the forward; a trainable model's stays in the root, gathered then
    (with tied embeddings the two are one weight, and one unit). Ranks that built the model on the meta device
    (`load_model`) receive rank 0's weights, shard by shard; when rank 0 has none either (a rehearsal), the
    weights stay uninitialised.
    """
    trainable = any(p.requires_grad for p in model.parameters())
    meta = any(p.is_meta for p in model.parameters())  # this rank has no weights
    on_meta, weights = all_sum(torch.tensor([int(meta), int(dist.get_rank() == 0 and not meta)], device=device))
    broadcast = bool(on_meta > 0 and weights > 0)  # some ranks have none, and rank 0 has them to send
    full = model.state_dict() if broadcast and dist.get_rank() == 0 else {}  # rank 0's full weights
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    kw = {"mp_policy": mp} if mp is not None else {}
    if checkpointing:
        checkpoint_blocks(model)
    vision, decoder = families.blocks(model)
    for block in vision:
        _fully_shard(block, True, **kw)
    _fully_shard(model.model.visual, True, **kw)
    for layer in decoder:
        _fully_shard(layer, True, **kw)
    if not trainable:
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        _fully_shard([model.get_input_embeddings(), model.lm_head] if tied else model.lm_head, True, **kw)
    _fully_shard(model, not trainable, **kw)
    if meta:
        model.to_empty(device=device)
    elif device.type != "cpu":
        model.to(device)
    if broadcast:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # not in the state dict (rotary inv_freq): rank 0's are the computed ones
            dist.broadcast(buffer, src=0)
    return model


RESHARD_AFTER_FORWARD: "weakref.WeakKeyDictionary[FSDPModule, bool]" = weakref.WeakKeyDictionary()


def _fully_shard(modules, reshard_after_forward: bool, **kw) -> None:
    """`fully_shard`, remembering the unit's reshard_after_forward for `gathered` to put back."""
    fully_shard(modules, reshard_after_forward=reshard_after_forward, **kw)
    for module in modules if isinstance(modules, list) else [modules]:
        RESHARD_AFTER_FORWARD[module] = reshard_after_forward


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def gathered(model):
    """Inside this context every FSDP2 module of `model` holds its full weights; plain modules pass through.

    Without it, an FSDP2 model all-gathers each block's weights at every forward, i.e. at every decode step.
    Here each block is unsharded once on entry (a collective: every rank enters together) and resharded on
    exit; meanwhile `reshard_after_forward` is off, so forwards keep the full weights and ranks need not run
    the same number of decode steps. On exit the setting `shard` gave is put back (FSDP2's default for a module
    `shard` did not shard: the root's weights kept, the others' freed). Nested use is a no-op (the outer context
    owns the gather).
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    if not fsdp_modules or not any(isinstance(p, DTensor) for p in model.parameters()):
        yield model  # not sharded, or already gathered by an enclosing `gathered`
        return
    try:
        for m in reversed(fsdp_modules):  # bottom-up: blocks first, root last (the order `fully_shard` ran)
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(RESHARD_AFTER_FORWARD.get(m, m is not fsdp_modules[0]), recurse=False)
